"""Stage 3, PPO: improve the SFT policy against the reward model while a KL penalty keeps it close.

    make ppo [MODEL=tiny-llama] [ARGS="ppo.steps=50 ppo.kl_coef=0.1"]
    make ppo NPROC=8 ACCELERATE_CONFIG=configs/accelerate/zero3.yaml
    python -m stages.ppo --config configs/ppo.yaml key=value ...

Each step samples responses to a batch of prompts, scores them (the policy's log-probs and the critic's values
from the training forward, the frozen reference's log-probs, the reward model's score), turns the scores into
per-token rewards (a KL penalty at every token, the score at the last) and GAE advantages, and runs epochs of
clipped policy and value updates on minibatches. The loop is the library's (alignment/rl/loop.py, shared with
GRPO; TRL no longer ships PPO), the algorithm alignment/rl/algorithms.py's PPO, its math alignment/ppo.py. At the
end the policy is compared with the SFT policy on held-out prompts, and saved as <run>/ppo with the critic beside it.
"""

from __future__ import annotations

import dataclasses

from alignment import config
from alignment.config import field
from alignment.rl import loop, models
from alignment.rl.algorithms import PPO
from alignment.rl.settings import RLConfig, RLSettings


@dataclasses.dataclass
class PPOSettings(RLSettings):
    ppo_epochs: int = field(4, "passes over each rollout batch")
    kl_coef: float = field(0.3, "beta of the per-token penalty beta * (log pi - log pi_ref)")
    adaptive_kl: bool = field(False, "adapt kl_coef towards kl_target (Ziegler et al., 2019)")
    kl_target: float = field(1.0, "target per-sequence KL of the adaptive controller")
    kl_horizon: int = field(10000, "horizon (episodes) of the adaptive controller")
    gamma: float = field(1.0, "discount")
    lam: float = field(0.95, "GAE lambda")
    value_clip: float = field(0.2, "value clip around the rollout's values")
    vf_coef: float = field(0.1, "weight of the value loss")
    whiten_advantages: bool = field(True, "normalise advantages over each batch")
    normalize_reward: bool = field(True, "scale scores by running mean and std of the reward model's output")
    reward_clip: float = field(5.0, "clip (normalised) scores to +-reward_clip")


@dataclasses.dataclass
class Config(RLConfig):
    ppo: PPOSettings = field(PPOSettings(), "PPO settings")


def main(argv: list[str]) -> None:
    # 1. config, accelerator, inputs: the run's SFT checkpoint (policy init and reference) and reward model
    session = loop.start(config.cli(Config, argv, default_yaml="configs/ppo.yaml"), "ppo")
    # 2. models: the policy, and a critic that starts as the reward model, trained as one module; the reference
    #    and the reward model frozen
    trio = models.load(session.cfg, session.accelerator, session.sft, session.rm, "ppo", critic=True)
    # 3. the loop: rollout, score, PPO's advantages (KL-penalised rewards, GAE), clipped policy and value updates;
    #    log, evaluate, save a resumable state (loop.train)
    # 4. compare with the SFT policy on held-out prompts; save the policy, the critic beside it, the log
    loop.finish(session, trio, loop.train(session, trio, PPO(session.settings)))


if __name__ == "__main__":
    config.run(main)
