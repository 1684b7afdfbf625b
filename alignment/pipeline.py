"""The pipeline's stages, named once, in the order the report, the store and the plan show them. Stage 3 is one
of several methods on the SFT policy: DPO (trained on the preference pairs) or a method of the one RL loop
(alignment/rl): PPO, GRPO, RLOO, REINFORCE++."""

RL = ("ppo", "grpo", "rloo", "reinforce")  # stage 3 through the RL loop: sampled, scored, updated
STAGE3 = ("ppo", "dpo", "grpo", "rloo", "reinforce")
POLICIES = ("sft", *STAGE3)  # the stages whose checkpoint is a causal LM
ALL = ("sft", "rm", *STAGE3)
