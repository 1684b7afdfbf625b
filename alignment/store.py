"""The checkpoint store: one root folder of runs, each holding one checkpoint per stage.

    <root>/<run>/<stage>/            a Hugging Face model folder (from_pretrained loads it) + manifest.json

A checkpoint is written into a hidden temporary folder beside its final place and renamed there only
when complete, so a reader never sees half a checkpoint. The manifest makes it describe itself: stage,
base model, parent checkpoints, resolved config, data fingerprint, metrics, time and status.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import re
import shutil
import tempfile
import uuid
from pathlib import Path

MANIFEST = "manifest.json"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


class StoreError(LookupError):
    pass


def check_name(kind: str, name: str) -> str:
    """Run and stage names become folder names: no separators, no '..', nothing hidden."""
    if not _NAME.match(name or "") or ".." in name:
        raise StoreError(f"invalid {kind} name {name!r}: use letters, digits, '.', '_' and '-' only")
    return name


@dataclasses.dataclass
class Checkpoint:
    path: Path
    manifest: dict

    @property
    def id(self) -> str:
        return self.manifest["id"]

    @property
    def metrics(self) -> dict:
        return self.manifest.get("metrics", {})

    def summary(self) -> dict:
        m = self.manifest
        keys = ("id", "run", "stage", "model", "parents", "metrics", "created", "status", "uid")
        return {**{k: m.get(k) for k in keys}, "path": str(self.path)}


class Store:
    def __init__(self, root: str | Path):
        self.root = Path(root)

    def path(self, run: str, stage: str) -> Path:
        return self.root / check_name("run", run) / check_name("stage", stage)

    def staging(self, run: str, stage: str) -> Path:
        """A fresh temporary folder to write a checkpoint into before publish()."""
        parent = self.path(run, stage).parent
        parent.mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(prefix=f".tmp-{stage}-", dir=parent))

    def publish(self, tmp: Path, manifest: dict) -> Checkpoint:
        """Writes the manifest into tmp, flushes everything to disk and renames tmp into place."""
        run, stage = manifest["run"], manifest["stage"]
        final = self.path(run, stage)
        manifest = {**manifest, "id": f"{run}/{stage}", "status": "complete", "uid": uuid.uuid4().hex[:12]}
        manifest.setdefault("created", datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="microseconds"))
        with open(tmp / MANIFEST, "w") as f:
            json.dump(manifest, f, indent=2, default=str)
        _fsync_tree(tmp)
        old = None
        if final.exists():  # replacing an earlier checkpoint of this stage: move it aside, then swap
            old = final.parent / f".old-{stage}-{uuid.uuid4().hex[:8]}"
            os.rename(final, old)
        os.rename(tmp, final)
        _fsync_dir(final.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        return Checkpoint(final, manifest)

    def get(self, run: str, stage: str) -> Checkpoint:
        path = self.path(run, stage)
        if not (path / MANIFEST).is_file():
            raise StoreError(
                f"no complete '{stage}' checkpoint for run '{run}' in {self.root}/ "
                f"(run `make {stage}` first, with the same MODEL/RUN)"
            )
        return load_checkpoint(path)

    def list(self) -> list[Checkpoint]:
        if not self.root.is_dir():
            return []
        found = [load_checkpoint(m.parent) for m in sorted(self.root.glob(f"*/*/{MANIFEST}"))]
        found = [c for c in found if not c.path.parent.name.startswith(".") and not c.path.name.startswith(".")]
        return sorted(found, key=lambda c: (c.manifest.get("run", ""), c.manifest.get("created", "")))


def load_checkpoint(path: str | Path) -> Checkpoint:
    path = Path(path)
    with open(path / MANIFEST) as f:
        return Checkpoint(path, json.load(f))


def _fsync_tree(root: Path) -> None:
    for dirpath, _, files in os.walk(root):
        for name in files:
            with open(os.path.join(dirpath, name), "rb") as f:
                os.fsync(f.fileno())
        _fsync_dir(Path(dirpath))


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
