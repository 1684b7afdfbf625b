"""The models of an RL stage: the policy that trains (with PPO's critic, one module: forwards.ActorCritic), the
frozen reference it is kept close to, and the reward model behind a scoring.RewardScorer. Trained weights load in
fp32 (loading.py), frozen ones in the entry's dtype."""

from __future__ import annotations

from typing import NamedTuple

from peft import get_peft_model
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from alignment import distributed, forwards, loading, registry, scoring


class Models(NamedTuple):
    tokenizer: object
    spec: registry.ModelSpec
    model: forwards.ActorCritic  # the trained policy, and the critic where there is one
    reference: object  # the frozen SFT policy (with LoRA: the policy with its adapters off)
    scorer: scoring.RewardScorer | None  # None where the stage is rewarded by functions alone


def load(cfg, accelerator, sft, rm, stage: str, critic: bool) -> Models:
    """The policy from the SFT checkpoint (LoRA: with new adapters), the reference, the reward model (rm None: none,
    the scorer None); with critic, a critic that starts as the reward model or, if that reads other tokens or there
    is none, as the SFT body."""
    spec = registry.get(cfg.model, template=sft.manifest["template"], tokenizer=sft.path)
    tokenizer = loading.load_tokenizer(sft.path, spec)
    quantized = dict(quantization=cfg.quantization, compute_dtype=cfg.compute_dtype)
    # Under ZeRO-3 every model loads partitioned over the processes (transformers' zero.Init): the frozen ones
    # become inference engines of their own once the trained model is prepared (distributed.frozen).
    partitioned = distributed.zero3(accelerator)
    policy = loading.load_model(sft.path, AutoModelForCausalLM, spec, **quantized, tokenizer=tokenizer, trained=True)
    if cfg.lora.enabled:
        policy = get_peft_model(policy, loading.lora_config(cfg.lora, policy, spec, "CAUSAL_LM"))
        reference = forwards.AdapterDisabled(policy)
    else:
        reference = loading.load_model(sft.path, AutoModelForCausalLM, spec, **quantized, tokenizer=tokenizer,
                                       precision=cfg.precision)
        reference.requires_grad_(False)
    scorer = reward_model = None
    if rm is not None:
        rm_spec = registry.get(rm.manifest["model"], template=rm.manifest["template"], tokenizer=rm.path)
        rm_tokenizer = loading.load_tokenizer(rm.path, rm_spec)
        reward_model = loading.load_model(rm.path, AutoModelForSequenceClassification, rm_spec, **quantized,
                                          tokenizer=rm_tokenizer, precision=cfg.precision)
        reward_model.requires_grad_(False)
        scorer = scoring.RewardScorer(reward_model, rm_tokenizer, rm_spec, tokenizer, spec)
    if not partitioned:
        for frozen in (reference, reward_model):
            if frozen is not None:
                frozen.to(accelerator.device)
    loaded = [(n, m) for n, m in (("policy", policy), ("reference", reference), ("reward model", reward_model))
              if m is not None]
    for name, m in loaded:
        shared = " (the policy's weights, adapters off)" if name == "reference" and cfg.lora.enabled else ""
        print(f"[{stage}] {loading.footprint(name, m)}{shared}")
    for _, m in loaded:
        loading.disable_dropout(m)
        m.eval()  # no dropout anywhere; gradients still flow in eval mode
    source = rm if scorer is not None and not scorer.by_text else sft  # a critic reads the policy's tokens
    value_model = load_critic(cfg, source, spec, tokenizer, stage) if critic else None
    return Models(tokenizer, spec, forwards.ActorCritic(policy, value_model), reference, scorer)


def load_critic(cfg, source, spec, tokenizer, stage: str):
    """A one-label sequence-classification model from source (a checkpoint); quantized weights train through
    adapters only, so a quantized critic gets LoRA adapters of its own and a trained score head."""
    quantized = dict(quantization=cfg.quantization, compute_dtype=cfg.compute_dtype)
    critic = loading.load_model(source.path, AutoModelForSequenceClassification, spec, **quantized,
                                tokenizer=tokenizer, trained=True)
    if cfg.quantization:
        critic = get_peft_model(critic, loading.lora_config(cfg.lora, critic, spec, "SEQ_CLS",
                                                            modules_to_save=["score"]))
    print(f"[{stage}] {loading.footprint('critic', critic)}")
    loading.disable_dropout(critic)
    critic.eval()
    return critic
