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
    kept for the guard (guard_collapse) in the run's folder: written whole by the main process (under
    ZeRO-3 gathered by all of them) and renamed into place, so a kill leaves the previous ones."""
    from safetensors.torch import save_file

    weights = accelerator.get_state_dict(model)  # every process: under ZeRO-3 a collective
    trained = {name for name, p in accelerator.unwrap_model(model).named_parameters() if p.requires_grad}
    if accelerator.is_main_process:  # what training changes only (with LoRA the adapters)
        folder = store.run_dir(run) / HEALTHY.format(stage=stage)
        tmp = folder.with_name(folder.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        save_file({k: v.detach().contiguous().clone() for k, v in weights.items() if k in trained},
                  tmp / "model.safetensors")
        (tmp / "step.json").write_text(json.dumps({"step": step}))
        shutil.rmtree(folder, ignore_errors=True)
        tmp.rename(folder)
    accelerator.wait_for_everyone()


def restore_healthy(store: Store, run: str, stage: str, accelerator, model) -> int:
    """The kept healthy weights back into the trained model (every process reads them from the shared store; under
    ZeRO-3 the main process's copy reaches the shards); -> the step they were kept at."""
    from safetensors.torch import load_file

    folder = store.run_dir(run) / HEALTHY.format(stage=stage)
    weights = load_file(folder / "model.safetensors")
    parameters = {n: p for n, p in accelerator.unwrap_model(model).named_parameters() if n in weights}
    with torch.no_grad(), distributed.gathered(list(parameters.values()), modifier_rank=0):
        for name, parameter in parameters.items():
            parameter.copy_(weights[name].to(parameter.dtype))
    accelerator.wait_for_everyone()
    return json.loads((folder / "step.json").read_text())["step"]


def clear_healthy(store: Store, run: str, stage: str) -> None:
    shutil.rmtree(store.run_dir(run) / HEALTHY.format(stage=stage), ignore_errors=True)
