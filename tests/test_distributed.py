"""Two gloo processes on CPU through the Makefile's launcher: the world size is really 2, every stage produces
a working checkpoint, and both processes hold identical parameters after every optimizer step."""

import os
import re
import subprocess
from pathlib import Path

import pytest
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from alignment.store import Store

ROOT = Path(__file__).resolve().parent.parent
ARGS = {
    "sft": "limit=64 threads=1 sft.epochs=1 sft.batch_size=8 check_sync=true",  # 64 / (2 x 8) = 4 steps
    "rm": "limit=64 threads=1 rm.epochs=1 rm.batch_size=8 check_sync=true",
    "ppo": "limit=64 threads=1 ppo.steps=2 ppo.batch_size=8 ppo.mini_batch_size=4 ppo.ppo_epochs=1 "
           "ppo.max_new_tokens=8 ppo.eval_samples=1 ppo.eval_every=0 check_sync=true",  # 2 x 2 updates
}
UPDATES = {"sft": 4, "rm": 4, "ppo": 4}


@pytest.fixture(scope="module")
def two_process_store(tmp_path_factory, tiny_cache):
    store = tmp_path_factory.mktemp("dist")
    outputs = {}
    for stage in ("sft", "rm", "ppo"):
        out = subprocess.run(["make", "-s", stage, "NPROC=2", f"STORE={store}", f"ARGS={ARGS[stage]}"], cwd=ROOT,
                             capture_output=True, text=True, timeout=600, env={**os.environ})
        assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-4000:]
        outputs[stage] = out.stdout + out.stderr
    return Store(store), outputs


@pytest.mark.parametrize("stage", ["sft", "rm", "ppo"])
def test_two_processes_stay_identical(two_process_store, stage):
    store, outputs = two_process_store
    text = outputs[stage]
    assert len(re.findall(r"\b2 process\(es\)", text)) == 2  # both processes report a world of 2
    in_sync = re.findall(r"\[sync\] [^:]+: 2 processes hold identical parameters \(checksum ([-\d.]+)\)", text)
    assert len(in_sync) == 2 * UPDATES[stage]  # every optimizer step, checked by both processes
    assert len(set(in_sync)) > 1  # the parameters did change between steps
    ckpt = store.get("tiny-llama", stage)
    assert ckpt.metrics["processes"] == 2
    cls = AutoModelForSequenceClassification if stage == "rm" else AutoModelForCausalLM
    cls.from_pretrained(ckpt.path)
    assert store.verify() == []
