"""PPO math for RLHF, as pure functions over tensors.

Shapes: B = sequences in the batch, T = response length (tokens generated, padded). A `mask` is 1.0 on
response tokens up to and including the first EOS and 0.0 after it, so padding never enters a loss or
a statistic. Conventions follow Ziegler et al. (2019) and "The N Implementation Details of RLHF with
PPO" (Huang et al., 2023): per-token reward -kl_coef * (log pi - log pi_ref), the reward model's score
added at the last response token, GAE on top, whitened advantages, clipped policy and value losses.
GRPO's (at the end) replaces the critic by a group of responses to each prompt, and moves the KL into the loss;
RLOO's baseline is the other responses to the prompt, REINFORCE++'s the whole batch.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F

ROWS_AT_ONCE = 8  # sequences whose fp32 vocabulary-wide tensors exist at once (see logprobs_from_logits)


def logprobs_from_logits(logits: torch.Tensor, tokens: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """log softmax(logits / temperature) at tokens. logits [B, T, V], tokens [B, T] -> [B, T].

    Training must score tokens with the same temperature-scaled distribution they were sampled from,
    or the ratio pi/pi_old is off from the very first step. The fp32 log-softmax runs over ROWS_AT_ONCE sequences
    at a time: its [rows, T, V] temporaries, not the whole minibatch's, exist at once (without gradients; with
    them autograd keeps each chunk's output for the backward anyway). Each row's values are the same either way.
    """
    chunks = []
    for start in range(0, logits.shape[0], ROWS_AT_ONCE):
        logp = F.log_softmax(logits[start : start + ROWS_AT_ONCE].float() / temperature, dim=-1)
        chunks.append(torch.gather(logp, 2, tokens[start : start + ROWS_AT_ONCE].unsqueeze(-1)).squeeze(-1))
    return torch.cat(chunks) if chunks else logits.new_zeros(tokens.shape, dtype=torch.float32)


def entropy_from_logits(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Entropy of softmax(logits / temperature) per position, ROWS_AT_ONCE sequences at a time. [B, T, V] -> [B, T]."""
    chunks = []
    for start in range(0, logits.shape[0], ROWS_AT_ONCE):
        logp = F.log_softmax(logits[start : start + ROWS_AT_ONCE].float() / temperature, dim=-1)
        chunks.append(-(logp.exp() * logp).sum(-1))
    return torch.cat(chunks) if chunks else logits.new_zeros(logits.shape[:2], dtype=torch.float32)


def response_mask(responses: torch.Tensor, end_ids: int | tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """Mask of tokens up to and including the first end (any of end_ids: an instruct model declares several), and
    whether each response has one.

    responses [B, T] -> (mask [B, T] float, ended [B] bool).
    """
    ends = torch.tensor([end_ids] if isinstance(end_ids, int) else list(end_ids), dtype=responses.dtype,
                        device=responses.device)
    is_eos = torch.isin(responses, ends)
    ended = is_eos.any(dim=1)
    # eos_before[t] = number of EOS strictly before t; keep t while it is 0
    eos_before = torch.cumsum(is_eos.long(), dim=1) - is_eos.long()
    return (eos_before == 0).float(), ended


def masked(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """x where mask is set, 0 elsewhere. Selected, not multiplied: a NaN or inf in a masked-out position (a
    padding position's output) would survive a multiplication by 0 (NaN * 0 = NaN)."""
    return torch.where(mask.bool(), x, torch.zeros((), dtype=x.dtype, device=x.device))


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    if dim is None:
        return masked(x, mask).sum() / mask.sum().clamp(min=1)
    return masked(x, mask).sum(dim) / mask.sum(dim).clamp(min=1)


def masked_var(x: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    n = mask.sum()
    if unbiased and n > 1:
        var = var * n / (n - 1)
    return var


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True) -> torch.Tensor:
    """(x - mean) / std over the masked entries; with shift_mean=False the mean is added back."""
    mean, var = masked_mean(x, mask), masked_var(x, mask)
    whitened = (x - mean) * torch.rsqrt(var + 1e-8)
    if not shift_mean:
        whitened = whitened + mean
    return masked(whitened, mask)


class TokenRewards(NamedTuple):
    rewards: torch.Tensor  # [B, T] -kl_coef * kl per token, plus the score at the last response token
    kl: torch.Tensor  # [B, T] log pi - log pi_ref per token (0 where masked)
    non_score: torch.Tensor  # [B, T] the KL part alone


def token_rewards(
    scores: torch.Tensor, logprobs: torch.Tensor, ref_logprobs: torch.Tensor, mask: torch.Tensor, kl_coef: float
) -> TokenRewards:
    """Per-token rewards. scores [B]; logprobs, ref_logprobs, mask [B, T].

    The score lands on the last unmasked token of each response (its EOS, or the last token generated
    when the response never ended).
    """
    kl = masked(logprobs - ref_logprobs, mask)
    non_score = -kl_coef * kl
    last = (mask.sum(1).long() - 1).clamp(min=0)
    rewards = non_score.clone()
    rewards[torch.arange(len(scores), device=scores.device), last] += scores
    return TokenRewards(masked(rewards, mask), kl, masked(non_score, mask))


class Advantages(NamedTuple):
    advantages: torch.Tensor  # [B, T] GAE advantages (not yet whitened)
    returns: torch.Tensor  # [B, T] advantages + values: the value targets


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float) -> Advantages:
    """Generalised advantage estimation (Schulman et al., 2016) over masked responses.

    rewards, values, mask [B, T]. Beyond the last response token the value is taken as 0 (the episode
    has ended), which masking values achieves.
    """
    values = masked(values, mask)
    T = rewards.shape[1]
    advantages = torch.zeros_like(rewards)
    last_gae = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(T)):
        next_value = values[:, t + 1] if t + 1 < T else torch.zeros_like(last_gae)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        last_gae = delta + gamma * lam * last_gae
        advantages[:, t] = last_gae
    advantages = masked(advantages, mask)
    return Advantages(advantages, masked(advantages + values, mask))


class PolicyLoss(NamedTuple):
    loss: torch.Tensor  # scalar
    clip_frac: torch.Tensor  # share of tokens where the clipped objective was the active one
    approx_kl: torch.Tensor  # 0.5 * E[(log pi - log pi_old)^2], how far the update moved the policy


def policy_loss(
    logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, clip: float
) -> PolicyLoss:
    """Clipped surrogate loss: mean of max(-A r, -A clip(r, 1-eps, 1+eps)), r = pi / pi_old. All [B, T]."""
    log_ratio = logprobs - old_logprobs
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip, 1.0 + clip)
    loss = masked_mean(torch.max(unclipped, clipped), mask)
    with torch.no_grad():
        clip_frac = masked_mean((clipped > unclipped).float(), mask)
        approx_kl = 0.5 * masked_mean(log_ratio**2, mask)
    return PolicyLoss(loss, clip_frac, approx_kl)


class ValueLoss(NamedTuple):
    loss: torch.Tensor  # scalar
    clip_frac: torch.Tensor  # share of tokens where the clipped error was the larger


def value_loss(
    values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor, clip: float
) -> ValueLoss:
    """0.5 * mean of max((v - R)^2, (v_clipped - R)^2), v_clipped within clip of the rollout's value."""
    clipped_values = old_values + torch.clamp(values - old_values, -clip, clip)
    unclipped_err = (values - returns) ** 2
    clipped_err = (clipped_values - returns) ** 2
    loss = 0.5 * masked_mean(torch.max(unclipped_err, clipped_err), mask)
    with torch.no_grad():
        clip_frac = masked_mean((clipped_err > unclipped_err).float(), mask)
    return ValueLoss(loss, clip_frac)


def adaptive_kl_coef(kl_coef: float, kl: float, target: float, horizon: int, n_steps: int) -> float:
    """Ziegler et al. (2019) controller: move kl_coef so the observed KL approaches target.

    kl is the mean per-sequence KL of the batch just seen, n_steps the episodes it held.
    """
    error = max(-0.2, min(0.2, kl / target - 1.0))
    return kl_coef * (1.0 + error * n_steps / horizon)


class RunningMoments:
    """Running mean and standard deviation of a stream of scores (Chan et al.'s parallel update)."""

    def __init__(self) -> None:
        self.mean, self.var, self.count = 0.0, 1.0, 0

    def update(self, x: torch.Tensor) -> None:
        n = x.numel()
        batch_mean, batch_var = x.float().mean().item(), x.float().var(unbiased=False).item()
        total = self.count + n
        delta = batch_mean - self.mean
        m2 = self.var * self.count + batch_var * n + delta**2 * self.count * n / total
        self.mean += delta * n / total
        self.var, self.count = m2 / total, total

    @property
    def std(self) -> float:
        return max(self.var, 1e-8) ** 0.5

    def state_dict(self) -> dict:
        return {"mean": self.mean, "var": self.var, "count": self.count}

    def load_state_dict(self, state: dict) -> None:
        self.mean, self.var, self.count = state["mean"], state["var"], state["count"]


def minibatches(lengths: torch.Tensor, size: int, generator: torch.Generator, by_length: bool) -> list[torch.Tensor]:
    """Index sets that cover a rollout batch once, `size` each (the last may be smaller), in a random order.
    by_length: each set holds sequences of neighbouring lengths (ties broken at random), so a minibatch
    pads little; the random order of the sets keeps the updates of an epoch unordered by length."""
    lengths = lengths.cpu()  # the generator and the permutation live on the CPU, whatever the batch's device
    order = torch.randperm(len(lengths), generator=generator)
    if by_length:
        order = order[torch.sort(lengths[order], stable=True).indices]
    sets = list(order.split(size))
    return [sets[i] for i in torch.randperm(len(sets), generator=generator).tolist()]


# ---- GRPO (Shao et al., 2024, DeepSeekMath): a group of responses per prompt instead of a critic -------------


class GroupAdvantages(NamedTuple):
    advantages: torch.Tensor  # [B] each response's reward less its group's mean, scaled (see group_advantages)
    group_std: torch.Tensor  # [B] the standard deviation of its group's rewards (0: the group teaches nothing)


def group_advantages(
    rewards: torch.Tensor, group_size: int, scale: str = "group", eps: float = 1e-4
) -> GroupAdvantages:
    """GRPO's outcome advantages. rewards [B], B = groups * group_size, each group's responses consecutive.

    A = r - mean(group), divided by: scale="group" the group's std + eps (DeepSeekMath), "batch" the whole batch's
    std + eps (TRL's scale_rewards="batch"), "none" nothing (Dr. GRPO, Liu et al., 2025: the std's division gives
    groups that are nearly all right or all wrong the largest steps). Stds are unbiased (Bessel), as TRL's.
    """
    grouped = rewards.float().view(-1, group_size)
    centered = (grouped - grouped.mean(1, keepdim=True)).flatten()
    group_std = grouped.std(1, keepdim=True).expand_as(grouped).flatten()
    if scale == "group":
        centered = centered / (group_std + eps)
    elif scale == "batch":
        centered = centered / (rewards.float().std() + eps)
    elif scale != "none":
        raise ValueError(f"scale {scale!r} is not 'group', 'batch' or 'none'")
    return GroupAdvantages(centered, group_std)


def leave_one_out(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """RLOO's advantages (Kool et al., 2019; Ahmadian et al., 2024): each response's reward less the mean reward of
    the other responses to its prompt, a baseline that does not depend on the response itself (so the gradient stays
    unbiased). rewards [B], B = groups * group_size, each group's responses consecutive -> [B]. Equal to
    group_size / (group_size - 1) times the reward less the group's mean."""
    if group_size < 2:
        raise ValueError(f"group_size {group_size}: a leave-one-out baseline needs at least 2 responses a prompt")
    grouped = rewards.float().view(-1, group_size)
    others = (grouped.sum(1, keepdim=True) - grouped) / (group_size - 1)
    return (grouped - others).flatten()


def discounted_returns(rewards: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0) -> torch.Tensor:
    """Per-token returns G_t = r_t + gamma * G_{t+1} within each response (0 past its end). rewards, mask [B, T]."""
    rewards = masked(rewards, mask)
    returns = torch.zeros_like(rewards)
    running = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(rewards.shape[1])):
        running = rewards[:, t] + gamma * running
        returns[:, t] = running
    return masked(returns, mask)


def reinforce_pp_advantages(
    rewards: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0,
    total: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """REINFORCE++'s advantages (Hu, 2025): the per-token returns of token_rewards' rewards (the KL penalty at every
    token, the score at the last), normalised by the mean and (unbiased) std over every response token of the batch,
    with no critic and no per-prompt baseline. rewards, mask [B, T] -> [B, T]. With several processes each holding a
    share of the batch, total sums a tensor over them (the batch's moments are the whole batch's)."""
    returns = discounted_returns(rewards, mask, gamma)
    on = masked(returns, mask)
    sums = torch.stack([on.sum(), (on * on).sum(), mask.sum()]).double()
    s, squares, n = (total(sums) if total is not None else sums).tolist()
    mean = s / max(n, 1)
    var = max(squares / max(n, 1) - mean * mean, 0.0) * (n / (n - 1) if n > 1 else 1.0)
    return masked((returns - mean) / math.sqrt(var + 1e-8), mask)


def kl_k3(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """Per-token estimate of KL(pi || pi_ref) on tokens sampled from pi: exp(d) - d - 1 with d = log pi_ref - log pi
    (Schulman's k3, DeepSeekMath's eq. 4): unbiased, never negative. [B, T] -> [B, T]."""
    d = ref_logprobs - logprobs
    return torch.exp(d) - d - 1


class GRPOLoss(NamedTuple):
    loss: torch.Tensor  # scalar: the clipped surrogate plus kl_coef * k3, aggregated as asked
    kl: torch.Tensor  # mean k3 per token
    clip_frac: torch.Tensor  # share of tokens where the clipped objective was the active one
    approx_kl: torch.Tensor  # 0.5 * E[(log pi - log pi_old)^2], how far the update moved the policy


def grpo_loss(
    logprobs: torch.Tensor, old_logprobs: torch.Tensor, ref_logprobs: torch.Tensor, advantages: torch.Tensor,
    mask: torch.Tensor, clip: float, kl_coef: float, aggregation: str = "sequence", max_tokens: int = 0,
) -> GRPOLoss:
    """GRPO's objective as a loss. logprobs, old_logprobs, ref_logprobs, mask [B, T]; advantages [B], one per response,
    the same at each of its tokens (or [B, T], one per token: REINFORCE++). Per token: max(-A r, -A clip(r, 1-eps,
    1+eps)) + kl_coef * k3, r = pi / pi_old.

    aggregation: "sequence" each response's mean over its tokens, then the mean over responses (DeepSeekMath; a
    long response's tokens weigh less); "token" the mean over all tokens of the batch (DAPO); "constant" the sum over
    tokens / (B * max_tokens) (Dr. GRPO: no length in the normaliser at all).
    """
    log_ratio = logprobs - old_logprobs
    ratio = torch.exp(log_ratio)
    adv = advantages[:, None] if advantages.dim() == 1 else advantages
    unclipped, clipped = -adv * ratio, -adv * torch.clamp(ratio, 1.0 - clip, 1.0 + clip)
    kl = kl_k3(logprobs, ref_logprobs)
    per_token = masked(torch.max(unclipped, clipped) + kl_coef * kl, mask)
    if aggregation == "sequence":
        loss = (per_token.sum(1) / mask.sum(1).clamp(min=1)).mean()
    elif aggregation == "token":
        loss = per_token.sum() / mask.sum().clamp(min=1)
    elif aggregation == "constant" and max_tokens > 0:
        loss = per_token.sum() / (mask.shape[0] * max_tokens)
    else:
        raise ValueError(f"aggregation {aggregation!r} is not 'sequence', 'token' or 'constant' (with max_tokens > 0)")
    with torch.no_grad():
        clip_frac = masked_mean((clipped > unclipped).float(), mask)
        approx_kl = 0.5 * masked_mean(log_ratio**2, mask)
    return GRPOLoss(loss, masked_mean(kl.detach(), mask), clip_frac, approx_kl)
