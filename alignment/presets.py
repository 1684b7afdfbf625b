"""Settings sized to the model: what a stage trains with, by the base model's parameter count, unless its YAML or
the command line says otherwise.

A learning rate that trains a 1M-parameter twin in minutes (2e-3) ruins a 7B model in a few steps; the published
recipes for real models are 100-1000x lower, and they differ by stage. A stage's config therefore starts from the
preset of the model's size class, then takes its YAML (whose `presets:` section may set values for one class only:
what a data set's tuning on tiny models found), then the command line. A learning rate more than 10x its preset
prints one warning line. `python -m stages.<stage> --print-config` shows the result without loading weights.

The classes and their sources (full-parameter training; LoRA below):
  tiny (under 50M parameters: the twins built from config): measured on the embedded task here (configs/*.yaml
      said so before: SFT 2e-3, RM 5e-4, PPO and GRPO 1e-4, DPO 2e-4).
  mid (50M to 20B): SFT 2e-5 (Stanford Alpaca's LLaMA-7B; Llama 2's SFT, Touvron et al. 2023); RM 1e-5 (Llama 2's
      reward models below 70B); PPO 1e-6 (Llama 2's RLHF); GRPO 1e-6 (DeepSeekMath, Shao et al. 2024); DPO 5e-7
      (Zephyr-7B, Tunstall et al. 2023).
  large (20B and over): SFT 1e-5 (Tulu 2 70B, Ivison et al. 2023); RM 5e-6 (Llama 2's 70B reward model); PPO,
      GRPO and DPO as mid (Llama 2 used 1e-6 for PPO at every size; Tulu 2's 70B DPO 5e-7).
LoRA (lora.enabled) on a model over 50M: SFT 2e-4 up to 20B and 1e-4 beyond (QLoRA, Dettmers et al. 2023: 7B
and 13B, 33B and 65B); the other stages 10x their full-parameter rate, the ratio QLoRA's SFT rate bears to
full fine-tuning's. Models of 1B parameters and more also recompute activations in PPO and GRPO
(activation_checkpointing: the memory plan's first fix for activations at that size; the trainer stages do by
default).
"""

from __future__ import annotations

import dataclasses

from alignment import pipeline, registry

TINY_BELOW, LARGE_FROM = 50e6, 20e9
CHECKPOINT_ACTIVATIONS_FROM = 1e9

# size class -> stage -> learning rate, full-parameter training
LEARNING_RATES = {  # RLOO and REINFORCE++ take GRPO's: no critic, the same clipped ratio on sampled responses
    "tiny": {"sft": 2e-3, "rm": 5e-4, "ppo": 1e-4, "grpo": 1e-4, "rloo": 1e-4, "reinforce": 1e-4, "dpo": 2e-4},
    "mid": {"sft": 2e-5, "rm": 1e-5, "ppo": 1e-6, "grpo": 1e-6, "rloo": 1e-6, "reinforce": 1e-6, "dpo": 5e-7},
    "large": {"sft": 1e-5, "rm": 5e-6, "ppo": 1e-6, "grpo": 1e-6, "rloo": 1e-6, "reinforce": 1e-6, "dpo": 5e-7},
}
LORA_SFT = {"mid": 2e-4, "large": 1e-4}
LORA_FACTOR = 10  # LoRA's rate over full fine-tuning's, for the stages QLoRA did not publish (2e-4 / 2e-5)
WARN_ABOVE = 10  # a learning rate this many times its preset prints a warning


def size_class(parameters: int) -> str:
    return "tiny" if parameters < TINY_BELOW else "large" if parameters >= LARGE_FROM else "mid"


def for_stage(stage: str, parameters: int, lora: bool) -> dict:
    """The preset settings of stage's section for a model of that many parameters: {key: value}."""
    size = size_class(parameters)
    rate = LEARNING_RATES[size][stage]
    if lora and size != "tiny":
        rate = LORA_SFT[size] if stage == "sft" else float(f"{rate * LORA_FACTOR:.3g}")
    settings = {"learning_rate": rate}
    if stage in pipeline.RL and parameters >= CHECKPOINT_ACTIVATIONS_FROM:
        settings["activation_checkpointing"] = True
    return settings


@dataclasses.dataclass(frozen=True)
class Preset:
    """The presets of one stage's config: its stage, the model they were sized by, and LoRA or not."""

    stage: str
    model: str
    parameters: int
    lora: bool

    @property
    def size_class(self) -> str:
        return size_class(self.parameters)

    def settings(self) -> dict:
        """As a config tree: {stage: {key: value}}."""
        return {self.stage: for_stage(self.stage, self.parameters, self.lora)}

    def describe(self) -> str:
        count = f"{self.parameters / 1e9:.1f}B" if self.parameters >= 1e9 else f"{self.parameters / 1e6:.1f}M"
        return f"{self.model}: {count} parameters, class {self.size_class}{', LoRA' if self.lora else ''}"

    def warning(self, learning_rate: float) -> str | None:
        """One line when learning_rate is more than WARN_ABOVE times the preset, else None."""
        preset = for_stage(self.stage, self.parameters, self.lora)["learning_rate"]
        if learning_rate <= WARN_ABOVE * preset:
            return None
        return (f"[config] warning: {self.stage}.learning_rate={learning_rate:g} is {learning_rate / preset:.0f}x the "
                f"preset for {self.describe()} ({preset:g}, alignment/presets.py): a rate this far above what such "
                "models are trained with tends to wreck them within a few steps")


def of(cfg) -> Preset | None:
    """The presets of a stage's config (its section named after the stage; its model; lora.enabled), sized by
    the model's parameter count from its config alone (registry.parameters: no weights read). None for a config
    that is not a training stage's."""
    stage = next((f.name for f in dataclasses.fields(cfg) if f.name in LEARNING_RATES["tiny"]), None)
    if stage is None or not getattr(cfg, "model", ""):
        return None
    lora = bool(getattr(getattr(cfg, "lora", None), "enabled", False))
    spec = registry.MODELS.get(cfg.model)
    # a tiny twin is built for its data (its tokenizer is trained on it): counted from its config, not built here
    parameters = tiny_parameters(spec) if spec is not None and spec.is_tiny else registry.parameters(cfg.model)
    return Preset(stage, cfg.model, parameters, lora)


def tiny_parameters(spec) -> int:
    """A tiny twin's parameter count without building its tokenizer: its vocabulary (the data file's
    tokenizer_vocab: 512 for the embedded task, 4,096 for hh-rlhf) counted as 4,096."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(spec.family, vocab_size=4096, bos_token_id=0, eos_token_id=0, pad_token_id=0,
                                  **dict(spec.tiny_config))
    return sum(p.numel() for p in registry.on_meta(AutoModelForCausalLM, config).parameters())
