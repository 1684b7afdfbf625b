"""Measuring checkpoints honestly: every headline number on held-out data, with a 95% bootstrap interval.

The statistics are alignment/stats.py's; here the models run: reward-model accuracy on held-out pairs, policy
cross-entropy on held-out demonstrations, and policy behaviour on held-out prompts scored by the reward model, the
reference and (on the embedded task) the gold judge. report.py turns the results into text and HTML.
"""

from __future__ import annotations

import math

import torch

from alignment import forwards, health, ppo, rewards, scoring, stats, task, tokens

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
    "distinct_responses": (
        "Share of distinct responses across held-out prompts (one per prompt; case and spacing aside): 1 when every "
        "prompt gets its own answer, low when the policy says the same thing to all."
    ),
    "top_response_share": "Share of held-out prompts answered with the single most frequent response.",
    "distinct_1_all": "Distinct words over all words of all the responses together.",
    "distinct_2_all": "Distinct word bigrams over all bigrams of all the responses together.",
    "mean_length": "Mean response length in words (the answers-as-a-set table; response_length counts tokens).",
    "prompt_overlap": (
        "Mean share of a response's distinct words that its prompt contains: an answer that ignores its prompt "
        "shares few."
    ),
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
    lo, hi = stats.bootstrap_ci(per_record, ratio, seed=seed)
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
        "rm_accuracy": stats.estimate([float(m > 0) for m in margins], seed),
        "rm_margin": stats.estimate(margins, seed),
        "rm_calibration": stats.calibration(margins),
        "rm_length_correlation": stats.pearson(chosen + rejected, response_len),
        "shorter_wins_accuracy": stats.mean(shorter),
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
    kl: bool = True, all_done=None, reward: bool = True,
) -> dict[str, list]:
    """Responses of policy to prompts, with per-response RM score (scorer: a scoring.RewardScorer), gold score,
    KL to the reference (unless kl is false: two forwards saved where it is not read; reward false: no score) and
    length. all_done: generate()'s stopping rule, for a policy whose forwards are collectives (a partitioned one)."""
    out = {"reward": [], "gold": [], "kl": [], "kl_tokens": [], "length": [], "ended": [], "responses": [], "ids": []}
    for i in range(0, len(prompts), batch_size):
        batch = prompts[i : i + batch_size]
        templated = [spec.format_prompt(p) for p in batch]
        query_responses, query_mask, responses = forwards.generate(
            policy, tokenizer, templated, max_new_tokens, temperature, greedy=greedy,
            max_prompt_tokens=max_prompt_tokens, all_done=all_done,
        )
        mask, ended = ppo.response_mask(responses, tokens.end_ids(tokenizer))
        attention = torch.cat([query_mask, mask.long()], dim=1)
        context = query_mask.shape[1]
        if kl:
            t = 1.0 if greedy else temperature
            logprobs, _ = forwards.policy_forward(policy, query_responses, attention, context, t)
            ref_logprobs, _ = forwards.policy_forward(ref_policy, query_responses, attention, context, t)
            token_kl = ppo.masked(logprobs - ref_logprobs, mask)
            out["kl"] += token_kl.sum(1).tolist()
            out["kl_tokens"] += token_kl.sum(1).div(mask.sum(1).clamp(min=1)).tolist()
        if reward and scorer is not None:  # (None: no reward model, a stage rewarded by functions alone)
            out["reward"] += scorer(batch, query_responses, attention, responses).tolist()
        texts = forwards.decode_responses(tokenizer, responses)
        out["responses"] += texts
        out["ids"] += [row[:n] for row, n in zip(responses.tolist(), mask.sum(1).long().tolist(), strict=True)]
        out["length"] += mask.sum(1).tolist()
        out["ended"] += ended.float().tolist()
        if gold:
            out["gold"] += [task.gold_score(p, r) for p, r in zip(batch, texts)]
    return out


def curve_point(policy, ref_policy, scorer, tokenizer, spec, prompts: list, step: int, *, max_new_tokens: int,
                temperature: float, gold: bool, max_prompt_tokens: int = 512, seed: int = 0) -> dict:
    """One point of a method's held-out curve (its `eval_every` points): the mean RM reward, gold score (where
    defined) and KL to the reference of sampled responses to prompts, with the same sampling noise at every
    point, and the greedy answers' health (held_out_rollouts). The caller's RNG is left as it was."""
    devices = [next(policy.parameters()).device] if next(policy.parameters()).is_cuda else []
    with torch.random.fork_rng(devices=devices), torch.no_grad():
        torch.manual_seed(seed)
        r = held_out_rollouts(policy, ref_policy, scorer, tokenizer, spec, prompts, max_new_tokens=max_new_tokens,
                              temperature=temperature, gold=gold, max_prompt_tokens=max_prompt_tokens)
    return held_out_point(r, prompts, step)


def held_out_rollouts(policy, ref_policy, scorer, tokenizer, spec, prompts: list, **kwargs) -> dict[str, list]:
    """What a held-out point measures: one sampled response per prompt, scored (rollout_scores), and the greedy
    response to each, whose answers as a set are where a collapse shows first (sampling at temperature 1 keeps
    answers apart long after the greedy ones have fallen together)."""
    r = rollout_scores(policy, ref_policy, scorer, tokenizer, spec, prompts, greedy=False, **kwargs)
    greedy = rollout_scores(policy, ref_policy, scorer, tokenizer, spec, prompts, greedy=True, kl=False,
                            reward=False, **{**kwargs, "gold": False})  # the answers alone
    return {**r, "greedy_responses": greedy["responses"]}


def held_out_point(r: dict, prompts: list, step: int) -> dict:
    """A held-out point from held_out_rollouts: the means of reward, gold (where defined) and KL of the sampled
    responses, and the measures that need no judge (health.measures) of the sampled answers (eval_<name>) and of the
    greedy ones (eval_greedy_<name>)."""
    found = health.measures(prompts, r["responses"])
    greedy = health.measures(prompts, r["greedy_responses"]) if r.get("greedy_responses") else {}
    return {"step": step, **{f"eval_{k}": stats.mean(r[k]) for k in ("reward", "gold", "kl") if r[k]},
            **{f"eval_{k}": found[k] for k in health.POINT_KEYS if k in found},
            **{f"eval_greedy_{k}": greedy[k] for k in health.POINT_KEYS if k in greedy}}


def policy_metrics(rollout: dict, sft_rollout: dict, gold: bool, seed: int = 0) -> dict:
    """Headline figures of one policy's rollout on held-out prompts, against the SFT policy's on the same prompts."""
    out = {
        "kl_per_token": stats.estimate(rollout["kl_tokens"], seed),
        "kl_per_response": stats.estimate(rollout["kl"], seed),
        "response_length": stats.estimate(rollout["length"], seed),
        "distinct_1": stats.distinct_n(rollout["responses"], 1),
        "distinct_2": stats.distinct_n(rollout["responses"], 2),
        "ended_with_eos": stats.estimate(rollout["ended"], seed),
    }
    if rollout["reward"]:  # (none without a reward model)
        out["reward"] = stats.estimate(rollout["reward"], seed)
        out["win_rate_vs_sft"] = stats.estimate(stats.wins(rollout["reward"], sft_rollout["reward"]), seed)
    if gold:
        out["gold"] = stats.estimate(rollout["gold"], seed)
        out["gold_win_rate_vs_sft"] = stats.estimate(stats.wins(rollout["gold"], sft_rollout["gold"]), seed)
    return out


def versus_sft(greedy: dict, sampled: dict, sft_greedy: dict, sft_sampled: dict, samples: int, gold: bool,
               seed: int = 0) -> dict:
    """A policy against the SFT policy on the same held-out prompts, from rollout_scores of both: per mode
    (greedy; sampled, `samples` responses per prompt averaged before pairing) and score (gold where defined; reward
    where a reward model scored them) the two means and the paired difference with its bootstrap interval over
    prompts; and the KL to SFT per response of the policy's own samples (greedy responses are not draws from the
    policy: no KL)."""
    def per_prompt(xs: list, n: int) -> list[float]:
        return [stats.mean(xs[i : i + n]) for i in range(0, len(xs), n)]

    out: dict = {"prompts": len(greedy["responses"]), "samples": samples}
    keys = [k for k, measured in (("gold", gold), ("reward", bool(greedy["reward"]))) if measured]
    for mode, after, before, n in (("greedy", greedy, sft_greedy, 1), ("sampled", sampled, sft_sampled, samples)):
        section = {}
        for key in keys:
            a, b = per_prompt(after[key], n), per_prompt(before[key], n)
            section[key] = {"policy": stats.mean(a), "sft": stats.mean(b),
                            "difference": stats.paired_difference(a, b, seed=seed)}
        out[mode] = section
    out["kl"] = stats.estimate(per_prompt(sampled["kl"], samples), seed)
    return out


def term_versus_sft(term, prompts: list, before: dict, after: dict, columns: dict, reps: int, seed: int) -> dict:
    """A reward function's values for the SFT policy's and the trained policy's responses (rollout_scores of the same
    prompts, each repeated reps times): the means and the paired difference over the prompts where the function
    applies to both (None nowhere in the prompt's responses)."""
    def per_prompt(r: dict) -> list[float]:
        v = rewards.values(term, prompts, r["responses"], r["ids"], columns, "[eval] held-out comparison").tolist()
        return [stats.mean(v[i : i + reps]) for i in range(0, len(v), reps)]  # NaN where it did not apply

    b, a = per_prompt(before), per_prompt(after)
    both = [(x, y) for x, y in zip(a, b, strict=True) if math.isfinite(x) and math.isfinite(y)]
    if not both:
        return {"prompts": 0}
    a, b = [x for x, _ in both], [y for _, y in both]
    return {"sft": stats.mean(b), "policy": stats.mean(a), "prompts": len(both),
            "difference": stats.paired_difference(a, b, seed=seed)}


def compare_policies(
    policy, sft_policy, scorer, tokenizer, spec, prompts: list, *, gold: bool, max_new_tokens: int,
    temperature: float, samples: int, seed: int, max_prompt_tokens: int = 512, on_all=None, all_done=None,
    terms: list | None = None, columns: dict | None = None,
) -> dict:
    """The trained policy against the SFT policy on the same held-out prompts, greedy and sampled.

    Sampled figures average `samples` responses per prompt before pairing, so the paired bootstrap
    interval of the difference is over prompts. KL is the per-sequence estimate sum_t log pi - log pi_ref
    on the trained policy's own samples. on_all(fn, prompts), if given, runs fn(prompts) -> {key: list} spread
    over the processes of a distributed run and gathers the lists in order; all_done: generate()'s stopping rule
    where the SFT policy's forwards are collectives (partitioned under ZeRO-3). terms: reward functions
    (rewards.Term) the policy was also rewarded by, each compared like the reward model's score over the prompts it
    applies to (its values called with columns, the data's kept fields of each prompt).
    """
    on_all = on_all or (lambda fn, xs: fn(xs))
    out: dict = {"eval_prompts": len(prompts)}
    for mode, greedy, reps in (("greedy", True, 1), ("sampled", False, samples)):
        torch.manual_seed(seed)
        repeated = [p for p in prompts for _ in range(reps)]
        kwargs = dict(max_new_tokens=max_new_tokens, temperature=temperature, greedy=greedy, gold=gold,
                      max_prompt_tokens=max_prompt_tokens)
        before = on_all(lambda xs, kw=kwargs: rollout_scores(sft_policy, sft_policy, scorer, tokenizer, spec, xs, **kw,
                                                             all_done=all_done), repeated)
        after = on_all(lambda xs, kw=kwargs: rollout_scores(policy, sft_policy, scorer, tokenizer, spec, xs, **kw),
                       repeated)
        per_prompt = lambda xs, n=reps: [stats.mean(xs[i : i + n]) for i in range(0, len(xs), n)]
        section = {}
        for key in [k for k, measured in (("reward", scorer is not None), ("gold", gold)) if measured]:
            b, a = per_prompt(before[key]), per_prompt(after[key])
            section[key] = {"sft": stats.mean(b), "policy": stats.mean(a),
                            "difference": stats.paired_difference(a, b, seed=seed)}
        if terms:
            kept = {k: [v for v in vs for _ in range(reps)] for k, vs in (columns or {}).items()}
            section["terms"] = {t.name: term_versus_sft(t, repeated, before, after, kept, reps, seed) for t in terms}
        section["kl"] = stats.mean(after["kl"])
        section["response_length"] = {"sft": stats.mean(before["length"]), "policy": stats.mean(after["length"])}
        section["ended_with_eos"] = {"sft": stats.mean(before["ended"]), "policy": stats.mean(after["ended"])}
        section["health"] = {"sft": health.measures(prompts, before["responses"][::reps]),
                             "policy": health.measures(prompts, after["responses"][::reps])}
        section["examples"] = [
            {"prompt": p, "sft": b, "policy": a}
            for p, b, a in list(zip(repeated, before["responses"], after["responses"]))[::reps][:3]
        ]
        out[mode] = section
    return out


