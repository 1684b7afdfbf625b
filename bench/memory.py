"""Memory that scales with the processes: PPO on an 85M-parameter LLaMA built from config (hidden 768, 12 layers,
fp32), with 1 process and with 2 under DeepSpeed ZeRO-3 (gloo on a CPU, NCCL on GPUs), each process's peak.

    make bench-memory                   (= .venv/bin/python -m bench.memory)
    python -m bench.memory --nproc 2 --zero configs/accelerate/zero3.yaml --steps 2

A process's peak memory (resident set on a CPU, the allocator's on a GPU) counts its imports too: the fixed cost
of a process, measured here once (a process that imports a stage and stops), is set aside on both sides, and what
is left is what the models, optimizer states and activations took. With ZeRO-3 every model is partitioned, so each
of 2 processes should hold well under what 1 process holds. Beside each row, what the memory plan (alignment/plan.py,
`make plan`) says the same run holds, at the prompts' real length. Prints one table; writes JSON to bench/results/.
Nothing here is a test.

On a CPU the resident set also holds what glibc's heap keeps of freed blocks: ZeRO-3 gathers each layer's weights
(blocks of 2-6 MB for this model) and frees them a moment later, forward and backward, and the heap grows around
them. With --mmap-threshold (default 1 MiB; 0: none) both runs are measured again with every block over it mapped on
its own and returned when freed (glibc's MALLOC_MMAP_THRESHOLD_): what the tensors themselves need, at a cost in
speed (each block mapped and zeroed anew) that makes it no default of the stages. A GPU's allocator is another
matter: there the peak is the CUDA allocator's.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
FIXED_COST = ("import resource, stages.ppo; "
              "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)")


def build_llama(folder: Path, hidden: int, layers: int) -> Path:
    """A LLaMA with random fp32 weights and the tiny model's tokenizer: MODEL=<folder> takes the llama family's
    settings."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from alignment import registry

    tokenizer = AutoTokenizer.from_pretrained(registry.resolve(registry.get("tiny-llama")))
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=hidden * 8 // 3,
                         num_hidden_layers=layers, num_attention_heads=hidden // 64, num_key_value_heads=hidden // 64,
                         max_position_embeddings=1024, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                         tie_word_embeddings=False, dtype="float32")
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    print(f"[memory] {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M-parameter LLaMA in {folder}", flush=True)
    return folder


def planned_mb(model: Path, args: str, nproc: int, accelerate: str) -> float:
    """The memory plan's peak per process for this PPO run, above the fixed cost: its settings, with the longest
    prompt the run reads instead of max_prompt_length (the plan's bound at the configured length)."""
    from transformers import AutoTokenizer

    from alignment import data, plan, registry

    spec = registry.get(str(model))
    tokenizer = AutoTokenizer.from_pretrained(model)
    prompts = [r["prompt"] for split in ("prompts_train", "prompts_eval") for r in data.load("task", split, 64, "")]
    longest = max(len(tokenizer(spec.format_prompt(p)).input_ids) for p in prompts)
    device = "gpu" if torch.cuda.is_available() else "cpu"
    cfg = plan.stage_configs(("ppo",), ROOT / "configs", [*args.split(), f"model={model}",
                                                          f"ppo.max_prompt_length={longest}"])["ppo"]
    m = plan.model(str(model))
    launch = plan.launch_from(ROOT / accelerate if accelerate else None, nproc, device)
    return plan.for_stage("ppo", m.shape, launch, plan.workload("ppo", cfg, m, device)).peak / 2**20


def mean_step_s(log: Path) -> float:
    """A PPO step's mean wall time in seconds, from the stage's log (what the allocator's setting costs)."""
    steps = [json.loads(line)["step_s"] for line in log.read_text().splitlines() if line.strip()]
    return round(sum(steps) / len(steps), 2)


def make(target: str, python: str, store: Path, model: Path, args: str, nproc: int = 1, accelerate: str = "",
         env: dict | None = None) -> None:
    command = ["make", "-s", target, f"PY={python}", "INSTALL=", f"STORE={store}", f"MODEL={model}", "RUN=memory",
               f"NPROC={nproc}", f"ARGS={args}", *([f"ACCELERATE_CONFIG={accelerate}"] if accelerate else [])]
    print("[memory] $", *(f"{k}={v}" for k, v in (env or {}).items()), " ".join(command), flush=True)
    out = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, env={**os.environ, **(env or {})})
    if out.returncode != 0:
        sys.exit(f"[memory] {target} failed:\n{(out.stdout + out.stderr)[-3000:]}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--python", default=sys.executable)
    ap.add_argument("--hidden", type=int, default=768)
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--zero", default="configs/accelerate/zero3.yaml", help="the launch file of the several processes")
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--work", default="", help="a folder of an earlier run (llama/, store/ with its sft and rm): "
                    "reused instead of training them again")
    ap.add_argument("--mmap-threshold", type=int, default=2**20, help="bytes: both runs again with every block over "
                    "it mapped on its own (glibc's MALLOC_MMAP_THRESHOLD_); 0: not")
    ap.add_argument("--out", default=str(RESULTS / "memory.json"), help="where the JSON goes")
    a = ap.parse_args()
    work = Path(a.work or tempfile.mkdtemp(prefix="bench-memory-"))
    store = work / "store"
    model = work / "llama" if (work / "llama").is_dir() else build_llama(work / "llama", a.hidden, a.layers)
    common = "threads=1 precision=fp32 limit=64"
    if not (store / "memory" / "rm" / "manifest.json").is_file():
        make("sft", a.python, store, model, f"{common} sft.epochs=1 sft.batch_size=8 "
             "sft.activation_checkpointing=false")
        make("rm", a.python, store, model, f"{common} rm.epochs=1 rm.batch_size=8 rm.activation_checkpointing=false")
    fixed = float(subprocess.run([a.python, "-c", FIXED_COST], cwd=ROOT, capture_output=True, text=True,
                                 check=True).stdout.split()[-1])
    ppo = (f"{common} ppo.steps={a.steps} ppo.batch_size=8 ppo.mini_batch_size=8 ppo.ppo_epochs=1 "
           "ppo.max_new_tokens=8 ppo.eval_every=0 ppo.eval_samples=1 save_every=1000")
    rows, ratios = {}, {}
    heaps = [("", {})] + ([(f", {a.mmap_threshold / 2**20:g} MiB mmap threshold",
                            {"MALLOC_MMAP_THRESHOLD_": str(a.mmap_threshold)})] if a.mmap_threshold else [])
    for heap, env in heaps:
        for name, nproc, accelerate in (("1 process", 1, ""), (f"{a.nproc} processes", a.nproc, a.zero)):
            started = time.time()
            make("ppo", a.python, store, model, f"{ppo} resume=false", nproc, accelerate, env)
            metrics = json.loads((store / "memory" / "ppo" / "manifest.json").read_text())["metrics"]
            peaks = metrics.get("peak_memory_mb_per_process") or [metrics["peak_memory_mb"]]
            rows[name + heap] = {
                "peaks_mb": peaks, "above_fixed_mb": [round(p - fixed, 1) for p in peaks],
                "planned_mb": round(planned_mb(model, f"{ppo} resume=false", nproc, accelerate), 1),
                "zero_stage": metrics["deepspeed_zero_stage"], "seconds": round(time.time() - started, 1),
                "step_s": mean_step_s(store / "memory" / "ppo" / "ppo_log.jsonl"), **env}
        one, several = rows["1 process" + heap], rows[f"{a.nproc} processes{heap}"]
        ratios[heap.lstrip(", ") or "glibc defaults"] = max(several["above_fixed_mb"]) / one["above_fixed_mb"][0]
    ratio = ratios["glibc defaults"]
    print(f"\nPPO, {a.hidden}x{a.layers} LLaMA (fp32), 8 prompts, 8 new tokens, {a.steps} steps; fixed cost of a "
          f"process {fixed:.0f} MB")
    for name, row in rows.items():
        print(f"  {name:12s} ZeRO-{row['zero_stage']}  peak per process {row['peaks_mb']} MB, above the fixed cost "
              f"{row['above_fixed_mb']} MB, planned {row['planned_mb']:.0f} MB "
              f"({row['planned_mb'] / max(row['above_fixed_mb']):.2f}x)  ({row['step_s']} s a step)")
    for heap, r in ratios.items():
        print(f"  largest per-process peak above the fixed cost, {a.nproc} processes / 1 ({heap}): {r:.2f}x")
    for row in rows.values():  # the plan against what was measured, above the fixed cost (what the plan predicts)
        row["planned_over_measured"] = round(row["planned_mb"] / max(row["above_fixed_mb"]), 2)
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"fixed_cost_mb": fixed, "rows": rows, "ratio": ratio, "ratios": ratios,
                               "settings": vars(a), "cpu": os.uname().machine}, indent=1))
    print(f"[memory] wrote {out}")


if __name__ == "__main__":
    main()
