"""Training logs of the stages, kept with their checkpoints and read back by the report.

A trainer's log_history (loss, learning rate, held-out metrics, by step) lives in its working folder, which
the stage deletes once the checkpoint is published. save_log_history keeps it in the checkpoint as
train_log.jsonl. For a checkpoint written before that, read_log_history falls back to the TensorBoard event
files under <run>/tensorboard/<stage>, which every training of the run appends to (see there).
"""

from __future__ import annotations

import json
from pathlib import Path

LOG_FILE = "train_log.jsonl"


def save_log_history(trainer, folder: str | Path) -> Path:
    """trainer.state.log_history, one record a line, into a checkpoint's folder (before it is published, so the
    manifest's file hashes cover it). A resumed run's history holds the steps before the resumption too."""
    path = Path(folder) / LOG_FILE
    with open(path, "w") as f:
        f.writelines(json.dumps(record, default=float) + "\n" for record in trainer.state.log_history)
    return path


def read_log_history(checkpoint, tensorboard_dir: str | Path) -> tuple[list[dict], str]:
    """(a stage's per-step records, where they came from): the <stage>_log.jsonl our own loops keep (PPO, GRPO),
    the trainers' LOG_FILE (SFT, reward model, DPO: log_history's records, {"step", "loss", "eval_loss", ...}),
    else the TensorBoard events; ([], why) when there are none."""
    names = (f"{checkpoint.manifest.get('stage')}_log.jsonl", LOG_FILE)
    for name in names:
        kept = Path(checkpoint.path) / name
        if kept.is_file():
            return [
                json.loads(line) for line in kept.read_text().splitlines() if line.strip()
            ], f"{checkpoint.id}/{name}"
    tensorboard_dir = Path(tensorboard_dir)
    records = _from_tensorboard(tensorboard_dir, checkpoint.manifest.get("created", ""),
                                checkpoint.metrics.get("steps"))
    kept = f"no {' or '.join(names)} in {checkpoint.id}"
    if not records:
        return [], f"{kept}, no TensorBoard events in {tensorboard_dir}"
    return records, f"TensorBoard events in {tensorboard_dir} ({kept})"


def _from_tensorboard(folder: Path, created: str, steps: int | None) -> list[dict]:
    """Scalars of the event files in folder as log_history records ('train/loss' -> 'loss', 'eval/loss' ->
    'eval_loss'). Every training of the run writes its own file there, a resumed one too: a later file's value
    replaces an earlier one's at the same step, files written after the checkpoint was published are left out
    (a training since then, not this checkpoint's), and so are steps past the checkpoint's last."""
    import datetime

    if not folder.is_dir():
        return []
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    published = datetime.datetime.fromisoformat(created).timestamp() if created else float("inf")
    by_step: dict[int, dict] = {}
    for path in sorted(folder.glob("events.out.tfevents.*"), key=_written_at):
        if _written_at(path) > published:
            continue
        events = EventAccumulator(str(path), size_guidance={"scalars": 0})
        events.Reload()
        for tag in events.Tags()["scalars"]:
            section, _, name = tag.partition("/")  # 'train/rewards/margins' -> 'rewards/margins'
            key = f"eval_{name}" if section == "eval" else name or section
            for e in events.Scalars(tag):
                if steps is None or e.step <= steps:
                    by_step.setdefault(e.step, {"step": e.step})[key] = e.value
    return [by_step[s] for s in sorted(by_step)]


def _written_at(path: Path) -> float:
    """An event file's creation time, from its name: events.out.tfevents.<unix seconds>.<host>...."""
    try:
        return float(path.name.split(".")[3])
    except (IndexError, ValueError):
        return path.stat().st_mtime
