"""The checkpoint store: one root folder of runs, each holding one checkpoint per stage.

    <root>/<run>/<stage>/                     a Hugging Face model folder (from_pretrained loads it) + manifest.json
    <root>/<run>/.history/<stage>-<uid>/      a checkpoint replaced by a newer one, kept whole until removed by hand

A checkpoint is written into a hidden temporary folder beside its final place and renamed there only
when complete, so a reader never sees half a checkpoint. The manifest makes it describe itself: stage,
base model, parent checkpoints (ids and the uids they had), resolved config, data fingerprint, metrics,
time and status. A checkpoint is stale when a parent was replaced or removed since: stale() says why.
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json
import os
import re
import shutil
import tempfile
import uuid
from pathlib import Path

MANIFEST = "manifest.json"
HISTORY = ".history"
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
        _swap_in(tmp, final, history=final.parent / HISTORY)  # what a retraining replaces stays inspectable
        return Checkpoint(final, manifest)

    def get(self, run: str, stage: str) -> Checkpoint:
        path = self.path(run, stage)
        _recover(path, history=path.parent / HISTORY)
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
            _recover(old.parent / _replaced_name(old), history=old.parent / HISTORY)
        found = []
        for m in sorted(self.root.glob(f"*/*/{MANIFEST}")):
            try:
                found.append(load_checkpoint(m.parent))
            except (OSError, json.JSONDecodeError):  # unreadable: `store verify` reports it
                continue
        found = [c for c in found if not c.path.parent.name.startswith(".") and not c.path.name.startswith(".")]
        return sorted(found, key=lambda c: (c.manifest.get("run", ""), c.manifest.get("created", "")))

    def stale(self, checkpoint: Checkpoint, _seen: frozenset = frozenset()) -> str | None:
        """Why checkpoint no longer follows from what the store holds, or None: a parent (by id) was replaced
        (another uid than the one recorded), removed, or is itself stale. Manifests written before parent_uids
        was recorded cannot be checked and count as fresh."""
        recorded, me = checkpoint.manifest.get("parent_uids"), checkpoint.manifest.get("id")
        if recorded is None or me in _seen:  # nothing to compare; a cycle only a hand edit makes
            return None
        for parent_id, uid in zip(checkpoint.manifest.get("parents") or [], recorded):
            run, _, stage = parent_id.partition("/")
            try:
                parent = self.get(run, stage)
            except StoreError:
                return f"parent {parent_id} is missing"
            except (OSError, json.JSONDecodeError):
                return f"parent {parent_id} has an unreadable {MANIFEST}"
            if parent.manifest.get("uid") != uid:
                return f"parent {parent_id} was replaced (uid {uid} -> {parent.manifest.get('uid')})"
            if reason := self.stale(parent, _seen | {me}):
                return f"parent {parent_id} is stale: {reason}"
        return None

    def require_fresh(self, *inputs: Checkpoint, allow_stale: bool = False) -> None:
        """A stage's inputs must not be stale: what it builds would claim a lineage that no longer exists.
        StoreError (one line: which, why, what to do) unless allow_stale, which only warns."""
        for checkpoint in inputs:
            if not (reason := self.stale(checkpoint)):
                continue
            if allow_stale:
                print(f"warning: {checkpoint.id} is stale ({reason}); using it as it is (allow_stale=true)")
                continue
            raise StoreError(f"{checkpoint.id} is stale: {reason}; run `make {checkpoint.manifest.get('stage')}` again "
                             "(same MODEL/RUN) to rebuild it on its current parents, or set allow_stale=true to use it "
                             "as it is")

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
            if "id" in manifest and (reason := self.stale(Checkpoint(folder, manifest))):
                problems.append(f"{label}: stale: {reason}")
        return problems


WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "adapter_model.safetensors")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _swap_in(tmp: Path, final: Path, history: Path | None = None) -> None:
    """Flushes tmp to disk and renames it to final. An earlier final is moved aside first, and after the swap
    into history (None: deleted); a crash between the renames leaves it as .old-<name>-*, which _recover()
    puts back (no new final yet) or retires as this would have (new final in place)."""
    _fsync_tree(tmp)
    old = None
    if final.exists():
        old = final.parent / f".old-{final.name}-{uuid.uuid4().hex[:8]}"
        os.rename(final, old)
    os.rename(tmp, final)
    _fsync_dir(final.parent)
    if old is not None:
        _retire(old, history)


def _recover(final: Path, history: Path | None = None) -> None:
    """If a crash interrupted _swap_in after moving the old version aside, put it back; retire leftover copies."""
    olds = sorted(final.parent.glob(f".old-{final.name}-*")) if final.parent.is_dir() else []
    for old in olds:
        if not final.exists():
            os.rename(old, final)
        else:
            _retire(old, history)


def _retire(old: Path, history: Path | None) -> None:
    """A replaced .old-<name>-<suffix> folder -> history/<name>-<uid>/ (one rename: never half there), or deleted."""
    if history is None:
        shutil.rmtree(old, ignore_errors=True)
        return
    try:
        uid = json.loads((old / MANIFEST).read_text()).get("uid")
    except (OSError, json.JSONDecodeError, AttributeError):
        uid = None
    kept = history / f"{_replaced_name(old)}-{uid or old.name.rsplit('-', 1)[1]}"
    if kept.exists():  # a copy of what history already holds
        shutil.rmtree(old, ignore_errors=True)
        return
    history.mkdir(exist_ok=True)
    try:
        os.rename(old, kept)
    except FileNotFoundError:  # a concurrent reader's _recover() retired it first
        return
    _fsync_dir(history)
    _fsync_dir(old.parent)


def _replaced_name(old: Path) -> str:
    """.old-<name>-<hex suffix> -> <name>; names may hold '-', the suffix does not."""
    return old.name[len(".old-"):].rsplit("-", 1)[0]


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
