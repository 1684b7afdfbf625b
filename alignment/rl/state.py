"""The resumable state of an RL stage: weights, optimizer (under ZeRO each process its shard, with the fp32 master
copy) and every process's RNG through accelerator.save_state, the prompt order, and the loop's RLState."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import torch

from alignment import distributed, resume
from alignment.rl.types import RLState
from alignment.store import Store


def save(store: Store, run: str, stage: str, accelerator, order: torch.Generator, state: RLState) -> None:
    """Atomic: a killed save leaves the previous state."""
    folder = Path(distributed.shared_folder(accelerator, lambda: store.state_staging(run, stage)))
    accelerator.save_state(str(folder / "accelerate"))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        resume.record_launch(folder)
        torch.save(order.get_state(), folder / "order.pt")
        (folder / "state.json").write_text(json.dumps(dataclasses.asdict(state)))
        store.commit_state(folder, run, stage)
    accelerator.wait_for_everyone()


def load(folder: Path, accelerator, order: torch.Generator, how: str) -> RLState:
    """how: resume.how_to_resume's answer; "universal" loads the universal checkpoint converted from the state."""
    accelerator.load_state(str(folder / (resume.UNIVERSAL if how == "universal" else "accelerate")),
                           load_kwargs={"weights_only": True})
    order.set_state(torch.load(folder / "order.pt", weights_only=True))
    return RLState(**json.loads((folder / "state.json").read_text()))


def check_launch(store: Store, run: str, stage: str, cfg, accelerator) -> str | None:
    """At start-up, before any model loads: how the saved state (if it is to be resumed) resumes on this launch
    (resume.how_to_resume: a launch it cannot resume on stops here, in one line), decided by the main process.
    To resume on another number of processes under DeepSpeed, its engine is told to load a universal checkpoint."""
    def decide():
        saved = store.load_state_path(run, stage) if cfg.resume else None
        return resume.how_to_resume(resume.saved_launch(saved), saved) if saved else None

    how = distributed.main_decides(decide)
    if how == "universal":
        accelerator.state.deepspeed_plugin.deepspeed_config.setdefault("checkpoint", {})["load_universal"] = True
    return how


def resumed(store: Store, run: str, stage: str, cfg, fresh: RLState, accelerator,
            order: torch.Generator, how: str | None = None, per_process: int = 0) -> RLState | None:
    """The state an interrupted run of the same config (its number of steps aside) left, loaded (weights,
    optimizer, RNGs, prompt order), or None to start from fresh; with resume=false a saved state is removed."""
    def decide() -> str | None:  # by the main process alone, for all (distributed.main_decides)
        saved = store.load_state_path(run, stage)
        if saved and not cfg.resume:
            print(f"[{stage}] resume=false: removing the resumable state in {store.state_path(run, stage)}")
            store.clear_state(run, stage)
            return None
        if saved:
            resume.check_same_config(json.loads((saved / "state.json").read_text())["config"], fresh.config, saved,
                                     ignore=(f"{stage}.steps",))
            if how == "universal":  # DeepSpeed's shards of another number of processes: by parameter instead
                resume.to_universal(saved / "accelerate" / "pytorch_model", saved / resume.UNIVERSAL / "pytorch_model")
                for rng in (saved / "accelerate").glob("random_states_*.pkl"):  # (a process without one: seeded)
                    shutil.copy2(rng, saved / resume.UNIVERSAL / rng.name)
        return str(saved) if saved else None

    saved = distributed.main_decides(decide)
    if not saved:
        return None
    saved = Path(saved)
    if line := resume.changed_launch_line(stage, resume.saved_launch(saved), per_process, "episodes"):
        print(line)
    state = dataclasses.replace(load(saved, accelerator, order, how or "same"), config=fresh.config)
    print(f"[{stage}] resuming after step {state.step} from {saved}")
    return state

