"""The resumable state of an RL stage: weights, optimizer (under ZeRO each process its shard, with the fp32 master
copy) and every process's RNG through accelerator.save_state, the prompt order, and the loop's RLState."""

from __future__ import annotations

import dataclasses
import json
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
        torch.save(order.get_state(), folder / "order.pt")
        (folder / "state.json").write_text(json.dumps(dataclasses.asdict(state)))
        store.commit_state(folder, run, stage)
    accelerator.wait_for_everyone()


def load(folder: Path, accelerator, order: torch.Generator) -> RLState:
    accelerator.load_state(str(folder / "accelerate"), load_kwargs={"weights_only": True})
    order.set_state(torch.load(folder / "order.pt", weights_only=True))
    return RLState(**json.loads((folder / "state.json").read_text()))


def resumed(store: Store, run: str, stage: str, cfg, fresh: RLState, accelerator,
            order: torch.Generator) -> RLState | None:
    """The state an interrupted run of the same config (its number of steps aside) left, loaded (weights,
    optimizer, RNGs, prompt order), or None to start from fresh; with resume=false a saved state is removed."""
    saved = store.load_state_path(run, stage) if cfg.resume else None
    if not cfg.resume and accelerator.is_main_process and store.load_state_path(run, stage):
        print(f"[{stage}] resume=false: removing the resumable state in {store.state_path(run, stage)}")
        store.clear_state(run, stage)
    if not saved:
        return None
    resume.check_same_config(json.loads((saved / "state.json").read_text())["config"], fresh.config, saved,
                             ignore=(f"{stage}.steps",))
    state = dataclasses.replace(load(saved, accelerator, order), config=fresh.config)
    print(f"[{stage}] resuming after step {state.step} from {saved}")
    return state
