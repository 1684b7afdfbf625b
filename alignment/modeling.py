"""Loading models and tokenizers from the registry or the store, and the forward passes PPO needs.

Every checkpoint loads with the standard from_pretrained. A LoRA checkpoint holds only its adapter; its
manifest names the `base` it was trained on (a registry path or a parent checkpoint), and loading
merges the adapter into that base, so the stages downstream always get a plain model.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import inspect
from pathlib import Path

import torch
from torch import nn
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

from alignment import ppo
from alignment.registry import ModelSpec
from alignment.store import load_checkpoint

_PEFT_TASKS = {AutoModelForCausalLM: "CAUSAL_LM", AutoModelForSequenceClassification: "SEQ_CLS"}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def load_tokenizer(path: str | Path, spec: ModelSpec):
    tokenizer = AutoTokenizer.from_pretrained(str(path), trust_remote_code=spec.trust_remote_code)
    if tokenizer.pad_token is None:  # LLaMA and GPT-2 ship without one; padding is masked out everywhere
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = spec.padding_side
    return tokenizer


def quantization_config(quantization: str, compute_dtype: str = "float32"):
    """bitsandbytes settings for '8bit' or '4bit' (NF4 with double quantization), None for ''."""
    from transformers import BitsAndBytesConfig

    heads = ["lm_head", "score"]  # output layers stay in full precision (the reward head is tiny and trained)
    if quantization == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=heads)
    if quantization == "4bit":
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                  bnb_4bit_compute_dtype=DTYPES[compute_dtype], llm_int8_skip_modules=heads)
    return None


def load_model(path: str | Path, auto_class, spec: ModelSpec, quantization: str = "", compute_dtype: str = "float32",
               **kwargs) -> nn.Module:
    """auto_class.from_pretrained(path), optionally in 8/4 bit; an adapter-only checkpoint is merged into the base
    its manifest names (in full precision: merging into quantized weights would round the adapter away)."""
    path = Path(path)
    if quantization and not (path / "adapter_config.json").is_file():
        kwargs["quantization_config"] = quantization_config(quantization, compute_dtype)
        kwargs.setdefault("dtype", DTYPES[compute_dtype])
    kwargs.setdefault("dtype", DTYPES[spec.dtype])
    kwargs.setdefault("trust_remote_code", spec.trust_remote_code)
    kwargs.setdefault("use_safetensors", True)  # never unpickle weights: a .bin checkpoint can run code
    if auto_class is AutoModelForSequenceClassification:
        kwargs.setdefault("num_labels", 1)
    if (path / "adapter_config.json").is_file():
        from peft import PeftConfig, PeftModel

        base = load_model(load_checkpoint(path).manifest["base"], auto_class, spec, **kwargs)
        # An SFT (causal-LM) adapter merged into the body of a reward model needs no task wrapper: drop it
        # when the adapter's task differs from the class being loaded.
        adapter_config = PeftConfig.from_pretrained(str(path))
        if adapter_config.task_type != _PEFT_TASKS.get(auto_class):
            adapter_config.task_type = None
        merged = PeftModel.from_pretrained(base, str(path), config=adapter_config).merge_and_unload()
        merged.requires_grad_(True)  # peft froze the base; the caller decides what trains
        if quantization:  # quantize the merged weights by a round trip through a temporary folder
            import tempfile

            with tempfile.TemporaryDirectory() as tmp:
                merged.save_pretrained(tmp)
                return load_model(tmp, auto_class, spec, quantization, compute_dtype, **kwargs)
        return merged
    model = auto_class.from_pretrained(str(path), **kwargs)
    if model.config.pad_token_id is None:  # the reward model pools at the last non-pad token
        model.config.pad_token_id = model.config.eos_token_id
    return model


def lora_targets(model: nn.Module, wanted: list[str], model_name: str) -> list[str]:
    """wanted, checked against the model's modules: a clear stop at start-up instead of a peft error later."""
    linear = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if "Linear" in type(m).__name__ or
                     "Conv1D" in type(m).__name__})
    missing = [t for t in wanted if t not in linear]
    if missing:
        raise SystemExit(f"lora.target_modules: {missing} not in {model_name}; its linear layers are {linear}")
    return wanted


def footprint(name: str, model: nn.Module) -> str:
    """A log line with a model's memory footprint (weights and buffers)."""
    size = model.get_memory_footprint() if hasattr(model, "get_memory_footprint") else sum(
        t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
    return f"{name}: {size / 2**20:.1f} MiB in memory"


def lora_config(settings, model: nn.Module, spec: ModelSpec, task_type: str, **extra):
    """A peft LoraConfig from a config's `lora` section, its target modules checked against the model."""
    from peft import LoraConfig

    targets = lora_targets(model, settings.target_modules or list(spec.lora_targets), spec.name)
    return LoraConfig(r=settings.r, lora_alpha=settings.alpha, lora_dropout=settings.dropout, task_type=task_type,
                      target_modules=targets, **extra)


def disable_dropout(model: nn.Module) -> None:
    """RLHF models run without dropout: it would make log-probs, values and rewards noisy and the PPO ratio wrong."""
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


# ---- forward passes over [query | response] batches, queries left-padded -------------------------------


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


@torch.no_grad()
def reads_packed_rows(model: nn.Module) -> bool:
    """Whether model keeps sequences packed in one row apart when given restarting position ids and no
    attention mask (training.PackedRows): the second of two packed sequences must compute as it does alone.
    Models that take no position ids (BLOOM's ALiBi reads the mask) cannot."""
    if not _takes(model, "position_ids"):
        return False
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


def _logits_kwargs(model: nn.Module, keep: int) -> dict:
    """Ask for the last `keep` positions' logits only (the LM head on prompt positions would be thrown away),
    for models that take logits_to_keep; the others return all positions and the caller slices."""
    return {"logits_to_keep": keep} if keep and _takes(model, "logits_to_keep") else {}


@dataclasses.dataclass
class Packed:
    """A [query | response] minibatch laid out for a forward pass. The rollout layout aligns the responses:
    queries left-padded to the longest, responses right-padded to the longest, so a row pads for both its
    short prompt and its short response. Here each row's tokens (prompt, then response) sit at the right
    end instead: rows pad on the left only, up to the longest row, and rows of similar total length (PPO's
    length-grouped minibatches) pad almost nothing. Positions come from the mask, so every token computes
    as in the rollout layout."""

    input_ids: torch.Tensor  # [B, W]
    attention_mask: torch.Tensor  # [B, W]
    responses: torch.Tensor  # [B, t]: the response tokens, t the longest response of the minibatch
    index: torch.Tensor  # [B, t]: among the last t + 1 positions, the one before each response token
    width: int  # T, the rollout's response width: outputs are padded back to it

    @property
    def keep(self) -> int:
        """The last t + 1 positions: they predict (and hold the state before) every response token."""
        return self.responses.shape[1] + 1

    def at_responses(self, x: torch.Tensor) -> torch.Tensor:
        """Per-position outputs [B, W or keep, ...] -> [B, t, ...], those of the position before each response token."""
        x = x[:, -self.keep :]
        index = self.index.view(*self.index.shape, *[1] * (x.dim() - 2)).expand(-1, -1, *x.shape[2:])
        return x.gather(1, index)

    def pad(self, x: torch.Tensor) -> torch.Tensor:
        """[B, t] -> [B, T] with zeros after column t (those columns are masked out everywhere)."""
        return torch.nn.functional.pad(x, (0, self.width - x.shape[1]))


def pack(query_responses: torch.Tensor, attention_mask: torch.Tensor, context_length: int) -> Packed:
    """The rollout layout [B, Q + T] (row i: a prompt of p_i tokens ending at column Q, then r_i response
    tokens) -> Packed, whose row i ends with those p_i + r_i tokens."""
    full = query_responses.shape[1]
    lengths = attention_mask[:, context_length:].sum(1)  # r_i
    t = max(int(lengths.max()), 1)
    width = max(int(attention_mask.sum(1).max()), t + 1)
    # Column c of row i is old column Q + r_i - W + c. Below 0 it wraps to the row's end, which is the padding
    # after its response (W <= Q + T): the rows keep their own pad tokens.
    columns = (context_length + lengths[:, None] - width + torch.arange(width, device=lengths.device)) % full
    # The position before response token j of row i is W - r_i - 1 + j: index t - r_i + j among the last t + 1
    # (clamped past the response's end, where the outputs are masked out).
    index = (t - lengths[:, None] + torch.arange(t, device=lengths.device)).clamp(max=t)
    return Packed(query_responses.gather(1, columns), attention_mask.gather(1, columns),
                  query_responses[:, context_length : context_length + t], index, full - context_length)


def policy_forward(
    model: nn.Module, query_responses: torch.Tensor, attention_mask: torch.Tensor, context_length: int,
    temperature: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probs and entropies of the response tokens under model, at the sampling temperature. -> [B, T] each."""
    packed = pack(query_responses, attention_mask, context_length)
    out = model(
        input_ids=packed.input_ids, attention_mask=packed.attention_mask, use_cache=False,
        **_position_kwargs(model, packed.attention_mask), **_logits_kwargs(model, packed.keep),
    )
    logits = packed.at_responses(out.logits)
    return (packed.pad(ppo.logprobs_from_logits(logits, packed.responses, temperature)),
            packed.pad(ppo.entropy_from_logits(logits, temperature)))


class ActorCritic(nn.Module):
    """The two trained PPO models as one module: one forward gives the policy's logits and the critic's value
    at every position. One module is what a distributed wrapper (DDP, DeepSpeed) needs: it sees every
    trained parameter used by one forward, and Accelerate's DeepSpeed engine takes one model.

    The critic is a one-label sequence-classification model read at every position instead of the last.
    """

    def __init__(self, policy: nn.Module, critic: nn.Module):
        super().__init__()
        self.policy, self.critic = policy, critic

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, keep: int = 0,
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits, values): logits at least for the last `keep` positions (0: all), values at all."""
        logits = self.policy(
            input_ids=input_ids, attention_mask=attention_mask, use_cache=False,
            **_position_kwargs(self.policy, attention_mask), **_logits_kwargs(self.policy, keep),
        ).logits
        return logits, self.values(input_ids, attention_mask)

    def values(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """The critic alone: its value at every position. [B, L]."""
        critic = self.critic.get_base_model() if hasattr(self.critic, "get_base_model") else self.critic
        body = critic.base_model  # LoRA layers, if any, sit inside it
        hidden = body(
            input_ids=input_ids, attention_mask=attention_mask, use_cache=False, **_position_kwargs(body, attention_mask)
        ).last_hidden_state
        return critic.score(hidden).squeeze(-1)


def actor_critic_forward(
    model: nn.Module, query_responses: torch.Tensor, attention_mask: torch.Tensor, context_length: int,
    temperature: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(log-probs, values) of the response tokens, each [B, T]; the value is that of the state before the
    token, the log-probs at the sampling temperature. Computed in the packed layout (see Packed), without
    the LM head on prompt positions."""
    packed = pack(query_responses, attention_mask, context_length)
    logits, values = model(packed.input_ids, packed.attention_mask, packed.keep)
    return (packed.pad(ppo.logprobs_from_logits(packed.at_responses(logits), packed.responses, temperature)),
            packed.pad(packed.at_responses(values).float()))


@torch.no_grad()
def critic_values(model: nn.Module, query_responses: torch.Tensor, attention_mask: torch.Tensor,
                  context_length: int) -> torch.Tensor:
    """The critic's values of the response tokens (each the state before the token), [B, T], without the policy."""
    packed = pack(query_responses, attention_mask, context_length)
    return packed.pad(packed.at_responses(model.values(packed.input_ids, packed.attention_mask)).float())


class SampledLogprobs:
    """Collects, while generate() samples, the log-prob of each sampled token and the entropy of its
    distribution, at the sampling temperature: PPO's old log-probs then come from the rollout itself, with
    no extra forward pass. Memory is one [B, V] step at a time."""

    def __init__(self):
        self.logprobs, self.entropy = [], []

    def record(self, logprobs: torch.Tensor, tokens: torch.Tensor) -> None:
        """logprobs: one step's [B, V] at the sampling temperature; tokens: [B], the tokens drawn from it."""
        self.logprobs.append(logprobs.gather(1, tokens[:, None]))
        self.entropy.append(-(logprobs.exp() * logprobs).sum(-1, keepdim=True))

    def result(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(log-probs, entropies) of the responses' tokens, [B, T]; the positions after a response's EOS are
        masked out by the caller."""
        return torch.cat(self.logprobs, dim=1), torch.cat(self.entropy, dim=1)


def _sample(logprobs: torch.Tensor) -> torch.Tensor:
    """One token per row of [B, V] log-probs, drawn from the full distribution by inverting its CDF with one
    uniform number per row (torch.multinomial draws an exponential per vocabulary entry: on CPU that was
    3 ms of each 20 ms step at the bench's size)."""
    cdf = logprobs.exp().cumsum(-1)
    u = torch.rand(cdf.shape[0], 1, device=cdf.device, dtype=cdf.dtype) * cdf[:, -1:]
    return torch.searchsorted(cdf, u).squeeze(1).clamp(max=cdf.shape[1] - 1)


def gathered_parameters(accelerator, model: nn.Module):
    """Under DeepSpeed ZeRO-3 each process holds a shard of every parameter: gather them (e.g. to generate)."""
    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    if plugin is not None and plugin.zero_stage == 3:
        import deepspeed

        return deepspeed.zero.GatheredParameters(list(model.parameters()))
    return contextlib.nullcontext()


def reward_forward(reward_model: nn.Module, query_responses: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """The reward model's score of each whole sequence, pooled exactly as in its training. -> [B]."""
    out = reward_model(
        input_ids=query_responses, attention_mask=attention_mask, use_cache=False,
        **_position_kwargs(reward_model, attention_mask),
    )
    return out.logits[:, 0].float()


@torch.no_grad()
def score_texts(reward_model, tokenizer, texts: list[str], batch_size: int = 64) -> tuple[list[float], list[int]]:
    """Reward-model scores of whole texts (prompt + response, ended by EOS as in training), and their lengths."""
    scores, lengths = [], []
    device = next(reward_model.parameters()).device
    for i in range(0, len(texts), batch_size):
        chunk = [t + tokenizer.eos_token for t in texts[i : i + batch_size]]
        enc = tokenizer(chunk, return_tensors="pt", padding=True).to(device)
        scores += reward_forward(reward_model, enc.input_ids, enc.attention_mask).tolist()
        lengths += enc.attention_mask.sum(1).tolist()
    return scores, lengths


class RewardScorer:
    """Scores a policy's rollouts with a reward model. When both share tokenizer and template the token ids go
    straight in; otherwise (any reward model with any policy) the responses are decoded and the text is
    re-tokenized the way the reward model was trained: its template, its tokenizer, EOS at the end."""

    def __init__(self, reward_model, rm_tokenizer, rm_spec: ModelSpec, policy_tokenizer, policy_spec: ModelSpec):
        self.model, self.rm_tokenizer, self.rm_spec, self.policy_tokenizer = reward_model, rm_tokenizer, rm_spec, policy_tokenizer
        self.by_text = (rm_tokenizer.get_vocab() != policy_tokenizer.get_vocab()
                        or rm_spec.template != policy_spec.template)

    @torch.no_grad()
    def __call__(self, prompts: list, query_responses: torch.Tensor, attention_mask: torch.Tensor,
                 responses: torch.Tensor) -> torch.Tensor:
        """prompts: the raw prompts (strings or messages) of the batch. -> scores [B]."""
        if not self.by_text:  # packed: pooled at the last token as before, with less padding
            packed = pack(query_responses, attention_mask, query_responses.shape[1] - responses.shape[1])
            return reward_forward(self.model, packed.input_ids, packed.attention_mask)
        texts = self.policy_tokenizer.batch_decode(responses, skip_special_tokens=True)
        scores, _ = score_texts(self.model, self.rm_tokenizer,
                                [self.rm_spec.format_prompt(p) + t for p, t in zip(prompts, texts)])
        return torch.tensor(scores, device=query_responses.device)


@torch.no_grad()
def generate(
    model: nn.Module, tokenizer, prompts: list[str], max_new_tokens: int, temperature: float, greedy: bool = False,
    max_prompt_tokens: int = 0, record: SampledLogprobs | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Samples (or greedily decodes) responses to already-templated prompts, with a KV cache.

    Returns (query_responses [B, Q+T], query_mask [B, Q], responses [B, T]); queries are left-padded, and
    every token after a response's first EOS is the pad token. Sampling uses the full distribution at
    the given temperature (no top-k / top-p), the one PPO's log-probs are computed from. Prompts longer
    than max_prompt_tokens (if > 0) are cut from the left. record (a SampledLogprobs) gets every step's
    log-probs and tokens.

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
    device = next(model.parameters()).device if any(True for _ in model.parameters()) else torch.device("cpu")
    queries, query_mask = enc.input_ids.to(device), enc.attention_mask.to(device)
    pad, eos = tokenizer.pad_token_id, tokenizer.eos_token_id
    cache_name = "cache" if _takes(model, "cache") else "past_key_values"  # the name before transformers 5.x
    takes_positions = _takes(model, "position_ids")
    inputs = {"input_ids": queries, **_position_kwargs(model, query_mask), **_logits_kwargs(model, 1)}
    mask, tokens = query_mask, []
    done = torch.zeros(len(prompts), dtype=torch.bool, device=device)
    for _ in range(max_new_tokens):
        out = model(**inputs, attention_mask=mask, use_cache=True)
        logits = out.logits[:, -1].float()
        if greedy and record is None:
            token = logits.argmax(-1)
        else:
            logprobs = torch.log_softmax(logits / (1.0 if greedy else temperature), dim=-1)
            token = logits.argmax(-1) if greedy else _sample(logprobs)
            if record is not None:
                record.record(logprobs, token)
        token = torch.where(done, torch.full_like(token, pad), token)
        tokens.append(token)
        done |= token == eos
        if done.all():
            break
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        inputs = {"input_ids": token[:, None], cache_name: getattr(out, cache_name)}
        if takes_positions:
            inputs["position_ids"] = mask.sum(1, keepdim=True) - 1
    responses = torch.stack(tokens, dim=1)
    return torch.cat([queries, responses], dim=1), query_mask, responses


def decode_responses(tokenizer, responses: torch.Tensor) -> list[str]:
    return [t.strip() for t in tokenizer.batch_decode(responses, skip_special_tokens=True)]
