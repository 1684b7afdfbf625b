"""Two processes on CPU through the Makefile's launcher, as DDP (gloo) and under DeepSpeed ZeRO-2, ZeRO-3 and
ZeRO-3 with parameters and optimizer offloaded to CPU memory:
the world size is really 2, every stage produces a working checkpoint that records how it was trained, both
processes hold identical parameters after every optimizer step, a killed PPO run resumes where an
uninterrupted one ends, and a non-finite loss in one process is skipped by all."""

import contextlib
import json
import math
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from alignment.store import Store

ROOT = Path(__file__).resolve().parent.parent
ARGS = {
    "sft": "limit=64 threads=1 sft.epochs=1 sft.batch_size=8 check_sync=true",  # 64 / (2 x 8) = 4 steps
    "rm": "limit=64 threads=1 rm.epochs=1 rm.batch_size=8 check_sync=true",
    "ppo": "limit=64 threads=1 ppo.steps=2 ppo.batch_size=8 ppo.mini_batch_size=4 ppo.ppo_epochs=1 "
    "ppo.max_new_tokens=8 ppo.eval_samples=1 ppo.eval_every=1 ppo.eval_prompts=8 check_sync=true",  # 2 x 2 updates
    "dpo": "limit=64 threads=1 dpo.epochs=1 dpo.batch_size=8 dpo.eval_every=2 dpo.eval_prompts=8 dpo.eval_samples=1 "
    "dpo.max_new_tokens=8 check_sync=true",  # 64 / (2 x 8) = 4 steps
}
UPDATES = {"sft": 4, "rm": 4, "ppo": 4, "dpo": 4}
MODES = {"ddp": (0, []), "zero2": (2, ["ACCELERATE_CONFIG=configs/accelerate/zero2.yaml"]),
         "zero3": (3, ["ACCELERATE_CONFIG=configs/accelerate/zero3.yaml"]),
         "zero3_offload": (3, ["ACCELERATE_CONFIG=configs/accelerate/zero3_offload.yaml"])}  # DeepSpeed's CPU Adam
# precision=auto in a launch of 2 CPU processes takes the launch's (DDP's: none, fp32; the DeepSpeed files': bf16).
# zero3_offload runs in fp32 against its file's bf16: the stage's precision rules the launch (DeepSpeed's trainers
# once refused to start so). In bf16 its PPO failed the sync check in 1 run of 4 (rank 1 gathered garbage after the
# first CPU-Adam step); in fp32 in none of 4.
PRECISION = {"ddp": "auto", "zero2": "auto", "zero3": "auto", "zero3_offload": "fp32"}
TRAINED_IN = {"ddp": "fp32", "zero2": "bf16", "zero3": "bf16", "zero3_offload": "fp32"}
_stores = {}


def make(stage, store, mode, args, env=None, nproc=2, **kwargs):
    command = ["make", "-s", stage, f"NPROC={nproc}", f"PY={sys.executable}", "INSTALL=", f"STORE={store}",
               f"ARGS={args}", *MODES[mode][1]]
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env={**os.environ, **(env or {})}, **kwargs)


def two_process_store(mode, tmp_path_factory):
    """The three stages run once per mode, on 2 processes; their outputs by stage."""
    if mode not in _stores:
        store = tmp_path_factory.mktemp(mode)
        outputs = {}
        for stage in ("sft", "rm", "ppo", "dpo"):
            out = make(stage, store, mode, f"{ARGS[stage]} precision={PRECISION[mode]}")
            assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-4000:]
            outputs[stage] = out.stdout + out.stderr
        _stores[mode] = Store(store), outputs
    return _stores[mode]


@pytest.mark.multiprocess  # (2.5 minutes a mode on 2 cores: CI runs them beside the default suite)
@pytest.mark.parametrize("stage", ["sft", "rm", "ppo", "dpo"])
@pytest.mark.parametrize("mode", MODES)
def test_two_processes_stay_identical(tmp_path_factory, tiny_cache, mode, stage):
    store, outputs = two_process_store(mode, tmp_path_factory)
    text = outputs[stage]
    assert len(re.findall(r"\b2 process\(es\)", text)) == 2  # both processes report a world of 2
    in_sync = re.findall(r"\[sync\] [^:]+: 2 processes hold identical parameters \(checksum ([-\d.]+)\)", text)
    assert len(in_sync) == 2 * UPDATES[stage]  # every optimizer step, checked by both processes
    assert len(set(in_sync)) > 1  # the parameters did change between steps
    # under ZeRO-3 every model is partitioned from loading on, in every stage: each process reports its share of the
    # policy (sft), the reward model (rm), the policy, reference and judge (dpo), of all four (ppo)
    partitioned = len(re.findall(r"MiB in this process \(partitioned; whole", text))
    assert partitioned == (2 * {"sft": 1, "rm": 1, "dpo": 3, "ppo": 4}[stage] if MODES[mode][0] == 3 else 0), text
    ckpt = store.get("tiny-llama", stage)
    assert ckpt.metrics["processes"] == 2
    assert ckpt.metrics["precision"] == TRAINED_IN[mode]
    assert ckpt.metrics["deepspeed_zero_stage"] == MODES[mode][0]
    assert len(ckpt.metrics["peak_memory_mb_per_process"]) == 2  # each process's own peak
    assert ckpt.metrics["planned_peak_mb"] > 0  # and the memory plan's figure for the run, beside them
    cls = AutoModelForSequenceClassification if stage == "rm" else AutoModelForCausalLM
    model = cls.from_pretrained(ckpt.path)
    assert all(p.numel() and torch.isfinite(p).all() for p in model.parameters())  # whole tensors, not shards
    if stage == "ppo":
        assert ckpt.metrics["skipped_non_finite"] == 0
        assert len(ckpt.metrics["eval_curve"]) == 3  # evaluated on both processes at steps 0, 1, 2
        # under ZeRO-3 each process holds about half of every model, the frozen ones too (small parameters that
        # persist whole, the norms, add a little); otherwise all of each
        held = ckpt.metrics["parameters_held_per_process"]
        assert len(held) == 2 and all(set(h) == {"policy", "critic", "reference", "reward_model"} for h in held)
        for share in (x for h in held for x in h.values()):
            assert 0.45 <= share <= 0.6 if MODES[mode][0] == 3 else share == 1.0, held
    if stage == "dpo":
        assert ckpt.metrics["skipped_non_finite"] == 0 and ckpt.metrics["pairs_seen"] == 64
        assert [p["step"] for p in ckpt.metrics["eval_curve"]] == [0, 2, 4]
        assert ckpt.metrics["eval_prompts"] == 64  # the comparison: each process its share, gathered
    assert store.verify() == []


def copy_inputs(source: Store, dest: Path) -> None:
    for stage in ("sft", "rm"):
        shutil.copytree(source.root / "tiny-llama" / stage, dest / "tiny-llama" / stage)


def numbers(tree) -> list:
    """The numbers of a manifest's metric (a number, or lists and dicts of them), in order, times left out."""
    if isinstance(tree, dict):
        return [x for key in sorted(tree) if not key.endswith(("runtime", "_s")) for x in numbers(tree[key])]
    if isinstance(tree, list):
        return [x for item in tree for x in numbers(item)]
    return [tree] if isinstance(tree, int | float) and not isinstance(tree, bool) else []


def free_port() -> int:
    with contextlib.closing(socket.socket()) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Node(subprocess.Popen):
    """A launch as one machine, its output in a file (a pipe nobody reads while it runs would fill and stop it)."""

    def __init__(self, command: list, log: Path, env: dict):
        self.log = log
        with open(log, "w") as out:
            super().__init__(command, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, text=True, env=env)

    def output(self, timeout: float = 600) -> str:
        self.wait(timeout=timeout)
        return self.log.read_text()


def as_nodes(stage: str, store: Path, args: str, mode: str = "zero3", stores: list | None = None,
             env: dict | None = None) -> list[Node]:
    """Two launches as two machines (NNODES=2, node ranks 0 and 1 at 127.0.0.1 on a free port), one process each;
    stores: each machine's own STORE, where they are not given the same."""
    port, logs = free_port(), store.parent
    return [Node(["make", "-s", stage, "NPROC=1", "NNODES=2", f"NODE_RANK={rank}", "MASTER_ADDR=127.0.0.1",
                  f"MASTER_PORT={port}", f"PY={sys.executable}", "INSTALL=", f"STORE={(stores or [store] * 2)[rank]}",
                  f"ARGS={args}", *MODES[mode][1]], logs / f"{store.name}-{stage}-node{rank}-{port}.log",
                 {**os.environ, **(env or {})})
            for rank in (0, 1)]


NODE_ARGS = {**ARGS, "grpo": "limit=64 threads=1 grpo.steps=2 grpo.batch_size=4 grpo.group_size=2 "
             "grpo.mini_batch_size=4 grpo.epochs=1 grpo.max_new_tokens=8 grpo.eval_samples=1 grpo.eval_every=1 "
             "grpo.eval_prompts=8 check_sync=true"}
NODE_ARGS = {stage: f"{args} precision=fp32" for stage, args in NODE_ARGS.items()}
_one_node = {}


def one_node_inputs(tmp_path_factory) -> Path:
    """SFT and the reward model trained once on one machine with two processes (ZeRO-3, fp32): the inputs of
    the later stages, and the one-machine runs the two-machine SFT and RM are compared with."""
    if "store" not in _one_node:
        store = tmp_path_factory.mktemp("one-node")
        for stage in ("sft", "rm"):
            out = make(stage, store, "zero3", NODE_ARGS[stage])
            assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
        _one_node["store"] = store
    return _one_node["store"]


@pytest.mark.multiprocess
@pytest.mark.parametrize("stage", ["sft", "rm", "ppo", "grpo", "dpo"])
def test_two_machines_train_as_one_machine_with_two_processes(tmp_path, tmp_path_factory, tiny_cache, stage):
    """Two launches as two machines (NNODES=2, node ranks 0 and 1 at 127.0.0.1, one process each) under ZeRO-3
    train every stage as one machine with two processes does: the same metrics and weights (fp32)."""
    inputs = one_node_inputs(tmp_path_factory)
    one, two = tmp_path / "one", tmp_path / "two"
    if stage in ("sft", "rm"):
        one = inputs
        if stage == "rm":
            shutil.copytree(inputs / "tiny-llama" / "sft", two / "tiny-llama" / "sft")
    else:
        for store in (one, two):
            copy_inputs(Store(inputs), store)
        out = make(stage, one, "zero3", NODE_ARGS[stage])
        assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    nodes = as_nodes(stage, two, NODE_ARGS[stage])
    outputs = [node.output() for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], outputs[0][-3000:] + outputs[1][-3000:]
    assert all(len(re.findall(r"\b2 process\(es\)", out)) == 1 for out in outputs)  # one process a machine
    a, b = Store(one).get("tiny-llama", stage), Store(two).get("tiny-llama", stage)
    assert b.metrics["processes"] == 2 and b.metrics["deepspeed_zero_stage"] == 3
    keys = {"sft": ("train_loss", "eval_loss"), "rm": ("train_loss", "eval_accuracy"),
            "dpo": ("train_loss", "eval_loss", "eval_curve", "greedy", "sampled")}.get(
        stage, ("eval_curve", "greedy", "sampled"))  # (the held-out comparison with SFT, its curve)
    for key in keys:
        assert key in a.metrics and numbers(b.metrics[key]) == pytest.approx(numbers(a.metrics[key]), abs=1e-5), key
    if stage in ("ppo", "grpo"):
        log_a = [json.loads(x) for x in open(a.path / f"{stage}_log.jsonl")]
        log_b = [json.loads(x) for x in open(b.path / f"{stage}_log.jsonl")]
        for key in ("reward", "kl", "policy_loss" if stage == "ppo" else "loss"):
            assert [r[key] for r in log_b] == pytest.approx([r[key] for r in log_a], abs=1e-5), key
    weights_a, weights_b = load_file(str(a.path / "model.safetensors")), load_file(str(b.path / "model.safetensors"))
    assert weights_a.keys() == weights_b.keys()
    assert all(torch.allclose(weights_a[k], weights_b[k], atol=1e-5) for k in weights_a)


@pytest.mark.multiprocess
def test_machines_that_do_not_share_the_store_stop_at_once_saying_which(tmp_path, tiny_cache):
    """Two machines each given a store of its own (a local folder each, not one shared store): both stop within
    seconds, before any model loads, with one line naming the machine that cannot see the store."""
    nodes = as_nodes("sft", tmp_path / "node0", NODE_ARGS["sft"], stores=[tmp_path / "node0", tmp_path / "node1"])
    outputs = [node.output(timeout=300) for node in nodes]
    assert all(node.returncode != 0 for node in nodes)
    for out in outputs:
        line = [x for x in out.splitlines() if "is not shared" in x]
        assert len(line) == 1 and "process 1 on" in line[0] and "STORE=" in line[0], out[-3000:]
        assert "Traceback" not in out and "parameters, from" not in out  # one line, before the model loaded
    assert not list((tmp_path / "node0").rglob("manifest.json"))
    assert not list((tmp_path / "node0").glob(".shared-check-*"))  # the probe is cleaned up


def tree_of(pid: int) -> list[int]:
    """pid and every process under it (the launcher starts its workers in sessions of their own)."""
    return [pid] + [c.pid for c in psutil.Process(pid).children(recursive=True)]


def kill_tree(pids: list[int]) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


@pytest.mark.multiprocess
def test_a_machine_killed_mid_ppo_stops_the_other_within_a_minute_and_the_rerun_resumes(tmp_path, tmp_path_factory,
                                                                                      tiny_cache):
    """SIGKILL of every process of one "machine" (node rank 1: make, its launcher, its worker) once a state was
    saved: the other machine stops within 60 s with one line saying a process of the run was lost and how to go on
    (never a wait until the collective timeout), and the same two launches resume after the saved step and finish."""
    copy_inputs(Store(one_node_inputs(tmp_path_factory)), tmp_path)
    args = NODE_ARGS["ppo"].replace("ppo.steps=2", "ppo.steps=6").replace("ppo.eval_every=1", "ppo.eval_every=0") + \
        " save_every=2"
    nodes = as_nodes("ppo", tmp_path, args)
    deadline = time.time() + 300
    while not (tmp_path / "tiny-llama" / ".state" / "ppo" / "COMPLETE").exists():
        assert all(node.poll() is None for node in nodes), "ppo ended before saving a resumable state"
        assert time.time() < deadline
        time.sleep(0.02)
    kill_tree(tree_of(nodes[1].pid))
    killed = time.time()
    try:
        out = nodes[0].output(timeout=60)
    except subprocess.TimeoutExpired:
        kill_tree(tree_of(nodes[0].pid))
        pytest.fail("the surviving machine still ran 60 s after the other was killed")
    stopped = time.time() - killed
    nodes[1].wait()
    assert nodes[0].returncode != 0
    assert not (tmp_path / "tiny-llama" / "ppo" / "manifest.json").exists(), "killed too late: ppo had finished"
    lines = [x for x in out.splitlines() if "lost a process of the run" in x]
    assert len(lines) == 1 and "resume" in lines[0], out[-3000:]
    assert not re.search(r'File ".*/(alignment|stages)/', out), out[-3000:]  # one line, no traceback of ours
    print(f"the surviving machine stopped {stopped:.1f} s after the other was killed")

    nodes = as_nodes("ppo", tmp_path, args)
    outputs = [node.output() for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], outputs[0][-3000:] + outputs[1][-3000:]
    assert re.search(r"\[ppo\] resuming after step [2-5]\b", outputs[0]), outputs[0][-3000:]
    ckpt = Store(tmp_path).get("tiny-llama", "ppo")
    assert [json.loads(x)["step"] for x in open(ckpt.path / "ppo_log.jsonl")] == list(range(1, 7))
    assert ckpt.metrics["processes"] == 2


@pytest.mark.multiprocess
def with_faults(**variables) -> dict:
    """The environment of a launch whose processes load tests/fault_injection (variables: which fault)."""
    return {**variables, "PYTHONPATH": os.pathsep.join([str(ROOT / "tests" / "fault_injection"), str(ROOT),
                                                        os.environ.get("PYTHONPATH", "")])}


COUNT_ARGS = {"ppo": "limit=64 threads=1 precision=fp32 ppo.steps=2 ppo.batch_size=8 ppo.mini_batch_size=4 "
              "ppo.ppo_epochs=1 ppo.max_new_tokens=8 ppo.eval_samples=1 ppo.eval_every=0",
              "sft": "limit=64 threads=1 precision=fp32 sft.epochs=1 sft.batch_size=8 save_every=2"}


@pytest.mark.multiprocess
@pytest.mark.parametrize("counts", [(2, 1), (1, 2)], ids=["2to1", "1to2"])
@pytest.mark.parametrize("mode", ["zero2", "zero3"])
def test_a_ppo_state_resumes_on_another_number_of_processes(tmp_path, tmp_path_factory, tiny_cache, mode, counts):
    """A PPO state saved by N processes under ZeRO (each its shard of the optimizer) resumes on M: converted to
    DeepSpeed's universal checkpoint, it gives back the weights it was saved with (fp32, exactly), and trains on,
    the change in episodes per step stated."""
    saved_by, resumed_on = counts
    first = tmp_path / "first"
    copy_inputs(Store(one_node_inputs(tmp_path_factory)), first)
    out = make("ppo", first, mode, COUNT_ARGS["ppo"], env=with_faults(ALIGNMENT_FAIL_COMPARISON="1"), nproc=saved_by)
    assert out.returncode != 0 and "fault injection" in out.stdout + out.stderr, out.stderr[-3000:]
    state = first / "tiny-llama" / ".state" / "ppo"
    assert json.loads((state / "launch.json").read_text()) == {"processes": saved_by, "deepspeed_zero_stage": 2 if
                                                               mode == "zero2" else 3}
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    saved = get_fp32_state_dict_from_zero_checkpoint(str(state / "accelerate"), tag="pytorch_model")
    shutil.copytree(first, tmp_path / "again")

    # the state as it was saved, published on M processes (2 steps: none more to train)
    out = make("ppo", first, mode, COUNT_ARGS["ppo"], nproc=resumed_on)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    text = out.stdout + out.stderr
    assert f"resuming a state saved by {saved_by} process(es) on {resumed_on}: {8 * resumed_on} episodes per step " \
           f"instead of {8 * saved_by}" in text
    assert "resuming after step 2" in text
    weights = load_file(str(Store(first).get("tiny-llama", "ppo").path / "model.safetensors"))
    policy = {k.removeprefix("policy."): v for k, v in saved.items() if k.startswith("policy.")}
    shared = weights.keys() & policy.keys()
    assert len(shared) >= len(weights) - 1  # (an output layer tied to the embedding may be saved once)
    assert all(torch.equal(weights[k], policy[k].to(weights[k].dtype)) for k in shared)

    # and trained on, on M processes
    out = make("ppo", tmp_path / "again", mode, COUNT_ARGS["ppo"].replace("ppo.steps=2", "ppo.steps=3"),
               nproc=resumed_on)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    ckpt = Store(tmp_path / "again").get("tiny-llama", "ppo")
    log = [json.loads(x) for x in open(ckpt.path / "ppo_log.jsonl")]
    assert [r["step"] for r in log] == [1, 2, 3] and ckpt.metrics["processes"] == resumed_on
    assert log[0]["kl"] == 0.0 and abs(log[2]["kl"]) > 1e-4  # step 3 sampled from the trained policy, not SFT's
    assert math.isfinite(log[2]["policy_loss"]) and ckpt.metrics["skipped_non_finite"] == 0


@pytest.mark.multiprocess
def test_a_trainer_checkpoint_resumes_on_the_processes_that_saved_it_and_refuses_others(tmp_path, tiny_cache):
    """SFT stopped after its checkpoint at step 2, saved by 2 processes (two machines, one each): 1 process is
    refused in one line before the model loads (the trainer's data position counts steps of 2 processes' batches:
    on 1 it would repeat data); the same two machines resume it and finish the epoch."""
    store, args = tmp_path / "store", COUNT_ARGS["sft"]
    nodes = as_nodes("sft", store, args, mode="ddp", env=with_faults(ALIGNMENT_FAIL_TRAINER_LOSS="3"))
    assert all("fault injection" in node.output() for node in nodes) and all(node.returncode for node in nodes)
    checkpoint = store / "tiny-llama" / ".trainer-sft" / "checkpoint-2"
    assert (checkpoint / "COMPLETE").is_file()
    assert json.loads((checkpoint / "launch.json").read_text()) == {"processes": 2, "deepspeed_zero_stage": 0}
    one = make("sft", store, "ddp", args, nproc=1)
    text = one.stdout + one.stderr
    line = [x for x in text.splitlines() if "was saved by 2 process(es) and this launch has 1" in x]
    assert one.returncode != 0 and len(line) == 1 and "RESUME=0" in line[0], text[-3000:]
    assert "parameters, from" not in text and "Traceback" not in text  # before the model loaded
    nodes = as_nodes("sft", store, args, mode="ddp")
    outputs = [node.output() for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], outputs[0][-3000:]
    assert f"resuming from {checkpoint}" in outputs[0]
    ckpt = Store(store).get("tiny-llama", "sft")
    assert ckpt.metrics["processes"] == 2 and ckpt.metrics["steps"] == 4


@pytest.mark.multiprocess
def test_a_state_saved_under_another_zero_stage_is_refused_before_any_model_loads(tmp_path, tmp_path_factory,
                                                                                  tiny_cache):
    copy_inputs(Store(one_node_inputs(tmp_path_factory)), tmp_path)
    out = make("ppo", tmp_path, "zero2", COUNT_ARGS["ppo"], env=with_faults(ALIGNMENT_FAIL_COMPARISON="1"), nproc=1)
    assert out.returncode != 0
    out = make("ppo", tmp_path, "zero3", COUNT_ARGS["ppo"], nproc=1)
    text = out.stdout + out.stderr
    line = [x for x in text.splitlines() if "was saved by 1 process(es) under DeepSpeed ZeRO-2" in x]
    assert out.returncode != 0 and len(line) == 1 and "RESUME=0" in line[0], text[-3000:]
    assert "MiB in" not in text and "Traceback" not in text  # no model loaded, no traceback


@pytest.mark.multiprocess
def test_grpo_on_fewer_prompts_than_a_step_gives_every_process_a_whole_share(tmp_path, tmp_path_factory, tiny_cache):
    """3 training prompts for 2 processes x 4 prompts a step: the prompt queue refills until it holds the step, so
    each process samples its 4 (x 2 responses) and the step's gathers (GRPO's group statistics) get equal shares."""
    copy_inputs(Store(one_node_inputs(tmp_path_factory)), tmp_path)
    args = ("limit=3 threads=1 precision=fp32 grpo.steps=2 grpo.batch_size=4 grpo.group_size=2 "
            "grpo.mini_batch_size=4 grpo.epochs=1 grpo.max_new_tokens=8 grpo.eval_every=0 grpo.eval_samples=1")
    out = make("grpo", tmp_path, "ddp", args)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    ckpt = Store(tmp_path).get("tiny-llama", "grpo")
    assert ckpt.metrics["processes"] == 2 and ckpt.metrics["episodes"] == 2 * 2 * 4 * 2  # steps x processes x 4 x 2
    assert [json.loads(x)["step"] for x in open(ckpt.path / "grpo_log.jsonl")] == [1, 2]


@pytest.mark.multiprocess
@pytest.mark.parametrize("method", ["rloo", "reinforce"])
def test_critic_free_estimators_under_zero3_share_their_batch_statistics(tmp_path, tmp_path_factory, tiny_cache,
                                                                        method):
    """RLOO and REINFORCE++ on 2 processes under ZeRO-3: REINFORCE++ normalises its returns over both processes'
    tokens (a sum over processes in every step), RLOO gathers its groups' rewards; both processes train in step
    (check_sync) and the policy is published whole."""
    copy_inputs(Store(one_node_inputs(tmp_path_factory)), tmp_path)
    group = 2 if method == "rloo" else 1
    args = (f"limit=64 threads=1 precision=fp32 check_sync=true {method}.steps=2 {method}.batch_size=4 "
            f"{method}.group_size={group} {method}.mini_batch_size=8 {method}.max_new_tokens=8 "
            f"{method}.eval_every=0 {method}.eval_samples=1")
    out = make(method, tmp_path, "zero3", args)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    text = out.stdout + out.stderr
    assert len(re.findall(r"\[sync\] [^:]+: 2 processes hold identical parameters", text)) == 2 * 2  # 2 steps x 2
    ckpt = Store(tmp_path).get("tiny-llama", method)
    assert ckpt.metrics["processes"] == 2 and ckpt.metrics["episodes"] == 2 * 2 * 4 * group
    assert ckpt.metrics["deepspeed_zero_stage"] == 3
    log = [json.loads(x) for x in open(ckpt.path / f"{method}_log.jsonl")]
    assert [r["step"] for r in log] == [1, 2] and all(math.isfinite(r["loss"]) for r in log)
    policy = AutoModelForCausalLM.from_pretrained(ckpt.path)
    assert torch.isfinite(policy(torch.tensor([[1, 2, 3]])).logits).all()


@pytest.mark.multiprocess
def test_ppo_killed_under_zero2_resumes_where_an_uninterrupted_run_ends(tmp_path, tmp_path_factory, tiny_cache):
    """SIGKILL of both processes after a state was saved; the resumed run loads every process's optimizer shard,
    the fp32 master weights and RNG states, and ends where a run never stopped does."""
    source, _ = two_process_store("zero2", tmp_path_factory)
    # precision pinned: auto times bf16 against fp32 at start-up, which a loaded machine can tip either way
    args = ("limit=64 threads=1 precision=fp32 ppo.steps=4 ppo.batch_size=8 ppo.mini_batch_size=4 ppo.ppo_epochs=1 "
            "ppo.max_new_tokens=8 ppo.eval_samples=1 ppo.eval_every=0 save_every=2")
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    for store in (straight, killed):
        copy_inputs(source, store)
    assert make("ppo", straight, "zero2", args).returncode == 0

    command = ["make", "-s", "ppo", "NPROC=2", f"PY={sys.executable}", "INSTALL=", f"STORE={killed}", f"ARGS={args}",
               *MODES["zero2"][1]]
    proc = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not (killed / "tiny-llama" / ".state" / "ppo" / "COMPLETE").exists():
        assert proc.poll() is None, "ppo ended before saving a resumable state"
        assert time.time() < deadline
        time.sleep(0.02)
    kill_tree(tree_of(proc.pid))  # make, the launcher and both processes
    proc.wait()
    assert not (killed / "tiny-llama" / "ppo" / "manifest.json").exists(), "killed too late: ppo had finished"
    state = killed / "tiny-llama" / ".state" / "ppo" / "accelerate"
    assert len(list(state.rglob("*optim_states.pt"))) == 2  # each process's optimizer shard

    resumed = make("ppo", killed, "zero2", args)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming after step 2" in resumed.stdout
    a, b = Store(straight).get("tiny-llama", "ppo"), Store(killed).get("tiny-llama", "ppo")
    log_a = [json.loads(x) for x in open(a.path / "ppo_log.jsonl")]
    log_b = [json.loads(x) for x in open(b.path / "ppo_log.jsonl")]
    assert [r["step"] for r in log_b] == [1, 2, 3, 4]  # no step lost or repeated
    for key in ("reward", "kl", "policy_loss"):
        assert log_b[-1][key] == pytest.approx(log_a[-1][key], abs=1e-4)
    weights_a, weights_b = load_file(str(a.path / "model.safetensors")), load_file(str(b.path / "model.safetensors"))
    assert all(torch.equal(weights_a[k], weights_b[k]) for k in weights_a)


@pytest.mark.multiprocess
def test_the_collapse_guard_under_zero3_publishes_the_kept_shards_whole(tmp_path, tmp_path_factory, tiny_cache):
    """ppo.guard_collapse on 2 processes under ZeRO-3: the healthy weights are gathered a parameter at a time and
    kept, a collapse at step 3 stops both processes, the main one's copy goes back into the shards, and what is
    published is the policy a 2-step run publishes."""
    inputs = Store(one_node_inputs(tmp_path_factory))
    runs = {"two_steps": ("ppo.steps=2", {}),
            "guarded": ("ppo.steps=5 ppo.guard_collapse=true", with_faults(ALIGNMENT_SAME_ANSWERS_FROM_STEP="3"))}
    published = {}
    for name, (steps, env) in runs.items():
        store = tmp_path / name
        copy_inputs(inputs, store)
        out = make("ppo", store, "zero3", f"{COUNT_ARGS['ppo']} ppo.eval_every=1 ppo.eval_prompts=8 {steps}",
                   env=env)
        assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
        published[name] = Store(store).get("tiny-llama", "ppo")
    text = out.stdout + out.stderr
    assert text.count("guard_collapse: the held-out point of step 3 shows a collapse") == 2  # both processes
    assert published["guarded"].metrics["guard"]["published_step"] == 2
    a, b = (load_file(published[n].path / "model.safetensors") for n in runs)
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


@pytest.mark.multiprocess
def test_a_nan_loss_in_one_process_is_skipped_by_all_under_deepspeed(tmp_path, tmp_path_factory, tiny_cache):
    """DeepSpeed steps inside backward(): the loss is checked first, over all processes, so a bad minibatch in
    one of them is applied by none (applied, NaN would reach the weights; applied by one, the processes would
    part ways and the sync check would stop the run)."""
    source, _ = two_process_store("zero2", tmp_path_factory)
    copy_inputs(source, tmp_path)
    env = {"ALIGNMENT_NAN_LOSS": "1:2", "PYTHONPATH": os.pathsep.join([str(ROOT / "tests" / "fault_injection"),
                                                                        str(ROOT), os.environ.get("PYTHONPATH", "")])}
    out = make("ppo", tmp_path, "zero2", ARGS["ppo"].replace("eval_every=1", "eval_every=0"), env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    text = out.stdout + out.stderr
    assert len(re.findall(r"\[guard\] step 1: non-finite loss, update skipped", text)) == 2  # both processes
    assert len(re.findall(r"processes hold identical parameters", text)) == 2 * 3  # the other 3 updates
    ckpt = Store(tmp_path).get("tiny-llama", "ppo")
    assert ckpt.metrics["skipped_non_finite"] == 1
    model = AutoModelForCausalLM.from_pretrained(ckpt.path)
    assert all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.multiprocess
def test_a_nan_loss_in_sft_under_deepspeed_is_skipped_not_applied(tmp_path, tiny_cache):
    """The trainers step inside backward() under DeepSpeed too: ZeRO-2's own check (bf16) skips the step whose
    gradients are not finite, in every process, and the stage counts it."""
    env = {"ALIGNMENT_NAN_TRAINER_LOSS": "1:2", "PYTHONPATH": os.pathsep.join([
        str(ROOT / "tests" / "fault_injection"), str(ROOT), os.environ.get("PYTHONPATH", "")])}
    out = make("sft", tmp_path, "zero2", ARGS["sft"], env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    ckpt = Store(tmp_path).get("tiny-llama", "sft")
    assert ckpt.metrics["skipped_non_finite"] == 1 and ckpt.metrics["steps"] == 4
    assert len(set(re.findall(r"identical parameters \(checksum ([-\d.]+)\)", out.stdout + out.stderr))) == 3
    model = AutoModelForCausalLM.from_pretrained(ckpt.path)
    assert all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.multiprocess
def test_ppo_with_bf16_weights_skips_no_update_and_raises_the_reward(tmp_path, tmp_path_factory, tiny_cache):
    """DeepSpeed's bf16 mode, one process: bf16 weights and bf16 arithmetic, an fp32 master copy in the optimizer
    (the numerics of a real model on a GPU). Every update is applied and the reward model's score rises."""
    source, _ = two_process_store("zero2", tmp_path_factory)
    copy_inputs(source, tmp_path)
    args = ("limit=64 threads=2 precision=bf16 ppo.steps=12 ppo.batch_size=16 ppo.mini_batch_size=8 ppo.ppo_epochs=2 "
            "ppo.max_new_tokens=12 ppo.eval_every=0 ppo.eval_samples=1 ppo.learning_rate=3e-4")
    out = make("ppo", tmp_path, "zero2", args, nproc=1)
    assert out.returncode == 0, out.stderr[-3000:]
    ckpt = Store(tmp_path).get("tiny-llama", "ppo")
    assert ckpt.metrics["deepspeed_zero_stage"] == 2 and ckpt.metrics["processes"] == 1
    assert ckpt.metrics["precision"] == "bf16"
    assert ckpt.metrics["skipped_non_finite"] == 0
    rewards = [json.loads(x)["reward"] for x in open(ckpt.path / "ppo_log.jsonl")]
    assert sum(rewards[-4:]) / 4 > sum(rewards[:4]) / 4 + 0.05, rewards


def test_generation_gathers_the_policy_alone(monkeypatch):
    """Under ZeRO-3 the rollout gathers the policy's parameters for generation, never the critic's (which the
    scoring forward reads partitioned, layer by layer)."""
    import types

    import deepspeed
    import trl.models.utils

    from alignment import distributed, forwards

    policy, critic = torch.nn.Linear(3, 3), torch.nn.Linear(3, 1)
    model = forwards.ActorCritic(policy, critic)
    gathered = []

    class Gathered:
        def __init__(self, parameters, modifier_rank=None):
            gathered.append(list(parameters))

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

    monkeypatch.setattr(deepspeed.zero, "GatheredParameters", Gathered)
    monkeypatch.setattr(trl.models.utils, "remove_hooks", lambda m: None)
    monkeypatch.setattr(trl.models.utils, "add_hooks", lambda m: None)
    accelerator = types.SimpleNamespace(state=types.SimpleNamespace(deepspeed_plugin=types.SimpleNamespace(
        zero_stage=3)), unwrap_model=lambda m: m)
    with distributed.whole_policy(accelerator, model) as whole:
        assert whole is policy and not whole.training
    assert [[id(p) for p in ps] for ps in gathered] == [[id(p) for p in policy.parameters()]]
