"""Data profiles: where each stage's records come from, read and checked with errors that name the record.

A profile maps each stage to its files. `task` is the embedded default (data/task, written by
alignment.task). Records are plain dicts: SFT {prompt, completion}; preferences {prompt, chosen,
rejected}; PPO {prompt}.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from alignment import task

PROFILES = {
    "task": {
        "sft_train": task.DATA_DIR / "sft.jsonl",
        "sft_eval": task.DATA_DIR / "sft_eval.jsonl",
        "prefs_train": task.DATA_DIR / "prefs_train.jsonl",
        "prefs_eval": task.DATA_DIR / "prefs_eval.jsonl",
        "prompts_train": task.DATA_DIR / "prompts_train.jsonl",
        "prompts_eval": task.DATA_DIR / "prompts_eval.jsonl",
    },
}
FIELDS = {
    "sft_train": ("prompt", "completion"),
    "sft_eval": ("prompt", "completion"),
    "prefs_train": ("prompt", "chosen", "rejected"),
    "prefs_eval": ("prompt", "chosen", "rejected"),
    "prompts_train": ("prompt",),
    "prompts_eval": ("prompt",),
}


class DataError(ValueError):
    pass


def task_file(split: str) -> Path:
    return task.DATA_DIR / f"{split}.jsonl"


def read_jsonl(path: str | Path) -> list[dict]:
    records = []
    with open(path) as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
            if not isinstance(record, dict):
                raise DataError(f"{path}:{lineno}: expected a JSON object, got {type(record).__name__}")
            record["_line"] = lineno
            records.append(record)
    return records


def load(profile: str, split: str, limit: int = 0) -> list[dict]:
    """The records of one split (the first `limit` if > 0), each checked to carry its fields as non-empty strings."""
    if profile not in PROFILES:
        raise DataError(f"unknown data profile {profile!r}; known: {', '.join(sorted(PROFILES))}")
    path = PROFILES[profile][split]
    records = read_jsonl(path)
    if limit > 0:
        records = records[:limit]
    for r in records:
        for name in FIELDS[split]:
            value = r.get(name)
            if not isinstance(value, str):
                problem = "is missing" if value is None else f"is a {type(value).__name__}, not a string"
                raise DataError(f"{path}:{r['_line']}: field '{name}' {problem}")
            if not value.strip():
                raise DataError(f"{path}:{r['_line']}: field '{name}' is empty")
        if "chosen" in FIELDS[split] and r["chosen"] == r["rejected"]:
            raise DataError(f"{path}:{r['_line']}: chosen and rejected are identical")
    if not records:
        raise DataError(f"{path}: no records")
    return [{k: v for k, v in r.items() if k != "_line"} for r in records]


def fingerprint(profile: str, splits: list[str]) -> str:
    """sha256 over the bytes of the files a stage read, so a checkpoint says exactly what it saw."""
    h = hashlib.sha256()
    for split in splits:
        h.update(split.encode())
        h.update(Path(PROFILES[profile][split]).read_bytes())
    return h.hexdigest()
