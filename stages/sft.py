"""Stage 1, supervised fine-tuning: teach the base model to answer instructions from demonstrations.

    make sft [MODEL=tiny-llama] [ARGS="sft.epochs=2 lora.enabled=true"]
    python -m stages.sft --config configs/sft.yaml key=value ...

TRL's SFTTrainer runs the loop; the loss covers response tokens only (prompt-completion records).
The result lands in the store as <run>/sft: a full model, or with LoRA only the adapter.
"""

from __future__ import annotations

import dataclasses
import os
import time

import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM, Trainer
from trl import SFTConfig as TRLSFTConfig
from trl import SFTTrainer as TRLSFTTrainer

from alignment import (
    batching,
    callbacks,
    config,
    data,
    distributed,
    forwards,
    loading,
    publish,
    registry,
    resume,
    training,
)
from alignment.config import field
from alignment.store import Store


@dataclasses.dataclass
class SFTSettings(config.TrainerSettings):  # epochs, batch_size, learning_rate, ...: the keys every trainer stage has
    epochs: float = field(3.0, "passes over the demonstrations")
    batch_size: int = field(32, "sequences per device per forward")
    learning_rate: float = field(2e-3, "peak AdamW learning rate; set by the model's size unless given "
                                  "(alignment/presets.py: 2e-3 for the tiny twins, 2e-5 for 7B)")
    max_length: int = field(512, "longest sequence in tokens; a longer one loses the beginning of its prompt (counted)")
    group_by_length: bool = field(
        False,
        "batch sequences of similar length together: less padding (off by default: "
        "on the embedded task, length-sorted batches of alike examples trained a worse model)",
    )
    packed: bool = field(True, "pack each batch's sequences into rows as wide as its longest instead of padding "
                         "each: the same sequences and loss, far less padding computed")


class SFTTrainer(batching.LengthGrouping, TRLSFTTrainer):
    """TRL's SFTTrainer, but the loss is the model's own (one LM-head matmul, then cross-entropy over the
    completion tokens) instead of TRL's fused LM head, which tiles the vocabulary to also compute entropy and
    top-1 accuracy on every step: on CPU that kernel took half of each step (bench/README.md)."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        return Trainer.compute_loss(self, model, inputs, return_outputs=return_outputs,
                                    num_items_in_batch=num_items_in_batch)

    def example_lengths(self, dataset) -> list[int]:  # for sft.group_by_length
        return [len(ids) for ids in dataset["input_ids"]]


@dataclasses.dataclass
class Config(config.StageConfig):
    sft: SFTSettings = field(SFTSettings(), "training settings")
    lora: config.LoraSettings = field(config.LoraSettings(), "LoRA adapters instead of full fine-tuning")


def main(argv: list[str]) -> None:
    # 1. config, store, model entry
    cfg = config.cli(Config, argv, default_yaml="configs/sft.yaml")
    started = time.time()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    store, run = Store(cfg.store), cfg.run_name
    spec = registry.get(cfg.model, template=cfg.template or data.get_profile(cfg.data).template)
    os.environ["TENSORBOARD_LOGGING_DIR"] = str(store.run_dir(run) / "tensorboard" / "sft")

    # 2. base model and tokenizer, from the hub / a local folder / the tiny-twin cache
    # a tiny twin's tokenizer is trained on this profile's own text (cached per profile)
    profile = data.get_profile(cfg.data)
    base_path = registry.resolve(spec, data.corpus(cfg.data, spec.format_prompt), profile.tokenizer_vocab) \
        if spec.is_tiny else registry.resolve(spec)
    tokenizer = loading.load_tokenizer(base_path, spec)
    cfg.check_combinations(trains_weights=True, lora=cfg.lora.enabled)
    work_dir = store.run_dir(run) / ".trainer-sft"  # the trainer's resumable checkpoints
    distributed.check_final_save("sft")  # the end's settings, checked at the start
    planned = publish.planned_peak_mb("sft", cfg)  # the memory plan's figure, before DeepSpeed's config exists
    # the trainer's arguments before the model: under ZeRO-3 they make transformers load it partitioned over the
    # processes (DeepSpeed's zero.Init), so that no process holds it whole (training.trainer_config)
    args = training.trainer_config(
        TRLSFTConfig, "sft", cfg.sft, cfg, work_dir,
        completion_only_loss=True,
        truncation_mode="keep_end",  # a sequence over max_length loses the beginning of its prompt
        eval_strategy="epoch",
    )
    distributed.check_shared_store(store.root)  # every process (every node) sees one store
    # a saved checkpoint resumes on the launch that saved it (another stops here, before the model loads)
    resume.check_trainer_launch(work_dir, cfg.resume, "sft")
    model = loading.load_model(base_path, AutoModelForCausalLM, spec, cfg.quantization, cfg.compute_dtype,
                               tokenizer=tokenizer, trained=True)
    print(f"[sft] {spec.name}: {loading.count_parameters(model):,} parameters, from {base_path}")
    print(f"[sft] {loading.footprint('policy', model)}")
    packed = cfg.sft.packed and forwards.reads_packed_rows(model)
    if cfg.sft.packed and not packed:
        print(f"[sft] {spec.name} cannot keep sequences packed in one row apart: batches are padded instead")
    # the store is written to only now: a model that fails to load leaves no folder behind
    resume_from = resume.trainer_resume_point(work_dir, config.to_dict(cfg), cfg.resume)

    # 3. demonstrations as prompt-completion records: TRL masks the prompt out of the loss
    skipped = {}

    def records(split: str) -> Dataset:
        loaded = data.load_split(cfg.data, split, cfg.limit, cfg.on_error)
        skipped[split] = dict(loaded.skipped)
        if loaded.skipped:
            print(f"[sft] {split}: skipped {sum(loaded.skipped.values())} records: {skipped[split]}")
        return Dataset.from_list([{"prompt": spec.format_prompt(r["prompt"]), "completion": r["completion"]}
                                  for r in loaded.records])

    train_set, eval_set = records("sft_train"), records("sft_eval")
    truncated = sum(len(tokenizer(r["prompt"] + r["completion"]).input_ids) + 1 > cfg.sft.max_length for r in train_set)
    if truncated:
        print(f"[sft] {truncated} training sequences exceed sft.max_length={cfg.sft.max_length}: their prompts are "
              "cut from the left")

    # 4. train (the arguments every trainer stage shares: training.trainer_config)
    peft_config = None
    if cfg.lora.enabled:
        peft_config = loading.lora_config(cfg.lora, model, spec, "CAUSAL_LM")
    trainer = SFTTrainer(
        model=model, args=args, train_dataset=train_set, eval_dataset=eval_set,
        processing_class=tokenizer, peft_config=peft_config,
        data_collator=batching.PackedRows(tokenizer.pad_token_id) if packed else None,
        callbacks=callbacks.guarded("sft", work_dir, cfg),
    )
    result = training.train(trainer, "sft", resume_from)
    eval_metrics = trainer.evaluate()
    peaks = training.peak_memory_per_process(trainer)  # every process: each its own
    weights = training.trained_weights(trainer)  # every process: under ZeRO-3 each holds a shard
    if not trainer.is_world_process_zero():  # one process writes the result
        return

    # 5. save to the store: HF folder (or adapter) + tokenizer + manifest
    metrics = {
        "train_loss": result.training_loss,
        "peak_memory_mb_per_process": peaks,
        "planned_peak_mb": planned,
        "eval_loss": eval_metrics["eval_loss"],
        "eval_mean_token_accuracy": eval_metrics.get("eval_mean_token_accuracy"),
        "truncated": truncated,
        "packed": packed,
    }
    publish.publish(trainer, result, store, cfg, spec, tokenizer, weights, stage="sft", started=started,
                     base=base_path, splits=["sft_train", "sft_eval"], skipped=skipped, metrics=metrics)
    print(f"[sft] train loss {metrics['train_loss']:.4f}, held-out loss {metrics['eval_loss']:.4f}")


if __name__ == "__main__":
    config.run(main)
