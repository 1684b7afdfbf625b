"""Stage 3, PPO: improve the SFT policy against the reward model while a KL penalty keeps it close.

    make ppo [MODEL=tiny-llama] [ARGS="ppo.steps=50 ppo.kl_coef=0.1"]
    make ppo NPROC=8 ACCELERATE_CONFIG=configs/accelerate/zero3.yaml
    python stages/ppo.py --config configs/ppo.yaml key=value ...

Each step: 1. rollout: sample responses to a batch of prompts; 2. score them: the policy's log-probs and
the critic's values (one forward, the training one), the frozen reference's log-probs, the reward model's
score; 3. per-token rewards (KL penalty, score at the last token) and GAE advantages; 4. update: epochs of
clipped policy and value updates on minibatches; 5. log, evaluate, save a resumable state. The loop is ours
(TRL no longer ships PPO); the math is in alignment/ppo.py, the forwards in alignment/forwards.py.
At the end the policy is compared with the SFT policy on held-out prompts, and saved as <run>/ppo.

Several processes (Accelerate, DeepSpeed ZeRO-2/3) each sample and train on their own share of every batch;
policy and critic are one module (forwards.ActorCritic) in one engine; the reference and the reward model
are frozen, whole in every process (see alignment/distributed.py). stages/grpo.py runs this loop without the
critic: it imports the models, rollout, evaluation, optimizer step and resumable state from here.
"""

from __future__ import annotations

import alignment  # first: quiets third-party noise (alignment/__init__.py)
import dataclasses
import json
import time
from pathlib import Path
from typing import NamedTuple

import torch
from accelerate.utils import gather_object
from peft import get_peft_model
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from alignment import config, data, distributed, evaluation, forwards, loading, ppo, registry, scoring, training
from alignment.config import field
from alignment.store import Store

@dataclasses.dataclass
class PPOSettings:
    steps: int = field(60, "PPO iterations: rollout batches sampled, scored and trained on")
    batch_size: int = field(64, "prompts per rollout batch")
    mini_batch_size: int = field(16, "sequences per optimizer step inside a PPO epoch, per process (DeepSpeed's "
                                 "micro batch)")
    ppo_epochs: int = field(4, "passes over each rollout batch")
    learning_rate: float = field(1e-4, "AdamW learning rate for policy and critic")
    max_new_tokens: int = field(20, "longest response sampled")
    max_prompt_length: int = field(512, "longest prompt in tokens; longer ones lose their beginning (counted)")
    temperature: float = field(1.0, "sampling temperature; log-probs are computed at the same temperature")
    kl_coef: float = field(0.3, "beta of the per-token penalty beta * (log pi - log pi_ref)")
    adaptive_kl: bool = field(False, "adapt kl_coef towards kl_target (Ziegler et al., 2019)")
    kl_target: float = field(1.0, "target per-sequence KL of the adaptive controller")
    kl_horizon: int = field(10000, "horizon (episodes) of the adaptive controller")
    gamma: float = field(1.0, "discount")
    lam: float = field(0.95, "GAE lambda")
    clip_range: float = field(0.2, "policy ratio clip epsilon")
    value_clip: float = field(0.2, "value clip around the rollout's values")
    vf_coef: float = field(0.1, "weight of the value loss")
    group_by_length: bool = field(True, "minibatches of sequences of similar length (in a random order each "
                                  "epoch): each pads less; false: uniformly random minibatches")
    whiten_advantages: bool = field(True, "normalise advantages over each batch")
    normalize_reward: bool = field(True, "scale scores by running mean and std of the reward model's output")
    reward_clip: float = field(5.0, "clip (normalised) scores to +-reward_clip")
    missing_eos_penalty: float = field(1.0, "subtracted from the score of a response that never ends; 0: off")
    max_grad_norm: float = field(1.0, "gradient clipping")
    eval_samples: int = field(4, "sampled responses per held-out prompt in the final comparison")
    reward_model: str = field("", "store id run/rm of the reward model; empty: the run's. Any tokenizer: "
                              "when it differs from the policy's, responses are scored from their text")
    eval_every: int = field(10, "evaluate on held-out prompts every N steps (and before the first); 0: off")
    eval_prompts: int = field(64, "held-out prompts used by the evaluation during training")


@dataclasses.dataclass
class Config(config.StageConfig):
    ppo: PPOSettings = field(PPOSettings(), "PPO settings")
    lora: config.LoraSettings = field(config.LoraSettings(), "train LoRA adapters on the SFT policy; the reference "
                                      "is then the same weights with the adapters disabled (no second copy)")


class Rollout(NamedTuple):
    """One process's share of a rollout batch: B prompts and the responses sampled to them."""

    prompts: list  # B raw prompts (strings or messages)
    query_responses: torch.Tensor  # [B, Q + T] prompts left-padded to Q tokens, then responses
    attention: torch.Tensor  # [B, Q + T] 1 on prompt tokens and on response tokens up to the first EOS
    responses: torch.Tensor  # [B, T] sampled tokens, the pad token after the first EOS
    mask: torch.Tensor  # [B, T] float, 1 on response tokens up to and including the first EOS
    ended: torch.Tensor  # [B] bool, whether the response has an EOS

    @property
    def context(self) -> int:
        return self.query_responses.shape[1] - self.responses.shape[1]


class Scores(NamedTuple):
    logprobs: torch.Tensor  # [B, T] the policy's, from the training forward: the update's old log-probs
    values: torch.Tensor  # [B, T] the critic's
    ref_logprobs: torch.Tensor  # [B, T] the frozen reference's
    entropy: torch.Tensor  # [B, T] of the policy's distribution
    rewards: torch.Tensor  # [B] the reward model's raw score, less the missing-EOS penalty


@dataclasses.dataclass
class PPOState:
    """What a resumed run needs to go on as if never stopped (beside weights, optimizer and RNG states)."""

    config: dict
    kl_coef: float
    step: int = 0
    queue: list = dataclasses.field(default_factory=list)  # prompt indices not yet sampled, in order
    log: list = dataclasses.field(default_factory=list)  # one record per step
    eval_log: list = dataclasses.field(default_factory=list)  # held-out points every eval_every steps
    skipped: int = 0  # updates skipped for a non-finite loss or reward
    in_a_row: int = 0
    truncated_prompts: int = 0
    moments: dict = dataclasses.field(default_factory=dict)  # running statistics of the reward model's scores


def load_policies(cfg, accelerator, sft, rm, stage: str = "ppo"):
    """Tokenizer, the trained policy (LoRA: with new adapters), the frozen reference and the reward model's scorer:
    what PPO and GRPO share. Trained weights in fp32 (loading.py), frozen ones in the entry's dtype."""
    spec = registry.get(cfg.model, template=sft.manifest["template"], tokenizer=sft.path)
    rm_spec = registry.get(rm.manifest["model"], template=rm.manifest["template"], tokenizer=rm.path)
    tokenizer = loading.load_tokenizer(sft.path, spec)
    rm_tokenizer = loading.load_tokenizer(rm.path, rm_spec)
    quantized = dict(quantization=cfg.quantization, compute_dtype=cfg.compute_dtype)
    policy = loading.load_model(sft.path, AutoModelForCausalLM, spec, **quantized, tokenizer=tokenizer, trained=True)
    with distributed.outside_zero3_init(accelerator):
        if cfg.lora.enabled:
            policy = get_peft_model(policy, loading.lora_config(cfg.lora, policy, spec, "CAUSAL_LM"))
            ref_policy = forwards.AdapterDisabled(policy)
        else:
            ref_policy = loading.load_model(sft.path, AutoModelForCausalLM, spec, **quantized, tokenizer=tokenizer)
            ref_policy.requires_grad_(False).to(accelerator.device)
        reward_model = loading.load_model(rm.path, AutoModelForSequenceClassification, rm_spec, **quantized,
                                          tokenizer=rm_tokenizer)
    scorer = scoring.RewardScorer(reward_model, rm_tokenizer, rm_spec, tokenizer, spec)
    for name, m in (("policy", policy), ("reference", ref_policy), ("reward model", reward_model)):
        shared = " (the policy's weights, adapters off)" if name == "reference" and cfg.lora.enabled else ""
        print(f"[{stage}] {loading.footprint(name, m)}{shared}")
    for m in (policy, ref_policy, reward_model):
        loading.disable_dropout(m)
        m.eval()  # no dropout anywhere; gradients still flow in eval mode
    reward_model.requires_grad_(False).to(accelerator.device)
    return tokenizer, spec, policy, ref_policy, scorer


def load_models(cfg: Config, accelerator, sft, rm):
    """load_policies' models, the policy joined by the critic (trained) in one ActorCritic."""
    tokenizer, spec, policy, ref_policy, scorer = load_policies(cfg, accelerator, sft, rm)
    quantized = dict(quantization=cfg.quantization, compute_dtype=cfg.compute_dtype)
    # The critic starts as the reward model, or, if that reads other tokens, as the SFT body.
    critic = loading.load_model(sft.path if scorer.by_text else rm.path, AutoModelForSequenceClassification, spec,
                                **quantized, tokenizer=tokenizer, trained=True)
    if cfg.quantization:  # quantized weights train through adapters only: the critic gets its own
        critic = get_peft_model(critic, loading.lora_config(cfg.lora, critic, spec, "SEQ_CLS", modules_to_save=["score"]))
    print(f"[ppo] {loading.footprint('critic', critic)}")
    loading.disable_dropout(critic)
    critic.eval()
    return tokenizer, spec, forwards.ActorCritic(policy, critic), ref_policy, scorer


def rollout(policy, tokenizer, spec, prompts: list, p: PPOSettings, all_done) -> Rollout:
    """1. Responses sampled from the current policy (the whole model, see distributed.whole_model)."""
    query_responses, query_mask, responses = forwards.generate(
        policy, tokenizer, [spec.format_prompt(x) for x in prompts], p.max_new_tokens, p.temperature,
        max_prompt_tokens=p.max_prompt_length, all_done=all_done,
    )
    mask, ended = ppo.response_mask(responses, tokenizer.eos_token_id)
    return Rollout(prompts, query_responses, torch.cat([query_mask, mask.long()], dim=1), responses, mask, ended)


@torch.no_grad()
def score(model, ref_policy, scorer, r: Rollout, p: PPOSettings, minibatches: list[torch.Tensor]) -> Scores:
    """2. Log-probs and values from the training forward, on the minibatches the first epoch trains on: its
    ratio starts at 1 exactly (other minibatches give other widths, and in bf16 log-probs up to 3e-3 nats apart
    on a tiny model); reference log-probs and reward-model scores alike."""
    B, T = r.responses.shape
    logprobs, values, ref_logprobs, entropy = (torch.zeros(B, T, device=r.mask.device) for _ in range(4))
    raw = torch.zeros(B, device=r.mask.device)
    for idx in minibatches:
        idx = idx.to(r.mask.device)
        qr, att = r.query_responses[idx], r.attention[idx]
        logprobs[idx], values[idx], entropy[idx] = forwards.actor_critic_forward(model, qr, att, r.context,
                                                                                 p.temperature, entropy=True)
        ref_logprobs[idx] = forwards.policy_forward(ref_policy, qr, att, r.context, p.temperature)[0]
        raw[idx] = scorer([r.prompts[i] for i in idx.tolist()], qr, att, r.responses[idx])
    rewards = torch.where(r.ended, raw, raw - p.missing_eos_penalty)
    return Scores(logprobs, values, ref_logprobs, entropy, rewards)


def update(accelerator, model, optimizer, r: Rollout, s: Scores, adv: ppo.Advantages, whitened: torch.Tensor,
           cfg: Config, state: PPOState, epochs: list[list[torch.Tensor]], autocast) -> dict:
    """4. Clipped policy and value updates over each epoch's minibatches. A minibatch whose loss is not
    finite in any process is skipped by all of them, before anything is applied (under DeepSpeed backward()
    also steps); without DeepSpeed non-finite gradients are refused too (DeepSpeed's own check does it there)."""
    p = cfg.ppo
    trained = [q for q in model.parameters() if q.requires_grad]
    stats = {"policy_loss": [], "value_loss": [], "clip_frac": [], "value_clip_frac": [], "approx_kl": []}
    for minibatches in epochs:
        for idx in minibatches:
            idx = idx.to(r.mask.device)
            with autocast:
                new = forwards.actor_critic_forward(model, r.query_responses[idx], r.attention[idx], r.context,
                                                    p.temperature)
            pl = ppo.policy_loss(new.logprobs, s.logprobs[idx], whitened[idx], r.mask[idx], p.clip_range)
            vl = ppo.value_loss(new.values, s.values[idx], adv.returns[idx], r.mask[idx], p.value_clip)
            if not optimizer_step(accelerator, model, optimizer, trained, pl.loss + p.vf_coef * vl.loss, cfg, state,
                                  p.max_grad_norm):
                continue
            for key, value in (("policy_loss", pl.loss), ("value_loss", vl.loss), ("clip_frac", pl.clip_frac),
                               ("value_clip_frac", vl.clip_frac), ("approx_kl", pl.approx_kl)):
                stats[key].append(value.item())
    return stats


def optimizer_step(accelerator, model, optimizer, trained: list, loss: torch.Tensor, cfg, state: PPOState,
                   max_grad_norm: float, method: str = "PPO") -> bool:
    """Backward and step on one minibatch's loss; False when skipped (counted in state) for a loss not finite in
    some process, or non-finite gradients."""
    if distributed.any_process(accelerator, not bool(torch.isfinite(loss))):
        skip_update(state, "loss", cfg.max_bad_steps, method)
        return False
    skipped_before = distributed.skipped_by_deepspeed(model)
    accelerator.backward(loss)  # DeepSpeed: also clips (gradient_clipping = max_grad_norm) and steps
    if accelerator.state.deepspeed_plugin is None:
        # gradients are averaged over processes by now, so every process takes the same decision
        if not training.grads_finite(trained):
            optimizer.zero_grad()
            skip_update(state, "gradient", cfg.max_bad_steps, method)
            return False
        accelerator.clip_grad_norm_(trained, max_grad_norm)
        optimizer.step()
        optimizer.zero_grad()
    elif distributed.skipped_by_deepspeed(model) > skipped_before:
        skip_update(state, "gradient", cfg.max_bad_steps, method)
        return False
    state.in_a_row = 0
    if cfg.check_sync:
        training.assert_in_sync(trained, f"{method} step {state.step + 1}")
    return True


def skip_update(state: PPOState, what: str, patience: int, method: str = "PPO") -> None:
    state.skipped += 1
    state.in_a_row += 1
    print(f"[guard] step {state.step + 1}: non-finite {what}, update skipped ({state.skipped} so far)")
    if state.in_a_row >= patience:
        raise training.NonFiniteError(
            f"stopping at {method} step {state.step + 1}: {state.in_a_row} updates in a row had a non-finite {what}; "
            "the last complete state is kept for resuming"
        )


def evaluate_on_all(accelerator, fn, prompts: list) -> dict:
    """fn(prompts) -> {key: per-prompt list}, run by every process on its share of prompts, gathered in order."""
    with accelerator.split_between_processes(prompts) as share:
        part = fn(share)
    if accelerator.num_processes == 1:
        return part
    parts = gather_object([part])
    return {k: [x for q in parts for x in q[k]] for k in part}


def evaluate(accelerator, model, ref_policy, scorer, tokenizer, spec, prompts: list, cfg, step: int,
             writer, stage: str = "ppo") -> dict:
    """Sampled responses to held-out prompts (every process its share): RM reward, gold score (the embedded task),
    KL. Leaves the training RNG untouched. Settings from the config's section named stage (ppo, grpo)."""
    p = getattr(cfg, stage)
    with torch.random.fork_rng(devices=[accelerator.device] if accelerator.device.type == "cuda" else []), \
            distributed.whole_model(accelerator, model) as whole:
        torch.manual_seed(cfg.seed)
        r = evaluate_on_all(accelerator, lambda share: evaluation.rollout_scores(
            whole.policy, ref_policy, scorer, tokenizer, spec, share, max_new_tokens=p.max_new_tokens,
            temperature=p.temperature, greedy=False, gold=data.get_profile(cfg.data).gold, max_prompt_tokens=p.max_prompt_length,
        ), prompts[: p.eval_prompts])
    point = {"step": step, **{f"eval_{k}": evaluation.mean(r[k]) for k in ("reward", "gold", "kl") if r[k]}}
    for key, value in point.items():
        if key != "step" and writer:
            writer.add_scalar(f"{stage}/{key}", value, step)
    return point


def advantages(accelerator, r: Rollout, s: Scores, p: PPOSettings, state: PPOState, moments: ppo.RunningMoments):
    """3. Per-token rewards (KL penalty, the normalised and clipped score at the last token) and GAE advantages;
    reward statistics are shared by all processes. None when a score is not finite in any process."""
    all_scores = accelerator.gather(s.rewards)
    if not torch.isfinite(all_scores).all():
        return None
    scores = s.rewards
    if p.normalize_reward:
        moments.update(all_scores)
        scores = (scores - moments.mean) / moments.std
    rewards = ppo.token_rewards(scores.clamp(-p.reward_clip, p.reward_clip), s.logprobs, s.ref_logprobs, r.mask,
                                state.kl_coef)
    adv = ppo.gae(rewards.rewards, s.values, r.mask, p.gamma, p.lam)
    whitened = ppo.masked_whiten(adv.advantages, r.mask) if p.whiten_advantages else adv.advantages
    return rewards, adv, whitened


def step_record(accelerator, step: int, r: Rollout, s: Scores, rewards: ppo.TokenRewards, stats: dict,
                state: PPOState, times: list[float]) -> dict:
    """One line of ppo_log.jsonl: the batch over all processes, the losses of the update, where the time went."""
    t0, t1, t2, t3 = times
    return {
        "step": step, "reward": accelerator.gather(s.rewards).mean().item(),
        "kl": accelerator.gather(rewards.kl.sum(1)).mean().item(), "kl_coef": state.kl_coef,
        "entropy": ppo.masked_mean(s.entropy, r.mask).item(), "response_length": r.mask.sum(1).mean().item(),
        "ended": r.ended.float().mean().item(), **{k: sum(v) / len(v) for k, v in stats.items() if v},
        "skipped_non_finite": state.skipped, "generate_s": t1 - t0, "score_s": t2 - t1, "train_s": t3 - t2,
        "step_s": time.time() - t0,
    }


def save_training_state(store: Store, run: str, accelerator, order: torch.Generator, state: PPOState,
                        stage: str = "ppo") -> None:
    """Weights, optimizer (under ZeRO each process its shard, with the fp32 master copy), every process's RNG
    (CUDA's too) through accelerator.save_state; the loop state beside them. Atomic: a killed save leaves the
    previous state."""
    folder = Path(distributed.shared_folder(accelerator, lambda: store.state_staging(run, stage)))
    accelerator.save_state(str(folder / "accelerate"))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        torch.save(order.get_state(), folder / "order.pt")
        (folder / "state.json").write_text(json.dumps(dataclasses.asdict(state)))
        store.commit_state(folder, run, stage)
    accelerator.wait_for_everyone()


def load_training_state(folder: Path, accelerator, order: torch.Generator) -> PPOState:
    accelerator.load_state(str(folder / "accelerate"), load_kwargs={"weights_only": True})
    order.set_state(torch.load(folder / "order.pt", weights_only=True))
    return PPOState(**json.loads((folder / "state.json").read_text()))


def next_prompts(state: PPOState, n_prompts: int, per_step: int, order: torch.Generator, accelerator) -> list[int]:
    """This process's share of the next per_step prompt indices, from a queue of seeded permutations (refilled
    when it runs low) that is part of the resumable state: a resumed run takes the prompts an uninterrupted one would."""
    if len(state.queue) < per_step:
        state.queue += torch.randperm(n_prompts, generator=order).tolist()
    mine = state.queue[:per_step][accelerator.process_index :: accelerator.num_processes]
    state.queue = state.queue[per_step:]
    return mine


def resume_training_state(store: Store, run: str, cfg, fresh: PPOState, accelerator, order: torch.Generator,
                          stage: str = "ppo") -> PPOState | None:
    """The state an interrupted run of the same config (its number of steps aside) left, loaded (weights,
    optimizer, RNGs, prompt order), or None to start from fresh; with resume=false a saved state is removed."""
    saved = store.load_state_path(run, stage) if cfg.resume else None
    if not cfg.resume and accelerator.is_main_process and store.load_state_path(run, stage):
        print(f"[{stage}] resume=false: removing the resumable state in {store.state_path(run, stage)}")
        store.clear_state(run, stage)
    if not saved:
        return None
    training.check_same_config(json.loads((saved / "state.json").read_text())["config"], fresh.config, saved,
                               ignore=(f"{stage}.steps",))
    state = dataclasses.replace(load_training_state(saved, accelerator, order), config=fresh.config)
    print(f"[{stage}] resuming after step {state.step} from {saved}")
    return state


def main(argv: list[str]) -> None:
    # 0. config, accelerator, inputs: the run's SFT checkpoint (policy init and reference) and reward model
    cfg = config.cli(Config, argv, default_yaml="configs/ppo.yaml")
    p = cfg.ppo
    started = time.time()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    cfg.check_combinations(trains_weights=True, lora=cfg.lora.enabled)
    accelerator = distributed.make_accelerator(p.mini_batch_size, p.max_grad_norm, cfg.precision)
    main_process = accelerator.is_main_process
    torch.manual_seed(cfg.seed + accelerator.process_index)  # each process samples its own responses
    store, run = Store(cfg.store), cfg.run_name
    sft = store.get(run, "sft")
    rm = store.get(*p.reward_model.split("/", 1)) if p.reward_model else store.get(run, "rm")
    store.require_fresh(sft, rm, allow_stale=cfg.allow_stale)  # e.g. an rm trained on an SFT since replaced
    tokenizer, spec, model, ref_policy, scorer = load_models(cfg, accelerator, sft, rm)
    writer = SummaryWriter(str(store.run_dir(run) / "tensorboard" / "ppo")) if main_process else None  # once loaded
    optimizer = distributed.optimizer(accelerator, [q for q in model.parameters() if q.requires_grad],
                                      p.learning_rate)
    model, optimizer = accelerator.prepare(model, optimizer)
    zero = distributed.deepspeed_stage()
    all_done = distributed.all_processes_done(accelerator) if zero == 3 else None
    print(f"[ppo] policy and reference from {sft.id}, reward model and critic from {rm.id}; "
          f"{accelerator.num_processes} process(es) x {p.batch_size} prompts per step"
          + (f", DeepSpeed ZeRO-{zero}" if zero else ""))

    prompts = [r["prompt"] for r in data.load(cfg.data, "prompts_train", cfg.limit, cfg.on_error)]
    eval_prompts = [r["prompt"] for r in data.load(cfg.data, "prompts_eval", cfg.limit, cfg.on_error)]
    gold = data.get_profile(cfg.data).gold  # a gold judge exists for the embedded task only
    # Training state: fresh, or resumed from the last complete state saved by a run with the same config.
    order = torch.Generator().manual_seed(cfg.seed)  # prompt order and minibatches: the same in every process
    moments = ppo.RunningMoments()
    # the parents' uids belong to the state: a state trained on checkpoints since replaced is not resumed
    state = PPOState(config={**config.to_dict(cfg), "parent_uids": [sft.manifest["uid"], rm.manifest["uid"]]},
                     kl_coef=p.kl_coef, moments=moments.state_dict())
    if resumed := resume_training_state(store, run, cfg, state, accelerator, order):
        state = resumed
        moments.load_state_dict(state.moments)
    elif p.eval_every:
        state.eval_log.append(evaluate(accelerator, model, ref_policy, scorer, tokenizer, spec, eval_prompts, cfg, 0,
                                       writer))
    config.PROGRESS.update(stage="ppo", step=state.step, state=lambda: store.load_state_path(run, "ppo"))
    per_step = p.batch_size * accelerator.num_processes  # prompts consumed per step, over all processes
    bf16 = training.use_bf16(cfg.precision)
    autocast = torch.autocast(accelerator.device.type, dtype=torch.bfloat16, enabled=bf16)
    seconds = dict.fromkeys(("generate", "score", "train", "loop"), 0.0)  # this session's time, by phase
    loop_started, first_step = time.time(), state.step

    for step in (bar := tqdm(range(state.step + 1, p.steps + 1), desc="ppo",
                             disable=not (main_process and alignment.INTERACTIVE),
                             initial=state.step, total=p.steps, dynamic_ncols=True)):
        # 1. rollout: each process samples responses to its own share of the batch's prompts
        mine = next_prompts(state, len(prompts), per_step, order, accelerator)
        t0 = time.time()
        with distributed.whole_model(accelerator, model) as whole, autocast:
            r = rollout(whole.policy, tokenizer, spec, [prompts[i] for i in mine], p, all_done)
            t1 = time.time()
            # 2. score: old log-probs and values, reference log-probs, reward
            epochs = [ppo.minibatches(r.attention.sum(1), p.mini_batch_size, order, p.group_by_length)
                      for _ in range(p.ppo_epochs)]
            s = score(whole, ref_policy, scorer, r, p, epochs[0])
        state.truncated_prompts += sum(len(ids) > p.max_prompt_length for ids in
                                       tokenizer([spec.format_prompt(x) for x in r.prompts]).input_ids)
        t2 = time.time()

        # 3. rewards and advantages
        computed = advantages(accelerator, r, s, p, state, moments)
        if computed is None:
            skip_update(state, "reward", cfg.max_bad_steps)
            state.step = step
            continue
        rewards, adv, whitened = computed

        # 4. update
        stats = update(accelerator, model, optimizer, r, s, adv, whitened, cfg, state, epochs, autocast)
        t3 = time.time()
        for phase, spent in (("generate", t1 - t0), ("score", t2 - t1), ("train", t3 - t2)):
            seconds[phase] += spent

        # 5. log, adapt the KL coefficient, evaluate, save a resumable state
        state.step = config.PROGRESS["step"] = step
        record = step_record(accelerator, step, r, s, rewards, stats, state, [t0, t1, t2, t3])
        state.log.append(record)
        if writer:
            for key, value in record.items():
                writer.add_scalar(f"ppo/{key}", value, step)
        bar.set_postfix(reward=f"{record['reward']:.3f}", kl=f"{record['kl']:.3f}", len=f"{record['response_length']:.1f}")
        if p.adaptive_kl:
            state.kl_coef = ppo.adaptive_kl_coef(state.kl_coef, record["kl"], p.kl_target, p.kl_horizon, per_step)
        if p.eval_every and (step % p.eval_every == 0 or step == p.steps):
            t4 = time.time()
            state.eval_log.append(evaluate(accelerator, model, ref_policy, scorer, tokenizer, spec, eval_prompts, cfg,
                                           step, writer))
            loop_started += time.time() - t4  # held-out evaluation is not training time
        if step % cfg.save_every == 0 and step < p.steps:
            state.moments = moments.state_dict()
            save_training_state(store, run, accelerator, order, state)

    seconds["loop"] = time.time() - loop_started
    episodes = (p.steps - first_step) * per_step  # sampled and trained on in this session

    # 6. compare with the SFT policy on held-out prompts (every process its share): greedy and sampled
    with distributed.whole_model(accelerator, model) as whole:
        summary = evaluation.compare_policies(
            whole.policy, ref_policy, scorer, tokenizer, spec, eval_prompts, gold=gold,
            max_new_tokens=p.max_new_tokens, temperature=p.temperature, samples=p.eval_samples, seed=cfg.seed,
            max_prompt_tokens=p.max_prompt_length, on_all=lambda fn, xs: evaluate_on_all(accelerator, fn, xs),
        )
    weights = accelerator.get_state_dict(model)  # every process: under ZeRO-3 the main one gets whole tensors
    accelerator.wait_for_everyone()
    if not main_process:
        return
    writer.close()

    # 7. save: the policy as a causal LM, the critic beside it, the per-step log, the manifest
    publish(store, run, cfg, accelerator, model, tokenizer, spec, sft, rm, weights, state, {
        **summary, "eval_curve": state.eval_log, "final_kl_coef": state.kl_coef, "steps": p.steps,
        "skipped_non_finite": state.skipped, "truncated_prompts": state.truncated_prompts,
        "processes": accelerator.num_processes, "deepspeed_zero_stage": zero,
        "duration_s": round(time.time() - started, 1), **speed(seconds, episodes, bf16),
    })
    print(evaluation.format_comparison(summary))


def publish(store: Store, run: str, cfg, accelerator, model, tokenizer, spec, sft, rm, weights: dict,
            state: PPOState, metrics: dict, stage: str = "ppo") -> None:
    """The policy as a causal LM in the entry's dtype (bf16 for real models: the size it came in), the critic
    (PPO's; GRPO has none) beside it as value_model/, the per-step log <stage>_log.jsonl, the manifest."""
    dtype = loading.DTYPES[spec.dtype]
    weights = {k: v.to(dtype) if v.is_floating_point() and not cfg.quantization else v for k, v in weights.items()}
    unwrapped = accelerator.unwrap_model(model)
    tmp = store.staging(run, stage)
    unwrapped.policy.save_pretrained(tmp, state_dict=_part(weights, "policy."))
    loading.save_tokenizer(tokenizer, tmp, spec)
    if unwrapped.critic is not None:
        unwrapped.critic.save_pretrained(tmp / "value_model", state_dict=_part(weights, "critic."))
    with open(tmp / f"{stage}_log.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in state.log)
    checkpoint = store.publish(tmp, {
        "run": run, "stage": stage, "model": spec.name, "template": spec.template, "parents": [sft.id, rm.id],
        "parent_uids": [sft.manifest["uid"], rm.manifest["uid"]], "base": loading.base_reference(sft.path),
        "base_checkpoint": sft.id, "adapter": cfg.lora.enabled,
        "config": config.to_dict(cfg),
        "data": {"profile": data.get_profile(cfg.data).name, "fingerprint": data.fingerprint(cfg.data, ["prompts_train", "prompts_eval"])},
        "metrics": metrics,
    })
    store.clear_state(run, stage)  # published: a rerun starts a new training
    print(f"[{stage}] saved {checkpoint.id} -> {checkpoint.path}")


def _untied(weights: dict) -> dict:
    """A state dict with each shared tensor (tied embeddings) kept once, as safetensors requires."""
    seen, out = set(), {}
    for key, tensor in weights.items():
        if tensor.data_ptr() not in seen:
            seen.add(tensor.data_ptr())
            out[key] = tensor
    return out


def speed(seconds: dict, episodes: int, bf16: bool) -> dict:
    """Episodes (prompt + sampled response) per second of the training loop, and where its time went."""
    loop = seconds["loop"]
    split = {k: round(v, 2) for k, v in seconds.items() if k != "loop"}
    return {"precision": "bf16" if bf16 else "fp32", "episodes": episodes, "loop_s": round(loop, 2),
            "episodes_per_s": round(episodes / loop, 2) if loop else None,
            "time_s": {**split, "other": round(loop - sum(split.values()), 2)},
            "peak_memory_mb": round(training.peak_memory_mb(), 1)}


def _part(weights: dict, prefix: str) -> dict:
    return {k.removeprefix(prefix): v for k, v in weights.items() if k.startswith(prefix)}


if __name__ == "__main__":
    config.run(main)
