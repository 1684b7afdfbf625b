"""Every command README.md and docs/ show either runs, here, with tiny overrides, or is allowlisted below with the
reason it cannot run here. A command in neither fails the first test; the second runs them all, in the order the
pages show them, into one fresh store (marked `docs`: `make test-docs`, which .ci/run runs after the suite).

A command is a line of a ```bash block, or an inline `make ...`/`python -m ...` span that names no placeholder
(`<stage>`, `...`). It runs as written, with `STORE=` (or `store=`/`--root`) pointing at the test's store and, for
each stage it starts, that stage's tiny settings (`ARGS_<stage>=`, which make applies after the command's own ARGS:
the command's keys are still checked, its sizes are not kept). The pages' commands are examples, not one workflow:
one may retrain the SFT checkpoint the next one's reward model was trained on, so the stages run with
allow_stale=true.
"""

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

TINY = {
    "sft": "limit=48 sft.epochs=1",
    "rm": "limit=48 rm.epochs=1",
    "ppo": "limit=32 ppo.steps=2 ppo.batch_size=8 ppo.mini_batch_size=4 ppo.ppo_epochs=1 ppo.eval_every=0 "
           "ppo.eval_samples=1 ppo.max_new_tokens=8",
    "grpo": "limit=32 grpo.steps=2 grpo.batch_size=2 grpo.group_size=4 grpo.mini_batch_size=8 grpo.eval_every=0 "
            "grpo.eval_samples=1 grpo.max_new_tokens=8",
    "rloo": "limit=32 rloo.steps=2 rloo.batch_size=2 rloo.group_size=4 rloo.mini_batch_size=8 rloo.eval_every=0 "
            "rloo.eval_samples=1 rloo.max_new_tokens=8",
    "reinforce": "limit=32 reinforce.steps=2 reinforce.batch_size=8 reinforce.mini_batch_size=8 "
                 "reinforce.eval_every=0 reinforce.eval_samples=1 reinforce.max_new_tokens=8",
    "dpo": "limit=32 dpo.epochs=1 dpo.eval_every=0 dpo.eval_samples=1 dpo.max_new_tokens=8",
    "eval": "limit=16 eval.max_new_tokens=8",
}
TINY = {stage: f"{args} allow_stale=true" for stage, args in TINY.items()}

# command as the page writes it (comment cut) -> why it cannot run here
ALLOWED = {
    "make test": "the test suite itself",
    "make test-slow": "the slow checks, run by their own marker; not from inside the suite",
    "make test-multiprocess": "the multi-process checks, run by their own marker (.ci/run runs them); not from "
    "inside the suite",
    "make bench": "installs a second environment (TRL 1.12) and runs for tens of minutes; bench/README.md has its runs",
    "make gpu-check": "needs a CUDA GPU",
    "make bench-memory": "trains an 85M-parameter model through three stages, 1 and 2 processes: many minutes on 2 "
    "cores; bench/README.md has its runs",
    "make sft rm ppo NPROC=8 ACCELERATE_CONFIG=configs/accelerate/zero3.yaml": "8 processes want 8 GPUs; the "
    "NPROC=2 form of the same command runs here (docs/distributed.md)",
    "make sft rm ppo ACCELERATE_CONFIG=configs/accelerate/ddp.yaml NPROC=8": "8 processes want 8 GPUs; "
    "make sft rm ppo NPROC=2 runs here",
    "make sft rm ppo ACCELERATE_CONFIG=configs/accelerate/zero2.yaml NPROC=8": "8 processes want 8 GPUs; the ZeRO-2 "
    "stages run on 2 processes in tests/test_distributed.py",
    "make sft rm ppo ACCELERATE_CONFIG=configs/accelerate/zero3.yaml NPROC=8": "8 processes want 8 GPUs; the NPROC=2 "
    "form runs here",
    "make sft rm ppo ACCELERATE_CONFIG=configs/accelerate/multinode.yaml NPROC=8 NNODES=2 NODE_RANK=0 "
    "MASTER_ADDR=10.0.0.1": "several machines; tests/test_distributed.py runs two launches as two machines here",
    "make sft rm ppo MODEL=/models/my-llama": "a model folder this machine does not have; tests/test_registry.py loads "
    "model folders built from config",
    "make sft rm ppo MODEL=Qwen/Qwen2.5-0.5B-Instruct": "downloads from the hub",
    ".venv/bin/python -m stages.sft --print-config model=/models/Meta-Llama-3-8B-Instruct": "a model folder this "
    "machine does not have; tests/test_presets.py prints the config of a folder of that shape",
    'make sft MODEL=/models/Meta-Llama-3-8B-Instruct ARGS="--print-config"': "a model folder this machine does not "
    "have; tests/test_presets.py prints the config of a folder of that shape",
    "HF_HUB_OFFLINE=1 make sft MODEL=Qwen/Qwen2.5-0.5B": "needs the model in the local hub cache",
    "make data-check DATA=~/mydata/mine.yaml": "a user's own file; tests/test_own_data.py runs make data-check on one",
    "make sft rm ppo DATA=~/mydata/mine.yaml": "a user's own file; tests/test_own_data.py runs the stages on one",
    "make sft DATA=~/mydata/mine.yaml CONFIG=my-sft.yaml": "a user's own files; tests/test_own_data.py runs the "
    "stages on a data file of its own",
    "python -m alignment store verify": "exits 1 here by design: the examples before it leave stale checkpoints "
    "in the test's store (allow_stale), which verify reports; tests/test_store.py runs it on sound and broken stores",
    'export MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1) STORE=/shared/alignment-store':
    "the Slurm example's set-up: a Slurm cluster",
    "srun bash -c 'make ppo NPROC=8 NNODES=$SLURM_NNODES NODE_RANK=$SLURM_NODEID "
    "ACCELERATE_CONFIG=configs/accelerate/multinode.yaml'": "a Slurm cluster; tests/test_distributed.py runs the "
    "same make line as two machines on one",
    "make grpo ARGS='grpo.rewards=[model,my_rewards.py:exact_answer]'": "a user's own file; tests/test_rewards.py "
    "runs GRPO with a reward function of a file of its own",
    "make serve-rm RUN=tiny-llama PORT=8100": "a server that runs until stopped; tests/test_serve.py starts it, "
    "scores through it and stops it",
    "make ppo ARGS='ppo.rewards=[http://127.0.0.1:8100]'": "needs the server of the line before it running; "
    "tests/test_serve.py runs PPO through one",
    "make data": "rewrites data/task in the checkout; tests/test_task.py checks the generator against the files",
    'make ppo DATA=hh-rlhf ARGS="ppo.guard_collapse=true"': "the guard watches held-out points, which this check's "
    "tiny settings turn off (ppo.eval_every=0); tests/test_faults.py runs the guard of PPO and DPO",
    "accelerate launch --multi_gpu --num_processes 2": "a launcher line the Makefile "
    "composes; make ... NPROC=2 runs it",
}


def commands() -> list[tuple[str, str]]:
    """(page, command) in the order the pages show them, each once."""
    found: list[tuple[str, str]] = []
    for page in PAGES:
        text = page.read_text()
        for block in re.findall(r"```(?:bash|sh)\n(.*?)```", text, re.DOTALL):
            for line in block.splitlines():
                line = re.sub(r"\s+#.*$", "", line).strip()
                if line and not line.startswith("#"):
                    found.append((page.name, line))
        for span in re.findall(r"`((?:make |python -m |\.venv/bin/python |accelerate launch )[^`]*)`", text):
            if "<" not in span and "..." not in span:
                found.append((page.name, span.strip()))
    seen, out = set(), []
    for page, command in found:
        if command not in seen:
            seen.add(command)
            out.append((page, command))
    return out


def test_every_command_runs_or_says_why_not():
    found = commands()
    assert len(found) > 30, found  # the pages were read
    stale = set(ALLOWED) - {c for _, c in found}
    assert not stale, f"allowlisted commands no page shows any more: {sorted(stale)}"
    for page, command in found:
        assert command in ALLOWED or runnable(command), f"{page}: {command!r} is neither run nor allowlisted"


def runnable(command: str) -> bool:
    return command.split()[0] in ("make", "python", ".venv/bin/python")


def prepared(command: str, store: Path, out: Path) -> str:
    """The command as the test runs it: in the test's store, with every stage at its tiny size."""
    parts = []
    for part in command.split("&&"):
        words = part.split()
        if words[0] == "make":
            tiny = " ".join(f"ARGS_{stage}={shlex.quote(args)}" for stage, args in TINY.items())
            part = f"{part.strip()} PY={sys.executable} INSTALL= STORE={store} OUT={out} {tiny}"
        else:
            part = part.strip().replace(".venv/bin/python", sys.executable, 1)
            if part.startswith("python "):
                part = sys.executable + part[len("python"):]
            stage = re.match(rf"{re.escape(sys.executable)} -m stages\.(\w+)", part)
            if stage and "--help" not in part:
                part += f" store={store} {TINY[stage.group(1)]}"
            elif " -m alignment " in part:
                part += f" --root {store}"
        parts.append(part)
    return " && ".join(parts)


@pytest.mark.docs
def test_the_documented_commands_run(tmp_path):
    store, failures = tmp_path / "store", []
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    for i, (page, command) in enumerate(commands()):
        if command in ALLOWED:
            continue
        line = prepared(command, store, tmp_path / f"export-{i}")
        feed = "sort: d a c b\n" if " chat " in line else None  # chat reads prompts from its input
        out = subprocess.run(["bash", "-c", line], cwd=ROOT, env=env, input=feed, capture_output=True, text=True,
                             timeout=900)
        print(f"[{out.returncode}] {page}: {command}")
        if out.returncode != 0:
            failures.append(f"{page}: {command}\n  ran: {line}\n  {(out.stdout + out.stderr)[-1500:]}")
    assert not failures, "\n\n".join(failures)
