"""Measuring checkpoints honestly: every headline number on held-out data, with a 95% bootstrap interval.

The first half is pure metric functions (tested against hand-computed values); the second half runs
models: reward-model accuracy on held-out pairs, policy cross-entropy on held-out demonstrations, and
policy behaviour on held-out prompts scored by the reward model, the reference and (on the embedded
task) the gold judge.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence

import numpy as np
import torch

from alignment import forwards, ppo, scoring, task

METRICS = {
    # name -> one sentence a reader of the report needs to interpret it
    "cross_entropy": (
        "Mean negative log-likelihood, in nats per token, of the response tokens of held-out demonstrations."
    ),
    "perplexity": "exp(cross_entropy): the number of equally likely tokens the model hesitates between, on average.",
    "rm_accuracy": (
        "Share of held-out preference pairs where the reward model scores the chosen response above the rejected one."
    ),
    "rm_margin": "Mean of r(chosen) - r(rejected) over held-out pairs.",
    "rm_calibration": (
        "Held-out accuracy within buckets of |margin|, beside sigmoid(|margin|), the accuracy a calibrated "
        "Bradley-Terry model would have."
    ),
    "rm_length_correlation": (
        "Pearson correlation between reward and response length (tokens) over all held-out responses: how much of the "
        "reward length alone explains."
    ),
    "shorter_wins_accuracy": (
        "Accuracy on the same pairs of the rule 'the shorter response wins', a baseline the reward model should beat."
    ),
    "reward": "Mean reward-model score of the policy's sampled responses to held-out prompts.",
    "win_rate_vs_sft": (
        "Share of held-out prompts where the policy's response scores higher than the SFT policy's (ties count half), "
        "judged by the reward model."
    ),
    "kl_per_token": (
        "Mean over response tokens of log pi(token) - log pi_ref(token) on the policy's own samples: the per-token KL "
        "estimate to the SFT reference."
    ),
    "kl_per_response": "The same summed over each response: nats of KL per response.",
    "response_length": "Mean response length in tokens, EOS included.",
    "distinct_1": "Distinct unigrams over all unigrams of all responses: lexical diversity.",
    "distinct_2": "Distinct bigrams over all bigrams of all responses.",
    "ended_with_eos": "Share of responses that end with EOS within the length limit.",
    "gold": (
        "Mean gold-judge score (embedded task only): share of right answer positions, minus 0.4 if anything follows "
        "the answer."
    ),
    "gold_win_rate_vs_sft": (
        "Share of held-out prompts where the policy's response beats the SFT policy's by the gold judge (ties count "
        "half)."
    ),
    "difference_vs_sft": (
        "Per held-out prompt, the policy's score minus the SFT policy's on the same prompt, averaged over prompts "
        "(greedy: one deterministic response each; sampled: the mean of eval.samples responses each, drawn with the "
        "same random numbers); the interval is a paired bootstrap over prompts."
    ),
    "kl_to_sft": (
        "KL to the SFT policy in nats per response: sum over the response's tokens of log pi - log pi_sft on the "
        "policy's own sampled responses, averaged per prompt; the interval is over prompts."
    ),
    "duration_s": (
        "Wall time of the stage that produced the checkpoint, as its manifest records it (all of it: loading, "
        "training, its own evaluations, saving)."
    ),
    "trained_on": (
        "Episodes (PPO, GRPO: prompts with a sampled response trained on) or preference pairs seen (DPO), as the "
        "stage's manifest records them."
    ),
}

# ---- pure metrics -------------------------------------------------------------------------------------


def mean(xs: Sequence[float]) -> float:
    return sum(xs) / len(xs) if len(xs) else float("nan")


def bootstrap_ci(
    values: Sequence, statistic: Callable[[list], float] = mean, n_resamples: int = 2000, level: float = 0.95,
    seed: int = 0,
) -> tuple[float, float]:
    """Percentile bootstrap interval of statistic(values), resampling the items with replacement. The mean, the
    usual statistic, is taken of all resamples at once (numpy): item by item in Python an interval over 200
    items took 0.3 s, and a report holds a hundred of them."""
    rng = np.random.default_rng(seed)
    k = len(values)
    picks = rng.integers(0, k, size=(n_resamples, k))
    if statistic is mean:
        stats = np.sort(np.asarray(values, dtype=float)[picks].mean(1))
    else:
        stats = sorted(statistic([values[i] for i in row]) for row in picks.tolist())
    lo = stats[int((1 - level) / 2 * n_resamples)]
    hi = stats[min(n_resamples - 1, int((1 + level) / 2 * n_resamples))]
    return float(lo), float(hi)


def estimate(values: Sequence[float], seed: int = 0) -> dict:
    """{"mean", "ci95"}: the mean of values with its bootstrap interval. The mean is summed as the resamples' are
    (numpy): for equal values both are then the same float, and the interval holds the mean."""
    lo, hi = bootstrap_ci(values, seed=seed)
    return {"mean": float(np.mean(np.asarray(values, dtype=float))), "ci95": [lo, hi]}


def paired_difference(after: list[float], before: list[float], seed: int = 0) -> dict:
    """Mean of after - before over the same items, with its 95% paired bootstrap interval."""
    return estimate([a - b for a, b in zip(after, before, strict=True)], seed=seed)


def wins(a: Sequence[float], b: Sequence[float]) -> list[float]:
    """Per item: 1 if a beats b, 0.5 on a tie, 0 otherwise. Their mean is the win rate of a over b."""
    return [1.0 if x > y else 0.5 if x == y else 0.0 for x, y in zip(a, b, strict=True)]


def distinct_n(texts: Sequence[str], n: int) -> float:
    """Distinct word n-grams over all word n-grams in texts (0 when there are none)."""
    grams = [tuple(words[i : i + n]) for words in (t.split() for t in texts) for i in range(len(words) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0


def spread_sample(prompts: Sequence, k: int, seed: int = 0, kind: Callable | None = None) -> list[int]:
    """Indices of k prompts spread evenly over kind(prompt) (e.g. the embedded task's operation), drawn in a
    seeded order and grouped by kind; without kind, k at random in file order. The first k would not do: the
    embedded task's held-out prompts are sorted, so they are all of one operation."""
    order = random.Random(seed).sample(range(len(prompts)), len(prompts))
    if kind is None:
        return sorted(order[:k])
    groups: dict = {}
    for i in order:
        groups.setdefault(kind(prompts[i]), []).append(i)
    queues = [groups[name] for name in sorted(groups)]
    picked: list[int] = []
    while len(picked) < min(k, len(prompts)):
        for queue in queues:  # round robin: no kind gets a second prompt before every kind has had one
            if queue and len(picked) < k:
                picked.append(queue.pop(0))
    rank = {name: n for n, name in enumerate(sorted(groups))}
    return sorted(picked, key=lambda i: (rank[kind(prompts[i])], order.index(i)))


def pearson(x: Sequence[float], y: Sequence[float]) -> float:
    mx, my = mean(x), mean(y)
    sxy = sum((a - mx) * (b - my) for a, b in zip(x, y))
    sxx, syy = sum((a - mx) ** 2 for a in x), sum((b - my) ** 2 for b in y)
    return sxy / math.sqrt(sxx * syy) if sxx > 0 and syy > 0 else float("nan")


def calibration(margins: Sequence[float], buckets: int = 5) -> list[dict]:
    """Accuracy of a reward model by |margin| bucket (equal-count buckets, smallest margins first).

    margins are r(chosen) - r(rejected); a pair is right when its margin is > 0. Each bucket reports the
    accuracy and sigmoid of its mean |margin|, which a calibrated model's accuracy should match.
    """
    ordered = sorted(margins, key=abs)
    size = math.ceil(len(ordered) / buckets)
    out = []
    for i in range(0, len(ordered), size):
        chunk = ordered[i : i + size]
        mean_abs = mean([abs(m) for m in chunk])
        out.append({
            "abs_margin_min": abs(chunk[0]), "abs_margin_max": abs(chunk[-1]), "pairs": len(chunk),
            "accuracy": mean([float(m > 0) for m in chunk]), "predicted": 1 / (1 + math.exp(-mean_abs)),
        })
    return out


def token_nll(logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Summed negative log-likelihood per sequence of the masked labels. logits [B, T, V] predict labels [B, T]."""
    return -ppo.masked(ppo.logprobs_from_logits(logits, labels), mask).sum(1)


# ---- model-driven measurements ------------------------------------------------------------------------


@torch.no_grad()
def cross_entropy(model, tokenizer, spec, records: list[dict], batch_size: int = 32, seed: int = 0) -> dict:
    """Cross-entropy (nats/token) and perplexity of the completions of held-out prompt-completion records.

    The interval resamples records, keeping the ratio total NLL / total tokens.
    """
    per_record = []  # (nll, tokens)
    for i in range(0, len(records), batch_size):
        chunk = records[i : i + batch_size]
        prompts = [tokenizer(spec.format_prompt(r["prompt"])).input_ids for r in chunk]
        fulls = [tokenizer(spec.format_prompt(r["prompt"]) + r["completion"]).input_ids + [tokenizer.eos_token_id]
                 for r in chunk]
        width = max(map(len, fulls))
        ids = torch.full((len(chunk), width), tokenizer.pad_token_id)
        attention = torch.zeros_like(ids)
        loss_mask = torch.zeros(len(chunk), width)
        for row, (p, f) in enumerate(zip(prompts, fulls)):
            ids[row, : len(f)] = torch.tensor(f)
            attention[row, : len(f)] = 1
            loss_mask[row, len(p) : len(f)] = 1.0
        device = next((q.device for q in model.parameters()), torch.device("cpu"))
        ids, attention, loss_mask = ids.to(device), attention.to(device), loss_mask.to(device)
        logits = model(input_ids=ids, attention_mask=attention).logits[:, :-1]
        nll = token_nll(logits, ids[:, 1:], loss_mask[:, 1:])
        per_record += list(zip(nll.tolist(), loss_mask[:, 1:].sum(1).tolist()))

    def ratio(items):
        return sum(n for n, _ in items) / sum(t for _, t in items)

    ce = ratio(per_record)
    lo, hi = bootstrap_ci(per_record, ratio, seed=seed)
    return {
        "cross_entropy": {"mean": ce, "ci95": [lo, hi]},
        "perplexity": {"mean": math.exp(ce), "ci95": [math.exp(lo), math.exp(hi)]},
        "tokens": int(sum(t for _, t in per_record)),
    }


score_texts = scoring.score_texts


def reward_model_metrics(reward_model, tokenizer, spec, pairs: list[dict], seed: int = 0) -> dict:
    """Accuracy, margin, calibration and length dependence of a reward model on held-out pairs."""
    prompts = [spec.format_prompt(p["prompt"]) for p in pairs]
    prompt_lengths = [len(tokenizer(p).input_ids) for p in prompts]
    chosen, chosen_len = score_texts(reward_model, tokenizer, [p + r["chosen"] for p, r in zip(prompts, pairs)])
    rejected, rejected_len = score_texts(reward_model, tokenizer, [p + r["rejected"] for p, r in zip(prompts, pairs)])
    margins = [c - r for c, r in zip(chosen, rejected)]
    response_len = [n - k for n, k in zip(chosen_len + rejected_len, prompt_lengths * 2)]
    shorter = [1.0 if len(r["chosen"]) < len(r["rejected"]) else 0.5 if len(r["chosen"]) == len(r["rejected"]) else 0.0
               for r in pairs]
    return {
        "rm_accuracy": estimate([float(m > 0) for m in margins], seed),
        "rm_margin": estimate(margins, seed),
        "rm_calibration": calibration(margins),
        "rm_length_correlation": pearson(chosen + rejected, response_len),
        "shorter_wins_accuracy": mean(shorter),
        "pairs": len(pairs),
    }


def pairwise_accuracy(reward_model, tokenizer, spec, pairs: list[dict]) -> dict:
    """Held-out accuracy with its interval, and the mean margin: the reward-model stage's own check."""
    m = reward_model_metrics(reward_model, tokenizer, spec, pairs)
    return {"accuracy": m["rm_accuracy"]["mean"], "accuracy_ci95": m["rm_accuracy"]["ci95"],
            "margin": m["rm_margin"]["mean"], "pairs": len(pairs)}


@torch.no_grad()
def rollout_scores(
    policy, ref_policy, scorer, tokenizer, spec, prompts: list, *, max_new_tokens: int,
    temperature: float, greedy: bool, gold: bool, batch_size: int = 100, max_prompt_tokens: int = 512,
    kl: bool = True,
) -> dict[str, list]:
    """Responses of policy to prompts, with per-response RM score (scorer: a scoring.RewardScorer), gold score,
    KL to the reference (unless kl is false: two forwards saved where it is not read) and length."""
    out = {"reward": [], "gold": [], "kl": [], "kl_tokens": [], "length": [], "ended": [], "responses": []}
    for i in range(0, len(prompts), batch_size):
        batch = prompts[i : i + batch_size]
        templated = [spec.format_prompt(p) for p in batch]
        query_responses, query_mask, responses = forwards.generate(
            policy,
            tokenizer,
            templated,
            max_new_tokens,
            temperature,
            greedy=greedy,
            max_prompt_tokens=max_prompt_tokens,
        )
        mask, ended = ppo.response_mask(responses, tokenizer.eos_token_id)
        attention = torch.cat([query_mask, mask.long()], dim=1)
        context = query_mask.shape[1]
        if kl:
            t = 1.0 if greedy else temperature
            logprobs, _ = forwards.policy_forward(policy, query_responses, attention, context, t)
            ref_logprobs, _ = forwards.policy_forward(ref_policy, query_responses, attention, context, t)
            token_kl = ppo.masked(logprobs - ref_logprobs, mask)
            out["kl"] += token_kl.sum(1).tolist()
            out["kl_tokens"] += token_kl.sum(1).div(mask.sum(1).clamp(min=1)).tolist()
        out["reward"] += scorer(batch, query_responses, attention, responses).tolist()
        texts = forwards.decode_responses(tokenizer, responses)
        out["responses"] += texts
        out["length"] += mask.sum(1).tolist()
        out["ended"] += ended.float().tolist()
        if gold:
            out["gold"] += [task.gold_score(p, r) for p, r in zip(batch, texts)]
    return out


def curve_point(policy, ref_policy, scorer, tokenizer, spec, prompts: list, step: int, *, max_new_tokens: int,
                temperature: float, gold: bool, max_prompt_tokens: int = 512, seed: int = 0) -> dict:
    """One point of a method's held-out curve (its `eval_every` points): the mean RM reward, gold score (where
    defined) and KL to the reference of sampled responses to prompts, with the same sampling noise at every
    point. The caller's RNG is left as it was."""
    devices = [next(policy.parameters()).device] if next(policy.parameters()).is_cuda else []
    with torch.random.fork_rng(devices=devices), torch.no_grad():
        torch.manual_seed(seed)
        r = rollout_scores(policy, ref_policy, scorer, tokenizer, spec, prompts, max_new_tokens=max_new_tokens,
                           temperature=temperature, greedy=False, gold=gold, max_prompt_tokens=max_prompt_tokens)
    return {"step": step, **{f"eval_{k}": mean(r[k]) for k in ("reward", "gold", "kl") if r[k]}}


def policy_metrics(rollout: dict, sft_rollout: dict, gold: bool, seed: int = 0) -> dict:
    """Headline figures of one policy's rollout on held-out prompts, against the SFT policy's on the same prompts."""
    out = {
        "reward": estimate(rollout["reward"], seed),
        "win_rate_vs_sft": estimate(wins(rollout["reward"], sft_rollout["reward"]), seed),
        "kl_per_token": estimate(rollout["kl_tokens"], seed),
        "kl_per_response": estimate(rollout["kl"], seed),
        "response_length": estimate(rollout["length"], seed),
        "distinct_1": distinct_n(rollout["responses"], 1),
        "distinct_2": distinct_n(rollout["responses"], 2),
        "ended_with_eos": estimate(rollout["ended"], seed),
    }
    if gold:
        out["gold"] = estimate(rollout["gold"], seed)
        out["gold_win_rate_vs_sft"] = estimate(wins(rollout["gold"], sft_rollout["gold"]), seed)
    return out


def versus_sft(greedy: dict, sampled: dict, sft_greedy: dict, sft_sampled: dict, samples: int, gold: bool,
               seed: int = 0) -> dict:
    """A policy against the SFT policy on the same held-out prompts, from rollout_scores of both: per mode
    (greedy; sampled, `samples` responses per prompt averaged before pairing) and score (reward; gold where
    defined) the two means and the paired difference with its bootstrap interval over prompts; and the KL to
    SFT per response of the policy's own samples (greedy responses are not draws from the policy: no KL)."""
    def per_prompt(xs: list, n: int) -> list[float]:
        return [mean(xs[i : i + n]) for i in range(0, len(xs), n)]

    out: dict = {"prompts": len(greedy["reward"]), "samples": samples}
    for mode, after, before, n in (("greedy", greedy, sft_greedy, 1), ("sampled", sampled, sft_sampled, samples)):
        section = {}
        for key in ("gold", "reward") if gold else ("reward",):
            a, b = per_prompt(after[key], n), per_prompt(before[key], n)
            section[key] = {"policy": mean(a), "sft": mean(b), "difference": paired_difference(a, b, seed=seed)}
        out[mode] = section
    out["kl"] = estimate(per_prompt(sampled["kl"], samples), seed)
    return out


def compare_policies(
    policy, sft_policy, scorer, tokenizer, spec, prompts: list, *, gold: bool, max_new_tokens: int,
    temperature: float, samples: int, seed: int, max_prompt_tokens: int = 512, on_all=None,
) -> dict:
    """The trained policy against the SFT policy on the same held-out prompts, greedy and sampled.

    Sampled figures average `samples` responses per prompt before pairing, so the paired bootstrap
    interval of the difference is over prompts. KL is the per-sequence estimate sum_t log pi - log pi_ref
    on the trained policy's own samples. on_all(fn, prompts), if given, runs fn(prompts) -> {key: list} spread
    over the processes of a distributed run and gathers the lists in order.
    """
    on_all = on_all or (lambda fn, xs: fn(xs))
    out: dict = {"eval_prompts": len(prompts)}
    for mode, greedy, reps in (("greedy", True, 1), ("sampled", False, samples)):
        torch.manual_seed(seed)
        repeated = [p for p in prompts for _ in range(reps)]
        kwargs = dict(max_new_tokens=max_new_tokens, temperature=temperature, greedy=greedy, gold=gold,
                      max_prompt_tokens=max_prompt_tokens)
        before = on_all(lambda xs, kw=kwargs: rollout_scores(sft_policy, sft_policy, scorer, tokenizer, spec, xs, **kw),
                        repeated)
        after = on_all(lambda xs, kw=kwargs: rollout_scores(policy, sft_policy, scorer, tokenizer, spec, xs, **kw),
                       repeated)
        per_prompt = lambda xs, n=reps: [mean(xs[i : i + n]) for i in range(0, len(xs), n)]
        section = {}
        for key in ("reward", "gold") if gold else ("reward",):
            b, a = per_prompt(before[key]), per_prompt(after[key])
            section[key] = {"sft": mean(b), "policy": mean(a), "difference": paired_difference(a, b, seed=seed)}
        section["kl"] = mean(after["kl"])
        section["response_length"] = {"sft": mean(before["length"]), "policy": mean(after["length"])}
        section["ended_with_eos"] = {"sft": mean(before["ended"]), "policy": mean(after["ended"])}
        section["examples"] = [
            {"prompt": p, "sft": b, "policy": a}
            for p, b, a in list(zip(repeated, before["responses"], after["responses"]))[::reps][:3]
        ]
        out[mode] = section
    return out


def format_comparison(summary: dict, method: str = "ppo") -> str:
    """compare_policies' summary as the lines a stage ends with; method names the trained policy."""
    lines = [
        (f"{method.upper()} vs SFT on {summary['eval_prompts']} held-out prompts "
        "(95% paired bootstrap CI of the difference)")
    ]
    for mode in ("greedy", "sampled"):
        s = summary[mode]
        for key in ("gold", "reward"):
            if key in s:
                d = s[key]["difference"]
                lines.append(
                    f"  {mode:8s} {key:7s} sft {s[key]['sft']:+.3f} -> {method} {s[key]['policy']:+.3f}   "
                    f"diff {d['mean']:+.3f} [{d['ci95'][0]:+.3f}, {d['ci95'][1]:+.3f}]"
                )
        lines.append(
            f"  {mode:8s} KL({method}||sft) {s['kl']:.3f} nats/response   length sft {s['response_length']['sft']:.1f}"
            f" -> {method} {s['response_length']['policy']:.1f}"
        )
    for ex in summary["greedy"]["examples"]:
        prompt = ex["prompt"] if isinstance(ex["prompt"], str) else ex["prompt"][-1]["content"]  # last user turn
        lines.append(f"  e.g. {prompt!r}: sft {ex['sft']!r} -> {method} {ex['policy']!r}")
    return "\n".join(lines)
