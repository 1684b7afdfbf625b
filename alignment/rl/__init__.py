"""The RL loop of stage 3, shared by PPO and GRPO (stages/ppo.py, stages/grpo.py), which differ only in their
algorithm (algorithms.py): how advantages come from a scored rollout, and the loss of a minibatch.

- types.py: what one step passes along (Rollout, Scores) and the resumable state (RLState);
- settings.py: the settings every RL stage has (RLSettings), extended by each stage;
- models.py: the trained policy (with PPO's critic), the frozen reference and the reward model's scorer;
- steps.py: sampling, scoring, the optimizer step with its non-finite guard, held-out evaluation, the prompt queue;
- state.py: saving, loading and resuming the training state;
- algorithms.py: PPO (critic, GAE, clipped losses) and GRPO (groups, k3 KL in the loss);
- loop.py: the loop itself, the final comparison with SFT and publishing the policy.
"""
