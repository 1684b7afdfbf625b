"""Loading models and tokenizers from the registry or the store, and the forward passes PPO needs.

Every checkpoint loads with the standard from_pretrained. A LoRA checkpoint holds only its adapter; its
manifest names the `base` it was trained on (a registry path or a parent checkpoint), and loading
merges the adapter into that base, so the stages downstream always get a plain model.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
from pathlib import Path

import torch
from torch import nn
from transformers import (AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer, GenerationConfig,
                          LogitsProcessor, LogitsProcessorList)

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

    def generate(self, **kwargs):
        with self.peft_model.disable_adapter():
            return self.peft_model.generate(**kwargs)


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


def _response_logits_kwargs(model: nn.Module, query_responses: torch.Tensor, context_length: int) -> dict:
    """Ask for the logits of the positions that predict response tokens only (the LM head on the prompt
    positions would be thrown away), for models that take logits_to_keep."""
    if not _takes(model, "logits_to_keep"):
        return {}
    return {"logits_to_keep": query_responses.shape[1] - context_length + 1}


def _response_logits(logits: torch.Tensor, query_responses: torch.Tensor, context_length: int) -> torch.Tensor:
    """[B, T, V]: the logits predicting each response token, from all positions' or the kept last T+1."""
    width = query_responses.shape[1] - context_length
    return logits[:, -width - 1 : -1]


def policy_forward(
    model: nn.Module, query_responses: torch.Tensor, attention_mask: torch.Tensor, context_length: int,
    temperature: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probs and entropies of the response tokens under model, at the sampling temperature. -> [B, T] each."""
    width = query_responses.shape[1] - context_length
    query_responses, attention_mask, context_length = trim_padding(query_responses, attention_mask, context_length)
    out = model(
        input_ids=query_responses, attention_mask=attention_mask, use_cache=False,
        **_position_kwargs(model, attention_mask), **_response_logits_kwargs(model, query_responses, context_length),
    )
    logits = _response_logits(out.logits, query_responses, context_length)
    responses = query_responses[:, context_length:]
    return (_pad_right(ppo.logprobs_from_logits(logits, responses, temperature), width),
            _pad_right(ppo.entropy_from_logits(logits, temperature), width))


class ActorCritic(nn.Module):
    """The two trained PPO models as one module: one forward gives the policy's logits and the critic's value
    at every position. One module is what a distributed wrapper (DDP, DeepSpeed) needs: it sees every
    trained parameter used by one forward, and Accelerate's DeepSpeed engine takes one model.

    The critic is a one-label sequence-classification model read at every position instead of the last.
    """

    def __init__(self, policy: nn.Module, critic: nn.Module):
        super().__init__()
        self.policy, self.critic = policy, critic

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, context_length: int = 1,
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits, values): logits at least for the positions from context_length - 1 on, values at all."""
        logits = self.policy(
            input_ids=input_ids, attention_mask=attention_mask, use_cache=False,
            **_position_kwargs(self.policy, attention_mask),
            **_response_logits_kwargs(self.policy, input_ids, context_length),
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
    token, the log-probs at the sampling temperature. Columns that every row pads (the left padding of a
    minibatch's shortest prompts, the right padding after its longest response) are not computed, nor the
    LM head on prompt positions."""
    width = query_responses.shape[1] - context_length
    query_responses, attention_mask, context_length = trim_padding(query_responses, attention_mask, context_length)
    logits, values = model(query_responses, attention_mask, context_length)
    logits = _response_logits(logits, query_responses, context_length)
    responses = query_responses[:, context_length:]
    return (_pad_right(ppo.logprobs_from_logits(logits, responses, temperature), width),
            _pad_right(values[:, context_length - 1 : -1].float(), width))


@torch.no_grad()
def critic_values(model: nn.Module, query_responses: torch.Tensor, attention_mask: torch.Tensor,
                  context_length: int) -> torch.Tensor:
    """The critic's values of the response tokens (each the state before the token), [B, T], without the policy."""
    width = query_responses.shape[1] - context_length
    query_responses, attention_mask, context_length = trim_padding(query_responses, attention_mask, context_length)
    values = model.values(query_responses, attention_mask)
    return _pad_right(values[:, context_length - 1 : -1].float(), width)


def trim_padding(query_responses: torch.Tensor, attention_mask: torch.Tensor, context_length: int):
    """Drops the leading columns that pad every prompt and the trailing ones after every response has ended.
    Positions come from the mask, so the kept tokens compute exactly as before. -> the same three, trimmed."""
    used = attention_mask.bool().any(0)
    first = min(int(used.int().argmax()), context_length - 1)  # keep the last prompt column: it predicts token 1
    last = max(len(used) - int(used.flip(0).int().argmax()), context_length + 1)
    return query_responses[:, first:last], attention_mask[:, first:last], context_length - first


def _pad_right(x: torch.Tensor, width: int) -> torch.Tensor:
    """[B, t] -> [B, width] with zeros after column t (those columns are masked out everywhere)."""
    return torch.nn.functional.pad(x, (0, width - x.shape[1]))


class SampledLogprobs(LogitsProcessor):
    """Collects, while generate() samples, the log-prob and entropy of each sampled token's distribution
    at the sampling temperature: PPO's old log-probs then come from the rollout itself, with no extra
    forward pass. Memory is one [B, V] step at a time (not [B, T, V] as output_logits would keep)."""

    def __init__(self, temperature: float):
        self.temperature = temperature
        self.logprobs, self.entropy, self.pending = [], [], None

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        # custom processors run before generate's temperature warper: the scores are raw logits here
        if self.pending is not None:  # the previous step's token is now the last of input_ids
            self.logprobs.append(self.pending.gather(1, input_ids[:, -1:]))
        self.pending = torch.log_softmax(scores.float() / self.temperature, dim=-1)
        self.entropy.append(-(self.pending.exp() * self.pending).sum(-1, keepdim=True))
        return scores

    def result(self, responses: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(log-probs, entropies) of the responses' tokens, [B, T] (one generate() step per token); the
        positions after a response's EOS hold the pad token's and are masked out by the caller."""
        logprobs = torch.cat([*self.logprobs, self.pending.gather(1, responses[:, -1:])], dim=1)
        return logprobs, torch.cat(self.entropy, dim=1)


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
        if not self.by_text:
            return reward_forward(self.model, query_responses, attention_mask)
        texts = self.policy_tokenizer.batch_decode(responses, skip_special_tokens=True)
        scores, _ = score_texts(self.model, self.rm_tokenizer,
                                [self.rm_spec.format_prompt(p) + t for p, t in zip(prompts, texts)])
        return torch.tensor(scores, device=query_responses.device)


@torch.no_grad()
def generate(
    model: nn.Module, tokenizer, prompts: list[str], max_new_tokens: int, temperature: float, greedy: bool = False,
    max_prompt_tokens: int = 0, logits_processor: LogitsProcessor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Samples (or greedily decodes) responses to already-templated prompts.

    Returns (query_responses [B, Q+T], query_mask [B, Q], responses [B, T]); queries are left-padded, and
    every token after a response's first EOS is the pad token. Sampling uses the full distribution at
    the given temperature (no top-k / top-p), the one PPO's log-probs are computed from. Prompts longer
    than max_prompt_tokens (if > 0) are cut from the left. logits_processor (e.g. SampledLogprobs) sees
    every step's logits.
    """
    side, truncation_side = tokenizer.padding_side, tokenizer.truncation_side
    tokenizer.padding_side = tokenizer.truncation_side = "left"  # a long prompt loses its oldest turns
    limit = {"truncation": True, "max_length": max_prompt_tokens} if max_prompt_tokens else {}
    enc = tokenizer(prompts, return_tensors="pt", padding=True, **limit)
    tokenizer.padding_side, tokenizer.truncation_side = side, truncation_side
    sampling = {} if greedy else {"do_sample": True, "temperature": temperature, "top_k": 0, "top_p": 1.0}
    gen_config = GenerationConfig(
        max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
        **sampling,
    )
    device = next(model.parameters()).device if any(True for _ in model.parameters()) else torch.device("cpu")
    out = model.generate(
        input_ids=enc.input_ids.to(device), attention_mask=enc.attention_mask.to(device), generation_config=gen_config,
        logits_processor=LogitsProcessorList([logits_processor] if logits_processor else []),
    )
    context_length = enc.input_ids.shape[1]
    responses = out[:, context_length:]
    mask, _ = ppo.response_mask(responses, tokenizer.eos_token_id)
    responses = torch.where(mask.bool(), responses, torch.full_like(responses, tokenizer.pad_token_id))
    query_responses = torch.cat([enc.input_ids.to(device), responses], dim=1)
    return query_responses, enc.attention_mask.to(device), responses


def decode_responses(tokenizer, responses: torch.Tensor) -> list[str]:
    return [t.strip() for t in tokenizer.batch_decode(responses, skip_special_tokens=True)]
