"""Faults: SIGKILL mid-training then resume, non-finite steps, safe loading."""

import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from alignment import guard, loading, machine, registry, resume, training
from alignment.store import Store
from stages import ppo as ppo_stage
from stages import rm as rm_stage
from stages import sft as sft_stage

ROOT = Path(__file__).resolve().parent.parent
COMMON = ["limit=64", "threads=1", "precision=fp32"]  # pinned: a resumed run must not time its way to another
STAGE_ARGS = {
    "sft": ["sft.epochs=6", "sft.batch_size=16", "save_every=4"],  # 24 steps
    "rm": ["rm.epochs=6", "rm.batch_size=16", "save_every=4"],
    "ppo": ["ppo.steps=8", "ppo.batch_size=8", "ppo.mini_batch_size=4", "ppo.ppo_epochs=1", "ppo.max_new_tokens=8",
            "ppo.eval_samples=1", "ppo.eval_every=0", "save_every=2"],
    "dpo": ["dpo.epochs=3", "dpo.batch_size=16", "save_every=4", "dpo.eval_every=4", "dpo.eval_prompts=8",
            "dpo.eval_samples=1", "dpo.max_new_tokens=8"],  # 12 steps
}
RESUMABLE = {"sft": ".trainer-sft/checkpoint-*/COMPLETE", "rm": ".trainer-rm/checkpoint-*/COMPLETE",
             "ppo": ".state/ppo/COMPLETE", "dpo": ".trainer-dpo/checkpoint-*/COMPLETE"}


def stage_command(stage, store):
    return [sys.executable, "-m", f"stages.{stage}", f"store={store}", *COMMON, *STAGE_ARGS[stage]]


def run_to_end(stage, store):
    out = subprocess.run(stage_command(stage, store), cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


def kill_after_first_state(stage, store):
    """Starts the stage, SIGKILLs it as soon as a resumable state is on disk; asserts it had not finished."""
    proc = subprocess.Popen(stage_command(stage, store), cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not list((store / "tiny-llama").glob(RESUMABLE[stage])):
        assert proc.poll() is None, f"{stage} ended before saving a resumable state"
        assert time.time() < deadline
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (store / "tiny-llama" / stage / "manifest.json").exists(), "killed too late: the stage had finished"


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, tiny_cache):
    """A store with SFT and RM checkpoints, the inputs of the later stages."""
    root = tmp_path_factory.mktemp("faults")
    base = root / "base"
    sft_stage.main([f"store={base}", *COMMON, "sft.epochs=1", "sft.batch_size=16"])
    rm_stage.main([f"store={base}", *COMMON, "rm.epochs=1", "rm.batch_size=16"])
    return root, base


def copy_inputs(base, dest, stages):
    import shutil

    for stage in stages:
        shutil.copytree(base / "tiny-llama" / stage, dest / "tiny-llama" / stage)


@pytest.mark.parametrize("stage", ["sft", "rm", "ppo", "dpo"])
def test_killed_run_resumes_and_ends_where_an_uninterrupted_one_does(prepared, stage):
    root, base = prepared
    inputs = {"sft": [], "rm": ["sft"], "ppo": ["sft", "rm"], "dpo": ["sft", "rm"]}[stage]
    straight, killed = root / f"{stage}-straight", root / f"{stage}-killed"
    for store in (straight, killed):
        copy_inputs(base, store, inputs)
    env_cache = os.environ["ALIGNMENT_CACHE"]
    assert env_cache  # subprocesses inherit the test cache
    run_to_end(stage, straight)
    kill_after_first_state(stage, killed)
    resumed_output = run_to_end(stage, killed)
    assert "resuming" in resumed_output

    a, b = Store(straight).get("tiny-llama", stage), Store(killed).get("tiny-llama", stage)
    assert a.metrics["steps"] == b.metrics["steps"]
    assert Store(killed).verify() == []
    if stage == "ppo":
        log_a = [json.loads(x) for x in open(a.path / "ppo_log.jsonl")]
        log_b = [json.loads(x) for x in open(b.path / "ppo_log.jsonl")]
        assert [r["step"] for r in log_b] == list(range(1, 9))  # no step lost or repeated
        assert log_b[-1]["reward"] == pytest.approx(log_a[-1]["reward"], abs=1e-3)
        assert b.metrics["greedy"]["reward"]["policy"] == pytest.approx(
            a.metrics["greedy"]["reward"]["policy"], abs=1e-3
        )
    else:
        key = "eval_accuracy" if stage == "rm" else "eval_loss"
        assert b.metrics[key] == pytest.approx(a.metrics[key], abs=1e-3)  # same data order, same result
    if stage == "dpo":  # the held-out points from before the kill are kept, none repeated
        assert [p["step"] for p in b.metrics["eval_curve"]] == [0, 4, 8, 12]
        assert b.metrics["eval_curve"][-1]["eval_gold"] == pytest.approx(
            a.metrics["eval_curve"][-1]["eval_gold"], abs=1e-3
        )
    AutoModelForCausalLM.from_pretrained(b.path) if stage != "rm" else None
    assert (
        not (killed / "tiny-llama" / f".trainer-{stage}").exists()
        and not (killed / "tiny-llama" / ".state" / stage).exists()
    )


def test_a_key_the_saved_config_lacks_is_not_compared():
    """A state saved by a version without a setting (ppo.guard_collapse) resumes; a setting it has must match."""
    saved = {"model": "tiny-llama", "ppo": {"steps": 8, "kl_coef": 0.3}}
    resume.check_same_config(saved, {"model": "tiny-llama", "ppo": {"steps": 8, "kl_coef": 0.3,
                                                                  "guard_collapse": False}}, Path("state"))
    with pytest.raises(SystemExit, match="differs in: ppo"):
        resume.check_same_config(saved, {"model": "tiny-llama", "ppo": {"steps": 8, "kl_coef": 0.1,
                                                                      "guard_collapse": False}}, Path("state"))


def test_resume_refuses_a_state_from_another_config(prepared):
    root, _ = prepared
    store = root / "refuse"
    kill_after_first_state("sft", store)
    with pytest.raises(SystemExit, match=r"different config \(differs in: sft\).*resume=false"):
        sft_stage.main([f"store={store}", *COMMON, *STAGE_ARGS["sft"], "sft.learning_rate=0.1"])
    sft_stage.main([f"store={store}", *COMMON, "sft.epochs=1", "sft.batch_size=16", "resume=false"])  # starts over
    assert Store(store).get("tiny-llama", "sft").metrics["steps"] == 4


def nan_on_calls(original, calls):
    """Wraps a loss function: calls whose 1-based index is in `calls` return NaN."""
    count = {"n": 0}

    def wrapped(*args, **kwargs):
        count["n"] += 1
        out = original(*args, **kwargs)
        if count["n"] not in calls:
            return out
        if isinstance(out, tuple) and hasattr(out, "_replace"):
            return out._replace(loss=out.loss * float("nan"))
        return out * float("nan")

    return wrapped


def test_sft_skips_and_counts_nan_losses(prepared, monkeypatch):
    SFTTrainer = sft_stage.SFTTrainer  # the stage's trainer (TRL's, with the model's own loss)

    root, _ = prepared
    monkeypatch.setattr(SFTTrainer, "compute_loss", nan_on_calls(SFTTrainer.compute_loss, {2, 3}))  # train steps 2, 3
    sft_stage.main([f"store={root / 'nan-sft'}", *COMMON, "sft.epochs=2", "sft.batch_size=16"])
    ckpt = Store(root / "nan-sft").get("tiny-llama", "sft")
    assert ckpt.metrics["skipped_non_finite"] == 2 and ckpt.metrics["steps"] == 8
    assert math.isfinite(ckpt.metrics["eval_loss"])
    model = AutoModelForCausalLM.from_pretrained(ckpt.path)
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_sft_stops_after_a_run_of_nan_losses_keeping_the_last_checkpoint(prepared, monkeypatch):
    SFTTrainer = sft_stage.SFTTrainer

    root, _ = prepared
    store = root / "nan-run"
    # calls 1-4 train steps 1-4 (a checkpoint at step 4), 5-8 evaluate epoch 1, 9 on train steps 5, 6, ...
    monkeypatch.setattr(SFTTrainer, "compute_loss", nan_on_calls(SFTTrainer.compute_loss, set(range(6, 100))))
    with pytest.raises(guard.NonFiniteError, match="stopping at step 8: 4 updates in a row"):
        sft_stage.main([f"store={store}", *COMMON, *STAGE_ARGS["sft"], "max_bad_steps=4"])
    kept = sorted((store / "tiny-llama" / ".trainer-sft").glob("checkpoint-*/COMPLETE"))
    assert [p.parent.name for p in kept] == ["checkpoint-4"]  # the last good state, ready to resume from


def test_ppo_skips_nan_losses_and_stops_after_a_run(prepared, monkeypatch):
    from alignment import ppo

    root, base = prepared
    store = root / "nan-ppo"
    copy_inputs(base, store, ["sft", "rm"])
    monkeypatch.setattr(ppo, "policy_loss", nan_on_calls(ppo.policy_loss, {1, 3}))
    ppo_stage.main([f"store={store}", *COMMON, *STAGE_ARGS["ppo"]])
    ckpt = Store(store).get("tiny-llama", "ppo")
    assert ckpt.metrics["skipped_non_finite"] == 2
    monkeypatch.setattr(ppo, "policy_loss", nan_on_calls(ppo.policy_loss, set(range(5, 100))))
    with pytest.raises(guard.NonFiniteError, match=r"stopping at PPO step 4: 3 updates in a row"):
        ppo_stage.main([f"store={store}", *COMMON, *STAGE_ARGS["ppo"], "max_bad_steps=3"])
    state = json.loads((store / "tiny-llama" / ".state" / "ppo" / "state.json").read_text())
    assert state["step"] == 2  # two minibatches a step: calls 5-7 are steps 3-4; step 2 is the last saved


def test_the_guard_publishes_the_policy_of_the_last_healthy_held_out_point(prepared, monkeypatch, capsys):
    """ppo.guard_collapse: a held-out point whose answers collapsed (here: from step 3 on every held-out answer is
    made the same) stops training, and the policy of step 2 is compared and published, the very weights a run of 2
    steps publishes; the manifest says so, and the kept weights are gone once published."""
    from safetensors.torch import load_file

    from alignment import evaluation

    root, base = prepared
    args = [*COMMON, "ppo.batch_size=8", "ppo.mini_batch_size=4", "ppo.ppo_epochs=1", "ppo.max_new_tokens=8",
            "ppo.eval_samples=1", "ppo.eval_every=1", "ppo.eval_prompts=8", "save_every=100"]
    two_steps, guarded = root / "guard-two-steps", root / "guard"
    for store in (two_steps, guarded):
        copy_inputs(base, store, ["sft", "rm"])
    ppo_stage.main([f"store={two_steps}", *args, "ppo.steps=2"])
    assert "collapsed" not in capsys.readouterr().out

    point, same = evaluation.held_out_point, lambda r: ["a a a"] * len(r["responses"])  # sampled and greedy alike
    monkeypatch.setattr(evaluation, "held_out_point", lambda r, prompts, step: point(
        {**r, "responses": same(r), "greedy_responses": same(r)} if step >= 3 else r, prompts, step))
    ppo_stage.main([f"store={guarded}", *args, "ppo.steps=6", "ppo.guard_collapse=true"])
    out = capsys.readouterr().out
    # (the tiny SFT policy's greedy answers are often all empty: there a collapse shows in the sampled ones only)
    assert re.search(r"\[ppo\] held-out point of step 3: the policy's (greedy|sampled) answers collapsed", out)
    assert ("guard_collapse: the held-out point of step 3 shows a collapse; training stops, and the policy of "
            "step 2") in out
    published = Store(guarded).get("tiny-llama", "ppo")
    assert published.metrics["guard"]["collapsed_at_step"] == 3 and published.metrics["guard"]["published_step"] == 2
    assert [p["step"] for p in published.metrics["eval_curve"]] == [0, 1, 2, 3]
    assert published.metrics["episodes"] == 3 * 8  # three steps trained, the third's undone
    weights = load_file(published.path / "model.safetensors")
    expected = load_file(Store(two_steps).get("tiny-llama", "ppo").path / "model.safetensors")
    assert weights.keys() == expected.keys() and all(torch.equal(weights[k], expected[k]) for k in weights)
    assert not (guarded / "tiny-llama" / ".healthy-ppo").exists()


@pytest.mark.parametrize("collapse_at", [8, 4])
def test_dpos_guard_publishes_its_last_healthy_held_out_point(prepared, monkeypatch, capsys, collapse_at):
    """dpo.guard_collapse: held-out points at steps 0, 4, 8; from step 8 (or 4) on every held-out answer is made the
    same: training stops there and the weights of step 4 (or 0: the SFT policy), as kept, are measured and
    published."""
    from safetensors.torch import load_file

    from alignment import evaluation
    from alignment import guard as guard_module
    from stages import dpo as dpo_stage

    root, base = prepared
    store = root / f"dpo-guard-{collapse_at}"
    copy_inputs(base, store, ["sft", "rm"])
    point, same = evaluation.held_out_point, lambda r: ["a a a"] * len(r["responses"])
    monkeypatch.setattr(evaluation, "held_out_point", lambda r, prompts, step: point(
        {**r, "responses": same(r), "greedy_responses": same(r)} if step >= collapse_at else r, prompts, step))
    monkeypatch.setattr(guard_module, "clear_healthy", lambda *args: None)  # kept, to compare with what was published
    dpo_stage.main([f"store={store}", *COMMON, *STAGE_ARGS["dpo"], "dpo.epochs=2", "save_every=100",
                    "dpo.guard_collapse=true"])  # 8 steps
    out = capsys.readouterr().out
    assert re.search(rf"\[dpo\] held-out point of step {collapse_at}: the policy's (greedy|sampled) answers collapsed",
                     out)
    published = Store(store).get("tiny-llama", "dpo")
    assert published.metrics["guard"] == {**published.metrics["guard"], "collapsed_at_step": collapse_at,
                                          "published_step": collapse_at - 4}
    assert [p["step"] for p in published.metrics["eval_curve"]] == list(range(0, collapse_at + 1, 4))
    # step 0's policy is the SFT policy: its implicit rewards all 0, every held-out pair a tie, said so
    assert ("every pair ties" in out) == (collapse_at == 4)
    weights = load_file(published.path / "model.safetensors")
    kept = load_file(store / "tiny-llama" / ".healthy-dpo" / "model.safetensors")
    assert kept and all(torch.equal(weights[k], kept[k]) for k in kept)


def test_pickled_checkpoint_is_refused(tmp_path, tiny_cache):
    spec = registry.get("tiny-llama")
    model = AutoModelForCausalLM.from_pretrained(registry.resolve(spec))
    model.config.save_pretrained(tmp_path)
    torch.save(model.state_dict(), tmp_path / "pytorch_model.bin")  # a pickle: unpickling can run code
    assert (tmp_path / "pytorch_model.bin").is_file() and not (tmp_path / "model.safetensors").exists()
    with pytest.raises(OSError, match="safetensors"):
        loading.load_model(tmp_path, AutoModelForCausalLM, spec)


def test_path_traversal_run_name_is_refused(tmp_path):
    with pytest.raises(Exception, match="invalid run name '../outside'"):
        sft_stage.main([f"store={tmp_path}", "run=../outside", *COMMON])
    assert not (tmp_path.parent / "outside").exists()


def test_lora_targets_absent_from_the_model_fail_at_start(tmp_path, tiny_cache):
    with pytest.raises(SystemExit, match=r"lora.target_modules: \['c_attn'\] not in tiny-llama"):
        sft_stage.main([f"store={tmp_path}", *COMMON, "lora.enabled=true", "lora.target_modules=[c_attn]"])


def test_ctrl_c_ends_with_one_line_naming_the_step_and_the_state(prepared):
    root, base = prepared
    store = root / "interrupted"
    copy_inputs(base, store, ["sft", "rm"])
    proc = subprocess.Popen([*stage_command("ppo", store)[:-1], "save_every=1", "ppo.steps=40"], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # noqa: PLW1509 (no threads here)
    deadline = time.time() + 300
    while not (store / "tiny-llama" / ".state" / "ppo" / "COMPLETE").exists():
        assert proc.poll() is None and time.time() < deadline
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130
    last = err.strip().splitlines()[-1]
    assert re.fullmatch(rf"\[ppo\] stopped by Ctrl-C after step \d+; the last resumable state is "
                        rf"{re.escape(str(store))}/tiny-llama/.state/ppo: the same command resumes it", last), last
    assert "Traceback" not in err


def test_training_time_leaves_out_the_evaluations_inside_the_loop_only():
    """train_runtime counts the held-out evaluations run inside the loop, not an evaluate() after it nor those
    of a session before a resumption; the speed figures subtract exactly the first kind."""
    from types import SimpleNamespace

    history = [{"step": 0, "eval_runtime": 1.0}, {"step": 4, "eval_runtime": 2.0},  # before the kill at step 4
               {"step": 8, "eval_runtime": 3.0}, {"step": 8, "loss": 0.5}]  # this session's loop

    class Trainer:
        args, is_deepspeed_enabled = SimpleNamespace(world_size=1), False
        state = SimpleNamespace(log_history=history, num_input_tokens_seen=1400)

        def train(self, resume_from_checkpoint=None):
            return SimpleNamespace(metrics={"train_runtime": 10.0, "train_samples_per_second": 7.0})

    trainer = Trainer()
    result = training.train(trainer, "sft", "/store/run/.trainer-sft/checkpoint-4")
    history.append({"step": 8, "eval_runtime": 50.0})  # the stage's evaluate() after training
    speed = training.throughput(result.metrics, trainer.state, False)
    assert speed["train_runtime_s"] == 7.0 and speed["tokens_per_s"] == 200.0 and speed["samples_per_s"] == 10.0
    fresh = training.train(trainer, "sft", None)  # from the start: every evaluation in the log was this session's
    assert fresh.metrics["train_eval_runtime"] == 56.0


def test_precision_rules_the_launch_and_the_processes_of_one_launch_agree(monkeypatch):
    """Under `accelerate launch` the stage's precision becomes the launch's mixed precision (DeepSpeed's trainers
    refused to start when the two differed); 'auto' in a multi-process CPU launch takes the launch's instead of
    timing each process's CPU, which may disagree."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(machine, "_cpu_bf16_speedup", lambda: pytest.fail("a launch of 2 processes must not time"))
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    assert machine.use_bf16("auto") is True and os.environ["ACCELERATE_MIXED_PRECISION"] == "bf16"
    assert machine.use_bf16("fp32") is False and os.environ["ACCELERATE_MIXED_PRECISION"] == "no"
    assert machine.use_bf16("auto") is False  # the launch now says fp32: every later call agrees
    monkeypatch.delenv("ACCELERATE_MIXED_PRECISION")
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setattr(machine, "_cpu_bf16_speedup", lambda: 2.0)  # one process, not launched: it measures
    assert machine.use_bf16("auto") is True and "ACCELERATE_MIXED_PRECISION" not in os.environ


def test_a_run_stopped_before_its_first_checkpoint_leaves_nothing_that_blocks_another_config(tmp_path):
    work = tmp_path / ".trainer-dpo"  # what a stage that failed in its first step (a bad setting) leaves
    work.mkdir()
    (work / "stage_config.json").write_text(json.dumps({"dpo": {"loss_type": "nonsense"}}))
    assert resume._resume_point(work, {"dpo": {"loss_type": "ipo"}}, True, may_write=True) is None
    assert json.loads((work / "stage_config.json").read_text()) == {"dpo": {"loss_type": "ipo"}}
    checkpoint = work / "checkpoint-4"  # a complete checkpoint of it is resumable: another config is refused
    checkpoint.mkdir()
    (checkpoint / resume.COMPLETE).write_text("")
    with pytest.raises(SystemExit, match=r"different config \(differs in: dpo\)"):
        resume._resume_point(work, {"dpo": {"loss_type": "hinge"}}, True, may_write=True)
    assert resume._resume_point(work, {"dpo": {"loss_type": "ipo"}}, True, may_write=True) == str(checkpoint)


@pytest.mark.parametrize("saved, now, how", [
    ({"processes": 2, "deepspeed_zero_stage": 3}, ("2", "true", "3"), "same"),
    (None, ("4", "true", "3"), "same"),  # a state from before launches were recorded
    ({"processes": 2, "deepspeed_zero_stage": 0}, ("1", "false", "0"), "whole"),
    ({"processes": 2, "deepspeed_zero_stage": 2}, ("1", "true", "2"), "universal"),
    ({"processes": 1, "deepspeed_zero_stage": 3}, ("8", "true", "3"), "universal"),
    ({"processes": 2, "deepspeed_zero_stage": 2}, ("2", "true", "3"), None),
    ({"processes": 2, "deepspeed_zero_stage": 0}, ("2", "true", "2"), None),
    ({"processes": 2, "deepspeed_zero_stage": 3}, ("2", "false", "0"), None),
])
def test_a_state_resumes_on_any_number_of_processes_under_the_zero_stage_it_was_saved_by(monkeypatch, saved, now,
                                                                                      how):
    world, deepspeed, zero = now
    monkeypatch.setenv("WORLD_SIZE", world)
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", deepspeed)
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_ZERO_STAGE", zero)
    if how:
        assert resume.how_to_resume(saved, Path("state")) == how
    else:
        with pytest.raises(SystemExit, match=r"^state was saved by 2 process\(es\) .*\(RESUME=0"):
            resume.how_to_resume(saved, Path("state"))
    line = resume.changed_launch_line("ppo", saved, 8, "episodes")
    if saved and str(saved["processes"]) != world:
        assert line.startswith(f"[ppo] resuming a state saved by {saved['processes']} process(es) on {world}: "
                               f"{8 * int(world)} episodes per step instead of {8 * saved['processes']}")
    else:
        assert line is None


def test_zero3_gathers_whole_weights_for_the_final_save_or_refuses_at_start(monkeypatch, tmp_path):
    """Under ZeRO-3 the stages publish whole weights: a launch file without zero3_save_16bit_model gets it set at
    start-up; a DeepSpeed JSON config that turns it off stops the stage before anything trains, in one line."""
    from alignment import distributed

    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_ZERO_STAGE", "3")
    monkeypatch.delenv("ACCELERATE_DEEPSPEED_CONFIG_FILE", raising=False)
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_ZERO3_SAVE_16BIT_MODEL", "false")
    distributed.check_final_save("ppo")
    assert os.environ["ACCELERATE_DEEPSPEED_ZERO3_SAVE_16BIT_MODEL"] == "true"
    config = tmp_path / "ds.json"
    config.write_text(json.dumps({"zero_optimization": {"stage": 3}}))
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_CONFIG_FILE", str(config))
    with pytest.raises(SystemExit, match=r"ds.json: zero_optimization.stage3_gather_16bit_weights_on_model_save must"):
        distributed.check_final_save("sft")
    config.write_text(json.dumps({"zero_optimization": {"stage": 3,
                                                        "stage3_gather_16bit_weights_on_model_save": True}}))
    distributed.check_final_save("sft")
