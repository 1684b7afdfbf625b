"""Publishing a trained model to the store: one manifest builder for every stage (its lineage, config, data and
metrics), and the end of a trainer stage (sft, rm, dpo)."""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import torch

from alignment import config, data, distributed, loading, logs, plan, training
from alignment.callbacks import NonFiniteGuard


def save_trained(model, folder: Path, weights: dict | None, dtype: str, quantization: str) -> None:
    """save_pretrained of a model trained in fp32 (or its adapter), in the dtype it came in: a bf16 model's
    checkpoint stays the size it was."""
    weights = model.state_dict() if weights is None else weights
    if not quantization:  # quantized weights keep their own storage types
        weights = {k: v.to(loading.DTYPES[dtype]) if v.is_floating_point() else v for k, v in weights.items()}
    model.save_pretrained(folder, state_dict=weights)


def publish(trainer, result, store, cfg, spec, tokenizer, weights: dict | None, *, stage: str, started: float,
            parent=None, base: str | Path | None = None, splits: list[str], skipped: dict, metrics: dict, **extra):
    """The trained model (or its adapter) in the dtype it came in, its tokenizer and its manifest, published as
    <run>/<stage>; then the trainer's resumable checkpoints go (a rerun starts a new training). Lineage: parent, the
    checkpoint it was trained from, else base (a model path or hub id). metrics: the stage's own; the figures every
    trainer stage reports are added. extra: further manifest keys of the stage's own."""
    tmp = store.staging(cfg.run_name, stage)
    save_trained(trainer.model, tmp, weights, spec.dtype, cfg.quantization)
    loading.save_tokenizer(tokenizer, tmp, spec)
    logs.save_log_history(trainer, tmp)  # the training curves, for the report (the trainer's folder goes below)
    nonfinite = next(c for c in trainer.callback_handler.callbacks if isinstance(c, NonFiniteGuard))
    checkpoint = store.publish(tmp, manifest(
        cfg, spec, stage, parents=[parent] if parent else [], base=base, splits=splits, skipped=skipped, **extra,
        metrics={
            **metrics,
            "steps": result.global_step,
            "skipped_non_finite": nonfinite.skipped + training.deepspeed_skipped(trainer),
            "processes": trainer.args.world_size,
            "deepspeed_zero_stage": trainer.accelerator.state.deepspeed_plugin.zero_stage
            if trainer.is_deepspeed_enabled else 0,
            "duration_s": round(time.time() - started, 1),
            **training.throughput(result.metrics, trainer.state, trainer.args.bf16),
        }))
    shutil.rmtree(trainer.args.output_dir, ignore_errors=True)
    print(f"[{stage}] saved {checkpoint.id} -> {checkpoint.path}")
    return checkpoint


def planned_peak_mb(stage: str, cfg) -> float | None:
    """What `make plan` says a process of this run holds at its peak (MB above the fixed cost), for the manifest
    beside each process's measured peak; from the launch's environment (accelerate launch sets it). Call at start-up,
    before the trainer's or the loop's DeepSpeed config exists: the plan builds models on the meta device, which
    under ZeRO-3 transformers would build inside DeepSpeed's zero.Init, a collective."""
    def offloaded(what: str) -> bool:
        return os.environ.get(f"ACCELERATE_DEEPSPEED_OFFLOAD_{what}_DEVICE", "none") not in ("none", "")

    launch = plan.Launch(int(os.environ.get("WORLD_SIZE", "1")), distributed.deepspeed_stage(),
                         offloaded("OPTIMIZER"), offloaded("PARAM"), "gpu" if torch.cuda.is_available() else "cpu")
    return plan.planned_peak_mb(stage, cfg, launch)


def manifest(cfg, spec, stage: str, *, parents: list, splits: list[str], metrics: dict, base: str | Path | None = None,
             skipped: dict | None = None, **extra) -> dict:
    """A checkpoint's manifest: what it is (run, stage, model, template, adapter or not), where it comes from
    (parents: the store checkpoints it was trained from, with their uids, the first also its base; without
    parents, base: a model folder or hub id), its resolved config, its data (profile, fingerprint of the splits
    read, records skipped) and metrics; extra: keys of the stage's own."""
    lineage = {"parents": [], "base": loading.base_reference(base)} if not parents else {
        "parents": [p.id for p in parents], "parent_uids": [p.manifest["uid"] for p in parents],
        "base": loading.base_reference(parents[0].path), "base_checkpoint": parents[0].id}
    used = {"profile": data.get_profile(cfg.data).name, "fingerprint": data.fingerprint(cfg.data, splits)}
    return {
        "run": cfg.run_name, "stage": stage, "model": spec.name, "template": spec.template, **lineage,
        "adapter": cfg.lora.enabled, "config": config.to_dict(cfg), **extra,
        "data": {**used, **({"skipped": skipped} if skipped is not None else {})},
        "metrics": metrics,
    }
