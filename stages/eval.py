"""Evaluation: measure a run's checkpoints on held-out data and write a report a person can read.

    make eval [RUN=tiny-llama] [CHECKPOINTS="tiny-llama/sft,tiny-llama/ppo"] [ARGS="eval.runs=[tiny-bloom]"]
    python stages/eval.py --config configs/eval.yaml key=value ...

By default the latest run's base model, SFT, reward model and PPO checkpoints are measured on the
held-out splits of the run's data. Every policy is judged by the run's reward model and
compared with the run's SFT policy (the PPO reference). Writes <store>/<run>/report.json (every number)
and report.html with PNG plots in <store>/<run>/plots/.
"""

from __future__ import annotations

import alignment  # noqa: F401  (first: quiets third-party noise, see alignment/__init__.py)
import dataclasses
import sys
import time

import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from alignment import config, data, evaluation, loading, registry, report, scoring
from alignment.config import field
from alignment.store import Store, StoreError

STAGES = ("base", "sft", "rm", "ppo")


@dataclasses.dataclass
class EvalSettings:
    checkpoints: list[str] = field([], "ids run/stage to measure (stage: base, sft, rm, ppo); empty: all of each run")
    runs: list[str] = field([], "more runs to put in the same report, e.g. one per base model")
    max_new_tokens: int = field(20, "longest response sampled")
    temperature: float = field(1.0, "sampling temperature of the policy rollouts")
    side_by_side: int = field(8, "held-out prompts shown with every policy's greedy response")


@dataclasses.dataclass
class Config(config.StageConfig):
    eval: EvalSettings = field(EvalSettings(), "evaluation settings")


def latest_run(store: Store) -> str:
    checkpoints = store.list()
    if not checkpoints:
        raise StoreError(f"no checkpoints in {store.root}/: run `make sft rm ppo` first")
    return max(checkpoints, key=lambda c: c.manifest.get("created", "")).manifest["run"]


def main(argv: list[str]) -> None:
    # 1. config; which runs and stages to measure
    cfg = config.cli(Config, argv, default_yaml="configs/eval.yaml")
    e = cfg.eval
    started = time.time()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    store = Store(cfg.store)
    run = cfg.run or latest_run(store)
    wanted: dict[str, list[str]] = {}
    for ident in e.checkpoints:
        r, _, stage = ident.partition("/")
        if stage not in STAGES:
            sys.exit(f"eval.checkpoints: {ident!r} is not run/stage with stage one of {', '.join(STAGES)}")
        wanted.setdefault(r, []).append(stage)
    for r in [run, *e.runs]:
        wanted.setdefault(r, list(STAGES))

    result = {"created": time.strftime("%Y-%m-%dT%H:%M:%S"), "store": str(store.root), "definitions": evaluation.METRICS,
              "runs": {}}
    for r, stages in wanted.items():
        # 2. the run's judge (reward model), reference (SFT policy) and held-out data
        sft, rm = store.get(r, "sft"), store.get(r, "rm")
        for stage in dict.fromkeys(["rm", *(s for s in stages if s != "base")]):  # rm judges every policy
            if reason := store.stale(store.get(r, stage)):  # measured all the same: say what the numbers describe
                print(f"[eval] warning: {r}/{stage} is stale ({reason}); rerun its stage to measure the current lineage")
        spec = registry.get(sft.manifest["model"], template=sft.manifest["template"], tokenizer=sft.path)
        profile = sft.manifest["data"]["profile"]
        gold = data.get_profile(profile).gold  # a gold judge exists for the embedded task only
        tokenizer = loading.load_tokenizer(sft.path, spec)
        sft_policy = loading.on_device(loading.load_model(sft.path, AutoModelForCausalLM, spec, tokenizer=tokenizer)).eval()
        reward_model = loading.on_device(loading.load_model(rm.path, AutoModelForSequenceClassification, spec, tokenizer=tokenizer)).eval()
        scorer = scoring.RewardScorer(reward_model, tokenizer, spec, tokenizer, spec)
        demos = data.load(profile, "sft_eval", cfg.limit, cfg.on_error)
        pairs = data.load(profile, "prefs_eval", cfg.limit, cfg.on_error)
        prompts = [x["prompt"] for x in data.load(profile, "prompts_eval", cfg.limit, cfg.on_error)]
        shown = prompts[: e.side_by_side]
        rollout = dict(max_new_tokens=e.max_new_tokens, temperature=e.temperature, gold=gold)

        def sample(policy, greedy: bool, on: list[str]) -> dict:
            torch.manual_seed(cfg.seed)  # every policy sees the same sampling noise
            return evaluation.rollout_scores(policy, sft_policy, scorer, tokenizer, spec, on, greedy=greedy, **rollout)

        sft_rollout = sample(sft_policy, False, prompts)
        entry = {"model": spec.name, "data": profile, "checkpoints": {}, "side_by_side": [{"prompt": p} for p in shown]}

        # 3. measure each checkpoint
        for stage in stages:
            print(f"[eval] {r}/{stage}")
            if stage == "rm":
                entry["checkpoints"]["rm"] = {"kind": "reward_model", "path": str(rm.path),
                                              **evaluation.reward_model_metrics(reward_model, tokenizer, spec, pairs)}
                continue
            if stage == "base":
                path = sft.manifest["base"]  # what SFT started from
                policy = loading.on_device(loading.load_model(path, AutoModelForCausalLM, spec, tokenizer=tokenizer)).eval()
            elif stage == "sft":
                path, policy = sft.path, sft_policy
            else:
                path = store.get(r, stage).path
                policy = loading.on_device(loading.load_model(path, AutoModelForCausalLM, spec, tokenizer=tokenizer)).eval()
            own = sft_rollout if stage == "sft" else sample(policy, False, prompts)
            entry["checkpoints"][stage] = {
                "kind": "policy", "path": str(path), "prompts": len(prompts),
                **evaluation.cross_entropy(policy, tokenizer, spec, demos),
                **evaluation.policy_metrics(own, sft_rollout, gold),
            }
            greedy = sample(policy, True, shown)
            for row, i in zip(entry["side_by_side"], range(len(shown))):
                row[stage] = {"response": greedy["responses"][i], "reward": greedy["reward"][i],
                              **({"gold": greedy["gold"][i]} if gold else {})}

        # 4. PPO's curves, from its log
        if "ppo" in stages:
            ppo_checkpoint = store.get(r, "ppo")
            entry["ppo_log"] = data.read_jsonl(ppo_checkpoint.path / "ppo_log.jsonl")
            entry["ppo_eval"] = ppo_checkpoint.metrics.get("eval_curve", [])
        result["runs"][r] = entry

    # 5. write report.json, plots and report.html into the (first) run's folder
    result["duration_s"] = round(time.time() - started, 1)
    out = report.write(result, store.root / run)
    print(f"[eval] wrote {out / 'report.json'} and {out / 'report.html'}")
    print(report.text_summary(result))


if __name__ == "__main__":
    config.run(main)
