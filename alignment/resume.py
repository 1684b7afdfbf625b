"""Resuming a stage after a kill. SFT, the reward model and DPO run inside TRL's trainers, which save
resumable checkpoints (weights, optimizer, scheduler, RNG states, step; the data position is restored by skipping
batches) into <store>/<run>/.trainer-<stage>/. Their writes are not atomic, so a callback (callbacks.MarkComplete)
marks each checkpoint complete once it is on disk, and only a marked checkpoint is resumed from. A saved state is
resumed only by a run of the same config (the RL stages keep theirs through rl/state.py, checked the same way).

A state records the launch that saved it (processes, ZeRO stage: launch.json). An RL state resumes on another number
of processes: without DeepSpeed every process holds the whole optimizer state; under DeepSpeed each holds a shard,
and the state is first converted to DeepSpeed's universal checkpoint (sharded by parameter, not by process), which
any number of processes loads. A trainer's checkpoint resumes on the number of processes that saved it (its data
position counts steps of their batches). Another ZeRO stage, or DeepSpeed on one side only, is refused at start-up
in one line.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from alignment import distributed

COMPLETE = "COMPLETE"
LAUNCH = "launch.json"
UNIVERSAL = "universal"  # a DeepSpeed state's universal checkpoint, beside the per-process one it was converted from


_IGNORED_ON_RESUME = ("threads", "resume", "allow_stale", "store")  # may differ between a run and its resumption
# (a store moved to another folder, or mounted elsewhere, resumes)


def comparable(config: dict, ignore: tuple[str, ...] = ()) -> dict:
    """The config without the keys allowed to change between a run and its resumption."""
    out = {k: v for k, v in config.items() if k not in _IGNORED_ON_RESUME}
    for dotted in ignore:
        section, _, key = dotted.partition(".")
        if isinstance(out.get(section), dict):
            out[section] = {k: v for k, v in out[section].items() if k != key}
    return out


def check_same_config(saved: dict, current: dict, where: Path, ignore: tuple[str, ...] = ()) -> None:
    """Stops in one line when saved (a state's config) differs from current. A key of a section the saved config
    lacks (one a later version added) is not compared: the state was made without it, as its default does."""
    a, b = comparable(saved, ignore), comparable(current, ignore)
    b = {k: {kk: vv for kk, vv in v.items() if kk in a[k]} if isinstance(v, dict) and isinstance(a.get(k), dict)
         else v for k, v in b.items()}
    if a != b:
        diffs = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
        what = "built on other parent checkpoints (one was replaced since)" if diffs == ["parent_uids"] else \
            f"with a different config (differs in: {', '.join(diffs)})"
        raise SystemExit(
            f"{where} holds the state of a run {what}; "
            "run with resume=false (RESUME=0 through make) to start over"
        )


def check_trainer_launch(work_dir: Path, resume: bool, stage: str) -> None:
    """At start-up, before any model loads: a trainer's latest complete checkpoint (if it is to be resumed) resumes
    only on the launch that saved it (one line otherwise). The trainer's data position and learning-rate schedule
    count optimizer steps, whose size is the processes' batches together: on another number of processes it would
    skip or repeat data (the RL stages, whose prompt queue is part of their state, resume on any number)."""
    def decide():
        latest = latest_complete(work_dir) if resume and (work_dir / "stage_config.json").is_file() else None
        saved = saved_launch(Path(latest)) if latest else None
        if saved is None:
            return
        how_to_resume(saved, Path(latest))  # (another ZeRO stage: its own line)
        now = this_launch()
        if saved["processes"] != now["processes"]:
            raise SystemExit(
                f"{latest} was saved by {saved['processes']} process(es) and this launch has {now['processes']}: "
                f"the {stage} stage resumes on the number of processes that saved it (its data position and "
                f"learning-rate schedule count steps of {saved['processes']} processes' batches); launch "
                f"{saved['processes']} (NPROC x NNODES), or run with resume=false (RESUME=0 through make) to start "
                "over")

    distributed.main_decides(decide)


def trainer_resume_point(work_dir: Path, config: dict, resume: bool) -> str | None:
    """The latest complete trainer checkpoint to resume from, or None to start fresh (clearing old state).

    In a multi-process run the main process decides (and prepares the folder) alone, for every process.
    """
    return distributed.main_decides(lambda: _resume_point(work_dir, config, resume, may_write=True))


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


def this_launch() -> dict:
    """The processes and ZeRO stage of this launch, from the launcher's environment (before any process group)."""
    return {"processes": int(os.environ.get("WORLD_SIZE", "1")), "deepspeed_zero_stage": distributed.deepspeed_stage()}


def _described(launch: dict) -> str:
    zero = launch["deepspeed_zero_stage"]
    return f"{launch['processes']} process(es){f' under DeepSpeed ZeRO-{zero}' if zero else ' without DeepSpeed'}"


def how_to_resume(saved: dict | None, where: Path) -> str:
    """How a state saved by the launch `saved` (launch.json, None for a state from before it was recorded) resumes
    on this one: "same" launch, "whole" (no DeepSpeed on either side: any number of processes loads the whole
    optimizer state), "universal" (the same ZeRO stage, another number of processes: converted first); another
    ZeRO stage, or DeepSpeed on one side only, stops with one line."""
    now = this_launch()
    if saved is None or saved == now:
        return "same"
    if not saved["deepspeed_zero_stage"] and not now["deepspeed_zero_stage"]:
        return "whole"
    if saved["deepspeed_zero_stage"] == now["deepspeed_zero_stage"]:
        return "universal"
    raise SystemExit(f"{where} was saved by {_described(saved)} and this launch is {_described(now)}: a state resumes "
                     "on any number of processes, but under the ZeRO stage it was saved by; launch with that "
                     "ACCELERATE_CONFIG, or run with resume=false (RESUME=0 through make) to start over")


def record_launch(folder: Path) -> None:
    (folder / LAUNCH).write_text(json.dumps(this_launch()))


def saved_launch(folder: Path) -> dict | None:
    path = folder / LAUNCH
    return json.loads(path.read_text()) if path.is_file() else None


def changed_launch_line(stage: str, saved: dict | None, per_process: int, unit: str) -> str | None:
    """The line a resumption on another number of processes prints: what a step now takes."""
    now = this_launch()
    if saved is None or saved["processes"] == now["processes"]:
        return None
    return (f"[{stage}] resuming a state saved by {saved['processes']} process(es) on {now['processes']}: "
            f"{per_process * now['processes']} {unit} per step instead of {per_process * saved['processes']}, "
            "the data order going on where it stopped")


def to_universal(source: Path, dest: Path) -> None:
    """DeepSpeed's per-process checkpoint folder (one tag: model and optimizer shards of every process) as its
    universal checkpoint in dest, through DeepSpeed's own converter; dest is replaced, so a conversion killed half
    way is done again, one that finished (marked) is kept."""
    if (dest / COMPLETE).is_file():
        return
    shutil.rmtree(dest, ignore_errors=True)
    dest.parent.mkdir(parents=True, exist_ok=True)
    out = subprocess.run([sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", str(source),
                          "--output_folder", str(dest), "--inject_missing_state", "--num_extract_workers", "1",
                          "--num_merge_workers", "1"], capture_output=True, text=True, check=False)
    if out.returncode:
        raise SystemExit(f"{source}: DeepSpeed could not convert it to a universal checkpoint for another number of "
                         f"processes ({(out.stderr.strip().splitlines() or ['no message'])[-1]}); resume with the "
                         "launch it was saved by, or with resume=false (RESUME=0 through make) to start over")
    (dest / COMPLETE).write_text("")
