"""Stage 3, PPO: improve the SFT policy against the reward model while a KL penalty keeps it close.

    make ppo [MODEL=tiny-llama] [ARGS="ppo.steps=50 ppo.kl_coef=0.1"]
    python stages/ppo.py --config configs/ppo.yaml key=value ...

Each step: 1. sample responses to a batch of prompts, keeping each token's log-prob as it is sampled;
2. score them: log-probs under the frozen reference, values from the critic, a score from the reward
model; 3. per-token rewards (KL penalty, score at the last token) and GAE advantages; 4. several epochs
of clipped policy and value updates on minibatches. The loop is ours (TRL no longer ships PPO); the math is
in alignment/ppo.py.
At the end the policy is compared with the SFT policy on held-out prompts, and saved as <run>/ppo.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import gather_object
from peft import get_peft_model
from safetensors.torch import load_file, save_file
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from alignment import config, data, evaluation, modeling, ppo, registry, training
from alignment.config import field
from alignment.store import Store


@dataclasses.dataclass
class PPOSettings:
    steps: int = field(60, "PPO iterations: rollout batches sampled, scored and trained on")
    batch_size: int = field(64, "prompts per rollout batch")
    mini_batch_size: int = field(16, "sequences per optimizer step inside a PPO epoch")
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


def save_training_state(store: Store, run: str, accelerator, model, optimizer, order, state: dict) -> None:
    """Everything a resumed run needs to go on as if never stopped; written atomically by the main process."""
    rng = gather_object([{"torch": torch.get_rng_state(), "order": order.get_state()}])  # one per process
    weights = accelerator.get_state_dict(model)  # whole tensors, also from ZeRO-3 shards
    if not accelerator.is_main_process:
        return

    def write(folder: Path) -> None:
        save_file({k: v.contiguous() for k, v in _untied(weights).items()}, str(folder / "actor_critic.safetensors"))
        torch.save(optimizer.state_dict(), folder / "optimizer.pt")
        torch.save(rng, folder / "rng.pt")
        (folder / "state.json").write_text(json.dumps(state))

    store.save_state(run, "ppo", write)


def load_training_state(folder: Path, accelerator, model, optimizer, order) -> dict:
    unwrapped = accelerator.unwrap_model(model)
    missing = unwrapped.load_state_dict(load_file(str(folder / "actor_critic.safetensors")), strict=False).missing_keys
    if set(missing) - _tied_names(unwrapped):  # only the second name of a tied pair may be absent
        raise RuntimeError(f"{folder}: the saved state lacks {sorted(missing)}")
    optimizer.load_state_dict(torch.load(folder / "optimizer.pt", weights_only=True))  # tensors only, no pickle code
    rng = torch.load(folder / "rng.pt", weights_only=True)[accelerator.process_index]
    torch.set_rng_state(rng["torch"])
    order.set_state(rng["order"])
    return json.loads((folder / "state.json").read_text())


def main(argv: list[str]) -> None:
    # 0. config, store, inputs: the run's SFT checkpoint (policy init and reference) and reward model
    cfg = config.cli(Config, argv, default_yaml="configs/ppo.yaml")
    p = cfg.ppo
    started = time.time()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    # cpu=True where there is no GPU: without it Accelerate treats a multi-process CPU launch as one process.
    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    main_process = accelerator.is_main_process
    torch.manual_seed(cfg.seed + accelerator.process_index)  # each process samples its own responses
    store, run = Store(cfg.store), cfg.run_name
    sft = store.get(run, "sft")
    rm = store.get(*p.reward_model.split("/", 1)) if p.reward_model else store.get(run, "rm")
    spec = registry.get(cfg.model, template=sft.manifest["template"])
    rm_spec = registry.get(rm.manifest["model"], template=rm.manifest["template"])
    writer = SummaryWriter(str(store.run_dir(run) / "tensorboard" / "ppo")) if main_process else None

    tokenizer = modeling.load_tokenizer(sft.path, spec)
    cfg.check_combinations(trains_weights=True, lora=cfg.lora.enabled)
    quantized = dict(quantization=cfg.quantization, compute_dtype=cfg.compute_dtype)
    policy = modeling.load_model(sft.path, AutoModelForCausalLM, spec, **quantized)  # trained: the actor
    if cfg.lora.enabled:
        policy = get_peft_model(policy, modeling.lora_config(cfg.lora, policy, spec, "CAUSAL_LM"))
        ref_policy = modeling.AdapterDisabled(policy)
    else:
        ref_policy = modeling.load_model(sft.path, AutoModelForCausalLM, spec, **quantized).requires_grad_(False)
    reward_model = modeling.load_model(rm.path, AutoModelForSequenceClassification, rm_spec, **quantized)
    reward_model.requires_grad_(False)
    scorer = modeling.RewardScorer(reward_model, modeling.load_tokenizer(rm.path, rm_spec), rm_spec, tokenizer, spec)
    # The critic (trained) starts as the reward model, or, if that reads other tokens, as the SFT body.
    critic = modeling.load_model(sft.path if scorer.by_text else rm.path, AutoModelForSequenceClassification, spec,
                                 **quantized)
    if cfg.quantization:  # quantized weights train through adapters only: the critic gets its own
        critic = get_peft_model(critic, modeling.lora_config(cfg.lora, critic, spec, "SEQ_CLS", modules_to_save=["score"]))
    for name, m in (("policy", policy), ("reference", ref_policy), ("reward model", reward_model), ("critic", critic)):
        print(f"[ppo] {modeling.footprint(name, m)}" + (" (the policy's weights, adapters off)" if name == "reference"
                                                       and cfg.lora.enabled else ""))
    model = modeling.ActorCritic(policy, critic)
    for m in (model, ref_policy, reward_model):
        modeling.disable_dropout(m)
        m.eval()  # no dropout anywhere; gradients still flow in eval mode
    trained = [q for q in model.parameters() if q.requires_grad]
    # fused: one kernel for all tensors (on CPU here 5x faster than the per-tensor loop)
    optimizer = torch.optim.AdamW(trained, lr=p.learning_rate, eps=1e-5, fused=True)
    model, optimizer = accelerator.prepare(model, optimizer)
    reward_model = reward_model.to(accelerator.device)
    if not cfg.lora.enabled:
        ref_policy = ref_policy.to(accelerator.device)

    def unwrapped_policy():
        return accelerator.unwrap_model(model).policy
    print(f"[ppo] policy and reference from {sft.id}, reward model and critic from {rm.id}; "
          f"{accelerator.num_processes} process(es) x {p.batch_size} prompts per step")

    prompts = [r["prompt"] for r in data.load(cfg.data, "prompts_train", cfg.limit, cfg.on_error)]
    eval_prompts = [r["prompt"] for r in data.load(cfg.data, "prompts_eval", cfg.limit, cfg.on_error)]
    gold = cfg.data == "task"  # the gold judge exists for the embedded task only

    def evaluate(step: int) -> dict:
        """Sampled responses to held-out prompts: RM reward, gold score, KL. Leaves the training RNG untouched."""
        with torch.random.fork_rng():
            torch.manual_seed(cfg.seed)
            r = evaluation.rollout_scores(
                unwrapped_policy(), ref_policy, scorer, tokenizer, spec,
                eval_prompts[: p.eval_prompts], max_new_tokens=p.max_new_tokens, temperature=p.temperature,
                greedy=False, gold=gold, max_prompt_tokens=p.max_prompt_length,
            )
        point = {"step": step, **{f"eval_{k}": evaluation.mean(r[k]) for k in ("reward", "gold", "kl") if r[k]}}
        for key, value in point.items():
            if key != "step":
                writer.add_scalar(f"ppo/{key}", value, step)
        return point

    # Training state: fresh, or resumed from the last complete state saved by a run with the same config.
    order = torch.Generator().manual_seed(cfg.seed)  # prompt order and minibatches: the same in every process
    moments = ppo.RunningMoments()
    state = {"step": 0, "kl_coef": p.kl_coef, "queue": [], "log": [], "eval_log": [], "skipped": 0, "in_a_row": 0,
             "moments": moments.state_dict(), "config": config.to_dict(cfg)}
    saved = store.load_state_path(run, "ppo") if cfg.resume else None
    if not cfg.resume:
        store.clear_state(run, "ppo")
    if saved:
        training.check_same_config(json.loads((saved / "state.json").read_text())["config"], state["config"], saved,
                                   ignore=("ppo.steps",))
        state = {**load_training_state(saved, accelerator, model, optimizer, order), "config": state["config"]}
        moments.load_state_dict(state["moments"])
        print(f"[ppo] resuming after step {state['step']} from {saved}")
    elif p.eval_every and main_process:
        state["eval_log"].append(evaluate(0))
    per_step = p.batch_size * accelerator.num_processes  # prompts consumed per step, over all processes
    bf16 = training.use_bf16(cfg.precision)
    autocast = torch.autocast(accelerator.device.type, dtype=torch.bfloat16, enabled=bf16)
    seconds = dict.fromkeys(("generate", "score", "train", "loop"), 0.0)  # this session's time, by phase
    loop_started, first_step = time.time(), state["step"]

    for step in (bar := tqdm(range(state["step"] + 1, p.steps + 1), desc="ppo", disable=not main_process,
                             initial=state["step"], total=p.steps, dynamic_ncols=True)):
        # 1. rollout: sample responses from the current policy (each process on its own share of the prompts)
        if len(state["queue"]) < per_step:
            state["queue"] += torch.randperm(len(prompts), generator=order).tolist()
        mine = state["queue"][: per_step][accelerator.process_index :: accelerator.num_processes]
        batch_prompts, state["queue"] = [prompts[i] for i in mine], state["queue"][per_step:]
        batch = [spec.format_prompt(x) for x in batch_prompts]
        t0 = time.time()
        sampled = modeling.SampledLogprobs()  # the rollout's own log-probs: no policy forward later
        with modeling.gathered_parameters(accelerator, model), autocast:
            query_responses, query_mask, responses = modeling.generate(
                unwrapped_policy(), tokenizer, batch, p.max_new_tokens, p.temperature,
                max_prompt_tokens=p.max_prompt_length, record=sampled,
            )
        old_logprobs, entropy = sampled.result()
        state["truncated_prompts"] = state.get("truncated_prompts", 0) + sum(
            len(ids) > p.max_prompt_length for ids in tokenizer(batch).input_ids)
        mask, ended = ppo.response_mask(responses, tokenizer.eos_token_id)
        attention = torch.cat([query_mask, mask.long()], dim=1)
        context = query_mask.shape[1]
        t_generate = time.time() - t0

        # 2. score: values, reference log-probs, reward-model score (old log-probs came with the rollout), in
        # minibatches of similar length: each pads less, and memory stays that of one minibatch
        t1 = time.time()
        old_values, ref_logprobs = torch.zeros_like(old_logprobs), torch.zeros_like(old_logprobs)
        raw_scores = torch.zeros(len(batch), device=old_logprobs.device)
        with torch.no_grad(), autocast:
            for idx in torch.sort(attention.sum(1), stable=True).indices.split(p.mini_batch_size):
                qr, att = query_responses[idx], attention[idx]
                old_values[idx] = modeling.critic_values(accelerator.unwrap_model(model), qr, att, context)
                ref_logprobs[idx] = modeling.policy_forward(ref_policy, qr, att, context, p.temperature)[0]
                raw_scores[idx] = scorer([batch_prompts[i] for i in idx.tolist()], qr, att, responses[idx])

        t_score = time.time() - t1

        # 3. rewards and advantages (reward statistics are shared by all processes)
        scores = torch.where(ended, raw_scores, raw_scores - p.missing_eos_penalty)
        all_scores = accelerator.gather(scores)
        if not torch.isfinite(all_scores).all():
            state["skipped"] += 1
            state["in_a_row"] += 1
            _check_patience(state, step, cfg.max_bad_steps, "reward")
            continue
        if p.normalize_reward:
            moments.update(all_scores)
            scores = (scores - moments.mean) / moments.std
        scores = scores.clamp(-p.reward_clip, p.reward_clip)
        rewards = ppo.token_rewards(scores, old_logprobs, ref_logprobs, mask, state["kl_coef"])
        adv = ppo.gae(rewards.rewards, old_values, mask, p.gamma, p.lam)
        advantages = ppo.masked_whiten(adv.advantages, mask) if p.whiten_advantages else adv.advantages

        # 4. optimise: ppo_epochs passes of clipped policy and value updates over minibatches
        t2 = time.time()
        stats = {"policy_loss": [], "value_loss": [], "clip_frac": [], "value_clip_frac": [], "approx_kl": []}
        for _ in range(p.ppo_epochs):
            for idx in ppo.minibatches(attention.sum(1), p.mini_batch_size, order, p.group_by_length):
                with autocast:
                    logprobs, values = modeling.actor_critic_forward(
                        model, query_responses[idx], attention[idx], context, p.temperature
                    )
                pl = ppo.policy_loss(logprobs, old_logprobs[idx], advantages[idx], mask[idx], p.clip_range)
                vl = ppo.value_loss(values, old_values[idx], adv.returns[idx], mask[idx], p.value_clip)
                optimizer.zero_grad()
                accelerator.backward(pl.loss + p.vf_coef * vl.loss)
                # gradients are averaged over processes by now, so every process takes the same decision
                if not training.grads_finite(trained):
                    optimizer.zero_grad()
                    state["skipped"] += 1
                    state["in_a_row"] += 1
                    _check_patience(state, step, cfg.max_bad_steps, "gradient")
                    continue
                state["in_a_row"] = 0
                accelerator.clip_grad_norm_(trained, p.max_grad_norm)
                optimizer.step()
                if cfg.check_sync:
                    training.assert_in_sync(trained, f"PPO step {step}")
                for key, value in (("policy_loss", pl.loss), ("value_loss", vl.loss), ("clip_frac", pl.clip_frac),
                                   ("value_clip_frac", vl.clip_frac), ("approx_kl", pl.approx_kl)):
                    stats[key].append(value.item())

        t_train = time.time() - t2
        for phase, spent in (("generate", t_generate), ("score", t_score), ("train", t_train)):
            seconds[phase] += spent

        # 5. log, adapt the KL coefficient, evaluate, save a resumable state
        sequence_kl = accelerator.gather(rewards.kl.sum(1)).mean().item()
        record = {
            "step": step,
            "reward": accelerator.gather(raw_scores).mean().item(),
            "kl": sequence_kl,
            "kl_coef": state["kl_coef"],
            "entropy": ppo.masked_mean(entropy, mask).item(),
            "response_length": mask.sum(1).mean().item(),
            "ended": ended.float().mean().item(),
            **{k: sum(v) / len(v) for k, v in stats.items() if v},
            "skipped_non_finite": state["skipped"],
            "generate_s": t_generate,
            "score_s": t_score,
            "train_s": t_train,
            "step_s": time.time() - t0,
        }
        state["log"].append(record)
        if main_process:
            for key, value in record.items():
                writer.add_scalar(f"ppo/{key}", value, step)
        bar.set_postfix(reward=f"{record['reward']:.3f}", kl=f"{sequence_kl:.3f}", len=f"{record['response_length']:.1f}")
        if p.adaptive_kl:
            state["kl_coef"] = ppo.adaptive_kl_coef(state["kl_coef"], sequence_kl, p.kl_target, p.kl_horizon, per_step)
        if p.eval_every and main_process and (step % p.eval_every == 0 or step == p.steps):
            t3 = time.time()
            state["eval_log"].append(evaluate(step))
            loop_started += time.time() - t3  # held-out evaluation is not training time
        if step % cfg.save_every == 0 and step < p.steps:
            state.update(step=step, moments=moments.state_dict())
            save_training_state(store, run, accelerator, model, optimizer, order, state)

    seconds["loop"] = time.time() - loop_started
    episodes = (p.steps - first_step) * per_step  # sampled and trained on in this session
    weights = _untied(accelerator.get_state_dict(model))  # whole tensors on the main process, also under ZeRO-3
    accelerator.wait_for_everyone()
    if not main_process:
        return
    writer.close()

    # 6. compare with the SFT policy on held-out prompts: greedy and sampled, gold and RM score, KL
    policy, critic = accelerator.unwrap_model(model).policy, accelerator.unwrap_model(model).critic
    summary = evaluation.compare_policies(
        policy, ref_policy, scorer, tokenizer, spec, eval_prompts, gold=gold,
        max_new_tokens=p.max_new_tokens, temperature=p.temperature, samples=p.eval_samples, seed=cfg.seed,
        max_prompt_tokens=p.max_prompt_length,
    )

    # 7. save: the policy as a causal LM, the critic beside it, the per-step log, the manifest
    tmp = store.staging(run, "ppo")
    policy.save_pretrained(tmp, state_dict=_part(weights, "policy."))
    tokenizer.save_pretrained(tmp)
    critic.save_pretrained(tmp / "value_model", state_dict=_part(weights, "critic."))
    with open(tmp / "ppo_log.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in state["log"])
    metrics = {**summary, "eval_curve": state["eval_log"], "final_kl_coef": state["kl_coef"], "steps": p.steps,
               "skipped_non_finite": state["skipped"], "truncated_prompts": state.get("truncated_prompts", 0),
               "processes": accelerator.num_processes,
               "duration_s": round(time.time() - started, 1),
               **_speed(seconds, episodes, bf16)}
    checkpoint = store.publish(tmp, {
        "run": run, "stage": "ppo", "model": spec.name, "template": spec.template, "parents": [sft.id, rm.id],
        "parent_uids": [sft.manifest["uid"], rm.manifest["uid"]], "base": str(sft.path), "adapter": cfg.lora.enabled,
        "config": config.to_dict(cfg),
        "data": {"profile": cfg.data, "fingerprint": data.fingerprint(cfg.data, ["prompts_train", "prompts_eval"])},
        "metrics": metrics,
    })
    store.clear_state(run, "ppo")  # published: a rerun starts a new training
    print(f"[ppo] saved {checkpoint.id} -> {checkpoint.path}")
    print(evaluation.format_comparison(summary))


def _untied(weights: dict) -> dict:
    """A state dict with each shared tensor (tied embeddings) kept once, as safetensors requires."""
    seen, out = set(), {}
    for key, tensor in weights.items():
        if tensor.data_ptr() not in seen:
            seen.add(tensor.data_ptr())
            out[key] = tensor
    return out


def _tied_names(model: torch.nn.Module) -> set[str]:
    """Names of parameters that share their tensor with an earlier one (tied embeddings)."""
    seen, tied = set(), set()
    for name, tensor in model.state_dict(keep_vars=True).items():
        if tensor.data_ptr() in seen:
            tied.add(name)
        seen.add(tensor.data_ptr())
    return tied


def _speed(seconds: dict, episodes: int, bf16: bool) -> dict:
    """Episodes (prompt + sampled response) per second of the training loop, and where its time went."""
    loop = seconds["loop"]
    split = {k: round(v, 2) for k, v in seconds.items() if k != "loop"}
    return {"precision": "bf16" if bf16 else "fp32", "episodes": episodes, "loop_s": round(loop, 2),
            "episodes_per_s": round(episodes / loop, 2) if loop else None,
            "time_s": {**split, "other": round(loop - sum(split.values()), 2)},
            "peak_memory_mb": round(training.peak_memory_mb(), 1)}


def _part(weights: dict, prefix: str) -> dict:
    return {k.removeprefix(prefix): v for k, v in weights.items() if k.startswith(prefix)}


def _check_patience(state: dict, step: int, patience: int, what: str) -> None:
    print(f"[guard] step {step}: non-finite {what}, update skipped ({state['skipped']} so far)")
    if state["in_a_row"] >= patience:
        raise training.NonFiniteError(
            f"stopping at PPO step {step}: {state['in_a_row']} updates in a row had a non-finite {what}; "
            "the last complete state is kept for resuming"
        )


if __name__ == "__main__":
    config.run(main)
