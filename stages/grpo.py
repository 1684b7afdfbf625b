"""Stage 3, GRPO: improve the SFT policy against the reward model by comparing responses to the same prompt.

    make grpo [MODEL=tiny-llama] [ARGS="grpo.steps=50 grpo.group_size=8 grpo.scale_rewards=none"]
    make grpo NPROC=8 ACCELERATE_CONFIG=configs/accelerate/zero3.yaml
    python stages/grpo.py --config configs/grpo.yaml key=value ...

Group Relative Policy Optimization (Shao et al., 2024, DeepSeekMath) is PPO without a critic: each step
1. rollout: group_size responses sampled to each of batch_size prompts; 2. score them: the policy's log-probs
(from the training forward), the frozen reference's, the reward model's score; 3. group-relative advantages:
each reward less its group's mean, over the group's std (grpo.scale_rewards: none is Dr. GRPO), one per response,
the same at each of its tokens; 4. update: the clipped ratio objective plus kl_coef * k3, the KL estimate to the
reference, in the loss (not in the reward, as PPO has it), on minibatches; 5. log, evaluate, save a resumable
state. The math is in alignment/ppo.py (group_advantages, grpo_loss); the models, rollout, held-out evaluation,
optimizer step with its non-finite guard, the resumable state and the publishing are stages/ppo.py's. At the end
the policy is compared with the SFT policy on held-out prompts, and saved as <run>/grpo.

Our loop, not TRL's GRPOTrainer. Speed does not decide it: with the same SFT policy, reward model (scored from
the text for TRL, as its reward functions get it), 16 prompts x 8 responses, 20 new tokens and one optimizer step
per rollout, a step took 2.55-2.61 s here and 2.84-3.07 s in TRL 1.16's GRPOTrainer (1 thread each, on this
2-core CPU shared with other jobs, load 9; generate() itself is as fast as forwards.generate at this size). What
decides it is that GRPO is PPO's loop without the critic: sampling, scoring (the reward model by token ids when
tokenizers agree), old log-probs from the training forward, held-out evaluation, DeepSpeed ZeRO-3, non-finite
updates refused by every process, the resumable state are stages/ppo.py's, tested there, and GRPO adds two pure
functions. PPO and GRPO then differ in their algorithm only, which is what a side-by-side comparison should
measure. TRL's LoRA reference (adapters disabled), k3 KL term and scale_rewards options are the same as here.
"""

from __future__ import annotations

import alignment  # first: quiets third-party noise (alignment/__init__.py)
import dataclasses
import sys
import time
from pathlib import Path
from typing import NamedTuple

import torch
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

from alignment import config, data, distributed, evaluation, forwards, ppo, training
from alignment.config import field
from alignment.store import Store

if not __package__:  # run as a script (make grpo): stages/ is on the path, not the folder holding it
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from stages import ppo as ppo_stage  # noqa: E402  (PPO's models, rollout, evaluation, guard and resumable state)
from stages.ppo import PPOState, Rollout  # noqa: E402


@dataclasses.dataclass
class GRPOSettings:
    steps: int = field(60, "GRPO iterations: rollout batches sampled, scored and trained on")
    batch_size: int = field(16, "prompts per rollout batch, per process; each answered group_size times")
    group_size: int = field(8, "responses sampled per prompt: the group each response's reward is compared with")
    mini_batch_size: int = field(64, "sequences per optimizer step, per process (DeepSpeed's micro batch)")
    epochs: int = field(1, "passes over each rollout batch (DeepSeekMath's mu); with more than one minibatch per "
                        "batch, the later ones are already off-policy and the ratio clip acts")
    learning_rate: float = field(1e-4, "AdamW learning rate")
    max_new_tokens: int = field(20, "longest response sampled")
    max_prompt_length: int = field(512, "longest prompt in tokens; longer ones lose their beginning (counted)")
    temperature: float = field(1.0, "sampling temperature; log-probs are computed at the same temperature")
    kl_coef: float = field(0.04, "beta of the k3 KL estimate to the reference in the loss (DeepSeekMath: 0.04; "
                           "DAPO and Dr. GRPO: 0)")
    scale_rewards: str = field("group", "divide each advantage by the std of: group (its group, GRPO), batch (the "
                               "whole batch), none (Dr. GRPO)")
    loss_aggregation: str = field("sequence", "sequence: each response's token mean, then the mean (GRPO); token: "
                                  "the mean over all tokens (DAPO); constant: token sum / (responses x "
                                  "max_new_tokens) (Dr. GRPO)")
    clip_range: float = field(0.2, "policy ratio clip epsilon")
    missing_eos_penalty: float = field(1.0, "subtracted from the score of a response that never ends; 0: off")
    max_grad_norm: float = field(1.0, "gradient clipping")
    group_by_length: bool = field(True, "minibatches of sequences of similar length (in a random order each "
                                  "epoch): each pads less; false: uniformly random minibatches")
    eval_samples: int = field(4, "sampled responses per held-out prompt in the final comparison")
    reward_model: str = field("", "store id run/rm of the reward model; empty: the run's. Any tokenizer: "
                              "when it differs from the policy's, responses are scored from their text")
    eval_every: int = field(20, "evaluate on held-out prompts every N steps (and before the first); 0: off")
    eval_prompts: int = field(64, "held-out prompts used by the evaluation during training")


@dataclasses.dataclass
class Config(config.StageConfig):
    grpo: GRPOSettings = field(GRPOSettings(), "GRPO settings")
    lora: config.LoraSettings = field(config.LoraSettings(), "train LoRA adapters on the SFT policy; the reference "
                                      "is then the same weights with the adapters disabled (no second copy)")


class Scores(NamedTuple):
    logprobs: torch.Tensor  # [B, T] the policy's, from the training forward: the update's old log-probs
    ref_logprobs: torch.Tensor  # [B, T] the frozen reference's (logged as KL even where kl_coef is 0)
    entropy: torch.Tensor  # [B, T] of the policy's distribution
    rewards: torch.Tensor  # [B] the reward model's raw score, less the missing-EOS penalty


def check(g: GRPOSettings) -> None:
    """Settings that cannot work stop here, at start-up."""
    if g.group_size < 2:
        raise SystemExit(f"grpo.group_size={g.group_size}: a group needs 2 responses or more (its mean is the baseline)")
    if g.scale_rewards not in ("group", "batch", "none"):
        raise SystemExit(f"grpo.scale_rewards: {g.scale_rewards!r} is not 'group', 'batch' or 'none'")
    if g.loss_aggregation not in ("sequence", "token", "constant"):
        raise SystemExit(f"grpo.loss_aggregation: {g.loss_aggregation!r} is not 'sequence', 'token' or 'constant'")


@torch.no_grad()
def score(model, ref_policy, scorer, r: Rollout, g: GRPOSettings, minibatches: list[torch.Tensor]) -> Scores:
    """2. Log-probs from the training forward on the minibatches the first epoch trains on (its ratio starts at 1
    exactly, as in PPO's score), reference log-probs and reward-model scores alike."""
    B, T = r.responses.shape
    logprobs, ref_logprobs, entropy = (torch.zeros(B, T, device=r.mask.device) for _ in range(3))
    raw = torch.zeros(B, device=r.mask.device)
    for idx in minibatches:
        idx = idx.to(r.mask.device)
        qr, att = r.query_responses[idx], r.attention[idx]
        logprobs[idx], _, entropy[idx] = forwards.actor_critic_forward(model, qr, att, r.context, g.temperature,
                                                                       entropy=True)
        ref_logprobs[idx] = forwards.policy_forward(ref_policy, qr, att, r.context, g.temperature)[0]
        raw[idx] = scorer([r.prompts[i] for i in idx.tolist()], qr, att, r.responses[idx])
    return Scores(logprobs, ref_logprobs, entropy, torch.where(r.ended, raw, raw - g.missing_eos_penalty))


def advantages(accelerator, s: Scores, g: GRPOSettings) -> ppo.GroupAdvantages | None:
    """3. Group-relative advantages of this process's responses. Computed over the whole batch (a batch std needs
    every process's rewards); a group never straddles processes. None when a reward is not finite anywhere."""
    everyone = accelerator.gather(s.rewards)
    if not torch.isfinite(everyone).all():
        return None
    adv = ppo.group_advantages(everyone, g.group_size, g.scale_rewards)
    mine = lambda x: x.view(accelerator.num_processes, -1)[accelerator.process_index]  # noqa: E731
    return ppo.GroupAdvantages(mine(adv.advantages), mine(adv.group_std))


def update(accelerator, model, optimizer, r: Rollout, s: Scores, adv: torch.Tensor, cfg: Config, state: PPOState,
           epochs: list[list[torch.Tensor]], autocast) -> dict:
    """4. The clipped ratio objective with the KL term over each epoch's minibatches; a minibatch whose loss or
    gradients are not finite in any process is skipped by all of them (ppo_stage.optimizer_step)."""
    g = cfg.grpo
    trained = [q for q in model.parameters() if q.requires_grad]
    stats = {"loss": [], "kl_k3": [], "clip_frac": [], "approx_kl": []}
    for minibatches in epochs:
        for idx in minibatches:
            idx = idx.to(r.mask.device)
            with autocast:
                new = forwards.actor_critic_forward(model, r.query_responses[idx], r.attention[idx], r.context,
                                                    g.temperature)
            out = ppo.grpo_loss(new.logprobs, s.logprobs[idx], s.ref_logprobs[idx], adv[idx], r.mask[idx],
                                g.clip_range, g.kl_coef, g.loss_aggregation, g.max_new_tokens)
            if ppo_stage.optimizer_step(accelerator, model, optimizer, trained, out.loss, cfg, state, g.max_grad_norm,
                                        "GRPO"):
                for key, value in zip(stats, (out.loss, out.kl, out.clip_frac, out.approx_kl)):
                    stats[key].append(value.item())
    return stats


def step_record(accelerator, step: int, r: Rollout, s: Scores, adv: ppo.GroupAdvantages, stats: dict,
                state: PPOState, times: list[float]) -> dict:
    """One line of grpo_log.jsonl: the batch over all processes, the losses of the update, where the time went.
    kl is PPO's per-response sum of log pi - log pi_ref on the samples, for comparison; kl_k3 the loss's term."""
    t0, t1, t2, t3 = times
    alike = accelerator.gather((adv.group_std == 0).float()).mean()  # groups whose responses all scored the same
    return {
        "step": step, "reward": accelerator.gather(s.rewards).mean().item(),
        "kl": accelerator.gather(ppo.masked(s.logprobs - s.ref_logprobs, r.mask).sum(1)).mean().item(),
        "reward_std": accelerator.gather(adv.group_std).mean().item(), "groups_alike": alike.item(),
        "entropy": ppo.masked_mean(s.entropy, r.mask).item(), "response_length": r.mask.sum(1).mean().item(),
        "ended": r.ended.float().mean().item(), **{k: sum(v) / len(v) for k, v in stats.items() if v},
        "skipped_non_finite": state.skipped, "generate_s": t1 - t0, "score_s": t2 - t1, "train_s": t3 - t2,
        "step_s": time.time() - t0,
    }


def main(argv: list[str]) -> None:
    # 0. config, accelerator, inputs: the run's SFT checkpoint (policy init and reference) and reward model
    cfg = config.cli(Config, argv, default_yaml="configs/grpo.yaml")
    g = cfg.grpo
    started = time.time()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    cfg.check_combinations(trains_weights=True, lora=cfg.lora.enabled)
    check(g)
    accelerator = distributed.make_accelerator(g.mini_batch_size, g.max_grad_norm, cfg.precision)
    main_process = accelerator.is_main_process
    torch.manual_seed(cfg.seed + accelerator.process_index)  # each process samples its own responses
    store, run = Store(cfg.store), cfg.run_name
    sft = store.get(run, "sft")
    rm = store.get(*g.reward_model.split("/", 1)) if g.reward_model else store.get(run, "rm")
    store.require_fresh(sft, rm, allow_stale=cfg.allow_stale)
    tokenizer, spec, policy, ref_policy, scorer = ppo_stage.load_policies(cfg, accelerator, sft, rm, "grpo")
    model = forwards.ActorCritic(policy, None)  # the policy alone, as one module for DDP and DeepSpeed
    writer = SummaryWriter(str(store.run_dir(run) / "tensorboard" / "grpo")) if main_process else None
    optimizer = distributed.optimizer(accelerator, [q for q in model.parameters() if q.requires_grad],
                                      g.learning_rate)
    model, optimizer = accelerator.prepare(model, optimizer)
    zero = distributed.deepspeed_stage()
    all_done = distributed.all_processes_done(accelerator) if zero == 3 else None
    print(f"[grpo] policy and reference from {sft.id}, reward model from {rm.id}; {accelerator.num_processes} "
          f"process(es) x {g.batch_size} prompts x {g.group_size} responses per step"
          + (f", DeepSpeed ZeRO-{zero}" if zero else ""))

    prompts = [r["prompt"] for r in data.load(cfg.data, "prompts_train", cfg.limit, cfg.on_error)]
    eval_prompts = [r["prompt"] for r in data.load(cfg.data, "prompts_eval", cfg.limit, cfg.on_error)]
    gold = data.get_profile(cfg.data).gold  # a gold judge exists for the embedded task only
    # Training state: fresh, or resumed from the last complete state saved by a run with the same config.
    order = torch.Generator().manual_seed(cfg.seed)  # prompt order and minibatches: the same in every process
    state = PPOState(config={**config.to_dict(cfg), "parent_uids": [sft.manifest["uid"], rm.manifest["uid"]]},
                     kl_coef=g.kl_coef)
    if resumed := ppo_stage.resume_training_state(store, run, cfg, state, accelerator, order, "grpo"):
        state = resumed
    elif g.eval_every:
        state.eval_log.append(ppo_stage.evaluate(accelerator, model, ref_policy, scorer, tokenizer, spec, eval_prompts,
                                                 cfg, 0, writer, "grpo"))
    config.PROGRESS.update(stage="grpo", step=state.step, state=lambda: store.load_state_path(run, "grpo"))
    per_step = g.batch_size * accelerator.num_processes  # prompts consumed per step, over all processes
    bf16 = training.use_bf16(cfg.precision)
    autocast = torch.autocast(accelerator.device.type, dtype=torch.bfloat16, enabled=bf16)
    seconds = dict.fromkeys(("generate", "score", "train", "loop"), 0.0)  # this session's time, by phase
    loop_started, first_step = time.time(), state.step

    for step in (bar := tqdm(range(state.step + 1, g.steps + 1), desc="grpo",
                             disable=not (main_process and alignment.INTERACTIVE),
                             initial=state.step, total=g.steps, dynamic_ncols=True)):
        # 1. rollout: each process samples a group of responses to each prompt of its share of the batch
        mine = ppo_stage.next_prompts(state, len(prompts), per_step, order, accelerator)
        t0 = time.time()
        with distributed.whole_model(accelerator, model) as whole, autocast:
            r = ppo_stage.rollout(whole.policy, tokenizer, spec, [prompts[i] for i in mine for _ in range(g.group_size)],
                                  g, all_done)
            t1 = time.time()
            # 2. score: old log-probs, reference log-probs, reward
            epochs = [ppo.minibatches(r.attention.sum(1), g.mini_batch_size, order, g.group_by_length)
                      for _ in range(g.epochs)]
            s = score(whole, ref_policy, scorer, r, g, epochs[0])
        state.truncated_prompts += sum(len(ids) > g.max_prompt_length for ids in
                                       tokenizer([spec.format_prompt(prompts[i]) for i in mine]).input_ids)
        t2 = time.time()

        # 3. group-relative advantages
        adv = advantages(accelerator, s, g)
        if adv is None:
            ppo_stage.skip_update(state, "reward", cfg.max_bad_steps, "GRPO")
            state.step = step
            continue

        # 4. update
        stats = update(accelerator, model, optimizer, r, s, adv.advantages, cfg, state, epochs, autocast)
        t3 = time.time()
        for phase, spent in (("generate", t1 - t0), ("score", t2 - t1), ("train", t3 - t2)):
            seconds[phase] += spent

        # 5. log, evaluate, save a resumable state
        state.step = config.PROGRESS["step"] = step
        record = step_record(accelerator, step, r, s, adv, stats, state, [t0, t1, t2, t3])
        state.log.append(record)
        if writer:
            for key, value in record.items():
                writer.add_scalar(f"grpo/{key}", value, step)
        bar.set_postfix(reward=f"{record['reward']:.3f}", kl=f"{record['kl']:.3f}", len=f"{record['response_length']:.1f}")
        if g.eval_every and (step % g.eval_every == 0 or step == g.steps):
            t4 = time.time()
            state.eval_log.append(ppo_stage.evaluate(accelerator, model, ref_policy, scorer, tokenizer, spec,
                                                     eval_prompts, cfg, step, writer, "grpo"))
            loop_started += time.time() - t4  # held-out evaluation is not training time
        if step % cfg.save_every == 0 and step < g.steps:
            ppo_stage.save_training_state(store, run, accelerator, order, state, "grpo")

    seconds["loop"] = time.time() - loop_started
    episodes = (g.steps - first_step) * per_step * g.group_size  # responses sampled and trained on in this session

    # 6. compare with the SFT policy on held-out prompts (every process its share): greedy and sampled
    with distributed.whole_model(accelerator, model) as whole:
        summary = evaluation.compare_policies(
            whole.policy, ref_policy, scorer, tokenizer, spec, eval_prompts, gold=gold,
            max_new_tokens=g.max_new_tokens, temperature=g.temperature, samples=g.eval_samples, seed=cfg.seed,
            max_prompt_tokens=g.max_prompt_length,
            on_all=lambda fn, xs: ppo_stage.evaluate_on_all(accelerator, fn, xs),
        )
    weights = accelerator.get_state_dict(model)  # every process: under ZeRO-3 the main one gets whole tensors
    accelerator.wait_for_everyone()
    if not main_process:
        return
    writer.close()

    # 7. save: the policy as a causal LM, the per-step log, the manifest
    ppo_stage.publish(store, run, cfg, accelerator, model, tokenizer, spec, sft, rm, weights, state, {
        **summary, "eval_curve": state.eval_log, "steps": g.steps, "skipped_non_finite": state.skipped,
        "truncated_prompts": state.truncated_prompts, "processes": accelerator.num_processes,
        "deepspeed_zero_stage": zero, "duration_s": round(time.time() - started, 1),
        **ppo_stage.speed(seconds, episodes, bf16),
    }, stage="grpo")
    print(evaluation.format_comparison(summary, "grpo"))


if __name__ == "__main__":
    config.run(main)
