"""Stage 3, GRPO: improve the SFT policy against the reward model by comparing responses to the same prompt.

    make grpo [MODEL=tiny-llama] [ARGS="grpo.steps=50 grpo.group_size=8 grpo.scale_rewards=none"]
    make grpo NPROC=8 ACCELERATE_CONFIG=configs/accelerate/zero3.yaml
    python -m stages.grpo --config configs/grpo.yaml key=value ...

Group Relative Policy Optimization (Shao et al., 2024, DeepSeekMath) is PPO without a critic: each step samples
group_size responses to each prompt of a batch and scores them; each reward less its group's mean, over the group's
std (grpo.scale_rewards: none is Dr. GRPO), is the advantage of every token of its response; the loss is the
clipped ratio objective plus kl_coef * k3, the KL estimate to the reference (in the loss, not in the reward as PPO
has it). The loop is PPO's (alignment/rl/loop.py): sampling, scoring, held-out evaluation, DeepSpeed, the
non-finite guard and the resumable state are the same code, so PPO and GRPO differ in their algorithm only
(alignment/rl/algorithms.py's GRPO; math: alignment/ppo.py's group_advantages and grpo_loss), which is what a
side-by-side comparison should measure. Why this loop rather than TRL's GRPOTrainer, and how fast each is:
bench/README.md. At the end the policy is compared with the SFT policy on held-out prompts, saved as <run>/grpo.
"""

from __future__ import annotations

import dataclasses

from alignment import config
from alignment.config import ConfigError, field
from alignment.rl import loop, models
from alignment.rl.algorithms import GRPO
from alignment.rl.settings import RLConfig, RLSettings, check_aggregation


@dataclasses.dataclass
class GRPOSettings(RLSettings):
    batch_size: int = field(16, "prompts per rollout batch, per process; each answered group_size times")
    group_size: int = field(8, "responses sampled per prompt: the group each response's reward is compared with")
    mini_batch_size: int = field(64, "sequences per optimizer step, per process (DeepSpeed's micro batch)")
    epochs: int = field(1, "passes over each rollout batch (DeepSeekMath's mu); with more than one minibatch per "
                        "batch, the later ones are already off-policy and the ratio clip acts")
    kl_coef: float = field(0.04, "beta of the k3 KL estimate to the reference in the loss (DeepSeekMath: 0.04; "
                           "DAPO and Dr. GRPO: 0)")
    scale_rewards: str = field("group", "divide each advantage by the std of: group (its group, GRPO), batch (the "
                               "whole batch), none (Dr. GRPO)")
    loss_aggregation: str = field("sequence", "sequence: each response's token mean, then the mean (GRPO); token: "
                                  "the mean over all tokens (DAPO); constant: token sum / (responses x "
                                  "max_new_tokens) (Dr. GRPO)")
    eval_every: int = field(20, "evaluate on held-out prompts every N steps (and before the first); 0: off")


@dataclasses.dataclass
class Config(RLConfig):
    grpo: GRPOSettings = field(GRPOSettings(), "GRPO settings")

    def check(self) -> None:
        """GRPO's settings that cannot work stop at start-up (config.load calls this)."""
        super().check()  # the keys every stage has
        g = self.grpo
        if g.group_size < 2:
            raise ConfigError(f"grpo.group_size={g.group_size}: a group needs 2 responses or more (its mean is the "
                              "baseline)")
        if g.scale_rewards not in ("group", "batch", "none"):
            raise ConfigError(f"grpo.scale_rewards: {g.scale_rewards!r} is not 'group', 'batch' or 'none'")
        check_aggregation("grpo", g.loss_aggregation)


def main(argv: list[str]) -> None:
    # 1. config (its settings checked), accelerator, inputs: the run's SFT checkpoint and reward model
    session = loop.start(config.cli(Config, argv, default_yaml="configs/grpo.yaml"), "grpo")
    # 2. the algorithm: group_size responses per prompt, group-relative advantages, the clipped objective with the
    #    k3 KL term in the loss; no critic
    algorithm = GRPO(session.settings)
    # 3. models: the policy alone trains; the reference and the reward model frozen
    policy_ref_rm = models.load(session.cfg, session.accelerator, session.sft, session.rm, "grpo", algorithm.critic)
    # 4. the loop (rollout, score, advantages, update; log, evaluate, save a resumable state), then the comparison
    #    with the SFT policy on held-out prompts; save the policy and the log
    loop.finish(session, policy_ref_rm, loop.train(session, policy_ref_rm, algorithm))


if __name__ == "__main__":
    config.run(main)
