"""The bench's arithmetic (the bench itself is run by `make bench`, not by the tests: it times things)."""

import importlib.util
from pathlib import Path

from alignment import registry

ROOT = Path(__file__).resolve().parent.parent


def _bench():
    spec = importlib.util.spec_from_file_location("bench_run", ROOT / "bench" / "run.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_model_flops_per_token_counts_every_multiplying_parameter(tiny_cache):
    path = registry.resolve(registry.get("tiny-llama"))
    d, inner, layers, vocab = 128, 384, 4, 340  # tiny-llama: untied embeddings, 4 attention projections, SwiGLU
    per_layer = 4 * d * d + 3 * d * inner + 2 * d  # attention, MLP, two RMSNorm weights
    multiplying = layers * per_layer + d + vocab * d  # + final norm + LM head; the input embedding is a lookup
    assert _bench().model_flops_per_token(path, mean_length=100) == 6 * multiplying + 12 * layers * d * 100


def test_table_names_every_ratio():
    report = {"matmul_peak_gflops": {"fp32": {"gflops": 150.0}, "bf16": {"gflops": 2.0}},
              "machine": {"threads": 2}, "model": "tiny-llama", "stages": {
                  "sft": {"ours": {"precision": "fp32", "tokens_per_s": 5000.0, "model_gflops": 60.0,
                                   "share_of_matmul_peak": 0.4, "peak_memory_mb": 900},
                          "sft-trl": {"precision": "bf16", "tokens_per_s": 250.0, "model_gflops": 3.0,
                                      "share_of_matmul_peak": 1.5, "peak_memory_mb": 800},
                          "ours/sft-trl": 20.0}}}
    speed = {"episodes": 384, "peak_memory_mb": 1000, "held_out_reward": 0.2, "held_out_kl": 2.0, "reward_gain": 0.1,
             "reward_gain_ci95": [0.0, 0.2], "reward_gain_per_1k_episodes": 0.26}
    report["stages"]["ppo"] = {
        "ppo_epochs": 4, "sft_held_out_reward": 0.1, "ours/trl112": 2.1,
        "ours": {**speed, "episodes_per_s": 6.3, "time_s": {"generate": 6.0, "score": 5.0, "train": 50.0}},
        "trl112": {**speed, "episodes_per_s": 3.0, "time_s": {"generate": 7.0, "score+train+other": 100.0}},
        "ours_minus_trl112_reward": {"mean": -0.05, "ci95": [-0.12, 0.02], "prompts": 311}}
    report["stages"]["dpo"] = {
        "ours": {"precision": "bf16", "samples_per_s": 40.0, "model_gflops": 1.0, "share_of_matmul_peak": 0.5,
                 "peak_memory_mb": 700},
        "dpo-trl": {"precision": "bf16", "samples_per_s": 32.0, "model_gflops": 0.8, "share_of_matmul_peak": 0.4,
                    "peak_memory_mb": 750},
        "ours/dpo-trl": 1.25}
    report["stages"]["grpo"] = {
        "peer": "trl", "sft_held_out_reward": 0.1, "ours/trl": 1.3,
        "ours": {**speed, "episodes_per_s": 13.0, "time_s": {"generate": 6.0, "score": 2.0, "train": 20.0}},
        "trl": {**speed, "episodes_per_s": 10.0, "time_s": {"all": 38.0}},
        "ours_minus_peer_reward": {"mean": 0.01, "ci95": [-0.03, 0.05], "prompts": 311}}
    report["memory"] = {"fixed_cost_mb": 424.0, "ratio": 0.97, "ratios": {"glibc defaults": 0.97,
                                                                         "1 MiB mmap threshold": 0.66},
                        "settings": {"hidden": 768, "layers": 12, "nproc": 2},
                        "rows": {"1 process": {"zero_stage": 0, "above_fixed_mb": [3219.0], "planned_mb": 3244.0},
                                 "2 processes": {"zero_stage": 3, "above_fixed_mb": [2929.0, 3121.0],
                                                 "planned_mb": 2201.0}}}
    table = _bench().format_table(report)
    memory = table[table.index("memory PPO on a 768x12 LLaMA"):].splitlines()
    assert "ZeRO-0 [3219.0] MB, planned 3244 MB (1.01x)" in memory[1]
    assert "ZeRO-3 [2929.0, 3121.0] MB, planned 2201 MB (0.71x)" in memory[2]
    assert "2 processes / 1 process (glibc defaults): 0.97x" in memory[3]
    assert "2 processes / 1 process (1 MiB mmap threshold): 0.66x" in memory[4]
    assert "ours/trl = 20.00x" in table and "40.0%" in table and "5000.0 tokens/s" in table
    assert "ours/trl112 = 2.10x" in table and "paired on the same 311 prompts: -0.050 [-0.120, +0.020]" in table
    dpo = [line for line in table.splitlines() if line.startswith("dpo")]
    assert len(dpo) == 2 and "40.0 pairs/s" in dpo[0] and "ours/trl = 1.25x" in dpo[1]
    grpo = [line for line in table.splitlines() if line.startswith("grpo")]
    assert len(grpo) == 2 and "13.00 episodes/s" in grpo[0] and "ours/trl = 1.30x" in grpo[1]
    assert "ours - trl, paired on the same 311 prompts: +0.010 [-0.030, +0.050]" in table


def test_reward_model_flops_have_a_scalar_head_not_the_lm_head(tiny_cache):
    path = registry.resolve(registry.get("tiny-llama"))
    bench = _bench()
    lm, rm = bench.model_flops_per_token(path, 100), bench.model_flops_per_token(path, 100, reward_model=True)
    assert lm - rm == 6 * (340 * 128 - 128)  # the LM head (vocab x width) against a one-output score head


def test_the_gpu_checks_largest_model_is_the_plans_largest_fit(tiny_cache, tmp_path):
    """bench/gpu_check.py --largest picks, by the memory plan alone (no GPU, no weights), the largest LLaMA shape
    whose SFT, RM and PPO fit: on an 80 GiB GPU with 115 GiB of CPU memory the 3B shape with the optimizer
    offloaded (8B's PPO wants 206 GiB of CPU memory so; with everything offloaded its SFT 125); with 60 GiB of
    CPU memory 3B's PPO (91, or 117 GiB) passes over to 1B; so does a disk too small for its checkpoints and PPO's
    resumable state."""
    from transformers import AutoTokenizer

    from alignment.plan import GiB
    from bench import gpu_check

    tokenizer = AutoTokenizer.from_pretrained(registry.resolve(registry.get("tiny-llama")))

    def choose(cpu, disk=1e15):
        return gpu_check.choose_rung(gpu_check.LADDER, tokenizer, tmp_path, (80 * GiB, cpu * GiB), "gpu", "bf16",
                                     free_disk=disk)

    rung, launch, passed = choose(115)
    assert rung[0] == "3b" and launch.zero == 3 and launch.offload_optimizer and not launch.offload_parameters
    assert list(passed) == ["13b", "8b"]
    assert "ppo with the optimizer offloaded: 75.5 of 80 GiB on the device, 206 of 115 GiB of CPU memory" \
        in passed["8b"]
    assert "sft with everything offloaded" in passed["8b"] and "125 of 115 GiB of CPU memory" in passed["8b"]
    rung, _, passed = choose(60)
    assert rung[0] == "1b" and "ppo with the optimizer offloaded" in passed["3b"]
    rung, _, passed = choose(115, disk=60 * GiB)  # 3B's copies and PPO's state: 123 GiB
    assert rung[0] == "1b" and "want 123 GiB of disk, 60 free" in passed["3b"]
    assert gpu_check.accelerate_file(launch, tmp_path).read_text().count("offload_param_device: none") == 1
