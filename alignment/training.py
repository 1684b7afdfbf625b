"""What keeps a long training alive: resuming after a kill, and skipping non-finite steps; and what the stages
run by a TRL trainer share: their arguments (trainer_config), callbacks (guarded), start (train) and end (publish).

The SFT, reward-model and DPO stages run inside TRL's trainers, which save resumable checkpoints (weights,
optimizer, scheduler, RNG states, step; the data position is restored by skipping batches) into
<store>/<run>/.trainer-<stage>/. Their writes are not atomic, so a callback marks each checkpoint
complete once it is on disk, and only a marked checkpoint is resumed from. PPO, whose loop is ours,
keeps its state through Store.save_state.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import resource
import shutil
import time
from pathlib import Path

import torch
from transformers import TrainerCallback
from transformers.trainer_pt_utils import LengthGroupedSampler as _LengthGroupedSampler

COMPLETE = "COMPLETE"
_IGNORED_ON_RESUME = ("threads", "resume", "allow_stale")  # may differ between the killed run and its resumption


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


def peak_memory_mb() -> float:
    """Peak memory of this process so far: max allocated on the GPU, else the peak resident set size."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def throughput(train_metrics: dict, state, bf16: bool) -> dict:
    """A trainer's speed figures for the manifest: training time without the held-out evaluations run inside
    it, non-padding tokens and samples per second of that time, and peak memory."""
    evaluating = train_metrics.get("train_eval_runtime")  # set by train(): this session's, inside the loop
    if evaluating is None:
        evaluating = sum(e.get("eval_runtime", 0.0) for e in state.log_history)
    seconds = train_metrics["train_runtime"] - evaluating
    samples = train_metrics.get("train_samples_per_second", 0.0) * train_metrics["train_runtime"]
    return {"precision": "bf16" if bf16 else "fp32", "train_runtime_s": round(seconds, 2),
            "train_tokens": state.num_input_tokens_seen,
            "tokens_per_s": round(state.num_input_tokens_seen / seconds, 1) if seconds > 0 else None,
            "samples_per_s": round(samples / seconds, 2) if seconds > 0 else None,
            "peak_memory_mb": round(peak_memory_mb(), 1)}


# ---- what the stages run by a TRL trainer share (sft, rm, dpo) ---------------------------------------------


def trainer_config(config_class, section: str, settings, cfg, work_dir: Path, **stage_args):
    """config_class (TRL's SFTConfig, RewardConfig, DPOConfig) from the settings every trainer stage shares
    (config.TrainerSettings, the config's `section`), the stage's own arguments, and last settings.trainer_args.
    A trainer_args key the config class does not have, or one set here already, stops the stage at start-up."""
    s = settings
    args = dict(
        output_dir=str(work_dir),
        num_train_epochs=s.epochs,
        per_device_train_batch_size=s.batch_size,
        per_device_eval_batch_size=s.batch_size,
        gradient_accumulation_steps=s.gradient_accumulation_steps,
        learning_rate=s.learning_rate,
        lr_scheduler_type=s.lr_scheduler_type,
        warmup_steps=s.warmup_ratio,  # under 1: a share of the steps
        weight_decay=s.weight_decay,
        max_grad_norm=s.max_grad_norm,
        max_length=s.max_length,
        train_sampling_strategy="group_by_length" if s.group_by_length else "random",
        activation_checkpointing=s.activation_checkpointing,
        bf16=use_bf16(cfg.precision),
        include_num_input_tokens_seen="non_padding",  # effective tokens trained, reported as tokens/s
        use_cpu=not torch.cuda.is_available(),
        logging_steps=s.logging_steps,
        save_strategy="steps",
        save_steps=cfg.save_every,
        save_total_limit=2,
        report_to=["tensorboard"],
        seed=cfg.seed,
        **stage_args,
    )
    known = {f.name for f in dataclasses.fields(config_class)}
    if "activation_checkpointing" not in known:  # transformers before 5.2x (5.17 on the GPU machines) names it so
        args["gradient_checkpointing"] = args.pop("activation_checkpointing")
    for key in s.trainer_args:
        if key not in known:
            raise SystemExit(f"{section}.trainer_args: {key!r} is not an argument of TRL's {config_class.__name__}")
        if key in args:
            how = f"set {section}.{key} instead" if hasattr(s, key) else \
                f"from a key of its own or by the stage (python stages/{section}.py --help lists the keys)"
            raise SystemExit(f"{section}.trainer_args: {key!r} is set already, {how}")
    return config_class(**args, **s.trainer_args)


def guarded(stage: str, work_dir: Path, cfg) -> list[TrainerCallback]:
    """The callbacks of every trainer stage: checkpoints marked complete, non-finite updates skipped and counted
    (publish reads the count), progress for Ctrl-C's line, and with check_sync the processes compared."""
    return [MarkComplete(), NonFiniteGuard(cfg.max_bad_steps), ReportProgress(stage, work_dir),
            *([SyncCheck()] if cfg.check_sync else [])]


def train(trainer, stage: str, resume_from: str | None):
    """trainer.train(), from resume_from if there is one; under DeepSpeed with ZeRO's own non-finite check."""
    print(f"[{stage}] {trainer.args.world_size} process(es)")
    if resume_from:
        print(f"[{stage}] resuming from {resume_from}")
    skip_non_finite_under_deepspeed(trainer)
    result = trainer.train(resume_from_checkpoint=resume_from)
    # the held-out evaluations of this session's loop, which train_runtime counts: not those before a resumption
    # (restored with the log history), nor an evaluate() the stage runs after training (it once made a short
    # run's training time negative)
    after = int(Path(resume_from).name.rpartition("-")[2]) if resume_from else -1
    result.metrics["train_eval_runtime"] = sum(e.get("eval_runtime", 0.0) for e in trainer.state.log_history
                                               if e.get("step", 0) > after)
    return result


def publish(trainer, result, store, cfg, spec, tokenizer, weights: dict | None, *, stage: str, started: float,
            parent=None, base: str | Path | None = None, splits: list[str], skipped: dict, metrics: dict, **manifest):
    """The trained model (or its adapter) in the dtype it came in, its tokenizer and its manifest, published as
    <run>/<stage>; then the trainer's resumable checkpoints go (a rerun starts a new training). Lineage: parent, the
    checkpoint it was trained from, else base (a model path or hub id). metrics: the stage's own; the figures every
    trainer stage reports are added. manifest: further keys of the stage's own."""
    from alignment import config, data, loading, logs

    tmp = store.staging(cfg.run_name, stage)
    save_trained(trainer.model, tmp, weights, spec.dtype, cfg.quantization)
    loading.save_tokenizer(tokenizer, tmp, spec)
    logs.save_log_history(trainer, tmp)  # the training curves, for the report (the trainer's folder goes below)
    guard = next(c for c in trainer.callback_handler.callbacks if isinstance(c, NonFiniteGuard))
    lineage = {"parents": [], "base": loading.base_reference(base)} if parent is None else {
        "parents": [parent.id], "parent_uids": [parent.manifest["uid"]], "base": loading.base_reference(parent.path),
        "base_checkpoint": parent.id}
    checkpoint = store.publish(tmp, {
        "run": cfg.run_name, "stage": stage, "model": spec.name, "template": spec.template, **lineage,
        "adapter": cfg.lora.enabled, "config": config.to_dict(cfg), **manifest,
        "data": {"profile": data.get_profile(cfg.data).name, "fingerprint": data.fingerprint(cfg.data, splits),
                 "skipped": skipped},
        "metrics": {
            **metrics,
            "steps": result.global_step,
            "skipped_non_finite": guard.skipped + deepspeed_skipped(trainer),
            "processes": trainer.args.world_size,
            "deepspeed_zero_stage": trainer.accelerator.state.deepspeed_plugin.zero_stage if trainer.is_deepspeed_enabled else 0,
            "duration_s": round(time.time() - started, 1),
            **throughput(result.metrics, trainer.state, trainer.args.bf16),
        },
    })
    shutil.rmtree(trainer.args.output_dir, ignore_errors=True)
    print(f"[{stage}] saved {checkpoint.id} -> {checkpoint.path}")
    return checkpoint


class LengthGroupedSampler(_LengthGroupedSampler):
    """Batches of similar length (transformers' sampler) in an order drawn from seed + epoch: the trainer calls
    set_epoch, so a resumed run sees the same batches as an uninterrupted one (the stock sampler draws from the
    global RNG, which a resumed run restores only after the order is drawn)."""

    def __init__(self, batch_size: int, lengths: list[int], seed: int):
        super().__init__(batch_size, lengths=lengths, generator=torch.Generator())
        self.seed = seed
        self.set_epoch(0)

    def set_epoch(self, epoch: int) -> None:
        self.generator.manual_seed(self.seed + epoch)


class LengthGrouping:
    """Trainer mixin: with train_sampling_strategy='group_by_length', training and evaluation batches come from
    LengthGroupedSampler (an order a resumed run repeats). A subclass says how long each example pads to."""

    def example_lengths(self, dataset) -> list[int]:
        raise NotImplementedError

    def _get_train_sampler(self, train_dataset=None):
        dataset = train_dataset if train_dataset is not None else self.train_dataset
        if self.args.train_sampling_strategy != "group_by_length":
            return super()._get_train_sampler(train_dataset)
        return LengthGroupedSampler(self.args.train_batch_size * self.args.gradient_accumulation_steps,
                                    self.example_lengths(dataset), self.args.seed)

    def _get_eval_sampler(self, eval_dataset):
        if self.args.train_sampling_strategy != "group_by_length" or eval_dataset is None:
            return super()._get_eval_sampler(eval_dataset)
        return LengthGroupedSampler(self.args.eval_batch_size, self.example_lengths(eval_dataset), self.args.seed)


class PackedRows:
    """A data collator: a batch's sequences (tokenized, with labels) packed into rows, first fit by
    decreasing length, instead of each padded to the longest. A row is as wide as the batch's longest
    sequence, so no more is computed than with padding, in the linear layers or in attention, and for a
    batch of mixed lengths much less. The rows carry position ids that restart at every sequence and no
    attention mask: the model reads the sequence boundaries from the positions and keeps the sequences
    apart (forwards.reads_packed_rows checks that it does). The batch trains on the same sequences, tokens
    and loss; only the padding is no longer computed.

    TRL's padding-free mode flattens a whole batch into one row instead, which outside FlashAttention costs
    attention over the full row (quadratic in the batch's tokens); its packing mode changes what a batch is
    (rows of max_length tokens, not batch_size sequences)."""

    def __init__(self, pad_token_id: int):
        self.pad_token_id = pad_token_id

    @staticmethod
    def rows(lengths: list[int]) -> list[list[int]]:
        """Sequence indices per row, each row holding at most max(lengths) tokens."""
        rows, room, width = [], [], max(lengths)
        for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
            fit = next((r for r, free in enumerate(room) if lengths[i] <= free), None)
            if fit is None:
                rows.append([i])
                room.append(width - lengths[i])
            else:
                rows[fit].append(i)
                room[fit] -= lengths[i]
        return rows

    def __call__(self, examples: list[dict]) -> dict:
        lengths = [len(e["input_ids"]) for e in examples]
        rows = self.rows(lengths)
        width = max(sum(lengths[i] for i in row) for row in rows)
        input_ids = torch.full((len(rows), width), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(rows), width), -100, dtype=torch.long)
        position_ids = torch.zeros((len(rows), width), dtype=torch.long)  # padding: one-token sequences
        for r, row in enumerate(rows):
            at = 0
            for i in row:
                n = lengths[i]
                input_ids[r, at : at + n] = torch.tensor(examples[i]["input_ids"])
                labels[r, at : at + n] = torch.tensor(examples[i].get("labels", examples[i]["input_ids"]))
                labels[r, at] = -100  # a sequence's first token is not predicted from the one before it
                position_ids[r, at : at + n] = torch.arange(n)
                at += n
        # use_cache=False: with a cache the model builds an ordinary causal mask and ignores the boundaries
        return {"input_ids": input_ids, "labels": labels, "position_ids": position_ids, "use_cache": False}


class NonFiniteError(RuntimeError):
    pass


def comparable(config: dict, ignore: tuple[str, ...] = ()) -> dict:
    """The config without the keys allowed to change between a run and its resumption."""
    out = {k: v for k, v in config.items() if k not in _IGNORED_ON_RESUME}
    for dotted in ignore:
        section, _, key = dotted.partition(".")
        if isinstance(out.get(section), dict):
            out[section] = {k: v for k, v in out[section].items() if k != key}
    return out


def check_same_config(saved: dict, current: dict, where: Path, ignore: tuple[str, ...] = ()) -> None:
    a, b = comparable(saved, ignore), comparable(current, ignore)
    if a != b:
        diffs = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
        what = "built on other parent checkpoints (one was replaced since)" if diffs == ["parent_uids"] else \
            f"with a different config (differs in: {', '.join(diffs)})"
        raise SystemExit(
            f"{where} holds the state of a run {what}; "
            "run with resume=false (RESUME=0 through make) to start over"
        )


def trainer_resume_point(work_dir: Path, config: dict, resume: bool) -> str | None:
    """The latest complete trainer checkpoint to resume from, or None to start fresh (clearing old state).

    In a multi-process run the main process prepares the folder first; the others only read it after.
    """
    from accelerate import PartialState

    state = PartialState(cpu=not torch.cuda.is_available())
    with state.main_process_first():
        return _resume_point(work_dir, config, resume, may_write=state.is_main_process)


def _resume_point(work_dir: Path, config: dict, resume: bool, may_write: bool) -> str | None:
    marker = work_dir / "stage_config.json"
    if not resume or not marker.is_file() or not latest_complete(work_dir):  # (a run stopped before its first
        # checkpoint leaves nothing to resume: whatever its config, start over)
        if may_write and latest_complete(work_dir):
            print(f"[resume=false] removing the resumable checkpoints in {work_dir}")
        if may_write:
            shutil.rmtree(work_dir, ignore_errors=True)
            work_dir.mkdir(parents=True, exist_ok=True)
            marker.write_text(json.dumps(config, indent=2))
        return None
    check_same_config(json.loads(marker.read_text()), config, work_dir)
    return latest_complete(work_dir)


def latest_complete(work_dir: Path) -> str | None:
    """The trainer's latest checkpoint marked complete, None if there is none."""
    complete = [p for p in work_dir.glob("checkpoint-*") if (p / COMPLETE).is_file()]
    if not complete:
        return None
    return str(max(complete, key=lambda p: int(p.name.split("-")[1])))


class ReportProgress(TrainerCallback):
    """Keeps config.PROGRESS up to date for the line Ctrl-C ends with."""

    def __init__(self, stage: str, work_dir: Path):
        from alignment import config

        config.PROGRESS.update(stage=stage, step=None, state=lambda: latest_complete(work_dir))

    def on_step_end(self, args, state, control, **kwargs):
        from alignment import config

        config.PROGRESS["step"] = state.global_step


class HeldOutCurve(TrainerCallback):
    """The held-out points of a TRL trainer's policy, at step 0 and every `every` optimizer steps (and the last):
    measure(model, step) -> {"step", "eval_reward", "eval_gold", "eval_kl"} (evaluation.curve_point). The points,
    with the seconds each took, go into the trainer's log_history, which its checkpoints save: a resumed run keeps
    the earlier ones."""

    def __init__(self, every: int, measure, writer=None):
        self.every, self.measure, self.writer = every, measure, writer

    def _add(self, state, model, step: int) -> None:
        was_training = model.training
        model.eval()
        started = time.time()
        point = self.measure(model, step)
        model.train(was_training)
        # its seconds under the name of an evaluation's: throughput() leaves them out of the training time
        state.log_history.append({**point, "eval_runtime": round(time.time() - started, 2)})
        if self.writer is not None:
            for key, value in point.items():
                if key != "step":
                    self.writer.add_scalar(key, value, step)

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if self.every and state.global_step == 0:
            self._add(state, model, 0)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if self.every and (state.global_step % self.every == 0 or state.global_step == state.max_steps):
            self._add(state, model, state.global_step)

    @staticmethod
    def points(state) -> list[dict]:
        return [e for e in state.log_history if "eval_kl" in e]


class MarkComplete(TrainerCallback):
    """After the trainer has written a checkpoint, flush it to disk and mark it complete."""

    def on_save(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            for dirpath, _, files in os.walk(folder):
                for name in files:
                    with open(os.path.join(dirpath, name), "rb") as f:
                        os.fsync(f.fileno())
            (folder / COMPLETE).write_text("")


def grads_finite(parameters) -> bool:
    return all(torch.isfinite(p.grad).all() for p in parameters if p.grad is not None)


class NonFiniteGuard(TrainerCallback):
    """Skips optimizer steps whose gradients are not finite (a NaN/inf loss gives such gradients) and counts
    them; after `patience` in a row it stops the stage, naming the step. The last complete checkpoint stays."""

    def __init__(self, patience: int):
        self.patience, self.skipped, self.in_a_row = patience, 0, 0

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        if grads_finite(model.parameters()):
            self.in_a_row = 0
            return
        for p in model.parameters():  # torch optimizers leave parameters without a gradient untouched
            p.grad = None
        self.skipped += 1
        self.in_a_row += 1
        print(f"[guard] step {state.global_step + 1}: non-finite gradient, update skipped ({self.skipped} so far)")
        if self.in_a_row >= self.patience:
            raise NonFiniteError(
                f"stopping at step {state.global_step + 1}: {self.in_a_row} updates in a row had non-finite "
                "gradients (loss or data went bad); the last complete checkpoint is kept for resuming"
            )


def trained_weights(trainer) -> dict | None:
    """The trained model's whole state dict under DeepSpeed (ZeRO-3 shards gathered: every process must call
    this), None otherwise (the model holds it)."""
    if not trainer.is_deepspeed_enabled:
        return None
    return trainer.accelerator.get_state_dict(trainer.model_wrapped)


def save_trained(model, folder: Path, weights: dict | None, dtype: str, quantization: str) -> None:
    """save_pretrained of a model trained in fp32 (or its adapter), in the dtype it came in: a bf16 model's
    checkpoint stays the size it was."""
    from alignment.loading import DTYPES

    weights = model.state_dict() if weights is None else weights
    if not quantization:  # quantized weights keep their own storage types
        weights = {k: v.to(DTYPES[dtype]) if v.is_floating_point() else v for k, v in weights.items()}
    model.save_pretrained(folder, state_dict=weights)


def skip_non_finite_under_deepspeed(trainer) -> None:
    """Under DeepSpeed the optimizer steps inside backward(), and ZeRO keeps no .grad to look at: NonFiniteGuard
    cannot refuse a step there. ZeRO-1/2's own check does instead, in bf16 (ZeRO-3 checks in fp16 only): it skips a
    step whose gradients are not finite; deepspeed_skipped() counts those steps afterwards."""
    if trainer.is_deepspeed_enabled:
        config = trainer.accelerator.state.deepspeed_plugin.hf_ds_config.config
        config["bf16"] = {**config.get("bf16", {}), "check_grad_overflow": True}


def deepspeed_skipped(trainer) -> int:
    return int(getattr(trainer.model_wrapped, "skipped_steps", 0) or 0) if trainer.is_deepspeed_enabled else 0


def assert_in_sync(parameters, where: str) -> None:
    """Raises if the processes of a distributed run hold different parameters (a silent DDP failure)."""
    if not torch.distributed.is_available() or not torch.distributed.is_initialized():
        return
    parameters = list(parameters)
    from alignment.distributed import gathered

    with gathered(parameters):
        checksum = torch.stack([p.detach().double().sum() for p in parameters]).sum().reshape(1)
    gathered = [torch.zeros_like(checksum) for _ in range(torch.distributed.get_world_size())]
    torch.distributed.all_gather(gathered, checksum)
    if any(not torch.equal(g, gathered[0]) for g in gathered):
        raise RuntimeError(f"{where}: processes hold different parameters: {[g.item() for g in gathered]}")
    print(f"[sync] {where}: {len(gathered)} processes hold identical parameters (checksum {checksum.item():.6f})")


class SyncCheck(TrainerCallback):
    """assert_in_sync after every optimizer step of a trainer."""

    def on_optimizer_step(self, args, state, control, model=None, **kwargs):
        assert_in_sync(list(model.parameters()), f"step {state.global_step + 1}")
