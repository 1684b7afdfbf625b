"""Resuming a trainer stage after a kill. SFT, the reward model and DPO run inside TRL's trainers, which save
resumable checkpoints (weights, optimizer, scheduler, RNG states, step; the data position is restored by skipping
batches) into <store>/<run>/.trainer-<stage>/. Their writes are not atomic, so a callback (callbacks.MarkComplete)
marks each checkpoint complete once it is on disk, and only a marked checkpoint is resumed from. A saved state is
resumed only by a run of the same config (the RL stages keep theirs through rl/state.py, checked the same way).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from accelerate import PartialState

COMPLETE = "COMPLETE"


_IGNORED_ON_RESUME = ("threads", "resume", "allow_stale")  # may differ between the killed run and its resumption


def comparable(config: dict, ignore: tuple[str, ...] = ()) -> dict:
    """The config without the keys allowed to change between a run and its resumption."""
    out = {k: v for k, v in config.items() if k not in _IGNORED_ON_RESUME}
    for dotted in ignore:
        section, _, key = dotted.partition(".")
        if isinstance(out.get(section), dict):
            out[section] = {k: v for k, v in out[section].items() if k != key}
    return out


def check_same_config(saved: dict, current: dict, where: Path, ignore: tuple[str, ...] = ()) -> None:
    a, b = comparable(saved, ignore), comparable(current, ignore)
    if a != b:
        diffs = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
        what = "built on other parent checkpoints (one was replaced since)" if diffs == ["parent_uids"] else \
            f"with a different config (differs in: {', '.join(diffs)})"
        raise SystemExit(
            f"{where} holds the state of a run {what}; "
            "run with resume=false (RESUME=0 through make) to start over"
        )


def trainer_resume_point(work_dir: Path, config: dict, resume: bool) -> str | None:
    """The latest complete trainer checkpoint to resume from, or None to start fresh (clearing old state).

    In a multi-process run the main process prepares the folder first; the others only read it after.
    """
    state = PartialState(cpu=not torch.cuda.is_available())
    with state.main_process_first():
        return _resume_point(work_dir, config, resume, may_write=state.is_main_process)


def _resume_point(work_dir: Path, config: dict, resume: bool, may_write: bool) -> str | None:
    marker = work_dir / "stage_config.json"
    if not resume or not marker.is_file() or not latest_complete(work_dir):  # (a run stopped before its first
        # checkpoint leaves nothing to resume: whatever its config, start over)
        if may_write and latest_complete(work_dir):
            print(f"[resume=false] removing the resumable checkpoints in {work_dir}")
        if may_write:
            shutil.rmtree(work_dir, ignore_errors=True)
            work_dir.mkdir(parents=True, exist_ok=True)
            marker.write_text(json.dumps(config, indent=2))
        return None
    check_same_config(json.loads(marker.read_text()), config, work_dir)
    return latest_complete(work_dir)


def latest_complete(work_dir: Path) -> str | None:
    """The trainer's latest checkpoint marked complete, None if there is none."""
    complete = [p for p in work_dir.glob("checkpoint-*") if (p / COMPLETE).is_file()]
    if not complete:
        return None
    return str(max(complete, key=lambda p: int(p.name.split("-")[1])))
