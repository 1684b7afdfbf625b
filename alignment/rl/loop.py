"""The one RL loop: start (config, accelerator, inputs), train (the steps), finish (compare with SFT, publish).
Each step: 1. rollout: sample responses to a batch of prompts (group_size each); 2. score them: the policy's
log-probs (and the critic's values) from the training forward, the frozen reference's log-probs, the reward
model's score; 3. advantages, by the algorithm; 4. update: epochs of the algorithm's loss on minibatches, a step
refused by every process when not finite; 5. log, evaluate, save a resumable state.

Several processes (Accelerate, DeepSpeed ZeRO-2/3) each sample and train on their own share of every batch; the
trained model is one module (forwards.ActorCritic) in one engine; the reference and the reward model are frozen:
under ZeRO-3 partitioned engines of their own, else whole in every process (see alignment/distributed.py).
"""

from __future__ import annotations

import dataclasses
import json
import time

import torch
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

import alignment
from alignment import (
    config,
    data,
    distributed,
    evaluation,
    forwards,
    guard,
    health,
    loading,
    machine,
    ppo,
    publish,
    report,
    rewards,
)
from alignment.rl import state as rl_state
from alignment.rl import steps
from alignment.rl.models import Models
from alignment.rl.types import RLState
from alignment.store import Store


@dataclasses.dataclass
class Session:
    """One run of an RL stage: its config and settings (the config's section named stage), the accelerator, the
    store and the inputs (the run's SFT checkpoint: policy init and reference; the reward model)."""

    cfg: object
    settings: object
    stage: str
    accelerator: object
    store: Store
    run: str
    sft: object
    rm: object  # None where the stage is rewarded by functions alone
    started: float
    planned_peak_mb: float | None  # the memory plan's figure for the run, for the manifest
    resume_how: str | None  # how a saved state resumes on this launch (resume.how_to_resume), None: none to resume


@dataclasses.dataclass
class Trained:
    """What train() hands to finish(): the prepared model, the final state, and the loop's figures."""

    model: object
    models: Models  # the frozen ones as they ran (under ZeRO-3, engines)
    state: RLState
    metrics: dict
    eval_prompts: list
    eval_columns: dict  # the data's kept fields of each held-out prompt, for the reward functions
    rewards: object  # rewards.Rewards: what the policy was rewarded by


def start(cfg, stage: str) -> Session:
    """The accelerator (DeepSpeed's config honoured) and the inputs, checked fresh; each process seeded apart, so
    each samples its own responses."""
    settings, started = getattr(cfg, stage), time.time()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    cfg.check_combinations(trains_weights=True, lora=cfg.lora.enabled)
    planned = publish.planned_peak_mb(stage, cfg)  # (before the accelerator: see there)
    distributed.check_final_save(stage)
    accelerator = distributed.make_accelerator(settings.mini_batch_size, settings.max_grad_norm, cfg.precision)
    torch.manual_seed(cfg.seed + accelerator.process_index)
    store, run = Store(cfg.store), cfg.run_name
    distributed.check_shared_store(store.root)  # every process (every node) sees one store
    resume_how = rl_state.check_launch(store, run, stage, cfg, accelerator)  # (before any model loads)
    sft = store.get(run, "sft")
    rm = None  # rewarded by functions alone: no reward model is read (rewards.py)
    if rewards.MODEL in settings.rewards:
        rm = store.get(*settings.reward_model.split("/", 1)) if settings.reward_model else store.get(run, "rm")
    store.require_fresh(*(c for c in (sft, rm) if c), allow_stale=cfg.allow_stale)  # e.g. an rm on an older SFT
    return Session(cfg, settings, stage, accelerator, store, run, sft, rm, started, planned, resume_how)


def train(session: Session, models: Models, algorithm) -> Trained:
    """Steps 1-5 from a fresh state, or from the last complete state saved by a run with the same config."""
    cfg, s, stage, accelerator = session.cfg, session.settings, session.stage, session.accelerator
    store, run = session.store, session.run
    main_process = accelerator.is_main_process
    writer = SummaryWriter(str(store.run_dir(run) / "tensorboard" / stage)) if main_process else None  # once loaded
    if s.activation_checkpointing:
        forwards.checkpoint_activations(models.model)
    distributed.fit_zero3(accelerator, models.model.policy.config.hidden_size)
    optimizer = distributed.optimizer(accelerator, [q for q in models.model.parameters() if q.requires_grad],
                                      s.learning_rate)
    model, optimizer = accelerator.prepare(models.model, optimizer)
    distributed.share_master_weights(model)
    # the frozen models: under ZeRO-3 partitioned engines of their own (distributed.frozen), else as loaded
    # (with LoRA the reference is the trained policy with its adapters off: nothing of its own to partition)
    reference, scorer = models.reference, models.scorer
    if not cfg.lora.enabled:
        reference = distributed.frozen(accelerator, reference, s.offload_frozen)
    if scorer is not None:
        scorer.model = distributed.frozen(accelerator, scorer.model, s.offload_frozen)
    models = models._replace(reference=reference)
    machine.give_back_freed_memory()  # what loading and building the engines freed
    unwrapped = accelerator.unwrap_model(model)
    held = {name: round(distributed.held_share(m), 4) for name, m in (
        ("policy", unwrapped.policy), ("critic", unwrapped.critic), ("reference", reference),
        ("reward_model", scorer and scorer.model)) if m is not None}  # (with LoRA the reference is the policy)
    zero = distributed.deepspeed_stage()
    all_done = distributed.all_processes_done(accelerator) if zero == 3 else None
    responses = f" x {algorithm.group_size} responses" if algorithm.group_size > 1 else ""
    functions = [x for x in s.rewards if x != rewards.MODEL]
    judged = (f"reward model{' and critic' if algorithm.critic else ''} from {session.rm.id}"
              + (f", and {', '.join(functions)}" if functions else "") if session.rm else
              f"rewarded by {', '.join(functions)}{', critic from the SFT body' if algorithm.critic else ''}")
    print(f"[{stage}] policy and reference from {session.sft.id}, {judged}; {accelerator.num_processes} "
          f"process(es) x {s.batch_size} prompts{responses} per step" + (f", DeepSpeed ZeRO-{zero}" if zero else ""))
    records = data.load(cfg.data, "prompts_train", cfg.limit, cfg.on_error)  # (with the fields the data keeps)
    prompts = [r["prompt"] for r in records]
    eval_records = data.load(cfg.data, "prompts_eval", cfg.limit, cfg.on_error)
    eval_prompts = [r["prompt"] for r in eval_records]
    kept = rewards.kept_columns(records, eval_records, stage)  # the same fields beside every prompt, or one line

    def evaluate(step: int) -> dict:
        return steps.evaluate(accelerator, model, reference, scorer, models.tokenizer, models.spec,
                              eval_prompts, cfg, s, step, writer, stage)

    order = torch.Generator().manual_seed(cfg.seed)  # prompt order and minibatches: the same in every process
    # the parents' uids belong to the state: a state trained on checkpoints since replaced is not resumed
    state = RLState(config={**config.to_dict(cfg), "parent_uids": [c.manifest["uid"] for c in parents(session)]},
                    kl_coef=s.kl_coef, moments=algorithm.fresh_moments())
    rewarder = rewards.Rewards(rewards.terms(s.rewards, s.reward_weights))
    if resumed := rl_state.resumed(store, run, stage, cfg, state, accelerator, order, session.resume_how,
                                   s.batch_size * algorithm.group_size):
        state = resumed
        algorithm.restore(state)
        rewarder.load_state_dict(state.reward_moments)
    guard.forget_healthy_after(store, run, stage, state.step if resumed else 0, main_process)
    if not resumed and s.eval_every:
        state.eval_log.append(evaluate(0))
        if s.guard_collapse:  # the SFT policy: healthy by definition, published if training collapses at once
            guard.keep_healthy(store, run, stage, accelerator, model, 0)
    config.PROGRESS.update(stage=stage, step=state.step, state=lambda: store.load_state_path(run, stage))
    per_step = s.batch_size * accelerator.num_processes  # prompts consumed per step, over all processes
    bf16 = machine.use_bf16(cfg.precision)
    autocast = torch.autocast(accelerator.device.type, dtype=torch.bfloat16, enabled=bf16)
    seconds = dict.fromkeys(("generate", "score", "train", "loop"), 0.0)  # this session's time, by phase
    loop_started, first_step, collapsed = time.time(), state.step, None
    trained = [q for q in model.parameters() if q.requires_grad]
    tokenizer, spec = models.tokenizer, models.spec

    for step in (bar := tqdm(range(state.step + 1, s.steps + 1), desc=stage,
                             disable=not (main_process and alignment.INTERACTIVE),
                             initial=state.step, total=s.steps, dynamic_ncols=True)):
        # 1. rollout: each process samples group_size responses to each prompt of its share of the batch
        mine = steps.next_prompts(state, len(prompts), per_step, order, accelerator)
        batch = [records[i] for i in mine for _ in range(algorithm.group_size)]
        t0 = time.time()
        with distributed.whole_policy(accelerator, model) as policy, autocast:
            r = steps.rollout(policy, tokenizer, spec, [x["prompt"] for x in batch], s, all_done)
        machine.give_back_freed_memory()  # (under ZeRO-3 the gathered policy)
        t1 = time.time()
        # 2. score: old log-probs (and values) by the training forward, reference log-probs, reward
        epochs = [ppo.minibatches(r.attention.sum(1), s.mini_batch_size, order, s.group_by_length)
                  for _ in range(algorithm.epochs)]
        with autocast:  # (the reference runs only where a KL term reads it: kl_coef 0 needs none)
            scores = steps.score(model, reference if algorithm.needs_reference else None,
                                 scorer if rewarder.uses_model else None, r, s, epochs[0])
        columns = {k: [x[k] for x in batch] for k in kept}  # the data's kept fields, for the reward functions
        scores = steps.reward(rewarder, accelerator, tokenizer, r, scores, columns, s, step, stage)
        state.truncated_prompts += sum(len(ids) > s.max_prompt_length for ids in
                                       tokenizer([spec.format_prompt(prompts[i]) for i in mine]).input_ids)
        machine.give_back_freed_memory()
        t2 = time.time()

        # 3. advantages, the algorithm's way
        adv = algorithm.advantages(accelerator, r, scores, state)
        save_now = step % cfg.save_every == 0 or step == s.steps  # the last too: a failure in the comparison or the
        if adv is None:  # save that follow then repeats no training
            guard.count_skip(state, "reward", step, cfg.max_bad_steps, algorithm.method)
            state.step = step
            if save_now:
                algorithm.keep(state)
                state.reward_moments = rewarder.state_dict()
                rl_state.save(store, run, stage, accelerator, order, state)
            continue

        # 4. update: the algorithm's loss over each epoch's minibatches
        stats = {key: [] for key in algorithm.stats}
        for minibatches in epochs:
            for idx in minibatches:
                idx = idx.to(r.mask.device)
                with autocast:
                    new = forwards.actor_critic_forward(model, r.query_responses[idx], r.attention[idx], r.context,
                                                        s.temperature)
                loss, values = algorithm.loss(new, r, scores, adv, idx, state)
                machine.give_back_freed_memory()  # (under ZeRO-3 the layers the forward gathered and let go)
                if steps.optimizer_step(accelerator, model, optimizer, trained, loss, cfg, state, s.max_grad_norm,
                                        algorithm.method):
                    for key, value in zip(algorithm.stats, values):
                        stats[key].append(value.item())
                machine.give_back_freed_memory()  # the minibatch's activations and gradients
        t3 = time.time()
        for phase, spent in (("generate", t1 - t0), ("score", t2 - t1), ("train", t3 - t2)):
            seconds[phase] += spent

        # 5. log, adapt (PPO's KL coefficient), evaluate, save a resumable state
        state.step = config.PROGRESS["step"] = step
        record = {
            "step": step, "reward": accelerator.gather(scores.rewards).mean().item(),
            **algorithm.record(accelerator, r, scores, adv, state),
            "entropy": ppo.masked_mean(scores.entropy, r.mask).item(), "response_length": r.mask.sum(1).mean().item(),
            "ended": r.ended.float().mean().item(), **{k: sum(v) / len(v) for k, v in stats.items() if v},
            **term_means(accelerator, scores.terms, rewarder),
            "skipped_non_finite": state.skipped, "generate_s": t1 - t0, "score_s": t2 - t1, "train_s": t3 - t2,
            "step_s": time.time() - t0,
        }
        state.log.append(record)
        if writer:
            for key, value in record.items():
                writer.add_scalar(f"{stage}/{key}", value, step)
        bar.set_postfix(reward=f"{record['reward']:.3f}", kl=f"{record['kl']:.3f}",
                        len=f"{record['response_length']:.1f}")
        algorithm.after_step(state, record, per_step)
        if s.eval_every and (step % s.eval_every == 0 or step == s.steps):
            t4 = time.time()
            state.eval_log.append(evaluate(step))
            signs = health.watch(state.eval_log, stage, main_process)  # (the same in every process: gathered)
            if s.guard_collapse and not signs:
                guard.keep_healthy(store, run, stage, accelerator, model, step)
            loop_started += time.time() - t4  # held-out evaluation is not training time
            if s.guard_collapse and signs:
                collapsed = {"step": step, "signs": signs}
                break
        if save_now:
            algorithm.keep(state)
            state.reward_moments = rewarder.state_dict()
            rl_state.save(store, run, stage, accelerator, order, state)

    seconds["loop"] = time.time() - loop_started
    distributed.release_optimizer_states(optimizer)  # (the resumable state holds them where it was saved)
    machine.give_back_freed_memory()
    episodes = (state.step - first_step) * per_step * algorithm.group_size  # sampled and trained on in this session
    guarded = {}  # the guard: the weights of the last healthy held-out point are the ones compared and published
    if collapsed:
        guarded = guard.publish_healthy(store, run, stage, accelerator, model, collapsed,
                                        "the last resumable state", "compared and published")
    if writer:
        writer.close()
    return Trained(model, models, state, {
        "steps": state.step, "skipped_non_finite": state.skipped, "truncated_prompts": state.truncated_prompts,
        "processes": accelerator.num_processes, "deepspeed_zero_stage": zero, **speed(seconds, episodes, bf16),
        **algorithm.final(state), **guarded,
        "parameters_held_per_process": distributed.every_process(accelerator, held),
    }, eval_prompts, {k: [r[k] for r in eval_records] for k in kept}, rewarder)



def finish(session: Session, models: Models, trained: Trained) -> None:
    """6. The trained policy against the SFT policy on held-out prompts (every process its share), greedy and
    sampled; 7. published as <run>/<stage>: the policy as a causal LM, the critic beside it, the per-step log, the
    manifest."""
    cfg, s, accelerator, stage = session.cfg, session.settings, session.accelerator, session.stage
    models = trained.models
    all_done = distributed.all_processes_done(accelerator) if distributed.zero3(accelerator) else None
    with distributed.whole_policy(accelerator, trained.model) as policy:
        summary = evaluation.compare_policies(
            policy, models.reference, models.scorer, models.tokenizer, models.spec, trained.eval_prompts,
            gold=data.get_profile(cfg.data).gold, max_new_tokens=s.max_new_tokens, temperature=s.temperature,
            samples=s.eval_samples, seed=cfg.seed, max_prompt_tokens=s.max_prompt_length,
            on_all=distributed.on_all(accelerator), all_done=all_done,
            terms=[t for t in trained.rewards.terms if t.function is not None], columns=trained.eval_columns,
        )
    machine.give_back_freed_memory()
    weights = accelerator.get_state_dict(trained.model)  # every process: under ZeRO-3 the main one gets whole tensors
    peaks = distributed.every_process(accelerator, round(machine.peak_memory_mb(), 1))
    accelerator.wait_for_everyone()
    if not accelerator.is_main_process:
        return
    metrics = {**summary, "eval_curve": trained.state.eval_log, **trained.metrics,
               "peak_memory_mb_per_process": peaks, "planned_peak_mb": session.planned_peak_mb,
               "duration_s": round(time.time() - session.started, 1)}
    save(session, models, accelerator.unwrap_model(trained.model), weights, trained.state, metrics)
    print(report.format_comparison(summary, stage))


def save(session: Session, models: Models, model, weights: dict, state: RLState, metrics: dict) -> None:
    """The policy in the entry's dtype (bf16 for real models: the size it came in), the critic (PPO's) beside it as
    value_model/, the per-step log <stage>_log.jsonl, the manifest; then the resumable state goes."""
    cfg, store, run, stage, spec = session.cfg, session.store, session.run, session.stage, models.spec
    dtype = loading.DTYPES[spec.dtype]
    weights = {k: v.to(dtype) if v.is_floating_point() and not cfg.quantization else v for k, v in weights.items()}
    tmp = store.staging(run, stage)
    model.policy.save_pretrained(tmp, state_dict=_part(weights, "policy."))
    loading.save_tokenizer(models.tokenizer, tmp, spec)
    if model.critic is not None:
        model.critic.save_pretrained(tmp / "value_model", state_dict=_part(weights, "critic."))
    with open(tmp / f"{stage}_log.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in state.log)
    checkpoint = store.publish(tmp, publish.manifest(cfg, spec, stage, parents=parents(session),
                                                     splits=["prompts_train", "prompts_eval"], metrics=metrics))
    store.clear_state(run, stage)  # published: a rerun starts a new training
    guard.clear_healthy(store, run, stage)
    print(f"[{stage}] saved {checkpoint.id} -> {checkpoint.path}")


def parents(session: Session) -> list:
    """The checkpoints the policy is trained from: the SFT policy, and the reward model where one rewards it."""
    return [c for c in (session.sft, session.rm) if c is not None]


def term_means(accelerator, terms: dict, rewarder: rewards.Rewards) -> dict:
    """reward/<name>: each reward term's mean raw value over the responses it applies to (every process's), where
    the reward is more than the reward model alone; NaN where it applied to none."""
    if [t.function for t in rewarder.terms] == [None]:
        return {}
    out = {}
    for name, values in terms.items():
        everyone = accelerator.gather(values.float())
        applicable = everyone[~torch.isnan(everyone)]
        out[f"reward/{name}"] = applicable.mean().item() if applicable.numel() else float("nan")
    return out


def speed(seconds: dict, episodes: int, bf16: bool) -> dict:
    """Episodes (prompt + sampled response) per second of the training loop, and where its time went."""
    loop = seconds["loop"]
    split = {k: round(v, 2) for k, v in seconds.items() if k != "loop"}
    return {"precision": "bf16" if bf16 else "fp32", "episodes": episodes, "loop_s": round(loop, 2),
            "episodes_per_s": round(episodes / loop, 2) if loop else None,
            "time_s": {**split, "other": round(loop - sum(split.values()), 2)},
            "peak_memory_mb": round(machine.peak_memory_mb(), 1)}


def _part(weights: dict, prefix: str) -> dict:
    return {k.removeprefix(prefix): v for k, v in weights.items() if k.startswith(prefix)}
