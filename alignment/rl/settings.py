"""The settings every RL stage has; stages/ppo.py and stages/grpo.py extend them with their algorithm's own keys
and may redeclare one with another default."""

from __future__ import annotations

import dataclasses

from alignment import config, rewards
from alignment.config import ConfigError, field


@dataclasses.dataclass
class RLSettings:
    steps: int = field(60, "iterations: rollout batches sampled, scored and trained on")
    batch_size: int = field(64, "prompts per rollout batch, per process")
    mini_batch_size: int = field(16, "sequences per optimizer step, per process (DeepSpeed's micro batch)")
    learning_rate: float = field(1e-4, "AdamW learning rate; set by the model's size unless given "
                                  "(alignment/presets.py: 1e-4 for the tiny twins, 1e-6 for 7B)")
    max_new_tokens: int = field(20, "longest response sampled")
    max_prompt_length: int = field(512, "longest prompt in tokens; longer ones lose their beginning (counted)")
    temperature: float = field(1.0, "sampling temperature; log-probs are computed at the same temperature")
    clip_range: float = field(0.2, "policy ratio clip epsilon")
    missing_eos_penalty: float = field(1.0, "subtracted from the score of a response that never ends; 0: off")
    max_grad_norm: float = field(1.0, "gradient clipping")
    group_by_length: bool = field(True, "minibatches of sequences of similar length (in a random order each "
                                  "epoch): each pads less; false: uniformly random minibatches")
    eval_samples: int = field(4, "sampled responses per held-out prompt in the final comparison")
    reward_model: str = field("", "store id run/rm of the reward model; empty: the run's. Any tokenizer: "
                              "when it differs from the policy's, responses are scored from their text")
    rewards: list[str] = field(["model"], "what rewards a response (alignment/rewards.py): model (the reward "
                               "model), module:function or file.py:function (TRL's reward-function signature); "
                               "several are each normalised by their running statistics, weighted and summed")
    reward_weights: list[float] = field([], "one weight per entry of rewards; empty: 1 each")
    eval_every: int = field(10, "evaluate on held-out prompts every N steps (and before the first); 0: off")
    eval_prompts: int = field(64, "held-out prompts used by the evaluation during training")
    activation_checkpointing: bool = field(False, "recompute the trained models' activations in the backward pass "
                                           "instead of keeping them: less memory, more compute (for large models)")
    guard_collapse: bool = field(False, "when a held-out point shows the policy's answers collapsed (alignment/"
                                 "health.py: few distinct answers, one answer to many prompts, much shorter ones "
                                 "than SFT's), stop and publish the policy of the last healthy held-out point")
    offload_frozen: str = field("auto", "under DeepSpeed ZeRO-3, where the reference's and the reward model's "
                                "partitions live between uses: auto (as the launch file's offload_param), cpu, or "
                                "none (the accelerator)")

    def check(self) -> None:
        rewards.terms(self.rewards, self.reward_weights)  # (a function not found: one line now)
        if self.reward_model and rewards.MODEL not in self.rewards:
            raise ConfigError(f"reward_model={self.reward_model} names a reward model that rewards (without "
                              f"{rewards.MODEL}) never reads: add {rewards.MODEL} to rewards, or leave it out")
        if self.offload_frozen not in ("auto", "cpu", "none"):
            raise ConfigError(f"offload_frozen: {self.offload_frozen!r} is not 'auto', 'cpu' or 'none'")
        if self.guard_collapse and not self.eval_every:
            raise ConfigError("guard_collapse needs held-out points to watch: set eval_every to a number of steps")


AGGREGATIONS = ("sequence", "token", "constant")  # how a clipped ratio loss sums its tokens (ppo.grpo_loss)


def check_aggregation(section: str, value: str) -> None:
    if value not in AGGREGATIONS:
        raise ConfigError(f"{section}.loss_aggregation: {value!r} is not 'sequence', 'token' or 'constant'")


@dataclasses.dataclass
class RLConfig(config.StageConfig):
    """An RL stage's config: the fields every stage has, LoRA, and (in the stage's class) its algorithm's section."""

    lora: config.LoraSettings = field(config.LoraSettings(), "train LoRA adapters on the SFT policy; the reference "
                                      "is then the same weights with the adapters disabled (no second copy)")
