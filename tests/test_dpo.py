"""DPO: TRL's loss against the formula worked by hand, and the stage end to end (full and LoRA) on a minuscule
config: finite losses, trained weights, a checkpoint that loads back, lineage, PPO's comparison keys, the curve."""

import math

import pytest
import torch
from datasets import Dataset
from test_pipeline import RM, SFT, changed, weights
from transformers import AutoModelForCausalLM
from trl import DPOConfig

from alignment import loading, registry
from alignment.store import Store
from stages import dpo as dpo_stage
from stages import rm as rm_stage
from stages import sft as sft_stage

TINY = ["limit=32", "threads=2"]  # 32 pairs in batches of 16: two optimizer steps
DPO = ["dpo.batch_size=16", "dpo.logging_steps=1", "dpo.eval_every=1", "dpo.eval_prompts=8", "dpo.eval_samples=1",
       "dpo.max_new_tokens=8"]


def dpo_loss(logp_chosen, logp_rejected, ref_chosen, ref_rejected, beta):
    """-log sigmoid(beta * [(log pi(c) - log pi_ref(c)) - (log pi(r) - log pi_ref(r))]) = log(1 + exp(-z))."""
    z = beta * ((logp_chosen - ref_chosen) - (logp_rejected - ref_rejected))
    return math.log1p(math.exp(-z))


def test_dpo_loss_by_hand():
    # z = 0.5 * ((-4 + 5) - (-6 + 5)) = 1, so the loss is log(1 + e^-1) = 0.313262
    assert dpo_loss(-4.0, -6.0, -5.0, -5.0, beta=0.5) == pytest.approx(0.313262, abs=1e-6)
    # policy = reference: z = 0, the loss is log 2 whatever beta
    assert dpo_loss(-3.0, -7.0, -3.0, -7.0, beta=9.0) == pytest.approx(math.log(2))


def sequence_logprob(model, prompt_ids: list[int], completion_ids: list[int]) -> float:
    """log pi(completion | prompt): the completion tokens' log-softmax summed, from the model's plain logits."""
    ids = torch.tensor([prompt_ids + completion_ids])
    with torch.no_grad():
        logprobs = model(input_ids=ids).logits[0, :-1].log_softmax(-1)
    targets = ids[0, 1:]
    picked = logprobs.gather(1, targets[:, None])[:, 0]
    return picked[len(prompt_ids) - 1 :].sum().item()


@pytest.mark.parametrize("sft_weight", [0.0, 0.7])
def test_trl_dpo_loss_is_the_formula_on_the_models_logprobs(tiny_cache, tmp_path, sft_weight):
    """TRL's DPOTrainer loss on a batch of two pairs equals the formula above applied to log-probs computed here from
    the same policy and reference (their logits, not TRL's fused LM head), the reference a perturbed copy so that
    every log-ratio is non-zero; with dpo.sft_weight, plus that weight times the chosen tokens' mean NLL."""
    spec = registry.get("tiny-llama")
    path = registry.resolve(spec)
    tokenizer = loading.load_tokenizer(path, spec)
    policy = loading.load_model(path, AutoModelForCausalLM, spec, tokenizer=tokenizer, trained=True)
    reference = loading.load_model(path, AutoModelForCausalLM, spec, tokenizer=tokenizer, trained=True)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in reference.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=generator))
    pairs = [{"prompt": spec.format_prompt("sort: c a b"), "chosen": "a b c", "rejected": "a b c hope this helps"},
             {"prompt": spec.format_prompt("copy: d e"), "chosen": "d e", "rejected": "e d"}]
    beta = 0.5
    settings = dpo_stage.DPOSettings(sft_weight=sft_weight)
    args = DPOConfig(output_dir=str(tmp_path), beta=beta, use_cpu=True, bf16=False, report_to=[],
                     activation_checkpointing=False, per_device_train_batch_size=2, **dpo_stage.losses(settings))
    trainer = dpo_stage.DPOTrainer(model=policy, ref_model=reference, args=args, train_dataset=Dataset.from_list(pairs),
                                   processing_class=tokenizer)
    rows = [trainer.train_dataset[i] for i in range(2)]
    with torch.no_grad():
        loss = trainer.compute_loss(trainer.model, trainer._prepare_inputs(trainer.data_collator(rows)))

    expected, chosen_logp, chosen_tokens = [], 0.0, 0
    for row in rows:  # TRL's tokens: the prompt, then each response with EOS appended
        assert row["chosen_ids"][-1] == row["rejected_ids"][-1] == tokenizer.eos_token_id
        # log pi(c), log pi(r), log pi_ref(c), log pi_ref(r)
        logps = [sequence_logprob(m, row["prompt_ids"], row[k]) for m in (policy, reference)
                 for k in ("chosen_ids", "rejected_ids")]
        assert all(abs(policy_logp - ref_logp) > 1e-2 for policy_logp, ref_logp in zip(logps[:2], logps[2:]))
        expected.append(dpo_loss(*logps, beta))
        chosen_logp, chosen_tokens = chosen_logp + logps[0], chosen_tokens + len(row["chosen_ids"])
    # the batch's mean, plus the weighted NLL per chosen token over the whole batch
    nll = -chosen_logp / chosen_tokens
    assert nll > 0.5  # a term that moves the loss where it is weighted
    assert loss.item() == pytest.approx(sum(expected) / len(expected) + sft_weight * nll, abs=1e-4)


@pytest.fixture(scope="module")
def sft_and_rm(tmp_path_factory, tiny_cache):
    """A store with the SFT and reward-model checkpoints DPO starts from and is judged by."""
    root = tmp_path_factory.mktemp("dpo")
    common = [f"store={root}", *TINY]
    sft_stage.main([*common, *SFT])
    rm_stage.main([*common, *RM])
    return root


def test_dpo_end_to_end(sft_and_rm, tmp_path, capsys):
    import shutil

    root = tmp_path / "store"
    shutil.copytree(sft_and_rm, root)
    dpo_stage.main([f"store={root}", *TINY, *DPO])
    store = Store(root)
    sft, rm, dpo = (store.get("tiny-llama", s) for s in ("sft", "rm", "dpo"))

    # lineage: trained from the SFT checkpoint, judged by the reward model (named, not a parent)
    assert dpo.manifest["parents"] == [sft.id] and dpo.manifest["parent_uids"] == [sft.manifest["uid"]]
    assert dpo.manifest["base_checkpoint"] == sft.id and dpo.manifest["base"] == str(sft.path)
    assert dpo.manifest["evaluated_with"] == {"reward_model": rm.id, "uid": rm.manifest["uid"]}
    assert store.stale(dpo) is None and store.verify() == []

    # two optimizer steps on 32 pairs, finite losses, nothing skipped
    m = dpo.metrics
    assert m["steps"] == 2 and m["pairs_seen"] == 32 and m["skipped_non_finite"] == 0
    assert math.isfinite(m["train_loss"]) and math.isfinite(m["eval_loss"]) and 0 <= m["eval_reward_accuracy"] <= 1

    # PPO's comparison keys, and the held-out curve before the first step and after each
    assert m["eval_prompts"] == 32
    for mode in ("greedy", "sampled"):
        assert {"gold", "reward", "kl"} <= set(m[mode])
        lo, hi = m[mode]["gold"]["difference"]["ci95"]
        assert lo <= m[mode]["gold"]["difference"]["mean"] <= hi
    assert [p["step"] for p in m["eval_curve"]] == [0, 1, 2]
    assert m["eval_curve"][0]["eval_kl"] == pytest.approx(0.0, abs=1e-4)  # the policy starts as its reference
    assert all(math.isfinite(p[k]) for p in m["eval_curve"] for k in ("eval_reward", "eval_gold", "eval_kl"))
    out = capsys.readouterr().out
    assert "DPO vs SFT on 32 held-out prompts" in out and "greedy   gold" in out
    assert list((root / "tiny-llama" / "tensorboard" / "dpo").glob("events.out.tfevents.*"))

    # trained weights changed, and the checkpoint loads with the standard from_pretrained
    assert changed(weights(sft.path), weights(dpo.path)) > 0.9
    policy = AutoModelForCausalLM.from_pretrained(dpo.path)
    assert torch.isfinite(policy(torch.tensor([[1, 2, 3]])).logits).all()
    assert not (root / "tiny-llama" / ".trainer-dpo").exists()  # published: no resumable state left


def test_lora_dpo_trains_adapters_on_the_sft_model(sft_and_rm, tmp_path):
    import shutil

    root = tmp_path / "store"
    shutil.copytree(sft_and_rm, root)
    dpo_stage.main([f"store={root}", *TINY, *DPO, "dpo.eval_every=2", "lora.enabled=true", "lora.r=4",
                    "dpo.learning_rate=1e-2"])
    store = Store(root)
    sft, dpo = store.get("tiny-llama", "sft"), store.get("tiny-llama", "dpo")
    assert (dpo.path / "adapter_config.json").is_file() and not (dpo.path / "model.safetensors").exists()
    assert dpo.manifest["adapter"] is True and dpo.manifest["base"] == str(sft.path)
    # the reference is the policy with its adapters off: no KL before the first step
    assert dpo.metrics["eval_curve"][0]["eval_kl"] == pytest.approx(0.0, abs=1e-4)
    spec = registry.get("tiny-llama")
    ids = torch.tensor([[5, 6, 7, 8]])
    merged_sft = loading.load_model(sft.path, AutoModelForCausalLM, spec)
    merged_dpo = loading.load_model(dpo.path, AutoModelForCausalLM, spec)
    assert not torch.allclose(merged_sft(ids).logits, merged_dpo(ids).logits)


def test_a_negative_or_doubled_sft_weight_stops_at_start_up(tmp_path):
    with pytest.raises(SystemExit, match="sft_weight must be 0"):
        dpo_stage.main([f"store={tmp_path}", "dpo.sft_weight=-1"])
    with pytest.raises(SystemExit, match="sft_weight adds the NLL that loss_type=sft already is"):
        dpo_stage.main([f"store={tmp_path}", "dpo.sft_weight=1", "dpo.loss_type=sft"])
    assert not any(tmp_path.iterdir())


def test_an_unknown_loss_stops_at_start_up_before_anything_loads(tmp_path):
    with pytest.raises(SystemExit, match="dpo.loss_type: 'nonsense' is not one of TRL's DPO losses: sigmoid, ipo"):
        dpo_stage.main([f"store={tmp_path}", "dpo.loss_type=nonsense"])  # the store is empty: nothing was read
    assert not any(tmp_path.iterdir())
