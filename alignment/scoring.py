"""Scoring with a reward model: whole texts, or a policy's rollouts (by token ids, or by text when the
reward model reads another tokenizer or template).

A sequence's score is the reward head's output at its last token (its EOS), the token a sequence-
classification model pools at in training. It is read here at the last attended position rather than
found by searching for pad tokens, so it holds for any padding.
"""

from __future__ import annotations

import torch
from torch import nn

from alignment import forwards
from alignment.registry import ModelSpec


def reward_forward(reward_model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                   last: torch.Tensor | None = None) -> torch.Tensor:
    """The reward model's score of each sequence of a right-padded batch, at its last token (last [B], by
    default the last attended position). -> [B]."""
    if last is None:
        last = attention_mask.sum(1) - 1
    scores = forwards.position_scores(reward_model, input_ids, attention_mask)
    return scores[torch.arange(len(scores), device=scores.device), last].float()


@torch.no_grad()
def score_texts(reward_model, tokenizer, texts: list[str], batch_size: int = 64) -> tuple[list[float], list[int]]:
    """Reward-model scores of whole texts (prompt + response, ended by EOS as in training), and their lengths."""
    scores, lengths = [], []
    device = next(reward_model.parameters()).device
    side, tokenizer.padding_side = tokenizer.padding_side, "right"
    try:
        for i in range(0, len(texts), batch_size):
            chunk = [t + tokenizer.eos_token for t in texts[i : i + batch_size]]
            enc = tokenizer(chunk, return_tensors="pt", padding=True).to(device)
            scores += reward_forward(reward_model, enc.input_ids, enc.attention_mask).tolist()
            lengths += enc.attention_mask.sum(1).tolist()
    finally:
        tokenizer.padding_side = side
    return scores, lengths


class RewardScorer:
    """Scores a policy's rollouts with a reward model. When both share tokenizer and template the token ids go
    straight in; otherwise (any reward model with any policy) the responses are decoded and the text is
    re-tokenized the way the reward model was trained: its template, its tokenizer, EOS at the end."""

    def __init__(self, reward_model, rm_tokenizer, rm_spec: ModelSpec, policy_tokenizer, policy_spec: ModelSpec):
        self.model, self.rm_tokenizer, self.rm_spec, self.policy_tokenizer = (
            reward_model,
            rm_tokenizer,
            rm_spec,
            policy_tokenizer,
        )
        self.by_text = (rm_tokenizer.get_vocab() != policy_tokenizer.get_vocab()
                        or (rm_spec.template, rm_spec.chat_template)
                        != (policy_spec.template, policy_spec.chat_template))

    @torch.no_grad()
    def __call__(self, prompts: list, query_responses: torch.Tensor, attention_mask: torch.Tensor,
                 responses: torch.Tensor) -> torch.Tensor:
        """prompts: the raw prompts (strings or messages) of the batch. -> scores [B]."""
        if not self.by_text:  # packed: read at each row's last token, with less padding
            packed = forwards.pack(query_responses, attention_mask, query_responses.shape[1] - responses.shape[1])
            return reward_forward(self.model, packed.input_ids, packed.attention_mask, packed.last)
        texts = self.policy_tokenizer.batch_decode(responses, skip_special_tokens=True)
        scores, _ = score_texts(self.model, self.rm_tokenizer,
                                [self.rm_spec.format_prompt(p) + t for p, t in zip(prompts, texts)])
        return torch.tensor(scores, device=query_responses.device)
