"""A user's own data, as the README shows it: Alpaca JSON instructions and JSONL preference pairs outside the
repository, named by a YAML data file, through `make` and the three stages; no eval splits (carved), PPO
prompts from the pairs."""

import json
import subprocess
import sys

from alignment import data
from alignment.store import Store

MAKE = ["make", "-s", f"PY={sys.executable}", "INSTALL="]


def own_data(folder):
    """The embedded task's records rewritten as a user would have them: Alpaca JSON and prompt/good/bad JSONL."""
    folder.mkdir(parents=True, exist_ok=True)
    sft = data.load("task", "sft_train")[:300]
    (folder / "instructions.json").write_text(json.dumps(
        [{"instruction": r["prompt"], "input": "", "output": r["completion"]} for r in sft], indent=1))
    pairs = data.load("task", "prefs_train")[:300]
    (folder / "pairs.jsonl").write_text("".join(
        json.dumps({"question": r["prompt"], "good": r["chosen"], "bad": r["rejected"]}) + "\n" for r in pairs))
    (folder / "mine.yaml").write_text(
        "# my instructions (Alpaca JSON) and my preference pairs (JSONL); eval splits carved, prompts from pairs\n"
        "sft_train: {path: instructions.json, format: alpaca}\n"
        "prefs_train:\n  path: pairs.jsonl\n  fields: {prompt: question, chosen: good, rejected: bad}\n")
    return folder / "mine.yaml"


def test_make_chooses_stage_configs_by_data(tmp_path):
    def dry(*args):
        return subprocess.run([*MAKE, "-n", *args], capture_output=True, text=True, check=True).stdout

    assert "--config configs/sft.yaml" in dry("sft", f"DATA={tmp_path}/mine.yaml")
    assert f"data={tmp_path}/mine.yaml" in dry("sft", f"DATA={tmp_path}/mine.yaml")
    assert "--config configs/hh-rlhf/rm.yaml" in dry("rm", "DATA=hh-rlhf")
    assert "--config my/ppo.yaml" in dry("ppo", "CONFIG=my/ppo.yaml", "DATA=hh-rlhf")
    assert "run=tiny-llama-mine " in dry("eval", f"DATA={tmp_path}/mine.yaml") + " "


def test_own_data_files_through_make_sft_rm_ppo(tmp_path, tiny_cache):
    mine = own_data(tmp_path / "elsewhere")
    store = tmp_path / "store"
    small = "limit=48 threads=2 sft.epochs=1 sft.batch_size=16 rm.epochs=1 rm.batch_size=16 ppo.steps=1 " \
            "ppo.batch_size=8 ppo.mini_batch_size=4 ppo.max_new_tokens=8 ppo.eval_samples=1"
    for stage in ("sft", "rm", "ppo"):
        args = " ".join(a for a in small.split() if "." not in a or a.startswith(stage))
        out = subprocess.run([*MAKE, stage, f"DATA={mine}", f"STORE={store}", f"ARGS={args}"],
                             capture_output=True, text=True, cwd=data.ROOT)
        assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    checkpoints = {c.manifest["stage"]: c for c in Store(store).list()}
    assert set(checkpoints) == {"sft", "rm", "ppo"}
    for c in checkpoints.values():
        assert c.manifest["run"] == "tiny-llama-mine"
        assert c.manifest["data"]["profile"] == str(mine)  # absolute: the run evaluates from anywhere
    # 5% of the 300 records held out for evaluation, the rest trained on (limit=48 takes the first 48 of them)
    assert len(data.load(str(mine), "sft_eval")) == 15 and len(data.load(str(mine), "sft_train")) == 285
    assert data.get_profile(str(mine)).gold is False  # no gold judge for the user's data
