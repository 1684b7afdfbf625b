"""Checks that a change of the code's shape left its behaviour alone: a seeded tiny run of every stage, its logs
and manifest metrics written to one JSON file, and two such files compared.

    python bench/same_behaviour.py run OUT.json [--root CHECKOUT] [--python PY]   # the stages of CHECKOUT (.)
    python bench/same_behaviour.py compare BEFORE.json AFTER.json                 # exit 1 on a difference

`run` calls `make sft rm ppo grpo dpo` in CHECKOUT one stage at a time (a stage's keys are its own), with one
thread, fp32 (precision=auto measures, and could choose differently in two runs) and a few steps each, into a
fresh store. What is kept: ppo_log.jsonl, grpo_log.jsonl and every manifest's metrics. `compare` sets aside what
is allowed to differ from one run to the next: timings, memory, dates and ids.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
from pathlib import Path

STAGES = {
    "sft": "sft.epochs=1 limit=2000",
    "rm": "rm.epochs=1 limit=1000",
    "ppo": "ppo.steps=4 ppo.batch_size=16 ppo.mini_batch_size=8 ppo.eval_every=2 ppo.eval_prompts=8 "
           "ppo.eval_samples=1 ppo.adaptive_kl=true limit=64",
    "grpo": "grpo.steps=4 grpo.batch_size=4 grpo.group_size=4 grpo.mini_batch_size=8 grpo.epochs=2 "
            "grpo.eval_every=2 grpo.eval_prompts=8 grpo.eval_samples=1 limit=64",
    "dpo": "dpo.epochs=1 dpo.eval_every=4 dpo.eval_prompts=8 dpo.eval_samples=1 limit=64",
}
COMMON = "threads=1 precision=fp32 seed=0 save_every=2"
# keys whose values differ between two runs of the same code: wall-clock times, memory, dates, identities, paths
VARYING = ("_s", "time_s", "episodes_per_s", "peak_memory_mb", "_per_process", "duration_s", "created", "uid",
           "samples_per_s", "tokens_per_s", "train_runtime_s", "runtime", "per_second")


def run(out: Path, root: Path, python: str) -> None:
    with tempfile.TemporaryDirectory() as store:
        for stage, args in STAGES.items():
            command = ["make", "-s", "-C", str(root), stage, f"PY={python}", "INSTALL=", f"STORE={store}",
                       "RUN=same", f"ARGS={COMMON} {args}"]
            print("$", " ".join(command[:-1]), repr(command[-1]), flush=True)
            subprocess.run(command, check=True, env={**os.environ, "PYTHONPATH": str(root)})
        result = {}
        for manifest in sorted(Path(store, "same").glob("*/manifest.json")):
            result[f"{manifest.parent.name}/metrics"] = json.loads(manifest.read_text())["metrics"]
        for stage in ("ppo", "grpo"):
            lines = Path(store, "same", stage, f"{stage}_log.jsonl").read_text().splitlines()
            result[f"{stage}/log"] = [json.loads(line) for line in lines]
    out.write_text(json.dumps(result, indent=1, sort_keys=True))
    print(f"wrote {out}")


def varying(key: str) -> bool:
    return key.endswith(VARYING) or key in VARYING


def strip(value):
    """value without its varying keys, at any depth."""
    if isinstance(value, dict):
        return {k: strip(v) for k, v in value.items() if not varying(k)}
    if isinstance(value, list):
        return [strip(v) for v in value]
    return value


def differences(a, b, where: str = "") -> list[str]:
    """Where after differs from before; a key only after is a new figure, not a difference (added() lists them)."""
    if isinstance(a, dict) and isinstance(b, dict):
        out = [f"{where}.{k}: only in before" for k in sorted(set(a) - set(b))]
        for k in sorted(set(a) & set(b)):
            out += differences(a[k], b[k], f"{where}.{k}")
        return out
    if isinstance(a, list) and isinstance(b, list):
        if len(a) != len(b):
            return [f"{where}: {len(a)} items before, {len(b)} after"]
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in differences(x, y, f"{where}[{i}]")]
    if isinstance(a, float) and isinstance(b, float) and (a == b or math.isnan(a) and math.isnan(b)):
        return []
    return [] if a == b else [f"{where}: {a!r} before, {b!r} after"]


def added(a, b, where: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        return [f"{where}.{k}" for k in sorted(set(b) - set(a))] + \
            [x for k in sorted(set(a) & set(b)) for x in added(a[k], b[k], f"{where}.{k}")]
    return []


def compare(before: Path, after: Path) -> int:
    a, b = strip(json.loads(before.read_text())), strip(json.loads(after.read_text()))
    found = differences(a, b)
    for line in found:
        print(line)
    for line in added(a, b):
        print(f"{line}: only in after (a new figure)")
    values = sum(1 for _ in _leaves(a))
    print(f"{values} values compared, {len(found)} differ" + ("" if found else ": the same behaviour"))
    return 1 if found else 0


def _leaves(value):
    if isinstance(value, dict):
        for v in value.values():
            yield from _leaves(v)
    elif isinstance(value, list):
        for v in value:
            yield from _leaves(v)
    else:
        yield value


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run")
    r.add_argument("out", type=Path)
    r.add_argument("--root", type=Path, default=Path("."), help="the checkout whose stages run")
    r.add_argument("--python", default=str(Path(".venv/bin/python").absolute()), help="the interpreter")
    c = sub.add_parser("compare")
    c.add_argument("before", type=Path)
    c.add_argument("after", type=Path)
    args = parser.parse_args()
    if args.command == "run":
        run(args.out, args.root.resolve(), args.python)
        return 0
    return compare(args.before, args.after)


if __name__ == "__main__":
    sys.exit(main())
