"""Peer: a plain GRPO (or, with --trainer rloo, RLOO) script on TRL 1.16's GRPOTrainer (RLOOTrainer) with its
default settings, scored by the same reward model (TRL loads it from its folder and scores prompt + completion
text). Only what the comparison fixes is set: SFT policy, reward model, prompts (already in the model's template),
--prompts-per-step x --group responses per rollout, one optimizer step per --mini-batch of them
(per_device_train_batch_size with steps_per_generation), --response-length sampled tokens at temperature 1, learning
rate, KL coefficient beta (so a reference forward is part of the work, as in ours), --steps rollouts. Writes
<out>/bench.json (episodes/s, peak memory) and the policy to <out>/policy."""

import argparse
import json
import resource
import time

import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl import GRPOConfig, GRPOTrainer, RLOOConfig, RLOOTrainer

ap = argparse.ArgumentParser()
for name in ("--sft", "--rm", "--prompts", "--out"):
    ap.add_argument(name, required=True)
for name in ("--steps", "--prompts-per-step", "--group", "--mini-batch", "--response-length", "--seed"):
    ap.add_argument(name, type=int, required=True)
ap.add_argument("--lr", type=float, required=True)
ap.add_argument("--beta", type=float, required=True)
ap.add_argument("--fp32", action="store_true", help="bf16=False instead of TRL's default")
ap.add_argument("--trainer", choices=("grpo", "rloo"), default="grpo")
a = ap.parse_args()

rollout = a.prompts_per_step * a.group  # responses per rollout batch
tokenizer = AutoTokenizer.from_pretrained(a.sft, padding_side="left")
policy = AutoModelForCausalLM.from_pretrained(a.sft)
prompts = Dataset.from_list([{"prompt": p} for p in json.load(open(a.prompts))])
Config, Trainer = {"grpo": (GRPOConfig, GRPOTrainer), "rloo": (RLOOConfig, RLOOTrainer)}[a.trainer]
args = Config(
    output_dir=a.out, per_device_train_batch_size=a.mini_batch, steps_per_generation=rollout // a.mini_batch,
    num_generations=a.group, max_steps=a.steps * rollout // a.mini_batch, max_completion_length=a.response_length,
    temperature=1.0, learning_rate=a.lr, beta=a.beta, report_to=[], save_strategy="no", logging_steps=1,
    seed=a.seed, use_cpu=not torch.cuda.is_available(), **({"bf16": False} if a.fp32 else {}),
)
trainer = Trainer(model=policy, reward_funcs=a.rm, args=args, train_dataset=prompts, processing_class=tokenizer)
started = time.time()
trainer.train()
loop = time.time() - started
trainer.model.save_pretrained(f"{a.out}/policy")
tokenizer.save_pretrained(f"{a.out}/policy")
episodes = a.steps * rollout
json.dump({"precision": "bf16" if args.bf16 else "fp32", "episodes": episodes, "loop_s": loop,
           "episodes_per_s": episodes / loop, "time_s": {"all": loop},
           "peak_memory_mb": (torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available()
                              else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
           "train_rewards": [h["reward"] for h in trainer.state.log_history if "reward" in h],
           "threads": torch.get_num_threads()}, open(f"{a.out}/bench.json", "w"))
