"""Evaluation metrics against hand-computed values, and the report end to end (JSON, HTML, headless Chromium)."""

import json
import math
import shutil
import subprocess
from types import SimpleNamespace

import pytest
import torch

from alignment import evaluation, registry, report
from alignment.loading import load_tokenizer
from stages import eval as eval_stage
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
    assert evaluation.token_nll(logits, labels, torch.ones(1, 2)).item() == pytest.approx(-math.log(0.5) - math.log(0.8))
    assert evaluation.token_nll(logits, labels, torch.tensor([[0.0, 1.0]])).item() == pytest.approx(-math.log(0.8))


def test_win_rate_counts_ties_half():
    assert evaluation.wins([1, 2, 3, 5], [0, 2, 4, 1]) == [1.0, 0.5, 0.0, 1.0]
    assert evaluation.mean(evaluation.wins([1, 2, 3, 5], [0, 2, 4, 1])) == 0.625


def test_distinct_n():
    texts = ["a b a", "a b c"]
    # unigrams: a b a a b c -> 3 distinct of 6; bigrams: (a b) (b a) (a b) (b c) -> 3 of 4
    assert evaluation.distinct_n(texts, 1) == pytest.approx(0.5)
    assert evaluation.distinct_n(texts, 2) == pytest.approx(0.75)
    assert evaluation.distinct_n(["a"], 2) == 0.0


def test_bootstrap_interval_on_a_known_sample():
    assert evaluation.bootstrap_ci([3.0] * 20) == (3.0, 3.0)
    # 100 coin flips, 50 heads: the mean's standard error is 0.05, so the 95% interval is about 0.5 +- 0.098
    lo, hi = evaluation.bootstrap_ci([0.0] * 50 + [1.0] * 50, n_resamples=4000)
    assert lo == pytest.approx(0.402, abs=0.015) and hi == pytest.approx(0.598, abs=0.015)
    assert evaluation.bootstrap_ci([0.0] * 50 + [1.0] * 50, seed=1) == evaluation.bootstrap_ci([0.0] * 50 + [1.0] * 50, seed=1)


def test_paired_difference_and_pearson():
    d = evaluation.paired_difference([2.0, 3.0, 4.0], [1.0, 1.0, 1.0])
    assert d["mean"] == pytest.approx(2.0) and 1.0 <= d["ci95"][0] <= d["ci95"][1] <= 3.0
    assert evaluation.pearson([1, 2, 3], [2, 4, 6]) == pytest.approx(1.0)
    assert evaluation.pearson([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    assert math.isnan(evaluation.pearson([1, 1, 1], [1, 2, 3]))


def test_calibration_buckets_by_absolute_margin():
    margins = [0.1, -0.2, 0.3, -0.4, 2.0, 3.0]
    buckets = evaluation.calibration(margins, buckets=3)
    assert [b["pairs"] for b in buckets] == [2, 2, 2]
    assert [b["accuracy"] for b in buckets] == [0.5, 0.5, 1.0]
    assert buckets[2]["predicted"] == pytest.approx(1 / (1 + math.exp(-2.5)))
    assert buckets[0]["abs_margin_min"] == pytest.approx(0.1) and buckets[0]["abs_margin_max"] == pytest.approx(0.2)


def test_report_escapes_model_output(tmp_path):
    hostile = "<script>alert('x')</script><img src=x onerror=alert(1)>"
    result = {
        "created": "now", "store": "s", "definitions": {"reward": "d"}, "runs": {"r": {
            "model": "tiny-llama", "data": "task",
            "checkpoints": {"sft": {"kind": "policy", "reward": {"mean": 1.0, "ci95": [0.5, 1.5]}}},
            "side_by_side": [{"prompt": hostile, "sft": {"response": hostile, "reward": 0.1}}],
        }},
    }
    report.write(result, tmp_path)
    page = (tmp_path / "report.html").read_text()
    assert hostile not in page and "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt;" in page
    assert json.loads((tmp_path / "report.json").read_text())["runs"]["r"]["side_by_side"][0]["prompt"] == hostile


@pytest.fixture(scope="module")
def evaluated_store(tmp_path_factory, tiny_cache):
    root = tmp_path_factory.mktemp("eval-store")
    common = [f"store={root}", "limit=48", "threads=2"]
    sft_stage.main([*common, "sft.epochs=1", "sft.batch_size=16"])
    rm_stage.main([*common, "rm.epochs=1", "rm.batch_size=16"])
    ppo_stage.main([*common, "ppo.steps=3", "ppo.batch_size=8", "ppo.mini_batch_size=4", "ppo.max_new_tokens=8",
                    "ppo.eval_samples=1", "ppo.eval_every=2", "ppo.eval_prompts=8"])
    eval_stage.main([*common, "eval.max_new_tokens=8", "eval.side_by_side=3"])
    return root / "tiny-llama"


def test_report_json_holds_every_metric_for_every_checkpoint(evaluated_store):
    result = json.loads((evaluated_store / "report.json").read_text())
    run = result["runs"]["tiny-llama"]
    assert set(run["checkpoints"]) == {"base", "sft", "rm", "ppo"}
    policy_metrics = ["cross_entropy", "perplexity", "reward", "win_rate_vs_sft", "kl_per_token", "kl_per_response",
                      "response_length", "distinct_1", "distinct_2", "ended_with_eos", "gold", "gold_win_rate_vs_sft"]
    for stage in ("base", "sft", "ppo"):
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
    assert [p["step"] for p in run["ppo_eval"]] == [0, 2, 3]  # PPO evaluated during training
    assert {"eval_reward", "eval_gold", "eval_kl"} <= set(run["ppo_eval"][-1])
    assert len(run["side_by_side"]) == 3 and {"base", "sft", "ppo"} <= set(run["side_by_side"][0])


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed (apt-get install chromium; .ci/run does)")
def test_report_renders_in_headless_chromium(evaluated_store, tmp_path):
    page = (evaluated_store / "report.html").as_uri()
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--no-first-run",
             "--disable-component-update", "--disable-sync", f"--user-data-dir={tmp_path / 'profile'}"]
    dom = subprocess.run([CHROMIUM, *flags, "--virtual-time-budget=10000", "--dump-dom", page],
                         capture_output=True, text=True, timeout=120).stdout
    images = dom.count("<img ")
    assert images == 3  # headline, calibration, PPO curves
    assert f'data-images-loaded="{images}"' in dom  # every plot file was found and decoded by the browser
    shot = tmp_path / "report.png"
    subprocess.run([CHROMIUM, *flags, "--window-size=1300,2400", f"--screenshot={shot}", page],
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
    expected = respond(model, tokenizer, spec, "sort: b a", SimpleNamespace(max_new_tokens=6, temperature=1.0, sample=False))
    assert out.stdout == expected + "\n"
    chat = subprocess.run([sys.executable, "-m", "alignment", "chat", str(evaluated_store / "sft"), "--max-new-tokens",
                           "6"], input="copy: a b\nsort: c a\n\n", capture_output=True, text=True, env=env)
    assert chat.returncode == 0, chat.stderr
    lines = chat.stdout.splitlines()  # a barely trained policy may answer with an empty line
    assert "template 'alpaca'" in lines[0] and len(lines) == 3  # banner + one response per prompt
    refused = subprocess.run([sys.executable, "-m", "alignment", "generate", "tiny-llama/rm", "sort: b a", "--root",
                              store_root], capture_output=True, text=True, env=env)
    assert refused.returncode == 1 and refused.stderr.strip().endswith(
        "tiny-llama/rm is a 'rm' checkpoint, not a policy: generate and chat take one of sft, ppo (e.g. tiny-llama/ppo)")
    listing = subprocess.run(f"{sys.executable} -m alignment store list --json --root {store_root} | head -1",
                             shell=True, capture_output=True, text=True, env=env)
    assert listing.stdout == "[\n" and "Error" not in listing.stderr  # the reader stopped early: no BrokenPipeError
