"""The forward passes PPO needs, over [prompt | response] batches, and the decoding loop that samples them.

Rollouts come out of generate() in the rollout layout: prompts left-padded to the longest, responses
right-padded to the longest. Every forward that scores or trains on them first lays each row out again
(pack): its prompt and response from column 0, padding only on the right, up to the longest row. Two
reasons. A row of similar-length rows (PPO's length-grouped minibatches) pads almost nothing. And no query
position is ever fully masked: a right pad still sees its row's tokens, where a left pad sees nothing, and
a fully masked attention row makes cuDNN's attention backward return NaN (the default on H100/H200).
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import inspect
from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import nn

from alignment import ppo, tokens


class AdapterDisabled(nn.Module):
    """A LoRA policy seen with its adapters switched off: the frozen reference for LoRA-PPO, without a second
    copy of the weights in memory."""

    def __init__(self, peft_model: nn.Module):
        super().__init__()
        self.peft_model = peft_model

    def get_base_model(self) -> nn.Module:
        return self.peft_model.get_base_model()

    def forward(self, **kwargs):
        with self.peft_model.disable_adapter():
            return self.peft_model(**kwargs)


class Frozen(nn.Module):
    """A frozen model (the reference, the reward model) whose every use is one call of this module's forward:
    use(model, *args). Under ZeRO-3 a DeepSpeed engine over it (distributed.frozen) then runs its hooks from the top
    for each use, as for any forward: each layer's parameters gathered when it runs and released after, the
    engine's step counted. Without DeepSpeed there is no wrapper; the functions here take either."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, use: Callable, *args, **kwargs):
        return use(self.model, *args, **kwargs)


def frozen_engine(model) -> bool:
    """Whether model is a DeepSpeed engine over a Frozen model (partitioned: every forward is a collective)."""
    return isinstance(getattr(model, "module", None), Frozen)


def _inner(model) -> nn.Module:
    """The model itself, under a frozen engine or not: for reading its class, config and parameters' device."""
    return model.module.model if frozen_engine(model) else model


@functools.cache
def _forward_takes(model_class: type, argument: str) -> bool:
    return argument in inspect.signature(model_class.forward).parameters


def _takes(model: nn.Module, argument: str) -> bool:
    """Whether model's forward takes argument; peft wrappers pass it through to the model they wrap."""
    if hasattr(model, "get_base_model"):
        model = model.get_base_model()
    return _forward_takes(type(model), argument)


def _position_kwargs(model: nn.Module, attention_mask: torch.Tensor) -> dict:
    """Positions that skip left padding, for models that take them (Bloom's ALiBi reads the mask instead)."""
    if not _takes(model, "position_ids"):
        return {}
    return {"position_ids": (attention_mask.long().cumsum(-1) - 1).clamp(min=0)}


def _logits_kwargs(model: nn.Module, keep: int) -> dict:
    """Ask for the last `keep` positions' logits only, for models that take logits_to_keep."""
    return {"logits_to_keep": keep} if keep and _takes(model, "logits_to_keep") else {}


@torch.no_grad()
def reads_packed_rows(model: nn.Module) -> bool:
    """Whether model keeps sequences packed in one row apart when given restarting position ids and no
    attention mask (batching.PackedRows): the second of two packed sequences must compute as it does alone.
    Models that take no position ids (BLOOM's ALiBi reads the mask) cannot."""
    if not _takes(model, "position_ids"):
        return False
    model = _probe_model(model)
    was_training = model.training
    model.eval()
    try:
        device = next(model.parameters()).device
        ids = torch.arange(3, 10, device=device)[None]  # two sequences, of 3 and 4 tokens
        positions = torch.tensor([[0, 1, 2, 0, 1, 2, 3]], device=device)
        packed = model(input_ids=ids, position_ids=positions, use_cache=False).logits[:, 3:].float()
        alone = model(input_ids=ids[:, 3:], use_cache=False).logits.float()
    finally:
        model.train(was_training)
    return torch.allclose(packed, alone, atol=1e-3 * alone.abs().max().item() + 1e-5)


def _probe_model(model: nn.Module) -> nn.Module:
    """model, or where its weights are partitioned (ZeRO-3 from loading on: no forward runs before the trainer's
    engine does) a one-layer model of its class and config, narrowed, with random weights: what the probe tests is
    the architecture's code, not the weights."""
    if not any(hasattr(p, "ds_id") for p in model.parameters()):
        return model
    config = copy.deepcopy(model.config)
    narrow = {"num_hidden_layers": 1, "n_layer": 1, "num_layers": 1, "hidden_size": 64, "n_embd": 64, "d_model": 64,
              "intermediate_size": 128, "n_inner": 128, "ffn_dim": 128, "num_attention_heads": 4, "n_head": 4,
              "num_key_value_heads": 4, "head_dim": 16}
    for key, value in narrow.items():
        if getattr(config, key, None) is not None:
            setattr(config, key, value)
    return type(model)(config)


# ---- the packed layout ---------------------------------------------------------------------------------


@dataclasses.dataclass
class Packed:
    """A [prompt | response] minibatch laid out for a forward pass: row i holds its p_i prompt tokens, then
    its r_i response tokens, from column 0, then padding (masked out) up to the longest row."""

    input_ids: torch.Tensor  # [B, W]
    attention_mask: torch.Tensor  # [B, W]: 1 on the row's p_i + r_i tokens
    responses: torch.Tensor  # [B, t]: the response tokens, t the longest response of the minibatch
    index: torch.Tensor  # [B, t]: the position before each response token, p_i - 1 + j (clamped past r_i)
    last: torch.Tensor  # [B]: the position of each row's last token, p_i + r_i - 1
    width: int  # T, the rollout's response width: outputs are padded back to it

    def pad(self, x: torch.Tensor) -> torch.Tensor:
        """[B, t] -> [B, T] with zeros after column t (those columns are masked out everywhere)."""
        return torch.nn.functional.pad(x, (0, self.width - x.shape[1]))


def at_positions(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """x [B, W, ...] at index [B, t] -> [B, t, ...]."""
    index = index.view(*index.shape, *[1] * (x.dim() - 2)).expand(-1, -1, *x.shape[2:])
    return x.gather(1, index)


def pack(query_responses: torch.Tensor, attention_mask: torch.Tensor, context_length: int) -> Packed:
    """The rollout layout [B, Q + T] (row i: a prompt of p_i tokens ending at column Q, then r_i response
    tokens) -> Packed."""
    full = query_responses.shape[1]
    prompts = attention_mask[:, :context_length].sum(1)  # p_i
    lengths = attention_mask[:, context_length:].sum(1)  # r_i
    t = max(int(lengths.max()), 1)
    width = int((prompts + lengths).max())
    columns = torch.arange(width, device=lengths.device)
    # Column c of row i is old column Q - p_i + c; past the row's end it holds whatever is there (masked out).
    source = (context_length - prompts[:, None] + columns).clamp(max=full - 1)
    valid = columns < (prompts + lengths)[:, None]
    index = (prompts[:, None] - 1 + torch.arange(t, device=lengths.device)).clamp(max=width - 1)
    return Packed(query_responses.gather(1, source), valid.to(attention_mask.dtype),
                  query_responses[:, context_length : context_length + t], index, prompts + lengths - 1,
                  full - context_length)


# ---- forwards ------------------------------------------------------------------------------------------


def _unwrapped(model: nn.Module) -> nn.Module:
    """The transformers model under a peft wrapper (its LoRA layers sit inside it)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def response_logits(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                    index: torch.Tensor) -> torch.Tensor:
    """A causal LM's logits at the positions index [B, t] -> [B, t, V]. The body runs over the whole row,
    the LM head only where it is read (on a prompt position its output would be thrown away)."""
    if frozen_engine(model):
        return model(response_logits, input_ids, attention_mask, index)
    if isinstance(model, AdapterDisabled):
        with model.peft_model.disable_adapter():
            return response_logits(model.peft_model, input_ids, attention_mask, index)
    lm = _unwrapped(model)
    body = lm.base_model
    hidden = body(input_ids=input_ids, attention_mask=attention_mask, use_cache=False,
                  **_position_kwargs(body, attention_mask)).last_hidden_state
    return lm.get_output_embeddings()(at_positions(hidden, index))


def position_scores(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """A one-label sequence-classification model read at every position: its score head over the body's
    hidden states. [B, W]. The critic's values; the reward model's score at a row's last token."""
    if frozen_engine(model):
        return model(position_scores, input_ids, attention_mask)
    model = _unwrapped(model)
    body = model.base_model  # LoRA layers, if any, sit inside it
    hidden = body(input_ids=input_ids, attention_mask=attention_mask, use_cache=False,
                  **_position_kwargs(body, attention_mask)).last_hidden_state
    head = model.score  # read in its own dtype: a quantized model's final norm may stay in fp32, its head not
    return head(hidden.to(next(head.parameters()).dtype)).squeeze(-1)


def policy_forward(model: nn.Module, query_responses: torch.Tensor, attention_mask: torch.Tensor,
                   context_length: int, temperature: float, entropy: bool = False,
                   ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Log-probs of the response tokens under model, at the sampling temperature, and their entropies if asked
    (a softmax over the vocabulary: only where it is logged). -> [B, T] each (entropies None unless asked)."""
    packed = pack(query_responses, attention_mask, context_length)
    logits = response_logits(model, packed.input_ids, packed.attention_mask, packed.index)
    return (packed.pad(ppo.logprobs_from_logits(logits, packed.responses, temperature)),
            packed.pad(ppo.entropy_from_logits(logits, temperature)) if entropy else None)


class ActorCritic(nn.Module):
    """The two trained PPO models as one module: one forward gives the policy's logits and the critic's values
    at the response positions. One module is what a distributed wrapper (DDP, DeepSpeed) needs: it sees every
    trained parameter used by one forward, and Accelerate's DeepSpeed engine takes one model.

    The critic is a one-label sequence-classification model read at every position instead of the last. Without
    one (critic=None: GRPO) the module is the policy alone, and its values are None.
    """

    def __init__(self, policy: nn.Module, critic: nn.Module | None):
        super().__init__()
        self.policy, self.critic = policy, critic

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, index: torch.Tensor,
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(logits [B, t, V], values [B, t] or None) at the positions index [B, t]."""
        logits = response_logits(self.policy, input_ids, attention_mask, index)
        if self.critic is None:
            return logits, None
        values = at_positions(position_scores(self.critic, input_ids, attention_mask), index)
        return logits, values


def checkpoint_activations(model: ActorCritic) -> None:
    """Activation checkpointing for the trained models: transformers recomputes each layer's activations in the
    backward pass (non-reentrant, which needs no input gradients under LoRA). It acts in training mode only, so the
    models go to it (their dropout is off: disable_dropout); generation runs in eval mode (distributed.whole_policy),
    with its KV cache."""
    for m in (model.policy, model.critic):
        if m is not None:
            m.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()


class Scored(NamedTuple):
    logprobs: torch.Tensor  # [B, T] of each response token, at the sampling temperature
    values: torch.Tensor | None  # [B, T] the critic's value of the state before each response token; None without one
    entropy: torch.Tensor | None  # [B, T] of the policy's distribution at each response token, if asked for


def actor_critic_forward(model: nn.Module, query_responses: torch.Tensor, attention_mask: torch.Tensor,
                         context_length: int, temperature: float, entropy: bool = False) -> Scored:
    """Log-probs and values (and entropies, if asked: a softmax over the vocabulary, for the log only) of the
    response tokens: the training forward, and (without gradients) the one that gives PPO its old log-probs and
    values, so the first update's ratio is 1 exactly."""
    packed = pack(query_responses, attention_mask, context_length)
    logits, values = model(packed.input_ids, packed.attention_mask, packed.index)
    with torch.no_grad():
        entropies = packed.pad(ppo.entropy_from_logits(logits, temperature)) if entropy else None
    return Scored(packed.pad(ppo.logprobs_from_logits(logits, packed.responses, temperature)),
                  packed.pad(values.float()) if values is not None else None, entropies)


# ---- generation ----------------------------------------------------------------------------------------


def _sample(logprobs: torch.Tensor) -> torch.Tensor:
    """One token per row of [B, V] log-probs, drawn from the full distribution by inverting its CDF with one
    uniform number per row (torch.multinomial draws an exponential per vocabulary entry: on CPU that was
    3 ms of each 20 ms step at the bench's size)."""
    cdf = logprobs.exp().cumsum(-1)
    u = torch.rand(cdf.shape[0], 1, device=cdf.device, dtype=cdf.dtype) * cdf[:, -1:]
    return torch.searchsorted(cdf, u).squeeze(1).clamp(max=cdf.shape[1] - 1)


@torch.no_grad()
def generate(
    model: nn.Module, tokenizer, prompts: list[str], max_new_tokens: int, temperature: float, greedy: bool = False,
    max_prompt_tokens: int = 0, all_done: Callable[[torch.Tensor], bool] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Samples (or greedily decodes) responses to already-templated prompts, with a KV cache.

    Returns (query_responses [B, Q+T], query_mask [B, Q], responses [B, T]); queries are left-padded, and
    every token after a response's first end (any of tokens.end_ids) is the pad token. Sampling uses the full
    distribution at the given temperature (no top-k / top-p), the one PPO's log-probs are computed from; the pad
    token is never drawn. Prompts longer than max_prompt_tokens (if > 0) are cut from the left. all_done(done [B])
    decides when to stop: in a multi-process run whose forwards communicate (ZeRO-3 without gathered weights)
    every process must decode until all are done.

    The loop is ours, not transformers' generate(): with none of its processors, warpers and stopping
    criteria to run, a decoding step costs the forward pass and one draw (at the bench's size on CPU,
    generate() spent about as long around each forward as in it). A test checks that greedy decoding gives
    the tokens generate() gives, for every architecture in the registry.
    """
    side, truncation_side = tokenizer.padding_side, tokenizer.truncation_side
    tokenizer.padding_side = tokenizer.truncation_side = "left"  # a long prompt loses its oldest turns
    limit = {"truncation": True, "max_length": max_prompt_tokens} if max_prompt_tokens else {}
    enc = tokenizer(prompts, return_tensors="pt", padding=True, **limit)
    tokenizer.padding_side, tokenizer.truncation_side = side, truncation_side
    if frozen_engine(model):  # a partitioned model: each decoding step is a collective (see all_done)
        engine, model = model, _inner(model)
        step = lambda **kwargs: engine(lambda m, **kw: m(**kw), **kwargs)
    else:
        step = model
    device = next(model.parameters()).device if any(True for _ in model.parameters()) else torch.device("cpu")
    queries, query_mask = enc.input_ids.to(device), enc.attention_mask.to(device)
    pad, ends = tokenizer.pad_token_id, torch.tensor(tokens.end_ids(tokenizer), dtype=torch.long, device=device)
    suppress_pad = pad not in tokens.end_ids(tokenizer)  # (decided once: a test on a GPU tensor would sync per token)
    cache_name = "cache" if _takes(model, "cache") else "past_key_values"  # the name before transformers 5.x
    takes_positions = _takes(model, "position_ids")
    inputs = {"input_ids": queries, **_position_kwargs(model, query_mask), **_logits_kwargs(model, 1)}
    mask, drawn = query_mask, []
    done = torch.zeros(len(prompts), dtype=torch.bool, device=device)
    for _ in range(max_new_tokens):
        out = step(**inputs, attention_mask=mask, use_cache=True)
        logits = out.logits[:, -1].float()
        if suppress_pad and pad < logits.shape[1]:
            logits[:, pad] = float("-inf")
        if greedy:
            token = logits.argmax(-1)
        else:
            token = _sample(torch.log_softmax(logits / temperature, dim=-1))
        token = torch.where(done, torch.full_like(token, pad), token)
        drawn.append(token)
        done |= torch.isin(token, ends)
        if all_done(done) if all_done else done.all():
            break
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        inputs = {"input_ids": token[:, None], cache_name: getattr(out, cache_name)}
        if takes_positions:
            inputs["position_ids"] = mask.sum(1, keepdim=True) - 1
    responses = torch.stack(drawn, dim=1)
    return torch.cat([queries, responses], dim=1), query_mask, responses


def decode_responses(tokenizer, responses: torch.Tensor) -> list[str]:
    return [t.strip() for t in tokenizer.batch_decode(responses, skip_special_tokens=True)]
