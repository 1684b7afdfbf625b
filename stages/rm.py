"""Stage 2, reward model: a scalar head on the SFT model, trained on pairwise preferences.

    make rm [MODEL=tiny-llama] [ARGS="rm.epochs=2"]
    python -m stages.rm --config configs/rm.yaml key=value ...

The model is AutoModelForSequenceClassification with one label, initialised from the run's SFT
checkpoint; TRL's RewardTrainer minimises -log sigmoid(r_chosen - r_rejected). Held-out pairwise
accuracy, with its bootstrap interval, goes into the manifest.
"""

from __future__ import annotations

import dataclasses
import os
import time

import torch
from datasets import Dataset
from transformers import AutoModelForSequenceClassification
from trl import RewardConfig
from trl import RewardTrainer as TRLRewardTrainer

from alignment import (
    batching,
    callbacks,
    config,
    data,
    distributed,
    evaluation,
    loading,
    publish,
    registry,
    resume,
    training,
)
from alignment.config import field
from alignment.store import Store


@dataclasses.dataclass
class RMSettings(config.TrainerSettings):  # epochs, batch_size, learning_rate, ...: the keys every trainer stage has
    epochs: float = field(2.0, "passes over the preference pairs")
    batch_size: int = field(32, "pairs per device per forward")
    learning_rate: float = field(5e-4, "peak AdamW learning rate; set by the model's size unless given "
                                  "(alignment/presets.py: 5e-4 for the tiny twins, 1e-5 for 7B)")
    max_length: int = field(512, "longest prompt+response in tokens; longer pairs are dropped and counted")
    group_by_length: bool = field(True, "batch pairs of similar length together: less padding")
    validation: int = field(200, "pairs carved from the end of the training pairs to choose the checkpoint on")


class RewardTrainer(batching.LengthGrouping, TRLRewardTrainer):
    """TRL's RewardTrainer; with rm.group_by_length its batches hold pairs of similar length (the trainer's own
    length grouping looks for an input_ids column, which tokenized pairs do not have)."""

    def example_lengths(self, dataset) -> list[int]:
        # a batch of pairs is padded to its longest chosen or rejected sequence
        return [max(len(c), len(r)) for c, r in zip(dataset["chosen_ids"], dataset["rejected_ids"])]


@dataclasses.dataclass
class Config(config.StageConfig):
    rm: RMSettings = field(RMSettings(), "training settings")
    lora: config.LoraSettings = field(config.LoraSettings(), "LoRA adapters instead of full fine-tuning")


def main(argv: list[str]) -> None:
    # 1. config, store, the run's SFT checkpoint
    cfg = config.cli(Config, argv, default_yaml="configs/rm.yaml")
    started = time.time()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    store, run = Store(cfg.store), cfg.run_name
    sft = store.get(run, "sft")
    store.require_fresh(sft, allow_stale=cfg.allow_stale)
    spec = registry.get(cfg.model, template=sft.manifest["template"], tokenizer=sft.path)
    os.environ["TENSORBOARD_LOGGING_DIR"] = str(store.run_dir(run) / "tensorboard" / "rm")

    # 2. reward model = SFT body + a new scalar head (seeded)
    torch.manual_seed(cfg.seed)
    tokenizer = loading.load_tokenizer(sft.path, spec)
    cfg.check_combinations(trains_weights=True, lora=cfg.lora.enabled)
    work_dir = store.run_dir(run) / ".trainer-rm"  # the trainer's resumable checkpoints
    distributed.check_final_save("rm")  # the end's settings, checked at the start
    planned = publish.planned_peak_mb("rm", cfg)  # the memory plan's figure, before DeepSpeed's config exists
    # the trainer's arguments before the model: under ZeRO-3 they make transformers load it partitioned over the
    # processes (DeepSpeed's zero.Init), so that no process holds it whole (training.trainer_config)
    args = training.trainer_config(
        RewardConfig, "rm", cfg.rm, cfg, work_dir,
        disable_dropout=True,
        eval_strategy="steps",  # on the validation pairs, at every save: the best one is loaded at the end
        eval_steps=cfg.save_every,
        load_best_model_at_end=True,
        metric_for_best_model="eval_accuracy",
    )
    distributed.check_shared_store(store.root)  # every process (every node) sees one store
    # a saved checkpoint resumes on the launch that saved it (another stops here, before the model loads)
    resume.check_trainer_launch(work_dir, cfg.resume, "rm")
    model = loading.load_model(sft.path, AutoModelForSequenceClassification, spec, cfg.quantization, cfg.compute_dtype,
                               tokenizer=tokenizer, trained=True)
    print(f"[rm] from {sft.id}: {loading.count_parameters(model):,} parameters")
    print(f"[rm] {loading.footprint('reward model', model)}")
    # the store is written to only now: a model that fails to load leaves no folder behind
    # the parent's uid belongs to the state: a state trained on an SFT since replaced is not resumed
    resume_from = resume.trainer_resume_point(work_dir, {**config.to_dict(cfg), "parent_uids": [sft.manifest["uid"]]},
                                                cfg.resume)

    # 3. preference pairs; prompts carry the model's template, so the RM reads what the policy writes
    def templated(records: list[dict]) -> list[dict]:
        return [
            {"prompt": spec.format_prompt(r["prompt"]), "chosen": r["chosen"], "rejected": r["rejected"]}
            for r in records
        ]

    # the checkpoint is chosen on a validation split carved from the training pairs, never on the held-out ones
    loaded = data.load_split(cfg.data, "prefs_train", cfg.limit, cfg.on_error)
    skipped = dict(loaded.skipped)
    if skipped:
        print(f"[rm] prefs_train: skipped {sum(skipped.values())} pairs: {skipped}")
    n_val = min(cfg.rm.validation, len(loaded.records) // 5)
    train_pairs, val_pairs = (
        templated(loaded.records[: len(loaded.records) - n_val]),
        templated(loaded.records[-n_val:]),
    )
    held_out = data.load_split(cfg.data, "prefs_eval", cfg.limit, cfg.on_error)
    raw_eval = held_out.records

    # 4. train (the arguments every trainer stage shares: training.trainer_config)
    peft_config = None
    if cfg.lora.enabled:
        peft_config = loading.lora_config(cfg.lora, model, spec, "SEQ_CLS", modules_to_save=["score"])
    trainer = RewardTrainer(
        model=model, args=args, train_dataset=Dataset.from_list(train_pairs),
        eval_dataset=Dataset.from_list(val_pairs), processing_class=tokenizer, peft_config=peft_config,
        callbacks=callbacks.guarded("rm", work_dir, cfg),
    )
    if cfg.quantization:
        # TRL casts every trainable parameter of a quantized model to bf16 (QLoRA's recipe) while k-bit preparation
        # keeps the final norm in fp32; the LoRA layers cast their input, the plain linear reward head does not:
        # it reads its input in its own dtype (as forwards.position_scores does after training).
        head = next(m for n, m in trainer.model.named_modules() if n.rsplit(".", 1)[-1] == "score")
        dtype = next(q for q in head.parameters() if q.requires_grad).dtype
        head.register_forward_pre_hook(lambda module, args: tuple(a.to(dtype) for a in args))
    dropped = len(train_pairs) - len(trainer.train_dataset)
    if dropped:
        print(f"[rm] {dropped} training pairs longer than rm.max_length={cfg.rm.max_length} tokens were dropped")
    result = training.train(trainer, "rm", resume_from)
    best_validation = trainer.state.best_metric

    # 5. held-out accuracy, scored the way PPO will score (our forward pass, not the trainer's batches)
    # (every process: under ZeRO-3 the weights are gathered for it, and each process then computes alone)
    with distributed.whole_model(trainer.accelerator, trainer.model_wrapped) as whole:
        whole.eval()
        accuracy = evaluation.pairwise_accuracy(whole, tokenizer, spec, raw_eval)
    peaks = training.peak_memory_per_process(trainer)  # every process: each its own
    weights = training.trained_weights(trainer)
    if not trainer.is_world_process_zero():  # one process writes the result
        return

    # 6. save to the store
    metrics = {
        "train_loss": result.training_loss,
        "peak_memory_mb_per_process": peaks,
        "planned_peak_mb": planned,
        "eval_accuracy": accuracy["accuracy"],
        "eval_accuracy_ci95": accuracy["accuracy_ci95"],
        "eval_margin": accuracy["margin"],
        "validation_accuracy": best_validation,
        "references": dict(data.get_profile(cfg.data).rm_references),
        "eval_pairs": len(raw_eval),
        "dropped_too_long": dropped,
    }
    publish.publish(trainer, result, store, cfg, spec, tokenizer, weights, stage="rm", started=started, parent=sft,
                     splits=["prefs_train", "prefs_eval"],
                     skipped={"prefs_train": skipped, "prefs_eval": dict(held_out.skipped)}, metrics=metrics)
    lo, hi = accuracy["accuracy_ci95"]
    print(
        f"[rm] held-out pairwise accuracy {accuracy['accuracy']:.3f} (95% CI {lo:.3f}-{hi:.3f}) "
        f"on {len(raw_eval)} pairs"
    )
    for name, value in data.get_profile(cfg.data).rm_references:
        print(f"[rm]   reference on the same split: {name}: {value:.3f}")


if __name__ == "__main__":
    config.run(main)
