"""Peer: TRL 1.12's experimental PPOTrainer (the last TRL release that shipped PPO), run in its own virtual
environment (bench/.venv-trl112) with the same SFT policy, reward model, prompts and settings as ours.

Settings are matched to ours: rollout batch --batch, an optimizer step per --mini-batch sequences
(per_device_train_batch_size=batch with num_mini_batches=batch/mini, so each minibatch is one forward),
--epochs PPO epochs, --response-length sampled tokens at temperature 1 with EOS as the stop token, k1 KL at
--kl-coef, constant learning rate, fp32 (--bf16: bf16 mixed precision). Generation time is measured by wrapping its
batch_generation.
Writes <out>/bench.json (episodes/s, time split, peak memory) and the trained policy to <out>/policy.
"""

import argparse
import json
import resource
import time

import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer
from trl.experimental.ppo import PPOConfig, PPOTrainer
from trl.experimental.ppo import ppo_trainer as trl_ppo

ap = argparse.ArgumentParser()
for name in ("--sft", "--rm", "--prompts", "--out"):
    ap.add_argument(name, required=True)
for name in ("--steps", "--batch", "--mini-batch", "--epochs", "--response-length", "--seed"):
    ap.add_argument(name, type=int, required=True)
ap.add_argument("--lr", type=float, required=True)
ap.add_argument("--kl-coef", type=float, required=True)
ap.add_argument("--bf16", action="store_true", help="bf16 mixed precision (the GPU check's setting)")
a = ap.parse_args()

tokenizer = AutoTokenizer.from_pretrained(a.sft, padding_side="left")
policy = AutoModelForCausalLM.from_pretrained(a.sft)
ref_policy = AutoModelForCausalLM.from_pretrained(a.sft)
value_model = AutoModelForSequenceClassification.from_pretrained(a.rm, num_labels=1)
reward_model = AutoModelForSequenceClassification.from_pretrained(a.rm, num_labels=1)
prompts = Dataset.from_dict({"input_ids": json.load(open(a.prompts))})

args = PPOConfig(
    output_dir=a.out, per_device_train_batch_size=a.batch, gradient_accumulation_steps=1,
    num_mini_batches=a.batch // a.mini_batch, num_ppo_epochs=a.epochs, total_episodes=a.steps * a.batch,
    response_length=a.response_length, temperature=1.0, stop_token="eos", missing_eos_penalty=None,
    kl_coef=a.kl_coef, kl_estimator="k1", learning_rate=a.lr, lr_scheduler_type="constant",
    num_sample_generations=0, bf16=a.bf16, report_to=[], save_strategy="no", logging_steps=1, seed=a.seed,
)

generating = [0.0]
_batch_generation = trl_ppo.batch_generation


def timed_batch_generation(*args, **kwargs):
    started = time.time()
    out = _batch_generation(*args, **kwargs)
    generating[0] += time.time() - started
    return out


trl_ppo.batch_generation = timed_batch_generation
trainer = PPOTrainer(args=args, processing_class=tokenizer, model=policy, ref_model=ref_policy,
                     reward_model=reward_model, value_model=value_model, train_dataset=prompts, eval_dataset=prompts)
started = time.time()
trainer.train()
loop = time.time() - started
episodes = args.num_total_batches * args.batch_size
trainer.policy_model.save_pretrained(f"{a.out}/policy")
tokenizer.save_pretrained(f"{a.out}/policy")
scores = [h["objective/scores"] for h in trainer.state.log_history if "objective/scores" in h]
json.dump({"episodes": episodes, "loop_s": loop, "episodes_per_s": episodes / loop,
           "time_s": {"generate": generating[0], "score+train+other": loop - generating[0]},
           "peak_memory_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
           "train_scores": scores, "threads": torch.get_num_threads()}, open(f"{a.out}/bench.json", "w"))
