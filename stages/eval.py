"""Evaluation: measure every policy of a run on held-out data against its SFT policy, and write a report a person
can read.

    make eval [RUN=tiny-llama] [CHECKPOINTS="tiny-llama/sft,tiny-llama/ppo"] [ARGS="eval.runs=[tiny-bloom]"]
    python -m stages.eval --config configs/eval.yaml key=value ...

By default every checkpoint the latest run holds is measured: the base model, SFT, the reward model, and each of
PPO, DPO and GRPO that exists. Every policy is judged by its run's reward model (and, on the embedded task, the
gold judge) and paired with its run's SFT policy on the same held-out prompts. Writes <store>/<run>/report.json
(every number) and report.html, one self-contained page (alignment/report.py), with the figures also as PNG
files in <store>/<run>/plots/.
"""

from __future__ import annotations

import collections
import dataclasses
import sys
import time
from typing import NamedTuple

import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from alignment import (
    config,
    data,
    evaluation,
    health,
    loading,
    logs,
    pipeline,
    registry,
    report,
    rewards,
    scoring,
    stats,
    task,
)
from alignment.config import field
from alignment.store import Checkpoint, Store, StoreError

STAGES = ("base", *pipeline.ALL)  # in the report's order


@dataclasses.dataclass
class EvalSettings:
    checkpoints: list[str] = field([], "ids run/stage to measure (stage: base, sft, rm, ppo, dpo, grpo, rloo, "
                                   "reinforce); empty: every one each run holds")
    runs: list[str] = field([], "more runs to put in the same report, e.g. one per base model")
    max_new_tokens: int = field(20, "longest response sampled")
    temperature: float = field(1.0, "sampling temperature of the policy rollouts")
    samples: int = field(1, "sampled responses per held-out prompt, averaged per prompt before pairing with SFT's")
    side_by_side: int = field(8, "held-out prompts shown with every policy's greedy response, spread over the "
                              "instruction kinds (the embedded task's operations), else drawn at random")
    kl_budget: float = field(10.0, "KL to SFT (nats per sampled response) a method may spend; the report warns beyond "
                             "it and draws it on the KL plot. 0: no budget")


@dataclasses.dataclass
class Config(config.StageConfig):
    eval: EvalSettings = field(EvalSettings(), "evaluation settings")


class Reference(NamedTuple):
    """What every policy of a run is measured with: the judge, the SFT policy and its responses, the data."""

    tokenizer: object
    spec: registry.ModelSpec
    sft_policy: torch.nn.Module
    reward_model: torch.nn.Module | None  # None: the run has none (its policies were rewarded by functions alone)
    scorer: scoring.RewardScorer | None
    gold: bool  # a gold judge exists for the embedded task only
    demos: list[dict]  # held-out demonstrations (cross-entropy)
    pairs: list[dict]  # held-out preference pairs (reward-model accuracy)
    prompts: list  # held-out prompts (rollouts)
    columns: dict  # the data's kept fields of each held-out prompt (for reward functions): name -> list


def latest_run(store: Store) -> str:
    checkpoints = store.list()
    if not checkpoints:
        raise StoreError(f"no checkpoints in {store.root}/: run `make sft rm ppo` first")
    return max(checkpoints, key=lambda c: c.manifest.get("created", "")).manifest["run"]


def present(store: Store, run: str) -> list[str]:
    """The stages of STAGES the run holds, base (what SFT started from) included."""
    held = {c.manifest.get("stage") for c in store.list() if c.manifest.get("run") == run}
    return [s for s in STAGES if s in held or s == "base"]


def load_reference(store: Store, run: str, cfg: Config) -> Reference:
    """A run without a reward model (its policies rewarded by functions alone) is measured without one: by the gold
    judge where there is one, the reward functions each policy was rewarded by, KL and the answers' health."""
    sft = store.get(run, "sft")
    rm = store.get(run, "rm") if "rm" in present(store, run) else None
    spec = registry.get(sft.manifest["model"], template=sft.manifest["template"], tokenizer=sft.path)
    profile = sft.manifest["data"]["profile"]
    tokenizer = loading.load_tokenizer(sft.path, spec)
    sft_policy = loading.on_device(loading.load_model(sft.path, AutoModelForCausalLM, spec, tokenizer=tokenizer)).eval()
    reward_model = rm and loading.on_device(loading.load_model(rm.path, AutoModelForSequenceClassification, spec,
                                                               tokenizer=tokenizer)).eval()
    scorer = rm and scoring.RewardScorer(reward_model, tokenizer, spec, tokenizer, spec)
    if rm is None:
        print(f"[eval] {run} has no reward model: its policies are measured by "
              f"{'the gold judge, ' if data.get_profile(profile).gold else ''}the reward functions they were "
              "rewarded by, KL to SFT and their answers' health")
    held_out = [
        data.load(profile, split, cfg.limit, cfg.on_error) for split in ("sft_eval", "prefs_eval", "prompts_eval")
    ]
    return Reference(tokenizer, spec, sft_policy, reward_model, scorer, data.get_profile(profile).gold,
                     held_out[0], held_out[1], [x["prompt"] for x in held_out[2]],
                     {k: [x[k] for x in held_out[2]] for k in held_out[2][0] if k != "prompt"})


def rollouts(ref: Reference, policy, cfg: Config) -> tuple[dict, dict]:
    """The policy's greedy response to every held-out prompt, and eval.samples sampled ones, all scored. Every
    policy is sampled with the same random numbers: paired with SFT's, the difference is the policy's."""
    e = cfg.eval
    kwargs = dict(max_new_tokens=e.max_new_tokens, temperature=e.temperature, gold=ref.gold)
    args = (policy, ref.sft_policy, ref.scorer, ref.tokenizer, ref.spec)
    greedy = evaluation.rollout_scores(*args, ref.prompts, greedy=True, kl=False, **kwargs)  # no draws: no KL
    torch.manual_seed(cfg.seed)
    sampled = evaluation.rollout_scores(*args, [p for p in ref.prompts for _ in range(e.samples)], greedy=False,
                                        **kwargs)
    return greedy, sampled


def policy_figures(ref: Reference, policy, greedy: dict, sampled: dict, sft_greedy: dict, sft_sampled: dict,
                   samples: int) -> dict:
    """Cross-entropy on held-out demonstrations; the metrics of the sampled responses to held-out prompts; the
    differences to SFT's responses to the same prompts, greedy and sampled (the report's headline)."""
    return {"prompts": len(ref.prompts), **evaluation.cross_entropy(policy, ref.tokenizer, ref.spec, ref.demos),
            **evaluation.policy_metrics(sampled, sft_sampled, ref.gold),
            "vs_sft": evaluation.versus_sft(greedy, sampled, sft_greedy, sft_sampled, samples, ref.gold),
            # the answers as a set, one per prompt (health.measures): greedy, and the first sample of each prompt
            "answers": {"greedy": health.measures(ref.prompts, greedy["responses"]),
                        "sampled": health.measures(ref.prompts, sampled["responses"][::samples])}}


def reward_terms(ref: Reference, checkpoint, stage: str, greedy: dict, sampled: dict, sft_greedy: dict,
                 sft_sampled: dict, cfg: Config) -> dict:
    """The reward functions an RL policy was also rewarded by (its config's rewards, alignment/rewards.py), each
    against SFT on the same responses, greedy and sampled: {"terms": {mode: {name: ...}}}; {} for none. A function
    that cannot be loaded here, or fails on this run's held-out data (a field it reads not kept), is reported as
    not measured, with why, and the report goes on."""
    sources = ((checkpoint.manifest.get("config") or {}).get(stage) or {}).get("rewards") if checkpoint else None
    try:
        functions = [t for t in rewards.terms(sources, []) if t.function is not None] if sources else []
    except config.ConfigError as e:
        print(f"[eval] {checkpoint.id}: its reward functions are not measured: {e}")
        return {"terms": {"greedy": {"(functions)": {"prompts": 0, "error": str(e)}}}}
    out = {}
    for mode, after, before, n in (("greedy", greedy, sft_greedy, 1), ("sampled", sampled, sft_sampled,
                                                                        cfg.eval.samples)):
        prompts = [p for p in ref.prompts for _ in range(n)]
        columns = {k: [v for v in vs for _ in range(n)] for k, vs in ref.columns.items()}
        out[mode] = {}
        for t in functions:
            try:
                out[mode][t.name] = evaluation.term_versus_sft(t, prompts, before, after, columns, n, cfg.seed)
            except SystemExit as e:  # (its one line: a field the function reads is not kept by this data)
                print(f"[eval] {checkpoint.id}: {t.name} not measured: {e}")
                out[mode][t.name] = {"prompts": 0, "error": str(e)}
    return {"terms": out} if functions else {}


def lineage(store: Store, checkpoint: Checkpoint) -> dict:
    """Who a checkpoint is, what it came from, whether that still holds, how long it took and how it was made."""
    m = checkpoint.manifest
    parents, uids = m.get("parents") or [], m.get("parent_uids") or []  # uids: absent from older manifests
    if reason := store.stale(checkpoint):  # measured all the same: say what the numbers describe
        print(f"[eval] warning: {checkpoint.id} is stale ({reason}); rerun its stage to measure the current lineage")
    return {"id": m["id"], "uid": m.get("uid"), "stage": m.get("stage"), "created": m.get("created"),
            "parents": [{"id": p, "uid": uids[i] if i < len(uids) else None} for i, p in enumerate(parents)],
            "stale": reason, "duration_s": checkpoint.metrics.get("duration_s"),
            "adapter": m.get("adapter"), "data": m.get("data"), "config": m.get("config"), "path": str(checkpoint.path)}


def recorded(checkpoint: Checkpoint, stage: str, prompts: int) -> dict:
    """What a trained policy's stage measured itself: its held-out curve (eval_every points; n prompts each),
    wall time, what it trained on."""
    m, settings = checkpoint.metrics, (checkpoint.manifest.get("config") or {}).get(stage, {})
    return {
        "eval_curve": m.get("eval_curve", []),
        "curve_prompts": min(settings.get("eval_prompts") or prompts, prompts),
        "duration_s": m.get("duration_s"),
        "episodes": m.get("episodes"),
        "pairs_seen": m.get("pairs_seen"),
        "skipped_non_finite": m.get("skipped_non_finite"),
        "reward_model": settings.get("reward_model") or None,  # a judge other than the run's, if it had one
        "guard": m.get("guard"),  # the guard stopped it at a collapse and published an earlier policy
        "rewards": settings.get("rewards") or ["model"],  # what it was rewarded by (alignment/rewards.py)
    }


def reward_model_entry(store: Store, run: str, ref: Reference, cfg: Config) -> dict:
    """The reward model's held-out figures, beside what its own stage recorded on the same split (the report
    says whether the two accuracies agree, and why not)."""
    rm = store.get(run, "rm")
    profile = rm.manifest["data"]["profile"]
    return {
        "kind": "reward_model",
        "path": str(rm.path),
        **evaluation.reward_model_metrics(ref.reward_model, ref.tokenizer, ref.spec, ref.pairs),
        "stage_recorded": {
            "accuracy": rm.metrics.get("eval_accuracy"),
            "ci95": rm.metrics.get("eval_accuracy_ci95"),
            "pairs": rm.metrics.get("eval_pairs"),
            "limit": (rm.manifest.get("config") or {}).get("limit"),
            "fingerprint": (rm.manifest.get("data") or {}).get("fingerprint"),
            "references": rm.metrics.get("references", {}),
        },
        "now": {
            "limit": cfg.limit,
            "fingerprint": data.fingerprint(profile, ["prefs_train", "prefs_eval"]),
            "dtype": ref.spec.dtype,
        },
    }


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
        wanted.setdefault(r, present(store, r))
    result = {"created": time.strftime("%Y-%m-%dT%H:%M:%S"), "store": str(store.root), "settings": config.to_dict(cfg),
              "definitions": evaluation.METRICS, "runs": {}}

    for r, stages in wanted.items():
        stages = sorted(set(stages), key=STAGES.index)
        # 2. the run's judge (reward model), reference (SFT policy) and held-out data; SFT's own responses
        ref = load_reference(store, r, cfg)
        sft = store.get(r, "sft")
        print(f"[eval] {r}: {', '.join(stages)} on {len(ref.prompts)} held-out prompts, {len(ref.pairs)} pairs, "
              f"{len(ref.demos)} demonstrations")
        sft_greedy, sft_sampled = rollouts(ref, ref.sft_policy, cfg)
        kind = (lambda p: task.parse_prompt(p)[0]) if ref.gold else None  # the embedded task's operation
        shown = stats.spread_sample(ref.prompts, e.side_by_side, cfg.seed, kind)
        entry = {"model": ref.spec.name, "data": sft.manifest["data"]["profile"], "gold": ref.gold,
                 "prompts": len(ref.prompts), "pairs": len(ref.pairs), "demonstrations": len(ref.demos),
                 "checkpoints": {},
                 "prompt_kinds": dict(collections.Counter(map(kind, ref.prompts))) if kind else None,
                 "side_by_side": [{"prompt": ref.prompts[i], "kind": kind(ref.prompts[i]) if kind else None}
                                  for i in shown]}

        # 3. measure each checkpoint: the reward model on held-out pairs; each policy on held-out demonstrations
        #    and prompts, paired with SFT on the same prompts
        for stage in stages:
            print(f"[eval] {r}/{stage}")
            if stage == "rm":
                entry["checkpoints"]["rm"] = reward_model_entry(store, r, ref, cfg)
                continue
            checkpoint = None if stage == "base" else sft if stage == "sft" else store.get(r, stage)
            path = sft.manifest["base"] if stage == "base" else checkpoint.path  # base: what SFT started from
            policy = ref.sft_policy if stage == "sft" else loading.on_device(
                loading.load_model(path, AutoModelForCausalLM, ref.spec, tokenizer=ref.tokenizer)).eval()
            greedy, sampled = (sft_greedy, sft_sampled) if stage == "sft" else rollouts(ref, policy, cfg)
            entry["checkpoints"][stage] = {
                "kind": "policy", "path": str(path), **policy_figures(ref, policy, greedy, sampled, sft_greedy,
                                                                      sft_sampled, e.samples),
                **({"recorded": recorded(checkpoint, stage, len(ref.prompts))} if stage not in ("base", "sft") else {}),
                **reward_terms(ref, checkpoint, stage, greedy, sampled, sft_greedy, sft_sampled, cfg),
            }
            for row, i in zip(entry["side_by_side"], shown):
                row[stage] = {"response": greedy["responses"][i],
                              **({"reward": greedy["reward"][i]} if ref.scorer else {}),
                              **({"gold": greedy["gold"][i]} if ref.gold else {})}
            del policy

        # 4. what the stages recorded: lineage and run times; their per-step logs (training curves)
        entry["base"], entry["lineage"], entry["training_logs"] = sft.manifest["base"], [], {}
        judge = ["rm"] if ref.reward_model is not None else []
        for stage in ("sft", *judge, *(s for s in stages if s not in ("base", "sft", "rm"))):
            checkpoint = store.get(r, stage)
            entry["lineage"].append(lineage(store, checkpoint))
            records, source = logs.read_log_history(checkpoint, store.run_dir(r) / "tensorboard" / stage)
            entry["training_logs"][stage] = {"records": records, "source": source}
        result["runs"][r] = entry

    # 5. write report.json and report.html (headline, warnings, plots, samples, lineage) into the first run's folder
    result["duration_s"] = round(time.time() - started, 1)
    out = report.write(result, store.root / run)
    print(f"[eval] wrote {out / 'report.json'} and {out / 'report.html'}")
    print(report.text_summary(result))


if __name__ == "__main__":
    config.run(main)
