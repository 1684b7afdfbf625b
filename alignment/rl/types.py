"""What one RL step passes from phase to phase, with the shapes of its tensors, and what a resumed run needs."""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import torch


class Rollout(NamedTuple):
    """One process's share of a rollout batch: B prompts and the responses sampled to them."""

    prompts: list  # B raw prompts (strings or messages)
    query_responses: torch.Tensor  # [B, Q + T] prompts left-padded to Q tokens, then responses
    attention: torch.Tensor  # [B, Q + T] 1 on prompt tokens and on response tokens up to the first EOS
    responses: torch.Tensor  # [B, T] sampled tokens, the pad token after the first EOS
    mask: torch.Tensor  # [B, T] float, 1 on response tokens up to and including the first EOS
    ended: torch.Tensor  # [B] bool, whether the response has an EOS

    @property
    def context(self) -> int:
        return self.query_responses.shape[1] - self.responses.shape[1]


class Scores(NamedTuple):
    logprobs: torch.Tensor  # [B, T] the policy's, from the training forward: the update's old log-probs
    values: torch.Tensor | None  # [B, T] the critic's; None without a critic (GRPO)
    ref_logprobs: torch.Tensor | None  # [B, T] the frozen reference's; None where no KL term needs it
    entropy: torch.Tensor  # [B, T] of the policy's distribution
    rewards: torch.Tensor  # [B] the reward model's raw score; after steps.reward the terms' mix less the
    # missing-EOS penalty (with the reward model alone: its score less the penalty)
    terms: dict | None = None  # name -> [B] each reward term's raw values (NaN: a function's None), after steps.reward


@dataclasses.dataclass
class RLState:
    """What a resumed run needs to go on as if never stopped (beside weights, optimizer and RNG states)."""

    config: dict
    kl_coef: float
    step: int = 0
    queue: list = dataclasses.field(default_factory=list)  # prompt indices not yet sampled, in order
    log: list = dataclasses.field(default_factory=list)  # one record per step
    eval_log: list = dataclasses.field(default_factory=list)  # held-out points every eval_every steps
    skipped: int = 0  # updates skipped for a non-finite loss or reward
    in_a_row: int = 0
    truncated_prompts: int = 0
    moments: dict = dataclasses.field(default_factory=dict)  # running statistics of the reward model's scores
    reward_moments: dict = dataclasses.field(default_factory=dict)  # each reward term's, when several are mixed
