"""Measuring checkpoints: reward-model accuracy on held-out pairs, policy quality on held-out prompts,
and bootstrap intervals so that a difference comes with its uncertainty."""

from __future__ import annotations

import random

import torch

from alignment import modeling, ppo, task


def bootstrap_ci(values: list[float], n_resamples: int = 2000, level: float = 0.95, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of values."""
    rng = random.Random(seed)
    k = len(values)
    means = sorted(sum(values[rng.randrange(k)] for _ in range(k)) / k for _ in range(n_resamples))
    lo = means[int((1 - level) / 2 * n_resamples)]
    hi = means[min(n_resamples - 1, int((1 + level) / 2 * n_resamples))]
    return lo, hi


def paired_difference(after: list[float], before: list[float], seed: int = 0) -> dict:
    """Mean of after - before over the same items, with its 95% paired bootstrap interval."""
    diffs = [a - b for a, b in zip(after, before, strict=True)]
    lo, hi = bootstrap_ci(diffs, seed=seed)
    return {"mean": sum(diffs) / len(diffs), "ci95": [lo, hi]}


@torch.no_grad()
def score_texts(reward_model, tokenizer, texts: list[str], batch_size: int = 64) -> list[float]:
    """Reward-model scores of whole texts (prompt + response), each ended by EOS as in training."""
    scores = []
    for i in range(0, len(texts), batch_size):
        chunk = [t + tokenizer.eos_token for t in texts[i : i + batch_size]]
        enc = tokenizer(chunk, return_tensors="pt", padding=True)
        scores += modeling.reward_forward(reward_model, enc.input_ids, enc.attention_mask).tolist()
    return scores


def pairwise_accuracy(reward_model, tokenizer, spec, pairs: list[dict]) -> dict:
    """Share of held-out pairs where the chosen response scores higher, and the mean margin."""
    chosen = score_texts(reward_model, tokenizer, [spec.format_prompt(p["prompt"]) + p["chosen"] for p in pairs])
    rejected = score_texts(reward_model, tokenizer, [spec.format_prompt(p["prompt"]) + p["rejected"] for p in pairs])
    wins = [float(c > r) for c, r in zip(chosen, rejected)]
    lo, hi = bootstrap_ci(wins)
    return {
        "accuracy": sum(wins) / len(wins),
        "accuracy_ci95": [lo, hi],
        "margin": sum(c - r for c, r in zip(chosen, rejected)) / len(pairs),
        "pairs": len(pairs),
    }


@torch.no_grad()
def rollout_scores(
    policy, ref_policy, reward_model, tokenizer, spec, prompts: list[str], *, max_new_tokens: int,
    temperature: float, greedy: bool, gold: bool, batch_size: int = 100,
) -> dict[str, list[float]]:
    """Responses of policy to prompts, with per-response RM score, gold score, KL to the reference and length."""
    out = {"reward": [], "gold": [], "kl": [], "length": [], "ended": [], "responses": []}
    for i in range(0, len(prompts), batch_size):
        batch = prompts[i : i + batch_size]
        templated = [spec.format_prompt(p) for p in batch]
        query_responses, query_mask, responses = modeling.generate(
            policy, tokenizer, templated, max_new_tokens, temperature, greedy=greedy
        )
        mask, ended = ppo.response_mask(responses, tokenizer.eos_token_id)
        attention = torch.cat([query_mask, mask.long()], dim=1)
        context = query_mask.shape[1]
        t = 1.0 if greedy else temperature
        logprobs, _ = modeling.policy_forward(policy, query_responses, attention, context, t)
        ref_logprobs, _ = modeling.policy_forward(ref_policy, query_responses, attention, context, t)
        out["kl"] += ((logprobs - ref_logprobs) * mask).sum(1).tolist()
        out["reward"] += modeling.reward_forward(reward_model, query_responses, attention).tolist()
        texts = modeling.decode_responses(tokenizer, responses)
        out["responses"] += texts
        out["length"] += mask.sum(1).tolist()
        out["ended"] += ended.float().tolist()
        if gold:
            out["gold"] += [task.gold_score(p, r) for p, r in zip(batch, texts)]
    return out


def mean(xs: list[float]) -> float:
    return sum(xs) / len(xs) if xs else float("nan")


def compare_policies(
    policy, sft_policy, reward_model, tokenizer, spec, prompts: list[str], *, gold: bool, max_new_tokens: int,
    temperature: float, samples: int, seed: int,
) -> dict:
    """The trained policy against the SFT policy on the same held-out prompts, greedy and sampled.

    Sampled figures average `samples` responses per prompt before pairing, so the paired bootstrap
    interval of the difference is over prompts. KL is the per-sequence estimate sum_t log pi - log pi_ref
    on the trained policy's own samples.
    """
    out: dict = {"eval_prompts": len(prompts)}
    for mode, greedy, reps in (("greedy", True, 1), ("sampled", False, samples)):
        torch.manual_seed(seed)
        repeated = [p for p in prompts for _ in range(reps)]
        kwargs = dict(max_new_tokens=max_new_tokens, temperature=temperature, greedy=greedy, gold=gold)
        before = rollout_scores(sft_policy, sft_policy, reward_model, tokenizer, spec, repeated, **kwargs)
        after = rollout_scores(policy, sft_policy, reward_model, tokenizer, spec, repeated, **kwargs)
        per_prompt = lambda xs: [mean(xs[i : i + reps]) for i in range(0, len(xs), reps)]  # noqa: E731
        section = {}
        for key in ("reward", "gold") if gold else ("reward",):
            b, a = per_prompt(before[key]), per_prompt(after[key])
            section[key] = {"sft": mean(b), "ppo": mean(a), "difference": paired_difference(a, b, seed=seed)}
        section["kl"] = mean(after["kl"])
        section["response_length"] = {"sft": mean(before["length"]), "ppo": mean(after["length"])}
        section["ended_with_eos"] = {"sft": mean(before["ended"]), "ppo": mean(after["ended"])}
        section["examples"] = [
            {"prompt": p, "sft": b, "ppo": a}
            for p, b, a in list(zip(repeated, before["responses"], after["responses"]))[:: reps][:3]
        ]
        out[mode] = section
    return out


def format_comparison(summary: dict) -> str:
    lines = [f"PPO vs SFT on {summary['eval_prompts']} held-out prompts (95% paired bootstrap CI of the difference)"]
    for mode in ("greedy", "sampled"):
        s = summary[mode]
        for key in ("gold", "reward"):
            if key in s:
                d = s[key]["difference"]
                lines.append(
                    f"  {mode:8s} {key:7s} sft {s[key]['sft']:+.3f} -> ppo {s[key]['ppo']:+.3f}   "
                    f"diff {d['mean']:+.3f} [{d['ci95'][0]:+.3f}, {d['ci95'][1]:+.3f}]"
                )
        lines.append(
            f"  {mode:8s} KL(ppo||sft) {s['kl']:.3f} nats/response   length sft {s['response_length']['sft']:.1f}"
            f" -> ppo {s['response_length']['ppo']:.1f}"
        )
    for ex in summary["greedy"]["examples"]:
        lines.append(f"  e.g. {ex['prompt']!r}: sft {ex['sft']!r} -> ppo {ex['ppo']!r}")
    return "\n".join(lines)
