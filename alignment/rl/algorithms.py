"""What PPO, GRPO, RLOO and REINFORCE++ do differently in the one loop (loop.py): whether a critic trains beside the
policy, how a scored rollout becomes advantages (3), the loss of a minibatch (4), and what each adds to a step's log.
The math itself is in alignment/ppo.py, as pure functions with hand-worked tests.

An algorithm is a small object: name (the stage, its config section and log), method (its name in messages),
critic, group_size (responses sampled per prompt), epochs, needs_reference (whether training reads the
reference's log-probs: with a KL coefficient of 0 no reference forward runs, and the step's kl is logged as nan);
fresh_moments(), restore(state), keep(state), advantages(accelerator, r, s, state) -> advantages or None (a score
not finite in some process), loss(new, r, s, adv, idx, state) -> (loss, the values of its stats),
record(accelerator, r, s, adv, state) -> log fields, after_step(state, record, per_step), final(state) -> manifest
metrics of its own.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from alignment import ppo
from alignment.rl.types import RLState, Rollout, Scores


class PPOAdvantages(NamedTuple):
    rewards: ppo.TokenRewards  # per-token rewards: the KL penalty, the score at the last token
    gae: ppo.Advantages  # GAE advantages and returns (the critic's targets)
    whitened: torch.Tensor  # [B, T] the advantages the policy loss reads


class PPO:
    """Per-token rewards (KL penalty against the reference, the normalised and clipped score at the last token),
    GAE over the critic's values, clipped policy and value losses (Ziegler et al., 2019; Ouyang et al., 2022)."""

    name, method, critic, group_size = "ppo", "PPO", True, 1
    stats = ("policy_loss", "value_loss", "clip_frac", "value_clip_frac", "approx_kl")

    def __init__(self, settings):
        self.s = settings
        self.epochs = settings.ppo_epochs
        self.moments = ppo.RunningMoments()  # of the reward model's scores, over all processes

    @property
    def needs_reference(self) -> bool:
        """Whether training reads the reference's log-probs: not with a KL coefficient of 0 that stays 0."""
        return self.s.kl_coef != 0 or self.s.adaptive_kl

    def fresh_moments(self) -> dict:
        return self.moments.state_dict()

    def restore(self, state: RLState) -> None:
        self.moments.load_state_dict(state.moments)

    def keep(self, state: RLState) -> None:
        state.moments = self.moments.state_dict()

    def advantages(self, accelerator, r: Rollout, s: Scores, state: RLState) -> PPOAdvantages | None:
        p = self.s
        all_scores = accelerator.gather(s.rewards)
        if not torch.isfinite(all_scores).all():
            return None
        scores = s.rewards
        if p.normalize_reward:
            self.moments.update(all_scores)
            scores = (scores - self.moments.mean) / self.moments.std
        reference = s.logprobs if s.ref_logprobs is None else s.ref_logprobs  # (none: kl_coef is 0)
        rewards = ppo.token_rewards(scores.clamp(-p.reward_clip, p.reward_clip), s.logprobs, reference, r.mask,
                                    state.kl_coef)
        adv = ppo.gae(rewards.rewards, s.values, r.mask, p.gamma, p.lam)
        whitened = ppo.masked_whiten(adv.advantages, r.mask) if p.whiten_advantages else adv.advantages
        return PPOAdvantages(rewards, adv, whitened)

    def loss(self, new, r: Rollout, s: Scores, adv: PPOAdvantages, idx: torch.Tensor, state: RLState):
        p = self.s
        pl = ppo.policy_loss(new.logprobs, s.logprobs[idx], adv.whitened[idx], r.mask[idx], p.clip_range)
        vl = ppo.value_loss(new.values, s.values[idx], adv.gae.returns[idx], r.mask[idx], p.value_clip)
        return pl.loss + p.vf_coef * vl.loss, (pl.loss, vl.loss, pl.clip_frac, vl.clip_frac, pl.approx_kl)

    def record(self, accelerator, r: Rollout, s: Scores, adv: PPOAdvantages, state: RLState) -> dict:
        kl = accelerator.gather(adv.rewards.kl.sum(1)).mean().item() if s.ref_logprobs is not None else math.nan
        return {"kl": kl, "kl_coef": state.kl_coef}  # (nan: not measured, no reference ran)

    def final(self, state: RLState) -> dict:
        return {"final_kl_coef": state.kl_coef}

    def after_step(self, state: RLState, record: dict, per_step: int) -> None:
        if self.s.adaptive_kl:
            state.kl_coef = ppo.adaptive_kl_coef(state.kl_coef, record["kl"], self.s.kl_target, self.s.kl_horizon,
                                                 per_step)


class CriticFree:
    """What the critic-free methods share: no critic, no running statistics of their own, no KL controller."""

    critic = False

    def __init__(self, settings):
        self.s = settings
        self.epochs, self.group_size = settings.epochs, settings.group_size

    @property
    def needs_reference(self) -> bool:
        return self.s.kl_coef != 0

    def fresh_moments(self) -> dict:
        return {}

    def restore(self, state: RLState) -> None:
        pass

    def keep(self, state: RLState) -> None:
        pass

    def final(self, state: RLState) -> dict:
        return {}

    def after_step(self, state: RLState, record: dict, per_step: int) -> None:
        pass

    def kl(self, accelerator, r: Rollout, s: Scores) -> float:
        """PPO's per-response sum of log pi - log pi_ref on the samples, over all processes (nan: no reference ran)."""
        if s.ref_logprobs is None:
            return math.nan
        return accelerator.gather(ppo.masked(s.logprobs - s.ref_logprobs, r.mask).sum(1)).mean().item()


class GRPO(CriticFree):
    """Group-relative advantages (each reward less its group's mean, over a std or none: Dr. GRPO), one per
    response at each of its tokens; the clipped ratio objective plus kl_coef * k3, the KL estimate to the reference,
    in the loss (Shao et al., 2024)."""

    name, method = "grpo", "GRPO"
    stats = ("loss", "kl_k3", "clip_frac", "approx_kl")

    def advantages(self, accelerator, r: Rollout, s: Scores, state: RLState) -> ppo.GroupAdvantages | None:
        """Computed over the whole batch (a batch std needs every process's rewards); a group never straddles
        processes."""
        everyone = accelerator.gather(s.rewards)
        if not torch.isfinite(everyone).all():
            return None
        adv = ppo.group_advantages(everyone, self.group_size, self.s.scale_rewards)
        return ppo.GroupAdvantages(_mine(accelerator, adv.advantages), _mine(accelerator, adv.group_std))

    def loss(self, new, r: Rollout, s: Scores, adv: ppo.GroupAdvantages, idx: torch.Tensor, state: RLState):
        g = self.s
        reference = (s.logprobs if s.ref_logprobs is None else s.ref_logprobs)[idx]  # (none: kl_coef is 0)
        out = ppo.grpo_loss(new.logprobs, s.logprobs[idx], reference, adv.advantages[idx], r.mask[idx],
                            g.clip_range, g.kl_coef, g.loss_aggregation, g.max_new_tokens)
        return out.loss, (out.loss, out.kl, out.clip_frac, out.approx_kl)

    def record(self, accelerator, r: Rollout, s: Scores, adv: ppo.GroupAdvantages, state: RLState) -> dict:
        """kl as PPO's, for comparison (kl_k3 is the loss's term); groups_alike the share of groups whose
        responses all scored the same (no signal)."""
        alike = accelerator.gather((adv.group_std == 0).float()).mean()
        return {"kl": self.kl(accelerator, r, s),
                "reward_std": accelerator.gather(adv.group_std).mean().item(), "groups_alike": alike.item()}


class RLOOAdvantages(NamedTuple):
    advantages: torch.Tensor  # [B] each response's KL-penalised reward less the mean of its group's others
    rewards: torch.Tensor  # [B] the KL-penalised rewards: score - kl_coef * sum of log pi - log pi_ref


class RLOO(CriticFree):
    """REINFORCE with a leave-one-out baseline (Kool et al., 2019; Ahmadian et al., 2024): each response's reward,
    less kl_coef times its summed log-ratio to the reference (the KL in the reward, as TRL's RLOOTrainer), less the
    mean of the other responses to its prompt, is the advantage of every one of its tokens; the clipped ratio loss
    (whose clip acts only when a batch is trained on more than once)."""

    name, method = "rloo", "RLOO"
    stats = ("loss", "clip_frac", "approx_kl")

    def advantages(self, accelerator, r: Rollout, s: Scores, state: RLState) -> RLOOAdvantages | None:
        kl = ppo.masked(s.logprobs - s.ref_logprobs, r.mask).sum(1) if s.ref_logprobs is not None else 0.0
        everyone = accelerator.gather(s.rewards - self.s.kl_coef * kl)
        if not torch.isfinite(everyone).all():
            return None
        adv = ppo.leave_one_out(everyone, self.group_size)
        if self.s.normalize_advantages:
            adv = (adv - adv.mean()) / (adv.std() + 1e-8)
        return RLOOAdvantages(_mine(accelerator, adv), _mine(accelerator, everyone))

    def loss(self, new, r: Rollout, s: Scores, adv: RLOOAdvantages, idx: torch.Tensor, state: RLState):
        old = s.logprobs[idx]  # (the KL is in the reward: the loss has no KL term)
        out = ppo.grpo_loss(new.logprobs, old, old, adv.advantages[idx], r.mask[idx], self.s.clip_range, 0.0,
                            self.s.loss_aggregation, self.s.max_new_tokens)
        return out.loss, (out.loss, out.clip_frac, out.approx_kl)

    def record(self, accelerator, r: Rollout, s: Scores, adv: RLOOAdvantages, state: RLState) -> dict:
        """kl as PPO's; penalized_reward the mean reward the advantages came from (score less the KL penalty)."""
        return {"kl": self.kl(accelerator, r, s), "penalized_reward": accelerator.gather(adv.rewards).mean().item()}


class Reinforce(CriticFree):
    """REINFORCE++ (Hu, 2025): PPO's per-token rewards (kl_coef * (log pi - log pi_ref) taken at every token, the
    score at the last), their returns normalised over every response token of the whole batch (no critic, no
    per-prompt baseline), the clipped ratio loss per token."""

    name, method = "reinforce", "REINFORCE++"
    stats = ("loss", "clip_frac", "approx_kl")

    def advantages(self, accelerator, r: Rollout, s: Scores, state: RLState) -> torch.Tensor | None:
        if not torch.isfinite(accelerator.gather(s.rewards)).all():
            return None
        reference = s.logprobs if s.ref_logprobs is None else s.ref_logprobs  # (none: kl_coef is 0)
        rewards = ppo.token_rewards(s.rewards, s.logprobs, reference, r.mask, self.s.kl_coef)
        return ppo.reinforce_pp_advantages(rewards.rewards, r.mask, self.s.gamma,
                                           total=lambda t: accelerator.reduce(t, reduction="sum"))

    def loss(self, new, r: Rollout, s: Scores, adv: torch.Tensor, idx: torch.Tensor, state: RLState):
        old = s.logprobs[idx]  # (the KL is in the reward: the loss has no KL term)
        out = ppo.grpo_loss(new.logprobs, old, old, adv[idx], r.mask[idx], self.s.clip_range, 0.0,
                            self.s.loss_aggregation, self.s.max_new_tokens)
        return out.loss, (out.loss, out.clip_frac, out.approx_kl)

    def record(self, accelerator, r: Rollout, s: Scores, adv: torch.Tensor, state: RLState) -> dict:
        return {"kl": self.kl(accelerator, r, s)}


def _mine(accelerator, everyone: torch.Tensor) -> torch.Tensor:
    """This process's share of a tensor gathered over all processes (equal shares, in process order)."""
    return everyone.view(accelerator.num_processes, -1)[accelerator.process_index]
