"""GRPO end to end on a minuscule config (finite losses, trained weights, a loadable checkpoint, lineage, the
comparison with SFT and the held-out curve), its LoRA/4-bit variant, non-finite losses, and resuming after a kill.
Its math is tested by hand in test_ppo_math.py."""

import json
import math
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from alignment import config, guard, health, loading, ppo, registry, report
from alignment.store import Store
from stages import grpo as grpo_stage
from stages import reinforce as reinforce_stage
from stages import rloo as rloo_stage
from stages import rm as rm_stage
from stages import sft as sft_stage

ROOT = Path(__file__).resolve().parent.parent
COMMON = ["limit=32", "threads=2"]
GRPO = ["grpo.steps=2", "grpo.batch_size=4", "grpo.group_size=4", "grpo.mini_batch_size=8", "grpo.max_new_tokens=8",
        "grpo.eval_every=1", "grpo.eval_prompts=8", "grpo.eval_samples=1"]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, tiny_cache):
    """A store with the SFT and RM checkpoints GRPO starts from (two optimizer steps each)."""
    base = tmp_path_factory.mktemp("grpo") / "base"
    sft_stage.main([f"store={base}", *COMMON, "sft.epochs=1", "sft.batch_size=16"])
    rm_stage.main([f"store={base}", *COMMON, "rm.epochs=1", "rm.batch_size=16"])
    return base


def store_with_inputs(base: Path, dest: Path) -> Path:
    for stage in ("sft", "rm"):
        shutil.copytree(base / "tiny-llama" / stage, dest / "tiny-llama" / stage)
    return dest


def test_grpo_end_to_end(inputs, tmp_path):
    root = store_with_inputs(inputs, tmp_path / "store")
    grpo_stage.main([f"store={root}", *COMMON, *GRPO])
    store = Store(root)
    sft, rm, grpo = (store.get("tiny-llama", s) for s in ("sft", "rm", "grpo"))

    # lineage
    m = grpo.manifest
    assert m["parents"] == [sft.id, rm.id] and m["parent_uids"] == [sft.manifest["uid"], rm.manifest["uid"]]
    assert m["base"] == loading.base_reference(sft.path) and m["base_checkpoint"] == sft.id and m["stage"] == "grpo"
    assert store.stale(grpo) is None and len(m["data"]["fingerprint"]) == 64

    # finite losses, every step logged
    log = [json.loads(line) for line in open(grpo.path / "grpo_log.jsonl")]
    assert [r["step"] for r in log] == [1, 2]
    for record in log:
        for key in ("loss", "kl_k3", "reward", "kl", "entropy", "reward_std"):
            assert math.isfinite(record[key]), key

    # the comparison with SFT, under PPO's keys; the held-out curve; the counts
    metrics = grpo.metrics
    assert metrics["eval_prompts"] == 32  # every held-out prompt (limit=32); grpo.eval_prompts: the curve's
    for mode in ("greedy", "sampled"):
        assert {"gold", "reward", "kl"} <= set(metrics[mode])
        lo, hi = metrics[mode]["gold"]["difference"]["ci95"]
        assert lo <= metrics[mode]["gold"]["difference"]["mean"] <= hi
    assert [p["step"] for p in metrics["eval_curve"]] == [0, 1, 2]
    # the scores of the sampled answers, and the measures of the sampled and greedy answers as sets (health.py)
    measures = {f"eval_{mode}{k}" for mode in ("", "greedy_") for k in health.POINT_KEYS}
    assert all(set(p) == {"step", "eval_reward", "eval_gold", "eval_kl", *measures} for p in metrics["eval_curve"])
    assert metrics["eval_curve"][0]["eval_kl"] == 0.0  # step 0: the policy is the reference
    assert metrics["episodes"] == 2 * 4 * 4 and metrics["steps"] == 2 and metrics["skipped_non_finite"] == 0
    assert metrics["duration_s"] > 0
    assert list((root / "tiny-llama" / "tensorboard" / "grpo").glob("events.*"))

    # trained weights changed; the checkpoint loads with the standard from_pretrained
    before, after = load_file(str(sft.path / "model.safetensors")), load_file(str(grpo.path / "model.safetensors"))
    assert sum(not torch.equal(before[k], after[k]) for k in before) / len(before) > 0.9
    policy = AutoModelForCausalLM.from_pretrained(grpo.path)
    assert torch.isfinite(policy(torch.tensor([[1, 2, 3]])).logits).all()
    assert not (root / "tiny-llama" / ".state" / "grpo").exists()  # published: no state left to resume


def test_grpo_with_lora_on_4bit_weights(inputs, tmp_path, capsys):
    pytest.importorskip("bitsandbytes")
    root = store_with_inputs(inputs, tmp_path / "store")
    grpo_stage.main([f"store={root}", *COMMON, *GRPO, "limit=16", "grpo.steps=1", "grpo.eval_every=0",
                     "quantization=4bit", "lora.enabled=true", "lora.r=4"])
    out = capsys.readouterr().out
    assert "[grpo] reference: " in out and "adapters off" in out
    grpo = Store(root).get("tiny-llama", "grpo")
    assert (grpo.path / "adapter_config.json").is_file() and grpo.manifest["adapter"] is True
    spec = registry.get("tiny-llama")
    merged = loading.load_model(grpo.path, AutoModelForCausalLM, spec)
    sft = loading.load_model(Store(root).get("tiny-llama", "sft").path, AutoModelForCausalLM, spec)
    ids = torch.tensor([[5, 6, 7, 8]])
    assert not torch.allclose(sft(ids).logits, merged(ids).logits)


def nan_on_calls(original, calls: set):
    count = {"n": 0}

    def wrapped(*args, **kwargs):
        count["n"] += 1
        out = original(*args, **kwargs)
        return out._replace(loss=out.loss * float("nan")) if count["n"] in calls else out

    return wrapped


def test_grpo_skips_nan_losses_and_stops_after_a_run(inputs, tmp_path, monkeypatch):
    root = store_with_inputs(inputs, tmp_path / "store")
    one_minibatch = [*GRPO, "limit=16", "grpo.eval_every=0", "grpo.mini_batch_size=16", "save_every=1"]  # 1 update/step
    monkeypatch.setattr(ppo, "grpo_loss", nan_on_calls(ppo.grpo_loss, {2}))
    grpo_stage.main([f"store={root}", *COMMON, *one_minibatch])
    ckpt = Store(root).get("tiny-llama", "grpo")
    assert ckpt.metrics["skipped_non_finite"] == 1
    assert all(torch.isfinite(p).all() for p in AutoModelForCausalLM.from_pretrained(ckpt.path).parameters())
    monkeypatch.setattr(ppo, "grpo_loss", nan_on_calls(ppo.grpo_loss, set(range(2, 100))))
    with pytest.raises(guard.NonFiniteError, match=r"stopping at GRPO step 3: 2 updates in a row"):
        grpo_stage.main([f"store={root}", *COMMON, *one_minibatch, "grpo.steps=5", "max_bad_steps=2"])
    state = json.loads((root / "tiny-llama" / ".state" / "grpo" / "state.json").read_text())
    assert state["step"] == 2  # step 2's update was skipped, yet the step ended and was saved; step 3 stopped


def test_killed_grpo_resumes_and_ends_where_an_uninterrupted_one_does(inputs, tmp_path):
    # precision pinned: auto measures bf16 against fp32 at start-up, and on a loaded CPU the resumed run may choose
    # otherwise than the killed one
    args = [*COMMON, *GRPO, "grpo.steps=6", "grpo.eval_every=0", "save_every=2", "threads=1", "precision=fp32"]

    def command(store):
        return [sys.executable, "-m", "stages.grpo", f"store={store}", *args]

    straight, killed = (store_with_inputs(inputs, tmp_path / name) for name in ("straight", "killed"))
    errors = open(tmp_path / "straight.err", "w")
    uninterrupted = subprocess.Popen(command(straight), cwd=ROOT, stdout=subprocess.DEVNULL, stderr=errors)  # alongside
    proc = subprocess.Popen(command(killed), cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not (killed / "tiny-llama" / ".state" / "grpo" / "COMPLETE").exists():
        assert proc.poll() is None, "grpo ended before saving a resumable state"
        assert time.time() < deadline
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (killed / "tiny-llama" / "grpo" / "manifest.json").exists(), "killed too late: the stage had finished"
    resumed = subprocess.run(command(killed), cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "[grpo] resuming after step" in resumed.stdout
    assert uninterrupted.wait(timeout=300) == 0, (tmp_path / "straight.err").read_text()[-3000:]

    a, b = Store(straight).get("tiny-llama", "grpo"), Store(killed).get("tiny-llama", "grpo")
    log_a, log_b = ([json.loads(x) for x in open(c.path / "grpo_log.jsonl")] for c in (a, b))
    assert [r["step"] for r in log_b] == list(range(1, 7))  # no step lost or repeated
    assert log_b[-1]["reward"] == pytest.approx(log_a[-1]["reward"], abs=1e-3)
    assert b.metrics["greedy"]["reward"]["policy"] == pytest.approx(a.metrics["greedy"]["reward"]["policy"], abs=1e-3)
    assert Store(killed).verify() == []


def test_a_failure_after_the_last_step_repeats_no_training(inputs, tmp_path, monkeypatch, capsys):
    """The trained state is saved after the last step, before the comparison with SFT and the save: a run that
    fails there resumes after its last step, trains nothing again, and publishes."""
    from alignment import evaluation

    root = store_with_inputs(inputs, tmp_path)
    args = [f"store={root}", *COMMON, *GRPO, "grpo.eval_every=0", "save_every=100"]

    def lost(*args, **kwargs):
        raise RuntimeError("the machine went away")

    with monkeypatch.context() as patch:
        patch.setattr(evaluation, "compare_policies", lost)
        with pytest.raises(RuntimeError, match="went away"):
            grpo_stage.main(args)
    state = json.loads((root / "tiny-llama" / ".state" / "grpo" / "state.json").read_text())
    assert state["step"] == 2 and not (root / "tiny-llama" / "grpo").exists()
    capsys.readouterr()
    grpo_stage.main(args)
    assert "[grpo] resuming after step 2" in capsys.readouterr().out
    ckpt = Store(root).get("tiny-llama", "grpo")
    assert [json.loads(x)["step"] for x in open(ckpt.path / "grpo_log.jsonl")] == [1, 2]  # none trained twice
    assert ckpt.metrics["episodes"] == 0  # this session sampled nothing
    assert not (root / "tiny-llama" / ".state" / "grpo").exists()  # published: the state goes


def test_shipped_yaml_loads_and_impossible_settings_stop_at_start(tmp_path):
    cfg = config.load(grpo_stage.Config, "configs/grpo.yaml")
    cfg.grpo.check()  # config.load calls it too
    assert open("configs/grpo.yaml").readline().startswith("# make grpo ")
    for override, message in (("grpo.group_size=1", "a group needs 2 responses"),
                              ("grpo.scale_rewards=std", "is not 'group', 'batch' or 'none'"),
                              ("grpo.loss_aggregation=mean", "is not 'sequence', 'token' or 'constant'")):
        with pytest.raises(SystemExit, match=message):
            grpo_stage.main([f"store={tmp_path}", override])


@pytest.mark.parametrize("method", ["rloo", "reinforce"])
def test_critic_free_estimators_train_and_publish(inputs, tmp_path, method):
    """RLOO and REINFORCE++ through the same loop: finite log with their own fields, trained weights, lineage, no
    critic saved, the comparison with SFT; the report's headline takes them (report.METHODS)."""
    root = store_with_inputs(inputs, tmp_path / "store")
    group = 4 if method == "rloo" else 1
    stage = {"rloo": rloo_stage, "reinforce": reinforce_stage}[method]
    stage.main([f"store={root}", *COMMON, f"{method}.steps=2", f"{method}.batch_size=4",
                f"{method}.group_size={group}", f"{method}.mini_batch_size=8", f"{method}.max_new_tokens=8",
                f"{method}.eval_every=0", f"{method}.eval_samples=1"])
    store = Store(root)
    sft, rm, trained = (store.get("tiny-llama", s) for s in ("sft", "rm", method))
    m = trained.manifest
    assert m["stage"] == method and m["parents"] == [sft.id, rm.id] and store.stale(trained) is None
    log = [json.loads(line) for line in open(trained.path / f"{method}_log.jsonl")]
    assert [r["step"] for r in log] == [1, 2]
    own = ("loss", "clip_frac", "approx_kl", "kl", "reward") + (("penalized_reward",) if method == "rloo" else ())
    for record in log:
        for key in own:
            assert math.isfinite(record[key]), key
    assert trained.metrics["episodes"] == 2 * 4 * group and trained.metrics["skipped_non_finite"] == 0
    assert {"gold", "reward", "kl"} <= set(trained.metrics["greedy"])
    assert not (trained.path / "value_model").exists()  # no critic
    before, after = load_file(str(sft.path / "model.safetensors")), load_file(str(trained.path / "model.safetensors"))
    assert sum(not torch.equal(before[k], after[k]) for k in before) / len(before) > 0.9
    assert method in report.METHODS


def test_critic_free_settings_that_cannot_work_stop_at_start(tmp_path):
    with pytest.raises(config.ConfigError, match="leave-one-out baseline needs 2"):
        config.load(rloo_stage.Config, ROOT / "configs" / "rloo.yaml", ["rloo.group_size=1"])
    with pytest.raises(config.ConfigError, match="is not 'sequence'"):
        config.load(reinforce_stage.Config, ROOT / "configs" / "reinforce.yaml", ["reinforce.loss_aggregation=x"])
    for method, module in (("rloo", rloo_stage), ("reinforce", reinforce_stage)):
        for folder in ("configs", "configs/hh-rlhf"):
            cfg = config.load(module.Config, ROOT / folder / f"{method}.yaml", [])
            assert getattr(cfg, method).learning_rate == 1e-4  # the tiny class's preset (alignment/presets.py)
