"""Stage 3 beside PPO, DPO: the SFT policy trained straight on the preference pairs, no reward model in the loop.

    make dpo [MODEL=tiny-llama] [ARGS="dpo.beta=0.2 dpo.loss_type=ipo"]
    python -m stages.dpo --config configs/dpo.yaml key=value ...

TRL's DPOTrainer minimises -log sigmoid(beta * [(log pi(c) - log pi_ref(c)) - (log pi(r) - log pi_ref(r))]) over the
pairs the reward model was trained on (prompts in the model's template, as there); pi_ref is the SFT policy, frozen
(with LoRA the same weights with the adapters off: no second copy). The run's reward model only judges: every
dpo.eval_every steps a held-out point (reward, gold, KL), and at the end the comparison with the SFT policy on the
held-out prompts that PPO ends with, under the same keys. The result lands in the store as <run>/dpo.
"""

from __future__ import annotations

import dataclasses
import os
import time
from pathlib import Path

import torch
from datasets import Dataset
from torch.utils.tensorboard import SummaryWriter
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification
from trl import DPOConfig
from trl import DPOTrainer as TRLDPOTrainer

from alignment import (
    batching,
    callbacks,
    config,
    data,
    distributed,
    evaluation,
    forwards,
    guard,
    health,
    loading,
    publish,
    registry,
    report,
    resume,
    scoring,
    training,
)
from alignment.config import field
from alignment.store import Store

# TRL 1.16's DPO losses (its trainer names an unknown one only at the first training step)
LOSS_TYPES = ("sigmoid", "ipo", "hinge", "robust", "exo_pair", "nca_pair", "bco_pair", "sppo_hard", "aot",
              "aot_unpaired", "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm")


@dataclasses.dataclass
class DPOSettings(config.TrainerSettings):  # epochs, batch_size, learning_rate, ...: the keys every trainer stage has
    epochs: float = field(1.0, "passes over the preference pairs")
    batch_size: int = field(32, "pairs per device per forward")
    learning_rate: float = field(2e-4, "peak AdamW learning rate; set by the model's size unless given "
                                  "(alignment/presets.py: 2e-4 for the tiny twins, 5e-7 for 7B)")
    max_length: int = field(512, "longest prompt+response in tokens; a longer pair loses its end, a pair whose prompt "
                            "alone is that long is dropped (counted)")
    beta: float = field(0.1, "weight of the log-ratio to the reference in the implicit reward: higher keeps the "
                        "policy closer to the reference")
    loss_type: str = field("sigmoid", f"TRL's DPO loss: {', '.join(LOSS_TYPES)} (sigmoid: DPO)")
    sft_weight: float = field(0.0, "weight of a negative log-likelihood term on the chosen responses added to the "
                              "loss (RPO; the train and held-out losses then include it); it keeps their likelihood "
                              "from falling with the rejected ones'. 0: off")
    eval_every: int = field(10, "a held-out point (reward, gold, KL) every N optimizer steps and before the first; "
                            "0: off")
    eval_prompts: int = field(64, "held-out prompts of those points")
    eval_samples: int = field(4, "sampled responses per held-out prompt in the final comparison")
    max_new_tokens: int = field(20, "longest response generated in the held-out evaluation")
    temperature: float = field(1.0, "sampling temperature of the held-out evaluation")
    max_prompt_length: int = field(512, "longest prompt in tokens in the held-out evaluation; longer ones lose their "
                                   "beginning")
    reward_model: str = field("", "store id run/rm of the reward model that judges the held-out evaluation; empty: "
                              "the run's")
    guard_collapse: bool = field(False, "when a held-out point shows the policy's answers collapsed (alignment/"
                                 "health.py), stop and publish the policy of the last healthy held-out point")

    def check(self) -> None:
        if self.sft_weight < 0:
            raise config.ConfigError("sft_weight must be 0 (off) or more")
        if self.sft_weight and self.loss_type == "sft":
            raise config.ConfigError("sft_weight adds the NLL that loss_type=sft already is: set one of them")
        if self.guard_collapse and not self.eval_every:
            raise config.ConfigError("guard_collapse needs held-out points to watch: set eval_every to a number "
                                     "of steps")


class DPOTrainer(batching.LengthGrouping, TRLDPOTrainer):
    """TRL's DPOTrainer; with dpo.group_by_length its batches hold pairs of similar length."""

    def example_lengths(self, dataset) -> list[int]:  # a pair pads to its prompt and its longer response
        return [len(p) + max(len(c), len(r))
                for p, c, r in zip(dataset["prompt_ids"], dataset["chosen_ids"], dataset["rejected_ids"])]


@dataclasses.dataclass
class Config(config.StageConfig):
    dpo: DPOSettings = field(DPOSettings(), "DPO settings")
    lora: config.LoraSettings = field(config.LoraSettings(), "train LoRA adapters on the SFT policy; the reference "
                                      "is then the same weights with the adapters disabled (no second copy)")


def losses(d: DPOSettings) -> dict:
    """DPOConfig's loss arguments: TRL sums its losses with weights, here the preference loss and, with
    sft_weight, the chosen responses' mean token NLL."""
    if not d.sft_weight:
        return dict(loss_type=[d.loss_type])
    return dict(loss_type=[d.loss_type, "sft"], loss_weights=[1.0, d.sft_weight])


def load_scorer(rm, spec, tokenizer, cfg: Config) -> scoring.RewardScorer:
    """The reward model as PPO's judge (alignment/rl/models.py): frozen, any tokenizer (scored from the text
    when it is not the policy's)."""
    rm_spec = registry.get(rm.manifest["model"], template=rm.manifest["template"], tokenizer=rm.path)
    rm_tokenizer = loading.load_tokenizer(rm.path, rm_spec)
    reward_model = loading.load_model(rm.path, AutoModelForSequenceClassification, rm_spec, cfg.quantization,
                                      cfg.compute_dtype, tokenizer=rm_tokenizer, precision=cfg.precision)
    reward_model.requires_grad_(False).eval()
    print(f"[dpo] {loading.footprint('reward model', reward_model)} (judge of the held-out evaluation only)")
    return scoring.RewardScorer(reward_model, rm_tokenizer, rm_spec, tokenizer, spec)


def main(argv: list[str]) -> None:
    # 1. config, store, the run's SFT checkpoint (start and reference) and reward model (judge only)
    cfg = config.cli(Config, argv, default_yaml="configs/dpo.yaml")
    d = cfg.dpo
    if d.loss_type not in LOSS_TYPES:
        raise SystemExit(f"dpo.loss_type: {d.loss_type!r} is not one of TRL's DPO losses: {', '.join(LOSS_TYPES)}")
    started = time.time()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    store, run = Store(cfg.store), cfg.run_name
    sft = store.get(run, "sft")
    rm = store.get(*d.reward_model.split("/", 1)) if d.reward_model else store.get(run, "rm")
    store.require_fresh(sft, rm, allow_stale=cfg.allow_stale)
    spec = registry.get(cfg.model, template=sft.manifest["template"], tokenizer=sft.path)
    tensorboard = store.run_dir(run) / "tensorboard" / "dpo"
    os.environ["TENSORBOARD_LOGGING_DIR"] = str(tensorboard)

    # 2. the policy from SFT (trained: fp32); the reference: the SFT weights frozen, or with LoRA the policy's
    # adapters off (TRL does it when given a peft_config and no ref_model); the judge
    torch.manual_seed(cfg.seed)
    tokenizer = loading.load_tokenizer(sft.path, spec)
    cfg.check_combinations(trains_weights=True, lora=cfg.lora.enabled)
    work_dir = store.run_dir(run) / ".trainer-dpo"  # the trainer's resumable checkpoints
    distributed.check_final_save("dpo")  # the end's settings, checked at the start
    planned = publish.planned_peak_mb("dpo", cfg)  # the memory plan's figure, before DeepSpeed's config exists
    # the trainer's arguments before the models: under ZeRO-3 they make transformers load them partitioned over the
    # processes (DeepSpeed's zero.Init), so that no process holds one whole (training.trainer_config)
    args = training.trainer_config(DPOConfig, "dpo", d, cfg, work_dir, beta=d.beta, **losses(d),
                                   eval_strategy="no")  # held-out pairs once at the end
    distributed.check_shared_store(store.root)  # every process (every node) sees one store
    # a saved checkpoint resumes on the launch that saved it (another stops here, before the model loads)
    resume.check_trainer_launch(work_dir, cfg.resume, "dpo")
    quantized = dict(quantization=cfg.quantization, compute_dtype=cfg.compute_dtype)
    model = loading.load_model(sft.path, AutoModelForCausalLM, spec, **quantized, tokenizer=tokenizer, trained=True)
    frozen = {**quantized, "precision": cfg.precision}  # the frozen ones' dtype follows it (loading.frozen_dtype)
    # (given to TRL: it would build the reference from the policy's config path, for an SFT adapter its base)
    ref_model = None if cfg.lora.enabled else loading.load_model(sft.path, AutoModelForCausalLM, spec, **frozen,
                                                                 tokenizer=tokenizer)
    eval_ref = ref_model  # the held-out evaluation's; under ZeRO-3 TRL makes its own an engine for the loss only
    if ref_model is not None and distributed.deepspeed_stage() == 3:
        eval_ref = loading.load_model(sft.path, AutoModelForCausalLM, spec, **frozen, tokenizer=tokenizer)
    print(f"[dpo] from {sft.id}: {loading.count_parameters(model):,} parameters")
    print(f"[dpo] {loading.footprint('policy', model)}" + ("" if ref_model is None else
                                                            f"; {loading.footprint('reference', ref_model)}"))
    scorer = load_scorer(rm, spec, tokenizer, cfg)
    # the store is written to only now: a model that fails to load leaves no folder behind
    # the parents' uids belong to the state: one trained (or its curve judged) on checkpoints since replaced is not
    # resumed
    resume_from = resume.trainer_resume_point(
        work_dir, {**config.to_dict(cfg), "parent_uids": [sft.manifest["uid"], rm.manifest["uid"]]}, cfg.resume)

    # 3. preference pairs, prompts in the model's template (as the reward model read them); held-out prompts
    def pairs(split: str):
        loaded = data.load_split(cfg.data, split, cfg.limit, cfg.on_error)
        if loaded.skipped:
            print(f"[dpo] {split}: skipped {sum(loaded.skipped.values())} pairs: {dict(loaded.skipped)}")
        records = [{"prompt": spec.format_prompt(r["prompt"]), "chosen": r["chosen"], "rejected": r["rejected"]}
                   for r in loaded.records]
        return Dataset.from_list(records), dict(loaded.skipped)

    (train_pairs, train_skipped), (eval_pairs, eval_skipped) = pairs("prefs_train"), pairs("prefs_eval")
    eval_prompts = [r["prompt"] for r in data.load(cfg.data, "prompts_eval", cfg.limit, cfg.on_error)]
    gold = data.get_profile(cfg.data).gold  # a gold judge exists for the embedded task only

    # 4. train (the arguments every trainer stage shares: training.trainer_config)
    peft_config = None
    if cfg.lora.enabled:
        peft_config = loading.lora_config(cfg.lora, model, spec, "CAUSAL_LM")
    trainer = DPOTrainer(
        model=model, ref_model=ref_model, args=args, train_dataset=train_pairs, eval_dataset=eval_pairs,
        processing_class=tokenizer, peft_config=peft_config, callbacks=callbacks.guarded("dpo", work_dir, cfg),
    )
    # the judge and the evaluation's reference: under ZeRO-3 partitioned engines of their own (distributed.frozen:
    # each forward a collective, which the evaluation's equal shares keep in step), else on this process's device
    if distributed.zero3(trainer.accelerator):
        scorer.model = distributed.frozen(trainer.accelerator, scorer.model)
        eval_ref = distributed.frozen(trainer.accelerator, eval_ref) if eval_ref is not None else None
    else:
        scorer.model.to(trainer.accelerator.device)

    def reference(policy):  # the SFT policy, for the held-out KL and the comparison
        return forwards.AdapterDisabled(policy) if cfg.lora.enabled else eval_ref

    def curve_point(_, step: int) -> dict:  # the whole policy: under ZeRO-3 gathered once for all the decoding
        with distributed.whole_model(trainer.accelerator, trainer.model_wrapped) as whole:
            return evaluation.curve_point(
                whole, reference(whole), scorer, tokenizer, spec, eval_prompts[: d.eval_prompts], step,
                max_new_tokens=d.max_new_tokens, temperature=d.temperature, gold=gold,
                max_prompt_tokens=d.max_prompt_length, seed=cfg.seed)

    collapsed: dict = {}

    def watch(points: list[dict], step: int) -> bool:  # every held-out point against SFT's (step 0); the guard
        # (each process measured its own point: the main one's decides for all)
        signs = distributed.main_decides(lambda: health.watch(points, "dpo", True))
        if d.guard_collapse and signs:
            collapsed.update(step=step, signs=signs)
            return True
        if d.guard_collapse:
            guard.keep_healthy(store, run, "dpo", trainer.accelerator, trainer.model_wrapped, step)
        return False

    writer = SummaryWriter(str(tensorboard)) if trainer.is_world_process_zero() else None
    trainer.add_callback(callbacks.HeldOutCurve(d.eval_every, curve_point, writer, watch))
    resumed_at = int(Path(resume_from).name.split("-")[-1]) if resume_from else 0  # (checkpoint-<step>)
    guard.forget_healthy_after(store, run, "dpo", resumed_at, trainer.is_world_process_zero())
    dropped = len(train_pairs) - len(trainer.train_dataset)
    if dropped:
        print(f"[dpo] {dropped} training pairs whose prompt fills dpo.max_length={d.max_length} tokens were dropped")
    result = training.train(trainer, "dpo", resume_from)
    guarded = {}  # the guard: the last healthy held-out point's weights are the ones measured and published
    if collapsed:
        guarded = guard.publish_healthy(store, run, "dpo", trainer.accelerator, trainer.model_wrapped, collapsed,
                                        "the last checkpoint", "measured and published")
    held_out = trainer.evaluate()  # DPO's own loss and implicit-reward accuracy on the held-out pairs

    # 5. compare with the SFT policy on held-out prompts (every process its share), greedy and sampled, as PPO does
    with distributed.whole_model(trainer.accelerator, trainer.model_wrapped) as whole:
        whole.eval()
        summary = evaluation.compare_policies(
            whole, reference(whole), scorer, tokenizer, spec, eval_prompts, gold=gold,
            max_new_tokens=d.max_new_tokens, temperature=d.temperature, samples=d.eval_samples, seed=cfg.seed,
            max_prompt_tokens=d.max_prompt_length, on_all=distributed.on_all(trainer.accelerator),
        )
    peaks = training.peak_memory_per_process(trainer)  # every process: each its own
    weights = training.trained_weights(trainer)  # every process: under ZeRO-3 each holds a shard
    if not trainer.is_world_process_zero():  # one process writes the result
        return
    writer.close()

    # 6. save: the policy (or its adapter on the SFT model) and the manifest. The reward model is no parent: the
    # weights do not depend on it (a retrained one leaves them valid), only the evaluation does, which names it.
    metrics = {
        **summary,  # eval_prompts, greedy, sampled: PPO's keys
        "peak_memory_mb_per_process": peaks,
        "planned_peak_mb": planned,
        "eval_curve": callbacks.HeldOutCurve.points(trainer.state),
        "train_loss": result.training_loss,
        "eval_loss": held_out["eval_loss"],
        "eval_reward_accuracy": held_out.get("eval_rewards/accuracies"),
        "eval_reward_margin": held_out.get("eval_rewards/margins"),
        "eval_pairs": len(trainer.eval_dataset),
        "pairs_seen": round(trainer.state.epoch * len(trainer.train_dataset)),  # over all processes
        "dropped_too_long": dropped,
        **guarded,
    }
    publish.publish(trainer, result, store, cfg, spec, tokenizer, weights, stage="dpo", started=started, parent=sft,
                     splits=["prefs_train", "prefs_eval", "prompts_eval"],
                     skipped={"prefs_train": train_skipped, "prefs_eval": eval_skipped}, metrics=metrics,
                     evaluated_with={"reward_model": rm.id, "uid": rm.manifest["uid"]})
    guard.clear_healthy(store, run, "dpo")
    # the guard may publish step 0's policy: the SFT policy itself, whose implicit rewards are all 0 (TRL counts
    # a tie as a wrong pair)
    ties = " (the published policy is the SFT policy: every pair ties)" if \
        guarded.get("guard", {}).get("published_step") == 0 and metrics["eval_reward_accuracy"] == 0 else ""
    print(f"[dpo] train loss {metrics['train_loss']:.4f}, held-out loss {metrics['eval_loss']:.4f}, held-out "
          f"implicit-reward accuracy {metrics['eval_reward_accuracy']:.3f} on {metrics['eval_pairs']} pairs{ties}")
    print(report.format_comparison(summary, "dpo"))


if __name__ == "__main__":
    config.run(main)
