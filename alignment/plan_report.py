"""The memory plan as text (alignment/plan.py counts): `make plan`'s report of each stage, with the first change
that makes it fit, and the table of docs/memory-plan.md (`make plan TABLE=1`)."""

from __future__ import annotations

import math
from pathlib import Path

from alignment import plan
from alignment.plan import (
    HELD,
    PHASES,
    RL_STAGES,
    Fit,
    GiB,
    Launch,
    Plan,
    Setup,
    Shape,
    Workload,
)


def launch_text(launch: Launch) -> str:
    """The launch file that gives launch."""
    if launch.zero == 3 and launch.offload_parameters:
        return "ACCELERATE_CONFIG=configs/accelerate/zero3_offload.yaml"
    if launch.zero and launch.offload_optimizer:
        return f"ACCELERATE_CONFIG=<configs/accelerate/zero{launch.zero}.yaml with offload_optimizer_device: cpu>"
    if launch.zero:
        return f"ACCELERATE_CONFIG=configs/accelerate/zero{launch.zero}.yaml"
    return "ACCELERATE_CONFIG=" + ("configs/accelerate/ddp.yaml" if launch.processes > 1 else "(none)")


def changes_text(given: Setup, found: Setup) -> list[str]:
    """The make variable and the config keys that turn given into found."""
    out = [launch_text(found.launch)] if found.launch != given.launch else []
    a, b, stage = given.work, found.work, given.work.stage
    keys = [("lora.enabled=true", b.lora and not a.lora),
            (f"quantization={b.quantization}", b.quantization != a.quantization),
            (f"compute_dtype={b.compute_dtype}", b.compute_dtype != a.compute_dtype),
            (f"{stage}.activation_checkpointing=true", b.activation_checkpointing and not a.activation_checkpointing)]
    out += [key for key, changed in keys if changed]
    if b.micro_batch != a.micro_batch:
        if stage in RL_STAGES:
            out.append(f"{stage}.mini_batch_size={b.micro_batch}")
        else:
            out.append(f"{stage}.batch_size={b.micro_batch} {stage}.gradient_accumulation_steps={b.accumulation}")
    return out


def setup_text(setup: Setup) -> str:
    """A setup in a few words: full parameters, LoRA or 4-bit QLoRA; the ZeRO stage; the offload."""
    w, launch = setup.work, setup.launch
    what = "4-bit QLoRA" if w.quantization == "4bit" else f"{w.quantization} LoRA" if w.quantization else \
        "LoRA" if w.lora else "full"
    if launch.zero:
        how = f"ZeRO-{launch.zero}" + (" + offload" if launch.offload_parameters else
                                       " + optimizer offload" if launch.offload_optimizer else "")
    else:
        how = "DDP" if launch.processes > 1 else "1 process"
    return f"{what}, {how}"


def report(stage: str, shape: Shape, setup: Setup, budget: float, fixed: float, host_budget: float = math.inf) -> str:
    """One stage: its items by phase, the peak, whether it fits (on the device, and in host_budget of CPU memory
    what is offloaded) and, if not, the first change that makes it fit (planned again with it: what that changes)
    or what stands in the way of every route."""
    given = plan.plan_of(stage, shape, setup)
    found = plan.first_fit(stage, shape, setup, budget, fixed, host_budget)
    verdict = "fits" if found.fits and not found.change else "does not fit"
    lines = [f"{stage}: {_workload_text(setup.work)}", *_items_text(given),
             (f"  {'peak':44s} {given.peak / GiB:8.2f} GiB ({given.peak_phase}) + fixed {fixed / GiB:.2f} = "
              f"{(given.peak + fixed) / GiB:.2f} of {budget / GiB:.0f} GiB: {verdict}{_host_text(given, host_budget)}")]
    if plan.refused(setup.launch, setup.work):
        lines.append(f"  the stage stops at start-up: {plan.refused(setup.launch, setup.work)}")
    if found.fits and found.change:
        lines.append(f"  first fix ({found.change}): {' '.join(changes_text(setup, found.setup))} -> "
                     f"{setup_text(found.setup)}, peak {found.plan.peak / GiB:.2f} GiB ({found.plan.peak_phase}) + "
                     f"fixed {fixed / GiB:.2f}: fits{_host_text(found.plan, host_budget)}; what it changes:")
        lines += ["  " + line for line in _items_text(found.plan, changed_from=given)]
    elif not found.fits:
        lines.append("  nothing fits; at the lightest of each route:")
        lines += [f"    {b.route}: {b.text}" for b in found.why_not]
    return "\n".join(lines)


def _host_text(p: Plan, host_budget: float = math.inf) -> str:
    if not p.host:
        return ""
    if math.isinf(host_budget):
        return f"; CPU memory {p.host / GiB:.1f} GiB a process (offloaded)"
    return (f"; CPU memory {p.host / GiB:.1f} of {host_budget / GiB:g} GiB a process (offloaded)"
            + (": more than there is" if p.host > host_budget else ""))


def _workload_text(w: Workload) -> str:
    parts = ["bf16" if w.bf16 else "fp32", "LoRA" if w.lora else "full parameters"]
    parts += [w.quantization] if w.quantization else []
    if w.stage in RL_STAGES:
        parts.append(f"{w.rollout_rows} rows generated of {w.prompt_tokens} + {w.new_tokens} tokens, "
                     f"mini_batch_size {w.micro_batch}")
    else:
        parts.append(f"batch_size {w.micro_batch} {'pairs' if w.rows_per_example == 2 else 'sequences'} of "
                     f"{w.width} tokens")
    parts.append("activation checkpointing" if w.activation_checkpointing else "no activation checkpointing")
    return ", ".join(parts)


def _items_text(p: Plan, changed_from: Plan | None = None) -> list[str]:
    """The items by phase; with changed_from, only those that differ from its (and those it had that p has not)."""
    before = {(i.name, i.phase): (i.bytes, i.host) for i in changed_from.items} if changed_from else {}
    now = {(i.name, i.phase) for i in p.items}
    gone = [i._replace(bytes=0.0, note="none now") for i in (changed_from.items if changed_from else [])
            if (i.name, i.phase) not in now]
    lines = []
    for phase in (HELD, *PHASES):
        items = [i for i in p.items if i.phase == phase and before.get((i.name, i.phase)) != (i.bytes, i.host)]
        items += [i for i in gone if i.phase == phase]
        if not items:
            continue
        lines.append(f"  {phase}" + (" (the peak)" if phase == p.peak_phase else ""))
        for i in items:
            where = " [CPU]" if i.host and p.launch.device == "gpu" else ""
            lines.append(f"    {i.name + where:42s} {i.bytes / GiB:8.2f} GiB  {i.note}")
    return lines


def header(name: str, shape: Shape, launch: Launch, budget: float, fixed: tuple[float, str]) -> str:
    how = f"DeepSpeed ZeRO-{launch.zero}" if launch.zero else "DDP" if launch.processes > 1 else "no DeepSpeed"
    offload = [what for what, on in (("optimizer", launch.offload_optimizer),
                                     ("parameters", launch.offload_parameters)) if on]
    return (f"Memory plan: {name}, {plan.count_text(shape.lm_parameters)} parameters (as a reward model or critic "
            f"{plan.count_text(shape.classifier_parameters)}); {launch.processes} process(es) on "
            f"{launch.device.upper()}, {how}" + (f", {' and '.join(offload)} offloaded to CPU" if offload else "")
            + f"; {budget / GiB:.0f} GiB a process\n"
            f"Fixed cost of a process, not in the figures below: {fixed[0] / GiB:.2f} GiB, {fixed[1]}.")


TABLE_MODELS = ("llama-3.2-1b-instruct", "llama-3-8b-instruct", "llama-2-13b", "llama-3-70b-instruct")
TABLE_PROCESSES = (1, 8, 16, 64)
TABLE_STAGES = ("sft", "rm", "ppo", "grpo", "dpo")  # RLOO and REINFORCE++ hold what GRPO holds, at their own batch


def table(configs: str | Path = plan.ROOT / "configs", budget: float = 80 * GiB, overrides: list[str] = (),
          host_budget: float = math.inf) -> str:
    """A markdown table: for each model and number of GPUs, each stage's lightest setup that fits
    (plan.lightest_fit; what it offloads within host_budget of CPU memory a process) with its peak per GPU, or what
    stands in the way."""
    cfgs = plan.stage_configs(TABLE_STAGES, configs, list(overrides))
    lines = ["| model | GPUs | " + " | ".join(TABLE_STAGES) + " |", "|---|---|" + "---|" * len(TABLE_STAGES)]
    for name in TABLE_MODELS:
        m = plan.model(name)
        for n in TABLE_PROCESSES:
            cells = []
            for stage in TABLE_STAGES:
                setup = Setup(Launch(n), plan.workload(stage, cfgs[stage], m))
                found = plan.lightest_fit(stage, m.shape, setup, budget, plan.CUDA_CONTEXT, host_budget)
                cells.append(_cell(found, setup))
            lines.append(f"| {name} ({plan.count_text(m.shape.lm_parameters)}) | {n} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _cell(found: Fit, given: Setup) -> str:
    if not found.fits:
        return "no: " + "; ".join(b.short for b in found.why_not)
    settings = [c for c in changes_text(given, found.setup) if c.startswith(f"{given.work.stage}.")]
    host = f", CPU {found.plan.host / GiB:.0f} GiB" if found.plan.host else ""
    return (f"{setup_text(found.setup)}" + (f" ({', '.join(settings)})" if settings else "")
            + f": {found.plan.peak / GiB:.0f} GiB{host}")


def main(processes: int, accelerate_config: str, gpu_memory: float, configs: str, device: str,
         stages: tuple[str, ...], overrides: list[str], cpu_memory: float = math.inf) -> None:
    """`make plan`: the header, then each stage's report (cpu_memory: GiB of CPU memory a process may fill with
    what it offloads; infinite: not checked)."""
    launch = plan.launch_from(accelerate_config, processes, device)
    cfgs = plan.stage_configs(stages, configs, overrides)
    m = plan.model(cfgs[stages[0]].model)
    fixed = plan.fixed_cost(device)
    print(header(m.name, m.shape, launch, gpu_memory * GiB, fixed))
    for stage in stages:
        setup = Setup(launch, plan.workload(stage, cfgs[stage], m, device))
        print(f"\n{report(stage, m.shape, setup, gpu_memory * GiB, fixed[0], cpu_memory * GiB)}")
