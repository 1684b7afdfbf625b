"""Stage 3, REINFORCE++: improve the SFT policy against the reward model with returns normalised over the batch.

    make reinforce [MODEL=tiny-llama] [ARGS="reinforce.steps=50 reinforce.kl_coef=0.01"]
    make reinforce NPROC=8 ACCELERATE_CONFIG=configs/accelerate/zero3.yaml
    python -m stages.reinforce --config configs/reinforce.yaml key=value ...

REINFORCE++ (Hu, 2025) is PPO without a critic: each step samples one response per prompt (group_size: more), turns
the scores into PPO's per-token rewards (-kl_coef * (log pi - log pi_ref) at every token, the score at the last),
takes their returns and normalises them over every response token of the whole batch (all processes), which is the
advantage of each token; the loss is the clipped ratio objective per token. The loop is the library's
(alignment/rl/loop.py, shared with PPO, GRPO and RLOO); the algorithm alignment/rl/algorithms.py's Reinforce; its
math alignment/ppo.py's token_rewards and reinforce_pp_advantages. At the end the policy is compared with the SFT
policy on held-out prompts, and saved as <run>/reinforce.
"""

from __future__ import annotations

import dataclasses

from alignment import config
from alignment.config import ConfigError, field
from alignment.rl import loop, models
from alignment.rl.algorithms import Reinforce
from alignment.rl.settings import RLConfig, RLSettings, check_aggregation


@dataclasses.dataclass
class ReinforceSettings(RLSettings):
    group_size: int = field(1, "responses sampled per prompt (REINFORCE++: 1; the baseline is the batch's mean)")
    epochs: int = field(1, "passes over each rollout batch; with more than one minibatch per batch, the later ones "
                        "are already off-policy and the ratio clip acts")
    kl_coef: float = field(0.01, "beta of the per-token penalty beta * (log pi - log pi_ref) in the reward")
    gamma: float = field(1.0, "discount of the per-token returns")
    loss_aggregation: str = field("token", "token: the mean over all tokens of the minibatch; sequence: each "
                                  "response's token mean, then the mean; constant: token sum / (responses x "
                                  "max_new_tokens)")


@dataclasses.dataclass
class Config(RLConfig):
    reinforce: ReinforceSettings = field(ReinforceSettings(), "REINFORCE++ settings")

    def check(self) -> None:
        """REINFORCE++'s settings that cannot work stop at start-up (config.load calls this)."""
        super().check()  # the keys every stage has
        r = self.reinforce
        if r.group_size < 1:
            raise ConfigError(f"reinforce.group_size={r.group_size}: at least 1 response per prompt")
        check_aggregation("reinforce", r.loss_aggregation)


def main(argv: list[str]) -> None:
    # 1. config (its settings checked), accelerator, inputs: the run's SFT checkpoint and reward model
    session = loop.start(config.cli(Config, argv, default_yaml="configs/reinforce.yaml"), "reinforce")
    # 2. the algorithm: KL-penalised per-token rewards, returns normalised over the batch; no critic
    algorithm = Reinforce(session.settings)
    # 3. models: the policy alone trains; the reference and the reward model frozen
    policy_ref_rm = models.load(session.cfg, session.accelerator, session.sft, session.rm, "reinforce",
                                algorithm.critic)
    # 4. the loop (rollout, score, advantages, update; log, evaluate, save a resumable state), then the comparison
    #    with the SFT policy on held-out prompts; save the policy and the log
    loop.finish(session, policy_ref_rm, loop.train(session, policy_ref_rm, algorithm))


if __name__ == "__main__":
    config.run(main)
