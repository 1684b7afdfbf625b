"""What this machine can do, measured: whether bf16 arithmetic pays here, and how much memory a process has used."""

from __future__ import annotations

import ctypes
import functools
import os
import resource
import time
from pathlib import Path

import torch


def use_bf16(precision: str) -> bool:
    """Whether a stage trains in bf16. 'auto' measures: on a CPU without bf16 units bf16 matmuls run through a
    slow emulation (here 50-100x slower than fp32), on one with them several times faster. Under `accelerate
    launch` the answer also becomes the launch's mixed precision (ACCELERATE_MIXED_PRECISION, which Accelerate
    and the DeepSpeed config read when they start): the stage's precision rules, not the launch file's
    mixed_precision (with which DeepSpeed's trainers refused to start, with a traceback, when the two differed).
    The processes of one launch must agree, and their timings may not: there 'auto' on a CPU takes the launch's
    mixed precision instead of measuring."""
    launched = os.environ.get("ACCELERATE_MIXED_PRECISION")
    if precision != "auto":
        bf16 = precision == "bf16"
    elif torch.cuda.is_available():
        bf16 = torch.cuda.is_bf16_supported()
    elif launched is not None and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        bf16 = launched == "bf16"
    else:
        bf16 = _cpu_bf16_speedup() > 1.5
    if launched is not None:
        os.environ["ACCELERATE_MIXED_PRECISION"] = "bf16" if bf16 else "no"
    return bf16


@functools.cache
def _cpu_bf16_speedup(n: int = 384, rounds: int = 5) -> float:
    """fp32 matmul time / bf16 matmul time on this CPU (about 0.15 s where bf16 is slow, 5 ms where fast). The two
    are timed in turns and the best of each kept: on a CPU shared with other jobs one pair of timings once gave
    0.08 where the ratio is 2 (bf16 units), so a resumed run could train in another precision than its start."""
    g = torch.Generator().manual_seed(0)  # not the global RNG: a stage's sampling must not depend on this probe
    a32, b32 = torch.randn(n, n, generator=g), torch.randn(n, n, generator=g)
    a16, b16 = a32.to(torch.bfloat16), b32.to(torch.bfloat16)
    a32 @ b32, a16 @ b16  # warm-up: library start-up, kernel choice
    best = {torch.float32: float("inf"), torch.bfloat16: float("inf")}
    for _ in range(rounds):
        for a, b in ((a32, b32), (a16, b16)):
            t = time.perf_counter()
            a @ b
            best[a.dtype] = min(best[a.dtype], time.perf_counter() - t)
    return best[torch.float32] / best[torch.bfloat16]


@functools.cache
def _glibc():
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc (macOS, musl): their allocators keep their own policy
        return None


def give_back_freed_memory() -> None:
    """Returns the memory the process has freed to the system (glibc's malloc_trim). glibc serves blocks under a
    threshold that rises to 32 MiB (a small model's tensors, a few MiB each) from its heap, and keeps what is freed
    there resident: what loading, ZeRO-3's gathers and each step's activations free piles up from one phase to the
    next. Called where a phase has freed much (a model loaded, the rollout's gathered policy dropped, an update
    done). PPO on bench/memory.py's 85M LLaMA under ZeRO-3, 2 processes: the peak of a process 4,333 -> about 3,500 MB,
    at the same speed. (A fixed mapping threshold of 4 MiB, MALLOC_MMAP_THRESHOLD_=4194304 in the environment, took
    it to 3,098 MB, but its training took 27% more time: each big block is mapped and zeroed anew.) Tensors over
    32 MiB, most of a real model's, are mapped on their own anyway. A no-op without glibc; on a GPU the CUDA
    allocator's memory is not concerned."""
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)
    if os.environ.get("ALIGNMENT_MEMORY_TRACE"):  # where a stage's memory goes, phase by phase
        _trace_memory()


def _trace_memory() -> None:
    """One line: this process's resident memory now and its peak since the line before, at the caller of
    give_back_freed_memory (ALIGNMENT_MEMORY_TRACE=1 in the environment; Linux). The kernel's peak is reset after
    each line (clear_refs), so a manifest's peak_memory_mb is then the last phase's only."""
    import sys

    status = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line)
    caller = sys._getframe(2)
    where = f"{Path(caller.f_code.co_filename).name}:{caller.f_lineno}"
    resident, peak = (int(status[key].split()[0]) / 1024 for key in ("VmRSS", "VmHWM"))
    print(f"[memory] process {os.environ.get('RANK', '0')} at {where}: resident {resident:,.0f} MB, peak since the "
          f"line before {peak:,.0f} MB", flush=True)
    Path("/proc/self/clear_refs").write_text("5")


def peak_memory_mb() -> float:
    """Peak memory of this process so far: max allocated on the GPU, else the peak resident set size."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB
