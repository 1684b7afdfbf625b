"""What the stages run by a TRL trainer (sft, rm, dpo) share: their arguments (trainer_config), their start
(train), the trained weights under DeepSpeed, and the speed figures of their manifests."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from alignment.distributed import every_process
from alignment.machine import peak_memory_mb, use_bf16


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


def peak_memory_per_process(trainer) -> list[float]:
    """Each process's peak memory so far (MB), in process order: a collective, every process calls it."""
    return every_process(trainer.accelerator, round(peak_memory_mb(), 1))


def trained_weights(trainer) -> dict | None:
    """The trained model's whole state dict under DeepSpeed (ZeRO-3 shards gathered: every process must call
    this), None otherwise (the model holds it)."""
    if not trainer.is_deepspeed_enabled:
        return None
    return trainer.accelerator.get_state_dict(trainer.model_wrapped)


def skip_non_finite_under_deepspeed(trainer) -> None:
    """Under DeepSpeed the optimizer steps inside backward(), and ZeRO keeps no .grad to look at: NonFiniteGuard
    cannot refuse a step there. ZeRO-1/2's own check does instead, in bf16 (ZeRO-3 checks in fp16 only): it skips a
    step whose gradients are not finite; deepspeed_skipped() counts those steps afterwards."""
    if trainer.is_deepspeed_enabled:
        config = trainer.accelerator.state.deepspeed_plugin.hf_ds_config.config
        config["bf16"] = {**config.get("bf16", {}), "check_grad_overflow": True}


def deepspeed_skipped(trainer) -> int:
    return int(getattr(trainer.model_wrapped, "skipped_steps", 0) or 0) if trainer.is_deepspeed_enabled else 0
