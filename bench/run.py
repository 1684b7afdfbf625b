"""Benchmark of every stage against the peers, on the same model, data, batch sizes and lengths.

    make bench                      (= .venv/bin/python -m bench.run)
    python -m bench.run --only sft,rm --sft-records 512

Each measurement runs in its own process (its peak memory is its own); ours are the real stages
(python -m stages.<stage>) writing to a bench store, the peers are the scripts in bench/peers/. The PPO peer is
TRL 1.12's PPOTrainer, the last TRL release with PPO, in a virtual environment of its own
(bench/.venv-trl112, made by `make bench`); the DPO and GRPO peers are plain scripts on TRL 1.16's DPOTrainer and
GRPOTrainer, run in the precision ours chose. Prints one table; writes it as JSON to bench/results/.
Speed figures are what this machine measured in this run; nothing here is a test.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

from alignment import data, evaluation, loading, registry, scoring, stats
from alignment.store import Store

ROOT = Path(__file__).resolve().parent.parent

RESULTS = ROOT / "bench" / "results"
PEER_PYTHON = ROOT / "bench" / ".venv-trl112" / "bin" / "python"
RUN = "bench"


def matmul_peak(dtype: torch.dtype) -> dict:
    """Best FLOP/s of a square matmul in this dtype: the size doubles until one product takes 50 ms
    (a CPU without bf16 units emulates bf16 slowly, so a fixed large size could take minutes)."""
    n = 256
    while True:
        a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
        a @ b
        t = time.perf_counter()
        a @ b
        if time.perf_counter() - t > 0.05 or n >= 4096:
            break
        n *= 2
    best = min(_timed(lambda: a @ b) for _ in range(3))
    return {"n": n, "gflops": round(2 * n**3 / best / 1e9, 1)}


def _cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []:
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def run_process(name: str, cmd: list[str], log_dir: Path, env: dict | None = None) -> float:
    """Runs one measurement; its output goes to a log file. Returns the wall time; stops on failure."""
    log = log_dir / f"{name}.log"
    print(f"[bench] {name}: {' '.join(cmd[:3])} ... (log: {log})", flush=True)
    started = time.time()
    with open(log, "w") as f:
        result = subprocess.run(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT,
                                env={**os.environ, "TOKENIZERS_PARALLELISM": "false", **(env or {})})
    if result.returncode != 0:
        tail = log.read_text()[-3000:]
        raise SystemExit(f"[bench] {name} failed (exit {result.returncode}); the end of {log}:\n{tail}")
    return time.time() - started


def model_flops_per_token(path: Path, mean_length: float, reward_model: bool = False) -> float:
    """Training FLOPs per token: 6 x the parameters that multiply (all but the input embedding; a reward model
    has a scalar head instead of the LM head) plus the attention scores, 12 x layers x width x sequence
    length (the PaLM appendix's count, used for MFU)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

    config = AutoConfig.from_pretrained(path, num_labels=1)
    with torch.device("meta"):
        model = (AutoModelForSequenceClassification if reward_model else AutoModelForCausalLM).from_config(config)
    params = sum(p.numel() for p in model.parameters()) - model.get_input_embeddings().weight.numel()
    if config.tie_word_embeddings and not reward_model:  # the tied output projection still multiplies
        params += model.get_input_embeddings().weight.numel()
    return 6 * params + 12 * config.num_hidden_layers * config.hidden_size * mean_length


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", default="sft,rm,ppo,dpo,grpo,rloo,reinforce,memory", help="stages to measure, "
                    "comma-separated (memory: bench/memory.py's PPO memory with 1 and 2 processes, on its own model; "
                    "rm needs sft; ppo, dpo, grpo, rloo and reinforce need sft and rm; reinforce takes the --rloo-* "
                    "sizes)")
    ap.add_argument("--model", default="tiny-llama")
    ap.add_argument("--sft-records", type=int, default=1024, help="Alpaca records trained on (one epoch)")
    ap.add_argument("--sft-batch", type=int, default=32)
    ap.add_argument("--sft-max-length", type=int, default=512)
    ap.add_argument("--rm-pairs", type=int, default=512, help="hh-rlhf pairs loaded (a fifth is validation)")
    ap.add_argument("--rm-batch", type=int, default=16)
    ap.add_argument("--rm-max-length", type=int, default=384)
    ap.add_argument("--ppo-steps", type=int, default=12)
    ap.add_argument("--ppo-batch", type=int, default=32)
    ap.add_argument("--ppo-mini-batch", type=int, default=8)
    ap.add_argument("--ppo-epochs", default="4,1", help="PPO epochs per rollout batch; one measurement each")
    ap.add_argument("--ppo-response-length", type=int, default=32)
    ap.add_argument("--ppo-prompt-length", type=int, default=256)
    ap.add_argument("--ppo-from", default="", help="a store holding <run>/sft and <run>/rm (e.g. from `make sft rm "
                    "DATA=hh-rlhf`) to start PPO from, so its reward gain means something; default: the bench's own")
    ap.add_argument("--ppo-run", default="tiny-llama-hh-rlhf", help="the run in --ppo-from")
    ap.add_argument("--ppo-eval-prompts", type=int, default=0, help="held-out prompts for the reward gain; 0: all 311")
    ap.add_argument("--dpo-beta", type=float, default=0.1, help="DPO trains on the RM's pairs, batch and max length")
    ap.add_argument("--grpo-steps", type=int, default=6, help="GRPO rollout batches, each --grpo-prompts x "
                    "--grpo-group responses; lengths as PPO's")
    ap.add_argument("--grpo-prompts", type=int, default=8)
    ap.add_argument("--grpo-group", type=int, default=8)
    ap.add_argument("--grpo-mini-batch", type=int, default=32)
    ap.add_argument("--rloo-steps", type=int, default=6, help="RLOO rollout batches, each --rloo-prompts x "
                    "--rloo-group responses; lengths as PPO's")
    ap.add_argument("--rloo-prompts", type=int, default=16)
    ap.add_argument("--rloo-group", type=int, default=4)
    ap.add_argument("--rloo-mini-batch", type=int, default=32)
    ap.add_argument("--peer-default-records", type=int, default=128,
                    help="records (SFT) and pairs (RM) the TRL-default peers train on: their default, bf16 "
                         "autocast, runs 10-20x slower on a CPU without bf16 units, so they measure on the first N; "
                         "the fp32 peer runs take the whole workload")
    ap.add_argument("--out", default=str(RESULTS))
    a = ap.parse_args()
    stages = a.only.split(",")
    out = Path(a.out)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    work = out / stamp
    work.mkdir(parents=True, exist_ok=True)
    store = Store(str(work / "store"))
    started = time.time()

    spec = registry.get(a.model, template=data.get_profile("hh-rlhf").template)
    base = Path(registry.resolve(spec, data.corpus("hh-rlhf", spec.format_prompt),
                                 data.get_profile("hh-rlhf").tokenizer_vocab)) if spec.is_tiny \
        else Path(registry.resolve(spec))
    machine = {"cpu": _cpu_name(), "threads": torch.get_num_threads(),
               "torch": torch.__version__, "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None}
    peaks = {"fp32": matmul_peak(torch.float32), "bf16": matmul_peak(torch.bfloat16)}
    print(f"[bench] {machine}; matmul peak fp32 {peaks['fp32']['gflops']} GFLOP/s, bf16 {peaks['bf16']['gflops']}")
    report = {"stamp": stamp, "machine": machine, "matmul_peak_gflops": peaks, "model": a.model,
              "base": str(base), "settings": vars(a), "stages": {}}
    run = RUN  # the RL stages' run: the bench's own, or --ppo-run's copied in
    common = [f"model={a.model}", "data=hh-rlhf", f"store={store.root}", f"run={RUN}", "save_every=100000"]
    py = sys.executable

    if "sft" in stages:
        records = [{"prompt": spec.format_prompt(r["prompt"]), "completion": r["completion"]}
                   for r in data.load("hh-rlhf", "sft_train", a.sft_records)]
        (work / "sft.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
        settings = dict(batch=a.sft_batch, max_length=a.sft_max_length, lr=2e-3)
        run_process("sft-ours", [py, "-m", "stages.sft", "--config", "configs/hh-rlhf/sft.yaml", *common,
                                 f"limit={a.sft_records}", "sft.epochs=1", f"sft.batch_size={a.sft_batch}",
                                 f"sft.max_length={a.sft_max_length}", "sft.learning_rate=2e-3"], work)
        ours = store.get(RUN, "sft").manifest["metrics"]
        peers = {}
        for name, extra in (("sft-trl", ["--limit", str(a.peer_default_records)]), ("sft-trl-fp32", ["--fp32"])):
            run_process(name, [py, "bench/peers/trl_sft.py", "--model", str(base), "--data", str(work / "sft.jsonl"),
                               "--out", str(work / f"{name}.json"), "--batch", str(settings["batch"]),
                               "--max-length", str(settings["max_length"]), "--lr", str(settings["lr"]), *extra], work)
            peers[name] = json.loads((work / f"{name}.json").read_text())
        report["stages"]["sft"] = _train_stage(ours, peers, base, peaks, "tokens_per_s")

    if "rm" in stages:
        if not store.path(RUN, "sft").exists():
            raise SystemExit("[bench] rm needs the sft measurement's checkpoint: run with --only sft,rm")
        sft_path = store.get(RUN, "sft").path
        run_process("rm-ours", [py, "-m", "stages.rm", "--config", "configs/hh-rlhf/rm.yaml", *common,
                                f"limit={a.rm_pairs}", "rm.epochs=1", f"rm.batch_size={a.rm_batch}",
                                f"rm.max_length={a.rm_max_length}"], work)
        rm = store.get(RUN, "rm")
        ours = rm.manifest["metrics"]
        # the peer trains on exactly our training pairs (the validation carve-out excluded)
        loaded = data.load("hh-rlhf", "prefs_train", a.rm_pairs)
        n_train = len(loaded) - min(rm.manifest["config"]["rm"]["validation"], len(loaded) // 5)
        pairs = [{"prompt": spec.format_prompt(r["prompt"]), "chosen": r["chosen"], "rejected": r["rejected"]}
                 for r in loaded[:n_train]]
        (work / "rm.jsonl").write_text("".join(json.dumps(r) + "\n" for r in pairs))
        peers = {}
        for name, extra in (("rm-trl", ["--limit", str(a.peer_default_records)]), ("rm-trl-fp32", ["--fp32"])):
            run_process(name, [py, "bench/peers/trl_rm.py", "--model", str(sft_path), "--data", str(work / "rm.jsonl"),
                               "--out", str(work / f"{name}.json"), "--batch", str(a.rm_batch),
                               "--max-length", str(a.rm_max_length), "--lr", "2e-4", *extra], work)
            peers[name] = json.loads((work / f"{name}.json").read_text())
        report["stages"]["rm"] = _train_stage(ours, peers, base, peaks, "samples_per_s", reward_model=True,
                                              per_sample=2)

    if {"ppo", "dpo", "grpo", "rloo", "reinforce"} & set(stages):
        if a.ppo_from:  # copied in, so ours and the peer start from the same files and the source stays as it was;
            run = a.ppo_run  # under their own run's name: the reward model's manifest names its SFT parent by it
            common = [*common[:3], f"run={run}", *common[4:]]
            source = Store(a.ppo_from)
            for stage in ("sft", "rm"):
                shutil.rmtree(store.path(run, stage), ignore_errors=True)
                shutil.copytree(source.get(a.ppo_run, stage).path, store.path(run, stage))
        if not (store.path(run, "sft").exists() and store.path(run, "rm").exists()):
            raise SystemExit("[bench] ppo, dpo, grpo, rloo and reinforce need the sft and rm measurements' "
                             "checkpoints: run with --only sft,rm,... or give --ppo-from")
        sft, rm = store.get(run, "sft"), store.get(run, "rm")
        tokenizer = loading.load_tokenizer(sft.path, spec)
        tokenizer.truncation_side = "left"  # as our stages: a long prompt loses its oldest turns
        prompts = [spec.format_prompt(r["prompt"]) for r in data.load("hh-rlhf", "prompts_train")]
        ids = tokenizer(prompts, truncation=True, max_length=a.ppo_prompt_length).input_ids

    if "ppo" in stages:
        if not PEER_PYTHON.exists():
            raise SystemExit(f"[bench] {PEER_PYTHON} is missing: `make bench` creates it (TRL 1.12 for the PPO peer)")
        (work / "ppo_prompts.json").write_text(json.dumps(ids))
        for epochs in [int(e) for e in a.ppo_epochs.split(",")]:
            key = "ppo" if epochs == 4 else f"ppo-{epochs}epoch"
            ppo = [f"ppo.steps={a.ppo_steps}", f"ppo.batch_size={a.ppo_batch}",
                   f"ppo.mini_batch_size={a.ppo_mini_batch}", f"ppo.ppo_epochs={epochs}",
                   f"ppo.max_new_tokens={a.ppo_response_length}", f"ppo.max_prompt_length={a.ppo_prompt_length}",
                   "ppo.eval_every=0", "ppo.eval_samples=1", "resume=false"]
            run_process(f"{key}-ours", [py, "-m", "stages.ppo", "--config", "configs/hh-rlhf/ppo.yaml", *common, *ppo],
                        work)
            ours = store.get(run, "ppo")
            cfg = ours.manifest["config"]["ppo"]
            peer_dir = work / f"{key}-trl112"
            run_process(f"{key}-trl112", [
                str(PEER_PYTHON), "bench/peers/trl112_ppo.py", "--sft", str(sft.path), "--rm", str(rm.path),
                "--prompts", str(work / "ppo_prompts.json"), "--out", str(peer_dir),
                "--steps", str(a.ppo_steps), "--batch", str(a.ppo_batch), "--mini-batch", str(a.ppo_mini_batch),
                "--epochs", str(epochs), "--response-length", str(a.ppo_response_length),
                "--lr", str(cfg["learning_rate"]), "--kl-coef", str(cfg["kl_coef"]), "--seed", "0",
            ], work)
            peer = json.loads((peer_dir / "bench.json").read_text())
            report["stages"][key] = {"ppo_epochs": epochs,
                                     **_rl_stage(ours, peer, "trl112", peer_dir / "policy", sft, rm, spec, a)}


    if "dpo" in stages:  # on the reward model's training pairs, with its batch size and lengths
        run_process("dpo-ours", [py, "-m", "stages.dpo", "--config", "configs/hh-rlhf/dpo.yaml", *common,
                                 f"limit={a.rm_pairs}", "dpo.epochs=1", f"dpo.batch_size={a.rm_batch}",
                                 f"dpo.max_length={a.rm_max_length}", f"dpo.beta={a.dpo_beta}", "dpo.eval_every=0",
                                 "dpo.eval_samples=1", "resume=false"], work)
        ours = store.get(run, "dpo").manifest["metrics"]
        pairs = [{"prompt": spec.format_prompt(r["prompt"]), "chosen": r["chosen"], "rejected": r["rejected"]}
                 for r in data.load("hh-rlhf", "prefs_train", a.rm_pairs)]
        (work / "dpo.jsonl").write_text("".join(json.dumps(r) + "\n" for r in pairs))
        run_process(
            "dpo-trl",
            [
                py,
                "bench/peers/trl_dpo.py",
                "--model",
                str(sft.path),
                "--data",
                str(work / "dpo.jsonl"),
                "--out",
                str(work / "dpo-trl.json"),
                "--batch",
                str(a.rm_batch),
                "--max-length",
                str(a.rm_max_length),
                "--lr",
                str(ours_lr(store, run, "dpo")),
                "--beta",
                str(a.dpo_beta),
                *(["--fp32"] if ours["precision"] == "fp32" else []),
            ],
            work,
        )
        peers = {"dpo-trl": json.loads((work / "dpo-trl.json").read_text())}
        # a pair is two sequences; the reference's forward adds 2 FLOPs per parameter to training's 6
        report["stages"]["dpo"] = _train_stage(ours, peers, base, peaks, "samples_per_s", per_sample=2, flops=8 / 6)

    # On PPO's prompts and lengths; the peer: TRL's GRPOTrainer, RLOOTrainer. REINFORCE++ has no peer of its own
    # in TRL: it does RLOO's work (as many episodes a step, one response to each of group x as many prompts) against
    # TRL's RLOOTrainer at REINFORCE++'s learning rate and KL coefficient.
    for method, peer_method in (("grpo", "grpo"), ("rloo", "rloo"), ("reinforce", "rloo")):
        if method not in stages:
            continue
        steps, prompts_per_step, group, mini_batch = (getattr(a, f"{peer_method}_{k}") for k in
                                                      ("steps", "prompts", "group", "mini_batch"))
        ours_prompts, ours_group = (prompts_per_step * group, 1) if method == "reinforce" else (prompts_per_step, group)
        texts = tokenizer.batch_decode(ids, skip_special_tokens=False)  # the prompts as cut to --ppo-prompt-length
        (work / f"{method}_prompts.json").write_text(json.dumps(texts))
        run_process(f"{method}-ours", [
            py, "-m", f"stages.{method}", "--config", f"configs/hh-rlhf/{method}.yaml", *common,
            f"{method}.steps={steps}", f"{method}.batch_size={ours_prompts}", f"{method}.group_size={ours_group}",
            f"{method}.mini_batch_size={mini_batch}", f"{method}.max_new_tokens={a.ppo_response_length}",
            f"{method}.max_prompt_length={a.ppo_prompt_length}", f"{method}.eval_every=0",
            f"{method}.eval_samples=1", "resume=false"], work)
        ours = store.get(run, method)
        cfg, peer_dir = ours.manifest["config"][method], work / f"{method}-trl"
        run_process(f"{method}-trl", [
            py, "bench/peers/trl_grpo.py", "--trainer", peer_method, "--sft", str(sft.path), "--rm", str(rm.path),
            "--prompts", str(work / f"{method}_prompts.json"), "--out", str(peer_dir), "--steps", str(steps),
            "--prompts-per-step", str(prompts_per_step), "--group", str(group), "--mini-batch", str(mini_batch),
            "--response-length", str(a.ppo_response_length), "--lr", str(cfg["learning_rate"]),
            "--beta", str(cfg["kl_coef"]), "--seed", "0",
            *(["--fp32"] if ours.manifest["metrics"]["precision"] == "fp32" else [])], work)
        peer = json.loads((peer_dir / "bench.json").read_text())
        report["stages"][method] = _rl_stage(ours, peer, "trl", peer_dir / "policy", sft, rm, spec, a)

    if "memory" in stages:  # bench/memory.py: PPO on an 85M LLaMA, 1 process and 2 under ZeRO-3, each one's peak
        run_process("memory", [py, "-m", "bench.memory", "--out", str(work / "memory.json")], work)
        report["memory"] = json.loads((work / "memory.json").read_text())

    report["wall_s"] = round(time.time() - started, 1)
    (work / "bench.json").write_text(json.dumps(report, indent=1))
    (out / "latest.json").write_text(json.dumps(report, indent=1))
    print(format_table(report))
    print(f"[bench] {report['wall_s']:.0f} s in all; results: {work / 'bench.json'}")


def ours_lr(store: Store, run: str, stage: str) -> float:
    """The learning rate our stage trained with (its config's), for the peer to use the same."""
    return store.get(run, stage).manifest["config"][stage]["learning_rate"]


def _train_stage(ours: dict, peers: dict, base: Path, peaks: dict, rate: str, reward_model: bool = False,
                 per_sample: int = 1, flops: float = 1.0) -> dict:
    """Ours and each peer: the rate, model FLOP/s (tokens x FLOPs/token, x flops for work beyond training's, e.g.
    DPO's reference forward) and its share of the matmul peak. per_sample: sequences in a sample (a pair: 2)."""
    rows = {"ours": ours, **peers}
    out = {}
    for name, m in rows.items():
        sequences = m["samples_per_s"] * m["train_runtime_s"] * per_sample
        mean_length = m["train_tokens"] / max(1.0, sequences)
        flops_per_s = flops * model_flops_per_token(base, mean_length, reward_model) * m["tokens_per_s"]
        out[name] = {
            "precision": m["precision"],
            "tokens_per_s": m["tokens_per_s"],
            "samples_per_s": m["samples_per_s"],
            "train_runtime_s": m["train_runtime_s"],
            "train_tokens": m["train_tokens"],
            "peak_memory_mb": m["peak_memory_mb"],
            "model_gflops": round(flops_per_s / 1e9, 1),
            "share_of_matmul_peak": round(flops_per_s / 1e9 / peaks[m["precision"]]["gflops"], 3),
        }
    for name in peers:
        out[f"ours/{name}"] = round(out["ours"][rate] / out[name][rate], 2)
    return out


def _rl_stage(ours, peer: dict, peer_name: str, peer_policy: Path, sft, rm, spec, a) -> dict:
    """PPO or GRPO, ours and the peer's: speed of each, and the reward gain per episode: the mean RM score of
    sampled responses to held-out prompts, policy minus SFT, scored by the same code for both policies."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    m = ours.manifest["metrics"]
    tokenizer = loading.load_tokenizer(sft.path, spec)
    reward_model = loading.load_model(rm.path, AutoModelForSequenceClassification, spec).eval()
    scorer = scoring.RewardScorer(reward_model, tokenizer, spec, tokenizer, spec)
    reference = loading.load_model(sft.path, AutoModelForCausalLM, spec).eval()
    prompts = [r["prompt"] for r in data.load("hh-rlhf", "prompts_eval")][: a.ppo_eval_prompts or None]

    def held_out_reward(path) -> dict:
        policy = loading.load_model(path, AutoModelForCausalLM, spec).eval()
        torch.manual_seed(0)  # the same sampling noise for every policy
        r = evaluation.rollout_scores(policy, reference, scorer, tokenizer, spec, prompts,
                                      max_new_tokens=a.ppo_response_length, temperature=1.0, greedy=False,
                                      gold=False, max_prompt_tokens=a.ppo_prompt_length)
        return {"reward": stats.mean(r["reward"]), "kl": stats.mean(r["kl"]), "rewards": r["reward"]}

    base_reward = held_out_reward(sft.path)
    rows = {}
    for name, path, speed in (("ours", ours.path, m), (peer_name, peer_policy, peer)):
        r = held_out_reward(path)
        diff = stats.paired_difference(r["rewards"], base_reward["rewards"])
        rows[name] = {"episodes_per_s": speed["episodes_per_s"], "episodes": speed["episodes"],
                      "time_s": speed["time_s"], "peak_memory_mb": speed["peak_memory_mb"],
                      "held_out_reward": round(r["reward"], 4), "held_out_kl": round(r["kl"], 3),
                      "reward_gain": round(diff["mean"], 4), "reward_gain_ci95": [round(x, 4) for x in diff["ci95"]],
                      "reward_gain_per_1k_episodes": round(1000 * diff["mean"] / speed["episodes"], 4)}
        rows[name]["rewards"] = r["rewards"]
    # Equal episodes on both sides: the gain per episode compares as the paired difference on the same prompts.
    diff = stats.paired_difference(rows["ours"].pop("rewards"), rows[peer_name].pop("rewards"))
    rows["peer"] = peer_name
    rows["ours_minus_peer_reward"] = {"mean": round(diff["mean"], 4), "ci95": [round(x, 4) for x in diff["ci95"]],
                                      "prompts": len(prompts)}
    rows["sft_held_out_reward"] = round(base_reward["reward"], 4)
    rows[f"ours/{peer_name}"] = round(rows["ours"]["episodes_per_s"] / rows[peer_name]["episodes_per_s"], 2)
    return rows


def format_table(report: dict) -> str:
    peaks = report["matmul_peak_gflops"]
    lines = [(f"matmul peak (this run): fp32 {peaks['fp32']['gflops']} GFLOP/s, bf16 {peaks['bf16']['gflops']} "
              f"GFLOP/s; {report['machine']['threads']} threads, model {report['model']}"), ""]
    head = f"{'stage':5} {'who':12} {'prec':5} {'rate':>16} {'model GFLOP/s':>14} {'% peak':>7} {'peak MB':>8}  ratio"
    lines += [head, "-" * len(head)]
    for stage, unit in (("sft", "tokens_per_s"), ("rm", "samples_per_s"), ("dpo", "samples_per_s")):
        rows = report["stages"].get(stage)
        if not rows:
            continue
        for name, r in rows.items():
            if "/" in name:
                continue
            ratio = "" if name == "ours" else f"ours/{name.split('-', 1)[1]} = {rows[f'ours/{name}']:.2f}x"
            label = "tokens/s" if unit == "tokens_per_s" else "pairs/s"
            lines.append(
                f"{stage:5} {name:12} {r['precision']:5} {r[unit]:>9.1f} {label:>6} {r['model_gflops']:>14.1f} "
                f"{100 * r['share_of_matmul_peak']:>6.1f}% {r['peak_memory_mb']:>8.0f}  {ratio}"
            )
    for key, rows in report["stages"].items():
        if not key.startswith(("ppo", "grpo", "rloo", "reinforce")):
            continue
        stage, peer = key.split("-")[0], rows.get("peer", "trl112")  # reports before GRPO: PPO against TRL 1.12
        if stage == "ppo":
            lines.append(f"{'ppo':5} {rows['ppo_epochs']} PPO epoch(s) per rollout batch")
        for name in ("ours", peer):
            r = rows[name]
            split = ", ".join(f"{k} {v:.1f}s" for k, v in r["time_s"].items())
            ratio = "" if name == "ours" else f"ours/{peer} = {rows[f'ours/{peer}']:.2f}x"
            lines.append(f"{stage:5} {name:12} {'':5} {r['episodes_per_s']:>7.2f} episodes/s {'':>14} {'':>7} "
                         f"{r['peak_memory_mb']:>8.0f}  {ratio}")
            lines.append(f"{'':18} time: {split}")
            lo, hi = r["reward_gain_ci95"]
            lines.append(
                f"{'':18} held-out RM reward {r['held_out_reward']:+.3f} vs SFT {rows['sft_held_out_reward']:+.3f}: "
                f"gain {r['reward_gain']:+.3f} [{lo:+.3f}, {hi:+.3f}] over {r['episodes']} episodes "
                f"({r['reward_gain_per_1k_episodes']:+.3f} per 1k), KL {r['held_out_kl']:.2f}"
            )
        d = rows.get("ours_minus_peer_reward") or rows["ours_minus_trl112_reward"]
        lines.append(f"{'':18} ours - {peer}, paired on the same {d['prompts']} prompts: {d['mean']:+.3f} "
                     f"[{d['ci95'][0]:+.3f}, {d['ci95'][1]:+.3f}]")
    if memory := report.get("memory"):
        s = memory["settings"]
        lines.append(f"memory PPO on a {s['hidden']}x{s['layers']} LLaMA (fp32), peak per process above the fixed "
                     f"cost of a process ({memory['fixed_cost_mb']:.0f} MB), the memory plan's figure beside")
        for name, row in memory["rows"].items():
            lines.append(f"{'':6} {name:12} ZeRO-{row['zero_stage']} {row['above_fixed_mb']} MB, planned "
                         f"{row['planned_mb']:.0f} MB ({row['planned_mb'] / max(row['above_fixed_mb']):.2f}x)")
        for heap, ratio in (memory.get("ratios") or {"": memory["ratio"]}).items():
            lines.append(f"{'':6} {s['nproc']} processes / 1 process{f' ({heap})' if heap else ''}: {ratio:.2f}x")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
