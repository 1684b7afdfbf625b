"""Stage 3, RLOO: improve the SFT policy against the reward model, each response's baseline the others to its prompt.

    make rloo [MODEL=tiny-llama] [ARGS="rloo.steps=50 rloo.group_size=4 rloo.kl_coef=0.05"]
    make rloo NPROC=8 ACCELERATE_CONFIG=configs/accelerate/zero3.yaml
    python -m stages.rloo --config configs/rloo.yaml key=value ...

REINFORCE Leave-One-Out (Kool et al., 2019; Ahmadian et al., 2024, "Back to Basics") samples group_size responses
to each prompt; each one's reward is the reward model's score less kl_coef times its summed log-ratio to the
reference (the KL in the reward, as TRL's RLOOTrainer puts it), and its advantage that reward less the mean reward
of the other responses to the same prompt: a baseline that does not depend on the response, so the gradient stays
unbiased, with no critic to train. The loss is the clipped ratio objective of GRPO without its KL term. The loop is
the library's (alignment/rl/loop.py, shared with PPO and GRPO); the algorithm alignment/rl/algorithms.py's RLOO;
its math alignment/ppo.py's leave_one_out. At the end the policy is compared with the SFT policy on held-out
prompts, and saved as <run>/rloo.
"""

from __future__ import annotations

import dataclasses

from alignment import config
from alignment.config import ConfigError, field
from alignment.rl import loop, models
from alignment.rl.algorithms import RLOO
from alignment.rl.settings import RLConfig, RLSettings, check_aggregation


@dataclasses.dataclass
class RLOOSettings(RLSettings):
    batch_size: int = field(16, "prompts per rollout batch, per process; each answered group_size times")
    group_size: int = field(4, "responses sampled per prompt: each one's baseline is the mean of the others")
    mini_batch_size: int = field(64, "sequences per optimizer step, per process (DeepSpeed's micro batch)")
    epochs: int = field(1, "passes over each rollout batch; with more than one minibatch per batch, the later ones "
                        "are already off-policy and the ratio clip acts")
    kl_coef: float = field(0.05, "beta: each reward less beta * the response's summed log pi - log pi_ref (TRL: 0.05)")
    normalize_advantages: bool = field(False, "scale the batch's advantages to mean 0 and std 1")
    loss_aggregation: str = field("sequence", "sequence: each response's token mean, then the mean; token: the mean "
                                  "over all tokens; constant: token sum / (responses x max_new_tokens), REINFORCE's "
                                  "summed log-probs of a response")
    eval_every: int = field(20, "evaluate on held-out prompts every N steps (and before the first); 0: off")


@dataclasses.dataclass
class Config(RLConfig):
    rloo: RLOOSettings = field(RLOOSettings(), "RLOO settings")

    def check(self) -> None:
        """RLOO's settings that cannot work stop at start-up (config.load calls this)."""
        super().check()  # the keys every stage has
        r = self.rloo
        if r.group_size < 2:
            raise ConfigError(f"rloo.group_size={r.group_size}: a leave-one-out baseline needs 2 responses or more "
                              "per prompt")
        check_aggregation("rloo", r.loss_aggregation)


def main(argv: list[str]) -> None:
    # 1. config (its settings checked), accelerator, inputs: the run's SFT checkpoint and reward model
    session = loop.start(config.cli(Config, argv, default_yaml="configs/rloo.yaml"), "rloo")
    # 2. the algorithm: group_size responses per prompt, KL-penalised rewards, leave-one-out advantages; no critic
    algorithm = RLOO(session.settings)
    # 3. models: the policy alone trains; the reference and the reward model frozen
    policy_ref_rm = models.load(session.cfg, session.accelerator, session.sft, session.rm, "rloo", algorithm.critic)
    # 4. the loop (rollout, score, advantages, update; log, evaluate, save a resumable state), then the comparison
    #    with the SFT policy on held-out prompts; save the policy and the log
    loop.finish(session, policy_ref_rm, loop.train(session, policy_ref_rm, algorithm))


if __name__ == "__main__":
    config.run(main)
