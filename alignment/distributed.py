"""Several processes, with or without DeepSpeed ZeRO: what PPO's own loop needs beyond Accelerate.

The trainers of SFT and the reward model (transformers' Trainer) handle DeepSpeed themselves; PPO's loop
is ours, so here is what it takes to run it under ZeRO-2/3 the way the peers do (TRL, OpenRLHF, DeepSpeed-Chat):
the launcher's DeepSpeed config honoured and sized to the model, the frozen models as partitioned inference
engines of their own under ZeRO-3, the policy alone gathered once for each rollout's generation, equal shares of
held-out work (partitioned forwards are collectives), and a non-finite step refused by all processes together
before DeepSpeed applies it.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import torch
from accelerate import Accelerator, PartialState
from accelerate.utils import broadcast_object_list, gather_object

from alignment.machine import use_bf16


def deepspeed_stage() -> int:
    """The ZeRO stage the launcher configured (accelerate launch sets these variables), 0 without DeepSpeed."""
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() != "true":
        return 0
    return int(os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE", "2"))


def check_final_save(stage: str) -> None:
    """At start-up: under ZeRO-3 a stage publishes whole weights, which DeepSpeed gathers at the end only where its
    config says so (stage3_gather_16bit_weights_on_model_save; Accelerate's zero3_save_16bit_model). A launch file
    that leaves it out gets it set here; a DeepSpeed JSON config that sets it false stops the stage in one line,
    before anything trains (else the run would fail after training, at its save)."""
    if deepspeed_stage() != 3:
        return
    if file := os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE"):
        import json

        zero = json.loads(Path(file).read_text()).get("zero_optimization", {})
        if zero.get("stage3_gather_16bit_weights_on_model_save") in (False, "false", None):
            raise SystemExit(f"{file}: zero_optimization.stage3_gather_16bit_weights_on_model_save must be true under "
                             f"ZeRO-3: the {stage} stage gathers the whole weights at the end to publish them")
        return
    os.environ["ACCELERATE_DEEPSPEED_ZERO3_SAVE_16BIT_MODEL"] = "true"


def make_accelerator(micro_batch_size: int, max_grad_norm: float, precision: str) -> Accelerator:
    """An Accelerator for a loop of our own. Under DeepSpeed its config gets what the loop decides (the micro
    batch: one PPO minibatch; the gradient clipping; bf16 or not, by the stage's precision) and, with bf16,
    ZeRO-1/2's own check that skips a step whose gradients are not finite. Without DeepSpeed on a machine without
    GPUs, cpu=True: otherwise Accelerate treats a multi-process CPU launch as one process (with DeepSpeed cpu=True
    drops the config)."""
    use_bf16(precision)  # decided before the Accelerator reads the launch's mixed precision (see there)
    if not deepspeed_stage():
        return Accelerator(cpu=not torch.cuda.is_available())
    if not torch.cuda.is_available():
        # Accelerate starts DeepSpeed only without cpu=True, and then, with no GPU, counts one process; the
        # process group started first as for a multi-process CPU run (gloo) gives it the right world.
        PartialState(cpu=True)
    accelerator = Accelerator()
    config = accelerator.state.deepspeed_plugin.deepspeed_config
    config["train_micro_batch_size_per_gpu"] = micro_batch_size
    config["train_batch_size"] = micro_batch_size * accelerator.num_processes
    config["gradient_accumulation_steps"] = 1
    config["gradient_clipping"] = max_grad_norm
    if config.get("bf16", {}).get("enabled") in (True, "auto") and accelerator.mixed_precision == "bf16":
        config["bf16"] = {**config["bf16"], "enabled": True, "check_grad_overflow": True}
    return accelerator


def offloads_optimizer(accelerator: Accelerator) -> bool:
    plugin = accelerator.state.deepspeed_plugin
    offload = (plugin.deepspeed_config.get("zero_optimization", {}).get("offload_optimizer") or {}) if plugin else {}
    return offload.get("device", "none") not in ("none", None)


def optimizer(accelerator: Accelerator, parameters: list, learning_rate: float) -> torch.optim.Optimizer:
    """AdamW; DeepSpeed's CPU Adam where ZeRO keeps the optimizer states in CPU memory (it refuses a torch
    optimizer there), built just in time by DeepSpeed the first time."""
    if offloads_optimizer(accelerator):
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam(parameters, lr=learning_rate, eps=1e-5, adamw_mode=True)
    # fused: one kernel for all tensors (on CPU here 5x faster than the per-tensor loop)
    return torch.optim.AdamW(parameters, lr=learning_rate, eps=1e-5, fused=True)


def share_master_weights(model) -> None:
    """Under ZeRO-3 in fp32: one copy of each process's partition of the trained weights, not two. DeepSpeed keeps
    an fp32 master copy of the partition for the optimizer and means to use the partition itself where that is fp32
    already, but its check compares a tensor's device with a device name (never equal, on a CPU or a GPU), so it
    copies: 326 MB more in each process on the 85M LLaMA of bench/memory.py (2 processes). The master copy is given
    the partition's storage here (equal values: it was cloned from it); DeepSpeed's copy from master to partition
    after each step then copies a tensor onto itself. In bf16 the two differ in dtype and both stay."""
    zero = getattr(model, "optimizer", None)
    for partition, master in zip(getattr(zero, "fp16_partitioned_groups_flat", []),
                                 getattr(zero, "fp32_partitioned_groups_flat", [])):
        if (master is not partition and master.dtype == partition.dtype and master.device == partition.device
                and master.shape == partition.shape):
            master.data = partition.data


def release_optimizer_states(optimizer) -> None:
    """Frees the optimizer's moments once training is over (AdamW's two per trained weight, or each process's
    partition of them under ZeRO): the held-out comparison and the save that follow need none, and would otherwise
    add their gathered weights on top of them."""
    while hasattr(optimizer, "optimizer"):  # Accelerate's wrapper, DeepSpeed's ZeRO optimizer, torch's
        optimizer = optimizer.optimizer
    optimizer.state.clear()


def held_share(model) -> float:
    """The share of model's parameter elements this process holds between uses: under ZeRO-3 its partition (a
    parameter small enough to persist counts whole), else all of them."""
    parameters = list(model.parameters())
    if not any(hasattr(p, "ds_numel") for p in parameters):
        return 1.0
    held = sum(p.ds_numel if getattr(p, "ds_persist", False) else p.ds_tensor.numel() for p in parameters)
    return held / max(1, sum(p.ds_numel for p in parameters))


def fit_zero3(accelerator: Accelerator, hidden_size: int) -> None:
    """ZeRO-3's sizes from the model's width, by Accelerate's rule for `auto` (which it cannot apply to a module
    without a config, as forwards.ActorCritic is), where the DeepSpeed config sets none: parameters of under
    10 x hidden elements (the norms) persist whole in every process, all others are partitioned. DeepSpeed's own
    default (1e5 elements) would keep every weight of a small model whole in each process. Call before prepare."""
    if not zero3(accelerator):
        return
    zero = accelerator.state.deepspeed_plugin.deepspeed_config["zero_optimization"]
    for key, value in zero3_sizes(hidden_size).items():
        if zero.get(key, "auto") == "auto":
            zero[key] = value


def zero3_sizes(hidden_size: int) -> dict:
    """ZeRO-3's sizes, in elements, for a model of that width. Accelerate's rule for `auto` (buckets of one h x h
    weight; norms persist whole), and what stays whole at once bounded to about two decoder layers (a layer holds
    about 12 h^2 weights): the parameters gathered in a forward, and the sub-group the optimizer step flattens the
    gradients of (DeepSpeed's defaults, 1e9 each, hold a small model whole, and the step then copies every
    gradient of the partition once more). PPO on the 85M LLaMA of bench/memory.py, 2 processes: peak per process
    3,410 -> 3,142 MB, the scoring phase's 2,975 -> 2,801 MB."""
    return {"reduce_bucket_size": hidden_size * hidden_size,
            "stage3_prefetch_bucket_size": int(0.9 * hidden_size * hidden_size),
            "stage3_param_persistence_threshold": 10 * hidden_size,
            "stage3_max_live_parameters": 24 * hidden_size * hidden_size,
            "stage3_max_reuse_distance": 24 * hidden_size * hidden_size,
            "sub_group_size": 24 * hidden_size * hidden_size}


def zero3(accelerator: Accelerator) -> bool:
    plugin = accelerator.state.deepspeed_plugin
    return plugin is not None and plugin.zero_stage == 3


def frozen(accelerator: Accelerator, model, offload: str = "auto"):
    """A frozen model (loaded partitioned under ZeRO-3) as a DeepSpeed ZeRO-3 inference engine: its parameters stay
    spread over the processes and each layer's are gathered while it runs, as the trained model's are (the peers'
    way: TRL's prepare_deepspeed, OpenRLHF's reference and reward engines, DeepSpeed-Chat's). offload: where the
    parameters live between uses: auto (as the launch file's offload_param), cpu, or none (the accelerator).
    Without ZeRO-3 the model as it is. Every forward through the engine is a collective: all processes must run the
    same number of them."""
    if not zero3(accelerator):
        return model
    import deepspeed

    from alignment.forwards import Frozen

    launched = accelerator.state.deepspeed_plugin.deepspeed_config.get("zero_optimization", {})
    zero = {"stage": 3, **zero3_sizes(model.config.hidden_size)}
    # the launch's sizes where it gives them (a trainer's are still "auto" before it trains: sized from the model)
    zero.update({k: v for k, v in launched.items() if k in zero and isinstance(v, int | float)})
    if offload == "cpu" or (offload == "auto" and (launched.get("offload_param") or {}).get("device") == "cpu"):
        zero["offload_param"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    # in the dtype it was loaded in (the entry's), as without DeepSpeed: a bf16 engine would cast fp32 weights
    dtype = next(model.parameters()).dtype
    config = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1, "zero_optimization": zero,
              "bf16": {"enabled": dtype == torch.bfloat16}, "fp16": {"enabled": dtype == torch.float16}}
    engine, *_ = deepspeed.initialize(model=Frozen(model), config=config)
    engine.eval()
    return engine


@contextlib.contextmanager
def _gathered_unhooked(engine, parameters: list):
    """Under ZeRO-3: parameters (of engine's model) whole in every process, and the engine's partitioning hooks
    removed, for the duration: every forward would otherwise gather every layer again, through collectives that
    all processes must join. Nothing of the model outside parameters may run inside."""
    import deepspeed
    from trl.models.utils import add_hooks, remove_hooks

    with deepspeed.zero.GatheredParameters(parameters):
        remove_hooks(engine)
        try:
            yield
        finally:
            add_hooks(engine)


@contextlib.contextmanager
def whole_model(accelerator: Accelerator, model):
    """A trained model (a trainer's) for inference, each process on its own. Under ZeRO-3 its weights are gathered
    once and its partitioning hooks removed for the duration."""
    if not zero3(accelerator):
        yield accelerator.unwrap_model(model)
        return
    with _gathered_unhooked(model, list(model.parameters())):
        yield accelerator.unwrap_model(model)


@contextlib.contextmanager
def whole_policy(accelerator: Accelerator, model):
    """The trained policy for generation (model: the prepared forwards.ActorCritic), each process on its own. Under
    ZeRO-3 the policy's weights alone are gathered once, never the critic's, and the partitioning hooks removed
    for the duration (_gathered_unhooked); the critic is not to be run inside."""
    policy = accelerator.unwrap_model(model).policy
    training, _ = policy.training, policy.eval()  # (in training mode only under activation checkpointing)
    try:
        if not zero3(accelerator):
            yield policy
            return
        with _gathered_unhooked(model, list(policy.parameters())):
            yield policy
    finally:
        policy.train(training)


def gathered(parameters: list, modifier_rank: int | None = None):
    """Under ZeRO-3 (parameters partitioned, from loading on): the whole tensors for the duration, every process
    calling; with modifier_rank, that process's changes are written back to the shards after. Else nothing to do."""
    if any(hasattr(p, "ds_id") for p in parameters):
        import deepspeed

        return deepspeed.zero.GatheredParameters(parameters, modifier_rank=modifier_rank)
    return contextlib.nullcontext()


def any_process(accelerator: Accelerator, flag: bool) -> bool:
    """Whether flag holds in any process: a decision all processes must take together."""
    if accelerator.num_processes == 1:
        return flag
    return bool(accelerator.reduce(torch.tensor([float(flag)], device=accelerator.device), "sum").item() > 0)


def all_processes_done(accelerator: Accelerator):
    """generate()'s stopping rule for decoding through forwards that communicate: stop when every process is done."""
    return lambda done: not any_process(accelerator, not bool(done.all()))


def every_process(accelerator: Accelerator, value) -> list:
    """value of every process, in process order (a collective: every process calls it)."""
    return gather_object([value]) if accelerator.num_processes > 1 else [value]


def check_shared_store(root) -> None:
    """Every process of the run must see one store: the main process writes a file of a name no run used before
    into its store, and every process looks for that name in the store it was given; where one does not find it
    (a node whose STORE is a folder of its own), every process stops with one line naming that node. (Rank 0
    alone decides what to resume, clear and publish, and every process must then find the same files.) Nothing to
    do in one process."""
    state = PartialState(cpu=not torch.cuda.is_available())
    if state.num_processes == 1:
        return
    import socket
    import uuid

    root = Path(root)
    name = [f".shared-check-{uuid.uuid4().hex}" if state.is_main_process else None]
    if state.is_main_process:
        root.mkdir(parents=True, exist_ok=True)
        (root / name[0]).write_text(socket.gethostname())
    broadcast_object_list(name)
    seen = gather_object([(state.process_index, socket.gethostname(), (root / name[0]).is_file())])
    state.wait_for_everyone()
    if state.is_main_process:
        (root / name[0]).unlink(missing_ok=True)
    blind = [(rank, host) for rank, host, ok in seen if not ok]
    if blind:
        who = ", ".join(f"process {rank} on {host}" for rank, host in blind)
        raise SystemExit(f"the store {root} is not shared: {who} cannot see the file process 0 on {seen[0][1]} wrote "
                         "into its store; every node must reach one store: set STORE= (store=) to a folder on a file "
                         "system all nodes mount (NFS, Lustre, a cloud file share)")


_decisions = iter(range(1 << 62))  # each decision's key in the launch's key-value store, in call order
DECISION_TIMEOUT_S = 6 * 3600  # what the other processes give the main one to decide (a conversion may take long)


def main_decides(decide):
    """decide() run by the main process alone, its result (or the one-line error it raised) given to every
    process: what to resume or clear is decided once, never by each process from what it sees on its own. The
    others wait for it through the launch's key-value store (up to DECISION_TIMEOUT_S: converting a large state
    for another number of processes outlasts a collective's timeout), then take its answer in a broadcast."""
    state = PartialState(cpu=not torch.cuda.is_available())
    if state.num_processes == 1:
        return decide()
    outcome = [None, None]
    if state.is_main_process:
        try:
            outcome[0] = decide()
        except SystemExit as stop:
            outcome[1] = stop.code if isinstance(stop.code, str) else f"stopped (exit code {stop.code})"
        except (OSError, ValueError, LookupError, RuntimeError) as e:  # (an unreadable state, a full disk): every
            # process stops, none waits for ever
            outcome[1] = f"process 0 could not decide what to resume: {type(e).__name__}: {e}".splitlines()[0]
    after_the_main_process(f"alignment/decided-{next(_decisions)}", DECISION_TIMEOUT_S)
    broadcast_object_list(outcome)
    if outcome[1] is not None:
        raise SystemExit(outcome[1])
    return outcome[0]


def after_the_main_process(key: str, timeout_s: float) -> None:
    """Called by every process once the main one is done with something long: the others wait for it (up to
    timeout_s) through the launch's key-value store, the one torch's own barriers wait on, not in a collective,
    whose timeout (10-30 min) a long write or conversion would outlast. key: unique to the call, the same in all."""
    import datetime

    from torch.distributed import distributed_c10d

    store = distributed_c10d._get_default_store()
    if torch.distributed.get_rank() == 0:
        store.set(key, "1")
    else:
        store.wait([key], datetime.timedelta(seconds=timeout_s))


def shared_folder(accelerator: Accelerator, make) -> str:
    """A folder the main process makes (make() -> path), known to every process."""
    path = [str(make()) if accelerator.is_main_process else None]
    if accelerator.num_processes > 1:
        broadcast_object_list(path)
    return path[0]


def on_all(accelerator: Accelerator):
    """evaluation.compare_policies' on_all for a run of several processes: fn(items) -> {key: list per item} run by
    every process on its share of the items, the lists gathered back in order. The shares are made equal by
    repeating a share's last item (its results dropped before gathering): with partitioned models every forward
    is a collective, and a process with one batch more would wait for the others forever."""
    def run(fn, items: list) -> dict:
        n, count, rank = len(items), accelerator.num_processes, accelerator.process_index
        if count == 1 or not items:
            return fn(items)
        size, extra = divmod(n, count)
        start = rank * size + min(rank, extra)
        share = items[start : start + size + (rank < extra)]
        width = size + (extra > 0)
        part = fn(share + [(share or items)[-1]] * (width - len(share)))
        parts = gather_object([{k: v[: len(share)] for k, v in part.items()}])
        return {k: [x for q in parts for x in q[k]] for k in part}
    return run


def skipped_by_deepspeed(model) -> int:
    """Steps DeepSpeed itself skipped for non-finite gradients (its overflow check), 0 without DeepSpeed."""
    return int(getattr(model, "skipped_steps", 0) or 0)


def assert_in_sync(parameters, where: str) -> None:
    """Raises if the processes of a distributed run hold different parameters (a silent DDP failure)."""
    if not torch.distributed.is_available() or not torch.distributed.is_initialized():
        return
    parameters = list(parameters)
    with gathered(parameters):
        checksum = torch.stack([p.detach().double().sum() for p in parameters]).sum().reshape(1)
    sums = [torch.zeros_like(checksum) for _ in range(torch.distributed.get_world_size())]
    torch.distributed.all_gather(sums, checksum)
    if any(not torch.equal(g, sums[0]) for g in sums):
        raise RuntimeError(f"{where}: processes hold different parameters: {[g.item() for g in sums]}")
    print(f"[sync] {where}: {len(sums)} processes hold identical parameters (checksum {checksum.item():.6f})")
