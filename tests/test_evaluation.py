"""Evaluation metrics against hand-computed values, and the report end to end (JSON, HTML, headless Chromium)."""

import json
import math
import re
import shutil
import subprocess
import time
from types import SimpleNamespace

import pytest
import torch

from alignment import data, evaluation, logs, registry, report, stats, task
from alignment.loading import load_tokenizer
from alignment.store import Store
from stages import dpo as dpo_stage
from stages import eval as eval_stage
from stages import grpo as grpo_stage
from stages import ppo as ppo_stage
from stages import rm as rm_stage
from stages import sft as sft_stage


def test_perplexity_of_a_uniform_model_is_the_vocabulary_size(tiny_cache):
    spec = registry.get("tiny-llama")
    tokenizer = load_tokenizer(registry.resolve(spec), spec)
    vocab = len(tokenizer)

    class Uniform(torch.nn.Module):
        def forward(self, input_ids, attention_mask=None):
            return SimpleNamespace(logits=torch.zeros(*input_ids.shape, vocab))

    records = [{"prompt": "sort: b a", "completion": "a b"}, {"prompt": "copy: c d e", "completion": "c d e"}]
    out = evaluation.cross_entropy(Uniform(), tokenizer, spec, records)
    assert out["cross_entropy"]["mean"] == pytest.approx(math.log(vocab))
    assert out["perplexity"]["mean"] == pytest.approx(vocab, rel=1e-5)
    assert out["cross_entropy"]["ci95"] == pytest.approx([math.log(vocab)] * 2)
    # the tokens counted are the completions plus EOS, not the prompts
    expected = sum(len(tokenizer(spec.format_prompt(r["prompt"]) + r["completion"]).input_ids) + 1
                   - len(tokenizer(spec.format_prompt(r["prompt"])).input_ids) for r in records)
    assert out["tokens"] == expected


def test_token_nll_of_a_known_distribution():
    logits = torch.log(torch.tensor([[[0.5, 0.25, 0.25], [0.1, 0.8, 0.1]]]))
    labels = torch.tensor([[0, 1]])
    assert evaluation.token_nll(logits, labels, torch.ones(1, 2)).item() == pytest.approx(
        -math.log(0.5) - math.log(0.8)
    )
    assert evaluation.token_nll(logits, labels, torch.tensor([[0.0, 1.0]])).item() == pytest.approx(-math.log(0.8))


def test_win_rate_counts_ties_half():
    assert stats.wins([1, 2, 3, 5], [0, 2, 4, 1]) == [1.0, 0.5, 0.0, 1.0]
    assert stats.mean(stats.wins([1, 2, 3, 5], [0, 2, 4, 1])) == 0.625


def test_distinct_n():
    texts = ["a b a", "a b c"]
    # unigrams: a b a a b c -> 3 distinct of 6; bigrams: (a b) (b a) (a b) (b c) -> 3 of 4
    assert stats.distinct_n(texts, 1) == pytest.approx(0.5)
    assert stats.distinct_n(texts, 2) == pytest.approx(0.75)
    assert stats.distinct_n(["a"], 2) == 0.0


def test_bootstrap_interval_on_a_known_sample():
    assert stats.bootstrap_ci([3.0] * 20) == (3.0, 3.0)
    # 100 coin flips, 50 heads: the mean's standard error is 0.05, so the 95% interval is about 0.5 +- 0.098
    lo, hi = stats.bootstrap_ci([0.0] * 50 + [1.0] * 50, n_resamples=4000)
    assert lo == pytest.approx(0.402, abs=0.015) and hi == pytest.approx(0.598, abs=0.015)
    assert stats.bootstrap_ci([0.0] * 50 + [1.0] * 50, seed=1) == stats.bootstrap_ci(
        [0.0] * 50 + [1.0] * 50, seed=1
    )


def test_paired_difference_and_pearson():
    d = stats.paired_difference([2.0, 3.0, 4.0], [1.0, 1.0, 1.0])
    assert d["mean"] == pytest.approx(2.0) and 1.0 <= d["ci95"][0] <= d["ci95"][1] <= 3.0
    assert stats.pearson([1, 2, 3], [2, 4, 6]) == pytest.approx(1.0)
    assert stats.pearson([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    assert math.isnan(stats.pearson([1, 1, 1], [1, 2, 3]))


def test_calibration_buckets_by_absolute_margin():
    margins = [0.1, -0.2, 0.3, -0.4, 2.0, 3.0]
    buckets = stats.calibration(margins, buckets=3)
    assert [b["pairs"] for b in buckets] == [2, 2, 2]
    assert [b["accuracy"] for b in buckets] == [0.5, 0.5, 1.0]
    assert buckets[2]["predicted"] == pytest.approx(1 / (1 + math.exp(-2.5)))
    assert buckets[0]["abs_margin_min"] == pytest.approx(0.1) and buckets[0]["abs_margin_max"] == pytest.approx(0.2)


def test_bootstrap_of_the_mean_matches_item_by_item_resampling():
    # numpy takes the mean of all resamples at once; the item-by-item path (any other statistic) must agree
    values = [0.0, 1.0, 1.0, 2.0, 5.0, 3.0]
    assert stats.bootstrap_ci(values) == stats.bootstrap_ci(values, statistic=lambda xs: sum(xs) / len(xs))


def test_side_by_side_prompts_spread_over_the_instruction_kinds():
    prompts = [r["prompt"] for r in data.load("task", "prompts_eval")]
    kind = lambda p: task.parse_prompt(p)[0]
    assert {kind(p) for p in prompts[:8]} == {"copy"}  # the held-out prompts are sorted: the first 8 are one kind
    shown = stats.spread_sample(prompts, 8, seed=0, kind=kind)
    assert [kind(prompts[i]) for i in shown] == ["copy"] * 2 + ["drop first"] * 2 + ["reverse"] * 2 + ["sort"] * 2
    assert shown == stats.spread_sample(prompts, 8, seed=0, kind=kind)  # fixed by the seed
    assert shown != stats.spread_sample(prompts, 8, seed=1, kind=kind)
    plain = stats.spread_sample(prompts, 8, seed=0)  # other data: evenly at random, in file order
    assert len(set(plain)) == 8 and plain == sorted(plain) and plain != list(range(8))


def test_versus_sft_pairs_each_prompt_with_sfts():
    # 2 prompts, 2 samples each; per prompt the sampled scores are averaged before pairing
    sft = {"reward": [1.0, 1.0], "gold": [0.5, 0.5], "kl": [0.0, 0.0]}
    sft_sampled = {"reward": [0.0, 1.0, 2.0, 2.0], "gold": [0.0, 0.0, 1.0, 1.0], "kl": [0.0] * 4}
    greedy = {"reward": [2.0, 3.0], "gold": [0.5, 1.0], "kl": [0.1, 0.1], "responses": ["a", "b"]}
    sampled = {"reward": [1.0, 2.0, 2.0, 4.0], "gold": [0.0, 1.0, 1.0, 1.0], "kl": [1.0, 3.0, 2.0, 2.0]}
    vs = evaluation.versus_sft(greedy, sampled, sft, sft_sampled, samples=2, gold=True)
    assert vs["prompts"] == 2 and vs["greedy"]["reward"]["difference"]["mean"] == pytest.approx(1.5)  # (1 + 2) / 2
    assert vs["greedy"]["gold"]["difference"]["mean"] == pytest.approx(0.25)
    # per prompt: policy (1.5, 3.0) against sft (0.5, 2.0): +1 each
    assert vs["sampled"]["reward"]["difference"] == {"mean": pytest.approx(1.0), "ci95": [pytest.approx(1.0)] * 2}
    assert vs["sampled"]["reward"]["policy"] == pytest.approx(2.25) and vs["sampled"]["reward"]["sft"] == pytest.approx(
        1.25
    )
    assert vs["kl"]["mean"] == pytest.approx(2.0)  # the sampled responses' KL, never the greedy ones'
    # no reward model (a run rewarded by functions alone): no reward scores, gold alone
    unjudged = [{**r, "reward": []} for r in (greedy, sampled, sft, sft_sampled)]
    vs = evaluation.versus_sft(*unjudged, samples=2, gold=True)
    assert vs["prompts"] == 2 and set(vs["greedy"]) == set(vs["sampled"]) == {"gold"}
    assert vs["greedy"]["gold"]["difference"]["mean"] == pytest.approx(0.25)


def test_training_log_kept_in_the_checkpoint_or_read_from_tensorboard(tmp_path):
    from torch.utils.tensorboard import SummaryWriter

    store = Store(tmp_path)
    tensorboard = store.run_dir("r") / "tensorboard" / "sft"
    old = SummaryWriter(str(tensorboard))  # an earlier training of the run, longer than the one published
    for step in (10, 20, 30):
        old.add_scalar("train/loss", 9.0, step)
    old.close()
    time.sleep(1.1)  # event files are named by the second they were opened
    new = SummaryWriter(str(tensorboard))
    for step, loss in ((10, 2.0), (20, 1.0)):
        new.add_scalar("train/loss", loss, step)
    new.add_scalar("eval/loss", 1.5, 20)
    new.close()
    tmp = store.staging("r", "sft")
    (tmp / "weights.bin").write_text("w")
    checkpoint = store.publish(tmp, {"run": "r", "stage": "sft", "parents": [], "metrics": {"steps": 20}})
    records, source = logs.read_log_history(checkpoint, tensorboard)
    assert (
        records == [{"step": 10, "loss": 2.0}, {"step": 20, "loss": 1.0, "eval_loss": 1.5}] and "TensorBoard" in source
    )
    # what the stages keep once they call logs.save_log_history(trainer, folder) before publishing
    tmp = store.staging("r", "sft")
    logs.save_log_history(SimpleNamespace(state=SimpleNamespace(log_history=[{"loss": 0.5, "step": 5}])), tmp)
    checkpoint = store.publish(tmp, {"run": "r", "stage": "sft", "parents": [], "metrics": {"steps": 5}})
    assert logs.read_log_history(checkpoint, tensorboard) == ([{"loss": 0.5, "step": 5}], f"r/sft/{logs.LOG_FILE}")
    assert logs.LOG_FILE in checkpoint.manifest["files"]  # hashed with the rest: store verify covers it


HOSTILE = "<script>alert('x')</script><img src=x onerror=alert(1)>"


def _est(mean: float, half: float = 0.05) -> dict:
    return {"mean": mean, "ci95": [mean - half, mean + half]}


def _policy(
    reward: float = 0.0, gold: float | None = 0.0, kl: float = 0.0, ended: float = 1.0, curve=(), **recorded
) -> dict:
    """A policy entry of report.json as stages/eval.py writes it, its differences to SFT given (+-0.05)."""
    modes = {
        mode: {
            "reward": {"policy": 1.0 + reward, "sft": 1.0, "difference": _est(reward)},
            **({"gold": {"policy": 0.5 + gold, "sft": 0.5, "difference": _est(gold)}} if gold is not None else {}),
        }
        for mode in ("greedy", "sampled")
    }
    out = {"kind": "policy", "reward": _est(1.0 + reward), "kl_per_response": _est(kl), "ended_with_eos": _est(ended),
           "vs_sft": {"prompts": 40, "samples": 1, **modes, "kl": _est(kl, 0.5)}}
    if curve or recorded:
        out["recorded"] = {"eval_curve": list(curve), "curve_prompts": 16, "skipped_non_finite": 0, **recorded}
    return out


def _run(gold: bool) -> dict:
    """One run that trips every warning: a stale PPO, a judge preferring the base, PPO gaming it beyond the KL
    budget and falling in gold along its curve, responses cut off, a judge near chance, two accuracies."""
    g = 0.0 if gold else None
    curve = [{"step": 0, "eval_reward": 0.0, "eval_gold": 0.5, "eval_kl": 0.0},
             {"step": 10, "eval_reward": 0.4, "eval_gold": 0.7, "eval_kl": 4.0},
             {"step": 20, "eval_reward": 0.9, "eval_gold": 0.4, "eval_kl": 11.0}]
    curve = [{k: v for k, v in p.items() if gold or k != "eval_gold"} for p in curve]
    return {
        "model": "tiny-llama",
        "data": "task" if gold else "mine",
        "gold": gold,
        "prompts": 40,
        "pairs": 100,
        "demonstrations": 30,
        "base": "/cache/tiny-llama",
        "checkpoints": {
            "base": _policy(reward=0.3, gold=-0.2 if gold else None, kl=20.0),
            "sft": _policy(gold=g),
            "rm": {
                "kind": "reward_model",
                "rm_accuracy": _est(0.55, 0.1),
                "rm_margin": _est(0.1),
                "pairs": 100,
                "rm_calibration": [
                    {"abs_margin_min": 0.0, "abs_margin_max": 1.0, "pairs": 100, "accuracy": 0.55, "predicted": 0.6}
                ],
                "rm_length_correlation": 0.2,
                "shorter_wins_accuracy": 0.6,
                "stage_recorded": {"accuracy": 0.56, "pairs": 100, "limit": 0, "fingerprint": "f"},
                "now": {"limit": 0, "fingerprint": "f", "dtype": "bfloat16"},
            },
            "ppo": _policy(
                reward=0.5, gold=-0.1 if gold else None, kl=12.0, ended=0.3, curve=curve, duration_s=95.0, episodes=3840
            ),
            "dpo": _policy(
                reward=0.1, gold=0.1 if gold else None, kl=2.0, curve=curve[:2], duration_s=40.0, pairs_seen=3000
            ),
        },
        "lineage": [
            {
                "id": "r/sft",
                "uid": "u1",
                "stage": "sft",
                "parents": [],
                "stale": None,
                "created": "t",
                "duration_s": 60.0,
                "adapter": False,
                "data": {"profile": "task", "fingerprint": "abc"},
                "config": {"sft": {"batch_size": 32}},
            },
            {
                "id": "r/ppo",
                "uid": "u3",
                "stage": "ppo",
                "parents": [{"id": "r/sft", "uid": "u0"}],
                "stale": "parent r/sft was replaced (uid u0 -> u1)",
                "created": "t",
                "duration_s": 95.0,
                "adapter": False,
                "data": None,
                "config": {"ppo": {"batch_size": 64}},
            },
        ],
        "training_logs": {
            "sft": {
                "records": [
                    {"step": 10, "loss": 2.0},
                    {"step": 20, "loss": 1.0},
                    {"step": 20, "eval_loss": 1.2, "eval_runtime": 0.5, "eval_samples_per_second": 60.0},
                ],
                "source": "r/sft/train_log.jsonl",
            },
            "rm": {"records": [], "source": "none kept"},
            "ppo": {
                "records": [{"step": 1, "reward": 0.1, "kl": 0.0}, {"step": 2, "reward": 0.3, "kl": 0.5}],
                "source": "r/ppo/ppo_log.jsonl",
            },
        },
        "side_by_side": [
            {
                "prompt": HOSTILE,
                "kind": None,
                "sft": {"response": HOSTILE, "reward": 0.1},
                "ppo": {"response": "a b", "reward": 0.2},
            }
        ],
    }


def _result(runs: dict) -> dict:
    return {"created": "now", "store": "s", "duration_s": 1.0, "definitions": {"reward": "d"}, "runs": runs,
            "settings": {"seed": 0, "eval": {"kl_budget": 8.0, "max_new_tokens": 20, "temperature": 1.0, "samples": 1}}}


def test_report_warns_in_words_where_the_numbers_say_so():
    said = "\n".join(report.warnings(_result({"r": _run(gold=True)})))
    for expected in (
        "r/ppo is stale: parent r/sft was replaced",
        "prefers the untrained base model to SFT",
        "by the gold judge the base is -0.200",
        "Over-optimisation: ppo scores higher than SFT",
        "every interval excludes zero",
        "Over-optimisation during ppo's training: after step 10",
        "over the KL budget of 8 (eval.kl_budget); during training it passed the budget at step 20",
        "Most sampled responses reach eval.max_new_tokens=20 without ending (ppo 70%)",
        "not clearly better than chance",
        "no better than the rule 'the shorter response wins'",
        "Two reward-model accuracies: 0.550",
        "rounding flips pairs",
    ):
        assert expected in said, expected
    assert "dpo" not in said  # within budget, gold and reward up together
    assert "No gold judge" not in said
    unjudged = "\n".join(report.warnings(_result({"r": _run(gold=False)})))
    assert "No gold judge for r's data" in unjudged and "Over-optimisation" not in unjudged


def _without_reward_model(run: dict) -> dict:
    """The run as stages/eval.py writes one whose store holds no reward model: no rm checkpoint, no reward scores."""
    run["checkpoints"].pop("rm")
    for m in run["checkpoints"].values():
        m.pop("reward", None)
        for mode in ("greedy", "sampled"):
            m["vs_sft"][mode].pop("reward")
        for p in (m.get("recorded") or {}).get("eval_curve", []):
            p.pop("eval_reward", None)
    for row in run["side_by_side"]:
        for stage in ("sft", "ppo"):
            row[stage].pop("reward")
    return run


def test_report_of_a_run_without_reward_model_or_gold_judge(tmp_path):
    """Functions alone rewarded it and its data has no judge: the page has nothing to draw against KL, no
    reward-model column, and says so instead of failing."""
    result = _result({"r": _without_reward_model(_run(gold=False))})
    report.write(result, tmp_path)
    page = (tmp_path / "report.html").read_text()
    assert "RM reward" not in page and "reward-model score" not in page
    assert "neither a gold judge nor a reward model: nothing to draw" in page
    assert "frontier" not in {p.stem for p in (tmp_path / "plots").iterdir()}
    assert all(k not in row for row in result["headline"] for k in ("reward_greedy", "reward_sampled"))
    assert any("take reward gains as the reward functions' opinion" in w for w in result["warnings"])


def test_report_agrees_with_the_reward_models_manifest_or_says_why():
    rm = _run(gold=True)["checkpoints"]["rm"]
    rm["stage_recorded"]["accuracy"] = 0.55
    assert report.rm_agreement(rm) == (True, ("Reward-model accuracy 0.550 on 100 held-out pairs (prefs_eval): the "
                                             "same number the rm stage recorded in its manifest after training."))
    rm["stage_recorded"].update(pairs=48, limit=48)
    agree, words = report.rm_agreement(rm)
    assert not agree and "the stage scored 48 pairs (limit=48), this report 100 (limit=0)" in words


def test_report_of_two_runs_is_one_self_contained_page(tmp_path):
    result = _result({"r": _run(gold=True), "other": _run(gold=False)})
    report.write(result, tmp_path)
    page = (tmp_path / "report.html").read_text()
    assert HOSTILE not in page and "&lt;script&gt;alert(&#39;x&#39;)&lt;/script&gt;" in page  # model output escaped
    assert json.loads((tmp_path / "report.json").read_text())["runs"]["r"]["side_by_side"][0]["prompt"] == HOSTILE
    methods = [row["method"] for row in result["headline"]]
    assert methods == ["r/sft (reference)", "r/base", "r/ppo", "r/dpo", "other/sft (reference)", "other/base",
                       "other/ppo", "other/dpo"]
    ppo = result["headline"][2]
    assert ppo["trained_on"] == "3,840 episodes" and ppo["duration_s"] == 95.0 and ppo["kl"]["mean"] == 12.0
    assert result["headline"][3]["trained_on"] == "3,000 pairs"
    images = re.findall(r"<img src=\"([^\"]+)\"", page)
    names = {"headline", "frontier", "held_out_curves", "rl_training", "training_curves", "rm_calibration"}
    assert len(images) == len(names) and all(src.startswith("data:image/png;base64,") for src in images)
    assert {p.stem for p in (tmp_path / "plots").iterdir()} == names
    headings = re.findall(r"<h2 id=\"([a-z-]+)\">", page)
    assert headings == ["headline", "warnings", "frontier", "curves", "training", "samples", "reward-model", "metrics",
                        "lineage", "definitions"]


@pytest.fixture(scope="module")
def evaluated_store(tmp_path_factory, tiny_cache):
    root = tmp_path_factory.mktemp("eval-store")
    common = [f"store={root}", "limit=48", "threads=2"]
    sft_stage.main([*common, "sft.epochs=1", "sft.batch_size=16", "sft.logging_steps=1"])
    rm_stage.main([*common, "rm.epochs=1", "rm.batch_size=16", "rm.logging_steps=1"])
    ppo_stage.main([*common, "ppo.steps=3", "ppo.batch_size=8", "ppo.mini_batch_size=4", "ppo.max_new_tokens=8",
                    "ppo.eval_samples=1", "ppo.eval_every=2", "ppo.eval_prompts=8"])
    dpo_stage.main([*common, "dpo.batch_size=16", "dpo.logging_steps=1", "dpo.eval_every=2", "dpo.eval_prompts=8",
                    "dpo.eval_samples=1", "dpo.max_new_tokens=8"])
    grpo_stage.main([*common, "grpo.steps=2", "grpo.batch_size=4", "grpo.group_size=4", "grpo.mini_batch_size=8",
                     "grpo.max_new_tokens=8", "grpo.eval_every=1", "grpo.eval_prompts=8", "grpo.eval_samples=1"])
    eval_stage.main([*common, "eval.max_new_tokens=8", "eval.side_by_side=4", "eval.kl_budget=0.001"])
    return root / "tiny-llama"


def test_report_json_holds_every_metric_for_every_checkpoint(evaluated_store):
    result = json.loads((evaluated_store / "report.json").read_text())
    run = result["runs"]["tiny-llama"]
    assert set(run["checkpoints"]) == {"base", "sft", "rm", "ppo", "dpo", "grpo"}
    policy_metrics = ["cross_entropy", "perplexity", "reward", "win_rate_vs_sft", "kl_per_token", "kl_per_response",
                      "response_length", "distinct_1", "distinct_2", "ended_with_eos", "gold", "gold_win_rate_vs_sft"]
    for stage in ("base", "sft", "ppo", "dpo", "grpo"):
        m = run["checkpoints"][stage]
        for key in policy_metrics:
            assert key in m, f"{stage} lacks {key}"
            assert key in result["definitions"]
        for key in ("reward", "gold", "win_rate_vs_sft", "cross_entropy"):
            lo, hi = m[key]["ci95"]
            assert lo <= m[key]["mean"] <= hi
    assert run["checkpoints"]["sft"]["kl_per_token"]["mean"] == pytest.approx(0.0, abs=1e-5)  # SFT is the reference
    rm = run["checkpoints"]["rm"]
    for key in ("rm_accuracy", "rm_margin", "rm_calibration", "rm_length_correlation", "shorter_wins_accuracy"):
        assert key in rm and key in result["definitions"]
    assert sum(b["pairs"] for b in rm["rm_calibration"]) == rm["pairs"] == 48
    # one reward-model accuracy: the manifest's, recomputed from the checkpoint on the same 48 pairs
    assert rm["rm_accuracy"]["mean"] == rm["stage_recorded"]["accuracy"] and rm["stage_recorded"]["pairs"] == 48
    assert not any("reward-model accuracies" in w for w in result["warnings"])
    ppo = run["checkpoints"]["ppo"]["recorded"]
    assert [p["step"] for p in ppo["eval_curve"]] == [0, 2, 3] and ppo["curve_prompts"] == 8  # PPO's eval_every points
    assert {"eval_reward", "eval_gold", "eval_kl"} <= set(ppo["eval_curve"][-1])
    assert len(run["side_by_side"]) == 4 and all(
        {"base", "sft", "ppo", "dpo", "grpo"} <= set(row) for row in run["side_by_side"]
    )
    assert all({"response", "reward", "gold"} == set(row["ppo"]) for row in run["side_by_side"])
    # the headline: every method against SFT, greedy and sampled, gold and reward, with KL, time and what it saw
    rows = {row["stage"]: row for row in result["headline"]}
    assert list(rows) == ["sft", "base", "ppo", "dpo", "grpo"]
    for stage in ("base", "ppo", "dpo", "grpo"):
        for key in ("gold_greedy", "gold_sampled", "reward_greedy", "reward_sampled", "kl"):
            lo, hi = rows[stage][key]["ci95"]
            assert lo <= rows[stage][key]["mean"] <= hi and rows[stage]["prompts"] == 48
    ppo_manifest = Store(evaluated_store.parent).get("tiny-llama", "ppo").metrics
    assert (
        rows["ppo"]["trained_on"] == f"{ppo_manifest['episodes']} episodes"
        and rows["ppo"]["duration_s"] == ppo_manifest["duration_s"]
    )
    assert rows["dpo"]["trained_on"].endswith(" pairs") and rows["grpo"]["trained_on"] == "32 episodes"  # 2 x 4 x 4
    for stage in ("dpo", "grpo"):  # the per-step logs the report draws (training curves)
        assert run["training_logs"][stage]["records"], run["training_logs"][stage]["source"]
    assert any("loss" in r for r in run["training_logs"]["dpo"]["records"])
    assert run["training_logs"]["dpo"]["source"] == f"tiny-llama/dpo/{logs.LOG_FILE}"
    assert run["training_logs"]["grpo"]["source"] == "tiny-llama/grpo/grpo_log.jsonl"
    assert any("ppo is" in w and "over the KL budget of 0.001" in w for w in result["warnings"])
    # limit=48 keeps the first prompts of the sorted file: one operation, which the report says
    assert run["prompt_kinds"] == {"copy": 48} and any(
        "hold only copy (48) of the task's 4" in w for w in result["warnings"]
    )
    # lineage, config and run time of every checkpoint; training curves from the trainers' logs (TensorBoard here)
    assert [c["id"] for c in run["lineage"]] == [f"tiny-llama/{s}" for s in ("sft", "rm", "ppo", "dpo", "grpo")]
    assert all(c["uid"] and c["config"] and c["duration_s"] is not None and c["stale"] is None for c in run["lineage"])
    assert run["lineage"][4]["parents"][1] == {"id": "tiny-llama/rm", "uid": run["lineage"][1]["uid"]}
    for stage, key in (("sft", "loss"), ("sft", "eval_loss"), ("rm", "loss"), ("rm", "eval_accuracy")):
        assert any(key in r for r in run["training_logs"][stage]["records"]), (stage, key)


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(
    CHROMIUM is None, reason="Debian's chromium is not installed (apt-get install chromium; .ci/run does)"
)
def test_report_renders_in_headless_chromium(evaluated_store, tmp_path):
    alone = tmp_path / "alone.html"  # the page without its folder: every figure travels inside it
    shutil.copy(evaluated_store / "report.html", alone)
    html_text = alone.read_text()
    for method in ("base", "ppo", "dpo", "grpo"):
        assert f"<td><b>{method}</b></td>" in html_text
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--no-first-run",
             "--disable-component-update", "--disable-sync", f"--user-data-dir={tmp_path / 'profile'}"]
    dom = subprocess.run([CHROMIUM, *flags, "--virtual-time-budget=10000", "--dump-dom", alone.as_uri()],
                         capture_output=True, text=True, timeout=120).stdout
    images = dom.count("<img ")
    # headline, gold-vs-KL frontier, held-out curves, PPO training, SFT/RM training, calibration (DPO and GRPO
    # draw into the curves once their stages run: fixtures keep no per-step log)
    assert images == 6 and dom.count('src="data:image/png;base64,') == 6
    assert f'data-images-loaded="{images}"' in dom  # every embedded figure was decoded by the browser
    shot = tmp_path / "report.png"
    subprocess.run([CHROMIUM, *flags, "--window-size=1300,2400", f"--screenshot={shot}", alone.as_uri()],
                   capture_output=True, timeout=120)
    assert shot.stat().st_size > 50_000


def test_generate_and_chat_commands(evaluated_store):
    import sys

    store_root = str(evaluated_store.parent)
    env = {**__import__("os").environ, "HF_HUB_OFFLINE": "1"}
    out = subprocess.run([sys.executable, "-m", "alignment", "generate", "tiny-llama/ppo", "sort: b a",
                          "--root", store_root, "--max-new-tokens", "6"], capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr
    from alignment.__main__ import load_policy, respond  # the same greedy response, computed in-process

    model, tokenizer, spec = load_policy("tiny-llama/ppo", store_root)
    expected = respond(
        model, tokenizer, spec, "sort: b a", SimpleNamespace(max_new_tokens=6, temperature=1.0, sample=False)
    )
    assert out.stdout == expected + "\n"
    chat = subprocess.run([sys.executable, "-m", "alignment", "chat", str(evaluated_store / "sft"), "--max-new-tokens",
                           "6"], input="copy: a b\nsort: c a\n\n", capture_output=True, text=True, env=env)
    assert chat.returncode == 0, chat.stderr
    lines = chat.stdout.splitlines()  # a barely trained policy may answer with an empty line
    assert "template 'alpaca'" in lines[0] and len(lines) == 3  # banner + one response per prompt
    refused = subprocess.run([sys.executable, "-m", "alignment", "generate", "tiny-llama/rm", "sort: b a", "--root",
                              store_root], capture_output=True, text=True, env=env)
    assert refused.returncode == 1 and refused.stderr.strip().endswith(
        "tiny-llama/rm is a 'rm' checkpoint, not a policy: generate and chat take one of sft, ppo, dpo, grpo, "
        "rloo, reinforce (e.g. tiny-llama/ppo)"
    )
    listing = subprocess.run(f"{sys.executable} -m alignment store list --json --root {store_root} | head -1",
                             shell=True, capture_output=True, text=True, env=env)
    assert listing.stdout == "[\n" and "Error" not in listing.stderr  # the reader stopped early: no BrokenPipeError
