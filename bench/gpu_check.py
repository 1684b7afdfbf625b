"""The GPU check: on a CUDA machine, what the CPU tests cannot show. One command, about 8 minutes on an H100/H200:

    make gpu-check                                    (here: .venv/bin/python -m bench.gpu_check)
    PYTHONPATH=/tmp/site:. python3 -m bench.gpu_check --python python3 --peer-site /tmp/trl112

(the second where the packages travel as wheels: bench/gpu_wheels.sh makes them and says how to install them.)

1. the bf16 matmul peak of this GPU, measured; 2. the test suite on the GPU; 3. every stage under DeepSpeed
ZeRO-2 and ZeRO-3 (one process) and QLoRA 4-bit and 8-bit, on the tiny model; 4. a ~0.5B LLaMA built from
config (bf16 weights, as a real model's checkpoint) through SFT, RM, PPO, DPO and GRPO: tokens/s and model FLOP
utilisation against the measured peak, PPO's and GRPO's episodes/s with their time split and skipped updates,
the reward before and after; 5. TRL 1.12's PPOTrainer in bf16 on the same PPO work (needs --peer-site: a folder
where TRL 1.12 is installed, e.g. `pip install --target`), and the ratio of episodes/s. Prints a summary; writes it as
JSON to --out (default bench/results/gpu_check.json). Nothing is downloaded. --smoke runs every step at a
toy size (on a CPU too), to check the script itself; --stages picks stage 3's methods (sft and rm always run).

--largest instead (a run of its own, a few minutes plus the model's loading): the largest LLaMA shape of a ladder
(1B to 13B, vocabulary 128,256, random bf16 weights built from config) whose SFT, RM and full-parameter PPO the
memory plan says fit this one GPU under ZeRO-3 with the optimizer offloaded, or else with the parameters too
(configs/accelerate/zero3_offload.yaml), within this machine's CPU memory and disk; then one step of each, and
every stage's measured peak beside the plan's figure (their manifests hold both).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

from bench.run import model_flops_per_token

ROOT = Path(__file__).resolve().parent.parent

TINY = {
    "sft": "limit=64 sft.epochs=1 sft.batch_size=16",
    "rm": "limit=64 rm.epochs=1 rm.batch_size=16",
    "ppo": "limit=64 ppo.steps=2 ppo.batch_size=8 ppo.mini_batch_size=4 ppo.ppo_epochs=1 ppo.max_new_tokens=8 "
    "ppo.eval_samples=1 ppo.eval_every=0",
    "dpo": "limit=64 dpo.epochs=1 dpo.batch_size=8 dpo.eval_every=4 dpo.eval_prompts=8 dpo.eval_samples=1 "
    "dpo.max_new_tokens=8",
    "grpo": "limit=64 grpo.steps=2 grpo.batch_size=4 grpo.group_size=4 grpo.mini_batch_size=8 grpo.max_new_tokens=8 "
    "grpo.eval_every=1 grpo.eval_prompts=8 grpo.eval_samples=1",
}


def cuda_peak(dtype=torch.bfloat16, n: int = 8192) -> float:
    """Best TFLOP/s of an n x n matmul on the GPU (the denominator of model FLOP utilisation)."""
    a, b = torch.randn(n, n, device="cuda", dtype=dtype), torch.randn(n, n, device="cuda", dtype=dtype)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    best = float("inf")
    for _ in range(10):
        t = time.perf_counter()
        a @ b
        torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best / 1e12


def step(name: str, cmd: list[str], results: dict, log_dir: Path, env: dict | None = None, timeout: int = 600) -> bool:
    """cmd, its output to log_dir/<name>.log; past timeout seconds it and every process it started are stopped (a
    failed step), so that the summary is still written."""
    import signal

    log = log_dir / f"{name}.log"
    started = time.time()
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, start_new_session=True,
                                env={**os.environ, "TOKENIZERS_PARALLELISM": "false", **(env or {})})
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # make, accelerate and the stage's processes alike
            proc.wait()
            f.write(f"\n[gpu-check] stopped after {timeout} s\n")
    ok = proc.returncode == 0
    results["steps"][name] = {"ok": ok, "seconds": round(time.time() - started, 1)}
    print(f"[gpu-check] {'ok  ' if ok else 'FAIL'} {name} ({time.time() - started:.0f} s; log {log})", flush=True)
    if not ok:
        print(log.read_text()[-2500:])
    return ok


def build_half_billion_llama(folder: Path, tokenizer_from: Path, smoke: bool) -> Path:
    """A LLaMA of ~0.46B parameters (hidden 1536, 16 layers) with random weights saved in bf16, and the tiny
    model's tokenizer: MODEL=<folder> takes the llama family's settings."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_from)
    rung = SMOKE_LADDER[-1] if smoke else ("0.5b", 1536, 4096, 16, 12, 12)
    return build_llama(rung, folder, tokenizer, torch.cuda.is_available(), vocab=len(tokenizer))


# LLaMA shapes, largest first: hidden, intermediate, layers, attention heads, key-value heads (LLaMA-2-13B, LLaMA-3-8B,
# LLaMA-3.2-3B, LLaMA-3.2-1B); the vocabulary is LLaMA-3's, of which the tiny tokenizer uses the first rows
LADDER = (("13b", 5120, 13824, 40, 40, 40), ("8b", 4096, 14336, 32, 32, 8), ("3b", 3072, 8192, 28, 24, 8),
          ("1b", 2048, 8192, 16, 32, 8))
SMOKE_LADDER = (("toy-256", 256, 512, 2, 4, 4), ("toy-128", 128, 384, 2, 4, 4))
VOCAB = 128256
LARGEST_STAGES = ("sft", "rm", "ppo")
LARGEST_ARGS = {  # one optimizer step each: what is measured is the memory of a step, not what it learns
    "sft": "limit=16 sft.epochs=1 sft.batch_size=8 sft.max_length=256",
    "rm": "limit=16 rm.epochs=1 rm.batch_size=8 rm.max_length=256",
    "ppo": "limit=16 ppo.steps=1 ppo.batch_size=8 ppo.mini_batch_size=4 ppo.ppo_epochs=1 ppo.max_new_tokens=16 "
           "ppo.max_prompt_length=64 ppo.eval_every=0 ppo.eval_samples=1 ppo.activation_checkpointing=true",
}
OFFLOAD = ROOT / "configs" / "accelerate" / "zero3_offload.yaml"


def llama_config(rung: tuple, tokenizer, vocab: int):
    from transformers import LlamaConfig

    _, hidden, intermediate, layers, heads, kv_heads = rung
    return LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate,
                       num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                       max_position_embeddings=1024, bos_token_id=tokenizer.bos_token_id,
                       eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                       tie_word_embeddings=False, dtype="bfloat16")


def machine_budgets(cuda: bool) -> tuple[float, float, str]:
    """Bytes of GPU memory (on a CPU: the memory the smoke run may use), of CPU memory, and the device's name."""
    with open("/proc/meminfo") as f:
        cpu = int(next(line for line in f if line.startswith("MemTotal")).split()[1]) * 1024
    if cuda:
        return torch.cuda.get_device_properties(0).total_memory, 0.9 * cpu, torch.cuda.get_device_name()
    return 0.5 * cpu, 0.5 * cpu, "cpu"


def choose_rung(ladder: tuple, tokenizer, work: Path, budgets: tuple[float, float], device: str,
                precision: str, free_disk: float | None = None) -> tuple[tuple | None, object, dict]:
    """The largest rung whose every stage the plan says fits under ZeRO-3 with the optimizer offloaded, or failing
    that with the parameters offloaded too (device memory, and CPU memory for what is offloaded), and whose
    checkpoints and PPO's resumable state fit the disk. -> (rung, its plan.Launch, why
    each larger one was passed over); (None, None, ...) where none fits. free_disk: bytes (default: measured)."""
    import shutil

    from alignment import plan

    gpu, cpu = budgets
    fixed = plan.CUDA_CONTEXT if device == "gpu" else plan.fixed_cost("cpu")[0]
    passed = {}
    for rung in ladder:
        folder = work / f"plan-{rung[0]}"
        llama_config(rung, tokenizer, VOCAB if device == "gpu" else len(tokenizer)).save_pretrained(folder)
        m = plan.model(str(folder))
        # five bf16 copies (base, SFT, RM, PPO's policy and critic), and PPO's resumable state of its last step,
        # kept until it publishes: the trained models' fp32 weights, Adam's two moments and bf16 weights
        disk = 5 * 2 * m.shape.lm_parameters + 14 * (m.shape.lm_parameters + m.shape.classifier_parameters)
        free = shutil.disk_usage(work).free if free_disk is None else free_disk
        if disk > free:
            passed[rung[0]] = (f"its checkpoints and PPO's resumable state want {disk / plan.GiB:.0f} GiB of disk, "
                               f"{free / plan.GiB:.0f} free")
            continue
        why = []
        for launch in (plan.Launch(1, 3, True, False, device), plan.Launch(1, 3, True, True, device)):
            for stage in LARGEST_STAGES:
                cfg = plan.stage_configs((stage,), ROOT / "configs", [f"model={folder}", f"precision={precision}",
                                                                       *LARGEST_ARGS[stage].split()])[stage]
                p = plan.plan_of(stage, m.shape, plan.Setup(launch, plan.workload(stage, cfg, m, device)))
                if not plan.fits(p, gpu, fixed, cpu):
                    why.append(f"{stage} with {'everything' if launch.offload_parameters else 'the optimizer'} "
                               f"offloaded: {(p.peak + fixed) / plan.GiB:.1f} of {gpu / plan.GiB:.0f} GiB on the "
                               f"device, {p.host / plan.GiB:.0f} of {cpu / plan.GiB:.0f} GiB of CPU memory")
                    break
            else:
                return rung, launch, passed
        passed[rung[0]] = "; ".join(why)
    return None, None, passed


def accelerate_file(launch, work: Path) -> Path:
    """configs/accelerate/zero3_offload.yaml, with the parameters kept on the GPU where the launch does not offload
    them."""
    import yaml

    config = yaml.safe_load(OFFLOAD.read_text())
    config["num_processes"] = 1
    if not launch.offload_parameters:
        config["deepspeed_config"]["offload_param_device"] = "none"
    path = work / ("zero3_offload.yaml" if launch.offload_parameters else "zero3_offload_optimizer.yaml")
    path.write_text(yaml.safe_dump(config))
    return path


def build_llama(rung: tuple, folder: Path, tokenizer, cuda: bool, vocab: int | None = None) -> Path:
    """The rung's LLaMA with random weights, built on the GPU where there is one, saved in bf16 with the tokenizer;
    its vocabulary LLaMA-3's on a GPU, the tokenizer's on a CPU, unless given."""
    from transformers import LlamaForCausalLM

    config = llama_config(rung, tokenizer, vocab or (VOCAB if cuda else len(tokenizer)))
    torch.manual_seed(0)
    with torch.device("cuda" if cuda else "cpu"):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    del model
    if cuda:
        torch.cuda.empty_cache()
    return folder


def largest(a, cuda: bool, work: Path, results: dict) -> None:
    """--largest: the rung the plan picks, then one step of SFT, RM and PPO under ZeRO-3 with what the plan offloads,
    each stage's measured peak beside the plan's."""
    from transformers import AutoTokenizer

    from alignment import registry
    from alignment.store import Store

    tokenizer = AutoTokenizer.from_pretrained(registry.resolve(registry.get("tiny-llama")))
    gpu, cpu, name = machine_budgets(cuda)
    precision = "bf16" if cuda else "fp32"
    rung, launch, passed = choose_rung(SMOKE_LADDER if a.smoke else LADDER, tokenizer, work,
                                       (gpu, cpu), "gpu" if cuda else "cpu", precision)
    results["largest"] = {"device": name, "gpu_memory_gib": round(gpu / 2**30, 1),
                          "cpu_memory_gib": round(cpu / 2**30, 1), "passed_over": passed}
    for size, why in passed.items():
        print(f"[gpu-check] largest: {size} passed over: {why}", flush=True)
    if rung is None:
        print("[gpu-check] largest: no rung of the ladder fits this machine by the plan", flush=True)
        return
    folder = build_llama(rung, work / f"llama-{rung[0]}", tokenizer, cuda)
    store, run = work / "store", f"largest-{rung[0]}"
    launch_file = accelerate_file(launch, work)
    results["largest"]["offloaded"] = "optimizer and parameters" if launch.offload_parameters else "optimizer"
    print(f"[gpu-check] largest: {rung[0]} under ZeRO-3, {results['largest']['offloaded']} offloaded", flush=True)
    make = ["make", "-s", f"PY={a.python}", "INSTALL=", f"STORE={store}", f"ACCELERATE_CONFIG={launch_file}"]
    for stage in LARGEST_STAGES:
        args = f"{LARGEST_ARGS[stage]} precision={precision}"
        if not step(f"largest-{rung[0]}-{stage}", [*make, stage, f"MODEL={folder}", f"RUN={run}", f"ARGS={args}"],
                    results, work, timeout=900):
            break
    s = Store(store)
    out = results["largest"]
    out["model"] = {"name": rung[0], "hidden": rung[1], "layers": rung[3], "folder": str(folder)}
    for stage in LARGEST_STAGES:
        if not results["steps"].get(f"largest-{rung[0]}-{stage}", {}).get("ok"):  # (reported by step())
            continue
        m = s.get(run, stage).metrics
        measured, planned = m.get("peak_memory_mb"), m.get("planned_peak_mb")
        out[stage] = {"peak_memory_mb": measured, "planned_peak_mb": planned,
                      "measured_over_planned": round(measured / planned, 2) if measured and planned else None}
        how = "the CUDA allocator's" if cuda else "resident memory, the fixed cost of a process included"
        print(f"[gpu-check] largest {rung[0]} {stage}: measured peak {measured} MB ({how}), planned {planned} MB",
              flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--python", default=sys.executable, help="the interpreter the stages run with")
    ap.add_argument("--peer-site", default="", help="a folder holding TRL 1.12 (for its PPOTrainer)")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "gpu_check.json"))
    ap.add_argument("--smoke", action="store_true", help="every step at a toy size, to check this script")
    ap.add_argument("--skip-tests", action="store_true")
    ap.add_argument("--stages", default="ppo,dpo,grpo", help="stage-3 methods to run after sft and rm")
    ap.add_argument("--modes", default="zero2,zero3,4bit,8bit", help="how step 3 runs the tiny model's stages")
    ap.add_argument("--largest", action="store_true", help="only the largest model whose PPO the plan says fits "
                    "this GPU under ZeRO-3 with offload, and its measured peaks beside the plan's")
    a = ap.parse_args()
    stages = ["sft", "rm", *a.stages.split(",")]
    cuda = torch.cuda.is_available()
    if not cuda and not a.smoke:
        raise SystemExit("gpu-check: no CUDA device here (--smoke runs the steps at a toy size on a CPU)")
    work = Path(os.environ.get("GPU_CHECK_WORK", "/tmp/gpu-check"))
    work.mkdir(parents=True, exist_ok=True)
    store = work / "store"
    results = {"device": torch.cuda.get_device_name() if cuda else "cpu", "torch": torch.__version__, "steps": {}}
    make = ["make", "-s", f"PY={a.python}", "INSTALL=", f"STORE={store}"]
    if a.largest:
        largest(a, cuda, work, results)
        finish(results, a.out)

    # 1. the matmul peak, measured here
    results["bf16_peak_tflops"] = round(cuda_peak(), 1) if cuda else None
    print(f"[gpu-check] {results['device']}: bf16 matmul peak {results['bf16_peak_tflops']} TFLOP/s", flush=True)

    # 2. the test suite, on the GPU
    if not a.skip_tests:
        xdist = ["-n", "8"] if subprocess.run([a.python, "-c", "import xdist"]).returncode == 0 else []
        # (tests/test_distributed.py starts 2 processes: on one GPU NCCL refuses two ranks; step 3 covers DeepSpeed)
        step("tests", [a.python, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *xdist,
                       "--ignore=tests/test_distributed.py", *(["tests/test_ppo_math.py"] if a.smoke else [])],
             results, work, timeout=400)

    # 3. every stage under ZeRO-2 and ZeRO-3, one process; QLoRA 4-bit and 8-bit
    modes = a.modes.split(",") if a.modes else []
    for zero in [m for m in modes if m.startswith("zero")]:
        for stage in stages:
            step(
                f"{stage}-{zero}",
                [
                    *make,
                    stage,
                    f"RUN=tiny-{zero}",
                    f"ACCELERATE_CONFIG=configs/accelerate/{zero}.yaml",
                    f"ARGS={TINY[stage]}",
                ],
                results,
                work,
            )
    for bits in [m for m in modes if m.endswith("bit")]:
        for stage in stages:
            args = f"ARGS={TINY[stage]} quantization={bits} lora.enabled=true compute_dtype=bfloat16"
            step(f"{stage}-qlora-{bits}", [*make, stage, f"RUN=tiny-{bits}", args], results, work)

    # 4. a ~0.5B LLaMA, bf16 weights, through SFT, RM and each method of stage 3
    from alignment import registry

    tiny = registry.resolve(registry.get("tiny-llama"))
    folder = build_half_billion_llama(work / "llama-0.5b", tiny, a.smoke)
    big = "limit=256" if a.smoke else "limit=4096"
    sft = f"{big} sft.epochs=1 sft.batch_size=64 sft.learning_rate=2e-5 sft.max_length=512 precision=bf16"
    rm = f"{big} rm.epochs=1 rm.batch_size=32 rm.learning_rate=1e-5 precision=bf16"
    ppo = (
        f"{big} ppo.steps={2 if a.smoke else 12} ppo.batch_size=64 ppo.mini_batch_size=16 ppo.ppo_epochs=4 "
        "ppo.max_new_tokens=32 ppo.learning_rate=1e-6 ppo.kl_coef=0.1 ppo.eval_every=0 ppo.eval_samples=1 "
        "precision=bf16"
    )
    dpo = (f"{big} dpo.epochs=1 dpo.batch_size=16 dpo.learning_rate=5e-7 dpo.max_length=512 dpo.eval_every=0 "
           "dpo.eval_samples=1 dpo.max_new_tokens=32 precision=bf16")
    grpo = (f"{big} grpo.steps={2 if a.smoke else 12} grpo.batch_size=16 grpo.group_size=8 grpo.mini_batch_size=32 "
            "grpo.max_new_tokens=32 grpo.learning_rate=1e-6 grpo.eval_every=0 grpo.eval_samples=1 precision=bf16")
    settings = {"sft": sft, "rm": rm, "ppo": ppo, "dpo": dpo, "grpo": grpo}
    for stage in stages:
        args = settings[stage]
        if not step(
            f"0.5b-{stage}", [*make, stage, f"MODEL={folder}", "RUN=llama-0.5b", f"ARGS={args}"], results, work
        ):
            break
    from alignment.store import Store

    s = Store(store)
    try:
        for stage in ("sft", "rm"):
            m = s.get("llama-0.5b", stage).metrics
            tokens_s = m["tokens_per_s"]
            length = m["train_tokens"] / max(m["train_runtime_s"] * m["samples_per_s"], 1)
            flops = model_flops_per_token(folder, length, reward_model=stage == "rm") * tokens_s
            results[f"0.5b_{stage}"] = {"tokens_per_s": tokens_s, "peak_memory_mb": m["peak_memory_mb"],
                                        "mfu": round(flops / 1e12 / results["bf16_peak_tflops"], 3) if cuda else None}
        if "dpo" in stages:  # a pair is two sequences; the reference forward adds 2 FLOPs per parameter to 6
            m = s.get("llama-0.5b", "dpo").metrics
            length = m["train_tokens"] / max(2 * m["train_runtime_s"] * m["samples_per_s"], 1)
            flops = 8 / 6 * model_flops_per_token(folder, length) * m["tokens_per_s"]
            results["0.5b_dpo"] = {"tokens_per_s": m["tokens_per_s"], "pairs_per_s": m["samples_per_s"],
                                   "peak_memory_mb": m["peak_memory_mb"], "skipped_non_finite": m["skipped_non_finite"],
                                   "mfu": round(flops / 1e12 / results["bf16_peak_tflops"], 3) if cuda else None,
                                   "reward": m["sampled"]["reward"]}
        for method in ("ppo", "grpo"):
            if method in stages:
                m = s.get("llama-0.5b", method).metrics
                results[f"0.5b_{method}"] = {k: m[k] for k in ("episodes_per_s", "time_s", "skipped_non_finite",
                                                               "peak_memory_mb")}
                results[f"0.5b_{method}"]["reward"] = m["sampled"]["reward"]
    except Exception as e:  # noqa: BLE001 - a failed stage was reported above
        print(f"[gpu-check] no 0.5B figures: {e}")

    # 5. TRL 1.12's PPOTrainer in bf16 on the same work
    if a.peer_site and "0.5b_ppo" in results:
        from alignment import data, loading

        spec = registry.get(str(folder))
        tokenizer = loading.load_tokenizer(s.get("llama-0.5b", "sft").path, spec)
        prompts = [spec.format_prompt(r["prompt"]) for r in data.load("task", "prompts_train", 4096)]
        (work / "prompts.json").write_text(json.dumps(tokenizer(prompts).input_ids))
        steps = 2 if a.smoke else 12
        if step(
            "0.5b-ppo-trl112",
            [
                a.python,
                "bench/peers/trl112_ppo.py",
                "--sft",
                str(s.get("llama-0.5b", "sft").path),
                "--rm",
                str(s.get("llama-0.5b", "rm").path),
                "--prompts",
                str(work / "prompts.json"),
                "--out",
                str(work / "trl112"),
                "--steps",
                str(steps),
                "--batch",
                "64",
                "--mini-batch",
                "16",
                "--epochs",
                "4",
                "--response-length",
                "32",
                "--lr",
                "1e-6",
                "--kl-coef",
                "0.1",
                "--seed",
                "0",
                "--bf16",
            ],
            results,
            work,
            env={"PYTHONPATH": os.pathsep.join([a.peer_site, str(ROOT), os.environ.get("PYTHONPATH", "")])},
        ):
            peer = json.loads((work / "trl112" / "bench.json").read_text())
            results["0.5b_ppo_trl112"] = peer
            results["0.5b_ppo"]["vs_trl112"] = round(results["0.5b_ppo"]["episodes_per_s"] / peer["episodes_per_s"], 2)

    finish(results, a.out)


def finish(results: dict, out: str) -> None:
    """The summary printed and written as JSON; exit 1 where a step failed."""
    results["all_ok"] = all(v["ok"] for v in results["steps"].values()) and bool(results["steps"])
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps(results, indent=1))
    print(json.dumps({k: v for k, v in results.items() if k != "steps"}, indent=1))
    print(f"[gpu-check] {'all green' if results['all_ok'] else 'FAILED'}; {out}")
    sys.exit(0 if results["all_ok"] else 1)


if __name__ == "__main__":
    main()
