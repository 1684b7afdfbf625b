"""The checkpoint store: one root folder of runs, each holding one checkpoint per stage.

    <root>/<run>/<stage>/            a Hugging Face model folder (from_pretrained loads it) + manifest.json

A checkpoint is written into a hidden temporary folder beside its final place and renamed there only
when complete, so a reader never sees half a checkpoint. The manifest makes it describe itself: stage,
base model, parent checkpoints, resolved config, data fingerprint, metrics, time and status.
"""

from __future__ import annotations

import dataclasses
import hashlib
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

    def run_dir(self, run: str) -> Path:
        """The run's folder, for its logs, report and the trainers' working state."""
        return self.root / check_name("run", run)

    def staging(self, run: str, stage: str) -> Path:
        """A fresh temporary folder to write a checkpoint into before publish()."""
        parent = self.path(run, stage).parent
        parent.mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(prefix=f".tmp-{stage}-", dir=parent))

    def publish(self, tmp: Path, manifest: dict) -> Checkpoint:
        """Writes the manifest (with a sha256 of every file) into tmp, flushes it to disk, renames it into place."""
        run, stage = manifest["run"], manifest["stage"]
        manifest = {**manifest, "id": f"{run}/{stage}", "status": "complete", "uid": uuid.uuid4().hex[:12],
                    "files": {str(f.relative_to(tmp)): _sha256(f) for f in sorted(tmp.rglob("*")) if f.is_file()}}
        manifest.setdefault("created", datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="microseconds"))
        with open(tmp / MANIFEST, "w") as f:
            json.dump(manifest, f, indent=2, default=str)
        final = self.path(run, stage)
        _swap_in(tmp, final)
        return Checkpoint(final, manifest)

    def get(self, run: str, stage: str) -> Checkpoint:
        path = self.path(run, stage)
        _recover(path)
        if not (path / MANIFEST).is_file():
            raise StoreError(
                f"no complete '{stage}' checkpoint for run '{run}' in {self.root}/ "
                f"(run `make {stage}` first, with the same MODEL/RUN)"
            )
        return load_checkpoint(path)

    def list(self) -> list[Checkpoint]:
        if not self.root.is_dir():
            return []
        for old in self.root.glob("*/.old-*"):
            _recover(old.parent / old.name.split("-")[1])
        found = []
        for m in sorted(self.root.glob(f"*/*/{MANIFEST}")):
            try:
                found.append(load_checkpoint(m.parent))
            except (OSError, json.JSONDecodeError):  # unreadable: `store verify` reports it
                continue
        found = [c for c in found if not c.path.parent.name.startswith(".") and not c.path.name.startswith(".")]
        return sorted(found, key=lambda c: (c.manifest.get("run", ""), c.manifest.get("created", "")))

    # ---- resumable training state: <root>/<run>/.state/<stage>/, invisible to list(), same atomic swap ----

    def state_path(self, run: str, stage: str) -> Path:
        return self.root / check_name("run", run) / ".state" / check_name("stage", stage)

    def save_state(self, run: str, stage: str, write) -> Path:
        """write(folder) fills a temporary folder; it replaces the previous state only once complete."""
        tmp = self.state_staging(run, stage)
        write(tmp)
        return self.commit_state(tmp, run, stage)

    def state_staging(self, run: str, stage: str) -> Path:
        """A fresh temporary folder beside the stage's state, to fill (by several processes, each its shard)."""
        final = self.state_path(run, stage)
        final.parent.mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(prefix=f".tmp-{stage}-", dir=final.parent))

    def commit_state(self, tmp: Path, run: str, stage: str) -> Path:
        """Marks a filled staging folder complete and swaps it in for the previous state."""
        final = self.state_path(run, stage)
        (tmp / "COMPLETE").write_text("")
        _swap_in(tmp, final)
        return final

    def load_state_path(self, run: str, stage: str) -> Path | None:
        path = self.state_path(run, stage)
        _recover(path)
        return path if (path / "COMPLETE").is_file() else None

    def clear_state(self, run: str, stage: str) -> None:
        shutil.rmtree(self.state_path(run, stage), ignore_errors=True)

    def verify(self) -> list[str]:
        """Problems with the store, one line each: every checkpoint's manifest, files and hashes."""
        problems = []
        if not self.root.is_dir():
            return [f"{self.root}: no such store"]
        for folder in sorted(p for p in self.root.glob("*/*") if p.is_dir() and not p.name.startswith(".")):
            if folder.name in ("tensorboard", "plots"):
                continue
            label = f"{folder.parent.name}/{folder.name}"
            try:
                with open(folder / MANIFEST) as f:
                    manifest = json.load(f)
            except FileNotFoundError:
                problems.append(f"{label}: no {MANIFEST}")
                continue
            except json.JSONDecodeError as e:
                problems.append(f"{label}: {MANIFEST} does not parse ({e.msg})")
                continue
            if manifest.get("status") != "complete":
                problems.append(f"{label}: status is {manifest.get('status')!r}, not 'complete'")
            for name, digest in manifest.get("files", {}).items():
                path = folder / name
                if not path.is_file():
                    problems.append(f"{label}: {name} is missing")
                elif _sha256(path) != digest:
                    problems.append(f"{label}: {name} does not match its recorded sha256")
            if not manifest.get("files") and not any((folder / f).is_file() for f in WEIGHT_FILES):
                problems.append(f"{label}: no weights ({' or '.join(WEIGHT_FILES)})")
        return problems


WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "adapter_model.safetensors")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _swap_in(tmp: Path, final: Path) -> None:
    """Flushes tmp to disk and renames it to final. An earlier final is moved aside first and deleted after;
    a crash between the two renames leaves it as .old-<name>-*, which _recover() puts back."""
    _fsync_tree(tmp)
    old = None
    if final.exists():
        old = final.parent / f".old-{final.name}-{uuid.uuid4().hex[:8]}"
        os.rename(final, old)
    os.rename(tmp, final)
    _fsync_dir(final.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _recover(final: Path) -> None:
    """If a crash interrupted _swap_in after moving the old version aside, put it back; drop stale copies."""
    olds = sorted(final.parent.glob(f".old-{final.name}-*")) if final.parent.is_dir() else []
    for old in olds:
        if not final.exists():
            os.rename(old, final)
        else:
            shutil.rmtree(old, ignore_errors=True)


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
