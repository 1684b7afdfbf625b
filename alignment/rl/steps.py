"""The phases of an RL step that do not depend on the algorithm: the prompts of the step, sampling (1), scoring
(2), the optimizer step with its non-finite guard (4), and the held-out evaluation (5)."""

from __future__ import annotations

import torch

from alignment import data, distributed, evaluation, forwards, guard, ppo, rewards, tokens
from alignment.rl.types import RLState, Rollout, Scores


def next_prompts(state: RLState, n_prompts: int, per_step: int, order: torch.Generator, accelerator) -> list[int]:
    """This process's share of the next per_step prompt indices, from a queue of seeded permutations (refilled
    until it holds a whole step: a prompt set smaller than a step is sampled more than once in it, and every
    process gets an equal share, which the gathers of the step need) that is part of the resumable state: a
    resumed run takes the prompts an uninterrupted one would."""
    if not n_prompts:
        raise SystemExit("no training prompts: the data's prompts_train split is empty")
    while len(state.queue) < per_step:
        state.queue += torch.randperm(n_prompts, generator=order).tolist()
    mine = state.queue[:per_step][accelerator.process_index :: accelerator.num_processes]
    state.queue = state.queue[per_step:]
    return mine


def rollout(policy, tokenizer, spec, prompts: list, settings, all_done) -> Rollout:
    """1. Responses sampled from the current policy (its whole weights, see distributed.whole_policy)."""
    query_responses, query_mask, responses = forwards.generate(
        policy, tokenizer, [spec.format_prompt(x) for x in prompts], settings.max_new_tokens, settings.temperature,
        max_prompt_tokens=settings.max_prompt_length, all_done=all_done,
    )
    mask, ended = ppo.response_mask(responses, tokens.end_ids(tokenizer))
    return Rollout(prompts, query_responses, torch.cat([query_mask, mask.long()], dim=1), responses, mask, ended)


@torch.no_grad()
def score(model, reference, scorer, r: Rollout, settings, minibatches: list[torch.Tensor]) -> Scores:
    """2. Log-probs (and values, with a critic) from the training forward, on the minibatches the first epoch
    trains on: its ratio starts at 1 exactly (other minibatches give other widths, and in bf16 log-probs up to
    3e-3 nats apart on a tiny model); reference log-probs (unless reference is None: no KL term reads them) and
    reward-model scores (unless scorer is None: no reward term reads them) alike."""
    B, T = r.responses.shape
    logprobs, values, ref_logprobs, entropy = (torch.zeros(B, T, device=r.mask.device) for _ in range(4))
    raw = torch.zeros(B, device=r.mask.device)
    critic = False
    for idx in minibatches:
        idx = idx.to(r.mask.device)
        qr, att = r.query_responses[idx], r.attention[idx]
        scored = forwards.actor_critic_forward(model, qr, att, r.context, settings.temperature, entropy=True)
        logprobs[idx], entropy[idx] = scored.logprobs, scored.entropy
        if scored.values is not None:
            values[idx], critic = scored.values, True
        if reference is not None:
            ref_logprobs[idx] = forwards.policy_forward(reference, qr, att, r.context, settings.temperature)[0]
        if scorer is not None:
            raw[idx] = scorer([r.prompts[i] for i in idx.tolist()], qr, att, r.responses[idx])
    return Scores(logprobs, values if critic else None, ref_logprobs if reference is not None else None, entropy,
                  raw)


def reward(rewarder: rewards.Rewards, accelerator, tokenizer, r: Rollout, scores: Scores, columns: dict, settings,
           step: int, stage: str) -> Scores:
    """2b. The reward of each response: the terms' values (the reward model's scores from score(), the functions'
    on the decoded responses and the data's kept fields: columns) mixed (rewards.Rewards.mix), less the missing-EOS
    penalty for a response that never ended."""
    terms = {rewards.MODEL: scores.rewards} if rewarder.uses_model else {}
    if len(terms) < len(rewarder.terms):
        ids = [row[:n] for row, n in zip(r.responses.tolist(), r.mask.sum(1).long().tolist(), strict=True)]
        texts = forwards.decode_responses(tokenizer, ids)  # (as the held-out comparison decodes them)
        called = rewarder.call_functions(r.prompts, texts, ids, columns, step, stage)
        terms.update({name: values.to(r.mask.device) for name, values in called.items()})
    mixed = rewarder.mix(accelerator.gather, terms)
    return scores._replace(rewards=torch.where(r.ended, mixed, mixed - settings.missing_eos_penalty), terms=terms)


def optimizer_step(accelerator, model, optimizer, trained: list, loss: torch.Tensor, cfg, state: RLState,
                   max_grad_norm: float, method: str) -> bool:
    """4. Backward and step on one minibatch's loss; False when skipped (counted in state) for a loss not finite in
    some process, or non-finite gradients. A loss not finite in any process is skipped by all of them, before
    anything is applied (under DeepSpeed backward() also steps); without DeepSpeed non-finite gradients are
    refused too (DeepSpeed's own check does it there)."""
    if distributed.any_process(accelerator, not bool(torch.isfinite(loss))):
        guard.count_skip(state, "loss", state.step + 1, cfg.max_bad_steps, method)
        return False
    skipped_before = distributed.skipped_by_deepspeed(model)
    accelerator.backward(loss)  # DeepSpeed: also clips (gradient_clipping = max_grad_norm) and steps
    if accelerator.state.deepspeed_plugin is None:
        # gradients are averaged over processes by now, so every process takes the same decision
        if not guard.grads_finite(trained):
            optimizer.zero_grad()
            guard.count_skip(state, "gradient", state.step + 1, cfg.max_bad_steps, method)
            return False
        accelerator.clip_grad_norm_(trained, max_grad_norm)
        optimizer.step()
        optimizer.zero_grad()
    elif distributed.skipped_by_deepspeed(model) > skipped_before:
        guard.count_skip(state, "gradient", state.step + 1, cfg.max_bad_steps, method)
        return False
    state.in_a_row = 0
    if cfg.check_sync:
        distributed.assert_in_sync(trained, f"{method} step {state.step + 1}")
    return True


def evaluate(accelerator, model, reference, scorer, tokenizer, spec, prompts: list, cfg, settings, step: int,
             writer, stage: str) -> dict:
    """5. Sampled responses to held-out prompts (every process its share): RM reward, gold score (the embedded
    task), KL. Leaves the training RNG untouched."""
    with torch.random.fork_rng(devices=[accelerator.device] if accelerator.device.type == "cuda" else []), \
            distributed.whole_policy(accelerator, model) as policy:
        torch.manual_seed(cfg.seed)
        r = distributed.on_all(accelerator)(lambda share: evaluation.held_out_rollouts(
            policy, reference, scorer, tokenizer, spec, share, max_new_tokens=settings.max_new_tokens,
            temperature=settings.temperature, gold=data.get_profile(cfg.data).gold,
            max_prompt_tokens=settings.max_prompt_length,
        ), prompts[: settings.eval_prompts])
    point = evaluation.held_out_point(r, prompts[: settings.eval_prompts], step)
    for key, value in point.items():
        if key != "step" and writer and not isinstance(value, str):  # (the most frequent answer: text)
            writer.add_scalar(f"{stage}/{key}", value, step)
    return point
