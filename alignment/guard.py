"""What must not land in a published policy. Non-finite updates: skipped and counted, and the stage stopped after
too many in a row; one rule for the trainer stages (callbacks.NonFiniteGuard) and the RL loop
(rl.steps.optimizer_step). A collapse seen at a held-out point (alignment/health.py), with the guard on
(guard_collapse): the stage stops and publishes the policy of the last healthy point, whose weights it kept."""

from __future__ import annotations

import json
import shutil

import torch

from alignment import distributed
from alignment.store import Store


class NonFiniteError(RuntimeError):
    pass


def grads_finite(parameters) -> bool:
    return all(torch.isfinite(p.grad).all() for p in parameters if p.grad is not None)


def count_skip(counter, what: str, step: int, patience: int, method: str = "", kept: str = "state") -> None:
    """One more update skipped for a non-finite `what` at `step`: counted in counter (its `skipped` and `in_a_row`;
    a success sets in_a_row back to 0); the patience-th in a row stops the stage, the last complete `kept` intact."""
    counter.skipped += 1
    counter.in_a_row += 1
    print(f"[guard] step {step}: non-finite {what}, update skipped ({counter.skipped} so far)")
    if counter.in_a_row >= patience:
        at = f"{method} step" if method else "step"
        raise NonFiniteError(f"stopping at {at} {step}: {counter.in_a_row} updates in a row had a non-finite {what}; "
                             f"the last complete {kept} is kept for resuming")


HEALTHY = ".healthy-{stage}"  # in the run's folder: the policy of the last healthy held-out point (the guard's)


def keep_healthy(store: Store, run: str, stage: str, accelerator, model, step: int) -> None:
    """The trained weights (policy and critic; with LoRA its adapters) of a held-out point that showed no collapse,
    kept for the guard (guard_collapse) in the run's folder: each gathered in turn (under ZeRO-3 every process
    takes part) and copied by the main process alone, which writes them and renames them into place, so a kill
    leaves the previous ones."""
    from safetensors.torch import save_file

    main, weights = accelerator.is_main_process, {}
    for name, parameter in _trained(accelerator, model):
        with distributed.gathered([parameter]):
            if main:
                weights[name] = parameter.detach().to("cpu", copy=True).contiguous()
    if main:
        folder = store.run_dir(run) / HEALTHY.format(stage=stage)
        tmp = folder.with_name(folder.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        save_file(weights, tmp / "model.safetensors")
        (tmp / "step.json").write_text(json.dumps({"step": step}))
        shutil.rmtree(folder, ignore_errors=True)
        tmp.rename(folder)
    accelerator.wait_for_everyone()


def restore_healthy(store: Store, run: str, stage: str, accelerator, model) -> int | None:
    """The kept healthy weights back into the trained model, each parameter in turn: under ZeRO-3 the main process
    reads them and its copy reaches the shards, else every process reads them (from the shared store). -> the step
    they were kept at, or None when none are kept."""
    from safetensors.torch import load_file

    step = healthy_step(store, run, stage)
    if step is None:
        return None
    trained = _trained(accelerator, model)
    partitioned = any(hasattr(p, "ds_id") for _, p in trained)
    folder = store.run_dir(run) / HEALTHY.format(stage=stage)
    weights = load_file(folder / "model.safetensors") if accelerator.is_main_process or not partitioned else {}
    with torch.no_grad():
        for name, parameter in trained:
            with distributed.gathered([parameter], modifier_rank=0):
                if name in weights:
                    parameter.copy_(weights[name].to(parameter.dtype))
    accelerator.wait_for_everyone()
    return step


def publish_healthy(store: Store, run: str, stage: str, accelerator, model, collapsed: dict, kept: str,
                    done: str) -> dict:
    """After a held-out point showed a collapse (`collapsed`: its step and signs), with the guard on: the last
    healthy point's weights back into the model, said in one line. -> the manifest's `guard` entry. Stops the
    stage in one line when none were kept (a run resumed from before the guard was on); `kept` names what is
    left to resume from, `done` what happens to the restored policy."""
    healthy = restore_healthy(store, run, stage, accelerator, model)
    if healthy is None:
        raise SystemExit(f"[{stage}] guard_collapse: the held-out point of step {collapsed['step']} shows a collapse, "
                         f"and no healthy policy was kept to publish instead (a run resumed from before the guard was "
                         f"on); {kept} is kept: rerun with {stage}.guard_collapse=false to go on from it, or with "
                         f"resume=false")
    print(f"[{stage}] guard_collapse: the held-out point of step {collapsed['step']} shows a collapse; training stops, "
          f"and the policy of step {healthy}, the last healthy held-out point, is {done}")
    return {"guard": {"collapsed_at_step": collapsed["step"], "published_step": healthy, "signs": collapsed["signs"]}}


def healthy_step(store: Store, run: str, stage: str) -> int | None:
    """The step whose weights are kept as healthy, None when none are."""
    found = store.run_dir(run) / HEALTHY.format(stage=stage) / "step.json"
    return json.loads(found.read_text())["step"] if found.is_file() else None


def forget_healthy_after(store: Store, run: str, stage: str, step: int, main: bool) -> None:
    """At start: healthy weights kept by a run that went on past step (the one resumed from; 0: a new run) are not
    this run's; the main process removes them."""
    kept = healthy_step(store, run, stage)
    if main and kept is not None and (step == 0 or kept > step):
        clear_healthy(store, run, stage)


def clear_healthy(store: Store, run: str, stage: str) -> None:
    shutil.rmtree(store.run_dir(run) / HEALTHY.format(stage=stage), ignore_errors=True)


def _trained(accelerator, model) -> list:
    """(name, parameter) of what training changes, in order."""
    return [(n, p) for n, p in accelerator.unwrap_model(model).named_parameters() if p.requires_grad]
