"""All three stages end to end on a minuscule config: finite losses, trained weights, loadable checkpoints,
manifests linking sft -> rm -> ppo."""

import json
import math
import re

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from alignment import batching, forwards, loading, ppo, registry, scoring
from alignment.rl import steps as rl_steps
from alignment.rl.types import Rollout
from alignment.store import Store
from stages import ppo as ppo_stage
from stages import rm as rm_stage
from stages import sft as sft_stage

SMALL = ["limit=64", "threads=2"]
SFT = ["sft.epochs=1", "sft.batch_size=16", "sft.logging_steps=1"]
RM = ["rm.epochs=1", "rm.batch_size=16", "rm.logging_steps=1"]
PPO = ["ppo.steps=2", "ppo.batch_size=8", "ppo.mini_batch_size=4", "ppo.ppo_epochs=2", "ppo.max_new_tokens=8",
       "ppo.eval_samples=1"]


def weights(path):
    return load_file(str(path / "model.safetensors"))


def changed(before: dict, after: dict, prefix_after: str = "") -> float:
    """Share of tensors present in both whose values differ."""
    common = [k for k in before if prefix_after + k in after]
    assert common, "no tensor names in common"
    return sum(not torch.equal(before[k], after[prefix_after + k]) for k in common) / len(common)


def run_pipeline(store_root, model, sft_extra=(), rm_extra=(), ppo_extra=(), small=SMALL):
    common = [f"store={store_root}", f"model={model}", *small]
    sft_stage.main([*common, *SFT, *sft_extra])
    rm_stage.main([*common, *RM, *rm_extra])
    ppo_stage.main([*common, *PPO, *ppo_extra])
    return Store(store_root)


@pytest.mark.parametrize("model", [s.name for s in registry.MODELS.values() if s.is_tiny])
def test_sft_rm_ppo_end_to_end(tmp_path, tiny_cache, model):
    # the default model on a small config; every other family on a minuscule one (one or two steps a stage)
    small = SMALL if model == registry.DEFAULT_MODEL else ["limit=24", "threads=2"]
    store = run_pipeline(tmp_path / "store", model, small=small)
    sft, rm, ppo = (store.get(model, s) for s in ("sft", "rm", "ppo"))

    # lineage
    assert sft.manifest["parents"] == [] and rm.manifest["parents"] == [sft.id]
    assert ppo.manifest["parents"] == [sft.id, rm.id]
    assert ppo.manifest["parent_uids"] == [sft.manifest["uid"], rm.manifest["uid"]]
    for c in (sft, rm, ppo):
        assert c.manifest["model"] == model and c.manifest["status"] == "complete"
        assert c.metrics["planned_peak_mb"] > 0 and len(c.metrics["peak_memory_mb_per_process"]) == 1
        assert len(c.manifest["data"]["fingerprint"]) == 64
        assert c.manifest["config"]["model"] == model

    # finite losses
    assert math.isfinite(sft.metrics["train_loss"]) and math.isfinite(sft.metrics["eval_loss"])
    assert math.isfinite(rm.metrics["train_loss"]) and 0.0 <= rm.metrics["eval_accuracy"] <= 1.0
    log = [json.loads(line) for line in open(ppo.path / "ppo_log.jsonl")]
    assert len(log) == 2
    for record in log:
        for key in ("policy_loss", "value_loss", "reward", "kl", "entropy"):
            assert math.isfinite(record[key]), key
    for mode in ("greedy", "sampled"):
        section = ppo.metrics[mode]
        assert {"gold", "reward", "kl"} <= set(section)
        lo, hi = section["gold"]["difference"]["ci95"]
        assert lo <= section["gold"]["difference"]["mean"] <= hi

    # trained weights changed
    base = weights(__import__("pathlib").Path(registry.resolve(registry.get(model))))
    assert changed(base, weights(sft.path)) > 0.9
    assert changed(weights(sft.path), weights(ppo.path)) > 0.9
    assert changed(weights(rm.path), weights(ppo.path / "value_model")) > 0.9

    # checkpoints load back with the standard from_pretrained
    policy = AutoModelForCausalLM.from_pretrained(ppo.path)
    reward_model = AutoModelForSequenceClassification.from_pretrained(rm.path)
    assert reward_model.config.num_labels == 1
    assert AutoModelForSequenceClassification.from_pretrained(ppo.path / "value_model").config.num_labels == 1
    ids = torch.tensor([[1, 2, 3]])
    assert torch.isfinite(policy(ids).logits).all() and reward_model(ids).logits.shape == (1, 1)


def test_lora_sft_feeds_rm_and_ppo(tmp_path, tiny_cache):
    lora = ["lora.enabled=true", "lora.r=4"]
    store = run_pipeline(tmp_path / "store", "tiny-llama", sft_extra=[*lora, "sft.learning_rate=1e-2"], rm_extra=lora,
                         ppo_extra=lora)
    sft = store.get("tiny-llama", "sft")
    assert (sft.path / "adapter_config.json").is_file() and not (sft.path / "model.safetensors").exists()
    base_path = registry.resolve(registry.get("tiny-llama"))
    assert sft.manifest["base"] == base_path and sft.manifest["adapter"] is True

    # the adapter loads with PeftModel.from_pretrained on its base, and moves the output
    base = AutoModelForCausalLM.from_pretrained(base_path)
    adapted = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_path), sft.path)
    ids = torch.tensor([[5, 6, 7, 8]])
    assert not torch.allclose(base(ids).logits, adapted(ids).logits)

    # the RM adapter (with its trained score head) sits on the merged SFT model, and loads through the store
    rm = store.get("tiny-llama", "rm")
    assert (rm.path / "adapter_config.json").is_file() and rm.manifest["base"] == str(sft.path)
    reward_model = loading.load_model(rm.path, AutoModelForSequenceClassification, registry.get("tiny-llama"))
    assert reward_model.score.weight.abs().sum() > 0

    # LoRA-PPO trained new adapters on the merged SFT model; loading merges both
    ppo = store.get("tiny-llama", "ppo")
    assert ppo.manifest["parents"] == ["tiny-llama/sft", "tiny-llama/rm"] and ppo.manifest["base"] == str(sft.path)
    assert (ppo.path / "adapter_config.json").is_file()
    merged_sft = loading.load_model(sft.path, AutoModelForCausalLM, registry.get("tiny-llama"))
    merged_ppo = loading.load_model(ppo.path, AutoModelForCausalLM, registry.get("tiny-llama"))
    assert not torch.allclose(merged_sft(ids).logits, merged_ppo(ids).logits)


def test_lora_reference_is_the_sft_model_with_adapters_disabled(tiny_cache):
    from peft import LoraConfig, get_peft_model

    spec = registry.get("tiny-llama")
    path = registry.resolve(spec)
    sft_model = AutoModelForCausalLM.from_pretrained(path).eval()
    policy = get_peft_model(AutoModelForCausalLM.from_pretrained(path), LoraConfig(
        r=4, target_modules=list(spec.lora_targets), init_lora_weights=False)).eval()  # adapters that change outputs
    reference = forwards.AdapterDisabled(policy)
    ids = torch.tensor([[3, 1, 4, 1, 5, 9, 2, 6], [0, 0, 2, 7, 1, 8, 2, 8]])
    attention = torch.tensor([[1] * 8, [0, 0] + [1] * 6])  # left padding, as in PPO rollouts
    ref_logprobs, _ = forwards.policy_forward(reference, ids, attention, 4, 1.0)
    sft_logprobs, _ = forwards.policy_forward(sft_model, ids, attention, 4, 1.0)
    policy_logprobs, _ = forwards.policy_forward(policy, ids, attention, 4, 1.0)
    # equal up to float rounding: the LM head multiplies a slice of positions, where kernels may round differently
    assert torch.allclose(ref_logprobs, sft_logprobs, rtol=0, atol=1e-5)
    assert not torch.allclose(policy_logprobs, sft_logprobs)
    assert loading.count_parameters(reference) == loading.count_parameters(policy)  # the same weights, no copy


def test_rm_without_sft_says_what_to_run(tmp_path):
    with pytest.raises(Exception, match="no complete 'sft' checkpoint for run 'tiny-llama'.*make sft"):
        rm_stage.main([f"store={tmp_path}", "model=tiny-llama"])


def test_retrained_sft_makes_rm_and_ppo_stale_and_ppo_refuses_them(tmp_path, tiny_cache, capsys):
    import subprocess
    import sys

    from alignment.store import StoreError

    tiny = ["limit=16", "threads=2"]  # one optimizer step a stage
    one_step = [*PPO, "ppo.steps=1", "ppo.ppo_epochs=1", "ppo.eval_every=0"]
    store = run_pipeline(tmp_path, "tiny-llama", ppo_extra=one_step, small=tiny)
    old_sft = store.get("tiny-llama", "sft")
    sft_stage.main([f"store={tmp_path}", "model=tiny-llama", *tiny, *SFT])  # retrained: replaces it
    new_sft = store.get("tiny-llama", "sft")
    assert (tmp_path / "tiny-llama" / ".history" / f"sft-{old_sft.manifest['uid']}" / "manifest.json").is_file()

    verify = subprocess.run([sys.executable, "-m", "alignment", "store", "verify", "--root", str(tmp_path)],
                            capture_output=True, text=True)
    replaced = f"parent tiny-llama/sft was replaced (uid {old_sft.manifest['uid']} -> {new_sft.manifest['uid']})"
    assert verify.returncode == 1
    assert (
        f"tiny-llama/rm: stale: {replaced}" in verify.stdout and f"tiny-llama/ppo: stale: {replaced}" in verify.stdout
    )

    with pytest.raises(StoreError, match=r"^tiny-llama/rm is stale: parent tiny-llama/sft was replaced .*make rm"):
        ppo_stage.main([f"store={tmp_path}", "model=tiny-llama", *tiny, *one_step])
    refused = subprocess.run(["make", "-s", "ppo", f"PY={sys.executable}", "INSTALL=", f"STORE={tmp_path}",
                              f"ARGS={' '.join([*tiny, *one_step])}"], capture_output=True, text=True)
    assert (
        refused.returncode != 0
        and "error: tiny-llama/rm is stale: parent tiny-llama/sft was replaced" in refused.stderr
    )
    assert "Traceback" not in refused.stderr
    ppo_stage.main([f"store={tmp_path}", "model=tiny-llama", *tiny, *one_step, "allow_stale=true"])
    assert "warning: tiny-llama/rm is stale" in capsys.readouterr().out
    # built as asked, and still marked: its reward model was trained on the replaced SFT
    assert store.stale(store.get("tiny-llama", "ppo")) == f"parent tiny-llama/rm is stale: {replaced}"


def test_reward_model_with_another_tokenizer_scores_from_text(tmp_path, tiny_cache):
    common = [f"store={tmp_path}", *SMALL]
    sft_stage.main([*common, "model=tiny-bloom", *SFT])  # the reward model comes from a BLOOM run
    rm_stage.main([*common, "model=tiny-bloom", *RM])
    sft_stage.main([*common, "model=tiny-llama", *SFT])  # the policy is a LLaMA
    ppo_stage.main([*common, "model=tiny-llama", *PPO, "ppo.reward_model=tiny-bloom/rm"])
    store = Store(tmp_path)
    ppo = store.get("tiny-llama", "ppo")
    assert ppo.manifest["parents"] == ["tiny-llama/sft", "tiny-bloom/rm"]
    assert math.isfinite(ppo.metrics["greedy"]["reward"]["policy"])

    # the scorer decodes the LLaMA policy's tokens and scores the text as the BLOOM reward model was trained
    llama, bloom = registry.get("tiny-llama"), registry.get("tiny-bloom")
    sft, rm = store.get("tiny-llama", "sft"), store.get("tiny-bloom", "rm")
    policy_tokenizer, rm_tokenizer = loading.load_tokenizer(sft.path, llama), loading.load_tokenizer(rm.path, bloom)
    assert policy_tokenizer.get_vocab() != rm_tokenizer.get_vocab()
    reward_model = loading.load_model(rm.path, AutoModelForSequenceClassification, bloom).eval()
    scorer = scoring.RewardScorer(reward_model, rm_tokenizer, bloom, policy_tokenizer, llama)
    assert scorer.by_text
    prompts = ["sort: c a b", "copy: d e"]
    policy = loading.load_model(ppo.path, AutoModelForCausalLM, llama).eval()
    query_responses, query_mask, responses = forwards.generate(
        policy, policy_tokenizer, [llama.format_prompt(p) for p in prompts], 8, 1.0, greedy=True)
    mask, _ = __import__("alignment.ppo", fromlist=["x"]).response_mask(responses, policy_tokenizer.eos_token_id)
    scores = scorer(prompts, query_responses, torch.cat([query_mask, mask.long()], 1), responses)
    texts = [
        bloom.format_prompt(p) + t
        for p, t in zip(prompts, policy_tokenizer.batch_decode(responses, skip_special_tokens=True))
    ]
    expected, _ = scoring.score_texts(reward_model, rm_tokenizer, texts)
    assert scores.tolist() == pytest.approx(expected, abs=1e-5)


@pytest.mark.parametrize("bits", ["4bit", "8bit"])
def test_quantized_lora_in_every_stage(tmp_path, tiny_cache, bits, capsys):
    q = [f"quantization={bits}", "lora.enabled=true", "lora.r=4", "limit=16"]  # one training step per stage
    run_pipeline(tmp_path, "tiny-llama", sft_extra=q, rm_extra=q, ppo_extra=[*q, "ppo.steps=1"])
    out = capsys.readouterr().out
    fp32 = AutoModelForCausalLM.from_pretrained(registry.resolve(registry.get("tiny-llama"))).get_memory_footprint()
    policy_mib = float(re.search(r"\[sft\] policy: ([\d.]+) MiB", out).group(1))
    assert policy_mib * 2**20 < 0.6 * fp32  # the weights really are stored in 8 or 4 bit
    for name in ("policy", "reference", "reward model", "critic"):
        assert f"[ppo] {name}: " in out  # each model's footprint is logged
    store = Store(tmp_path)
    for stage in ("sft", "rm", "ppo"):
        ckpt = store.get("tiny-llama", stage)
        assert ckpt.manifest["config"]["quantization"] == bits and (ckpt.path / "adapter_config.json").is_file()
    assert math.isfinite(store.get("tiny-llama", "rm").metrics["train_loss"])
    assert math.isfinite(store.get("tiny-llama", "ppo").metrics["greedy"]["reward"]["policy"])


def test_quantized_weights_without_lora_fail_at_start(tmp_path):
    with pytest.raises(SystemExit, match="quantized weights cannot be trained directly; set lora.enabled=true"):
        sft_stage.main([f"store={tmp_path}", "quantization=4bit"])


@pytest.mark.parametrize("name", [s.name for s in registry.MODELS.values() if s.is_tiny])
def test_greedy_decoding_gives_the_tokens_transformers_generate_gives(tiny_cache, name):
    """forwards.generate runs its own KV-cache loop; for every architecture in the registry its greedy tokens
    must be those of transformers' generate() (left padding, positions, cache and EOS handling included)."""
    spec = registry.get(name)
    path = registry.resolve(spec)
    tokenizer = loading.load_tokenizer(path, spec)
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    prompts = [spec.format_prompt(p) for p in ["sort: d a c b", "reverse: a b c d e f g h i j", "copy: x"]]
    query_responses, _, responses = forwards.generate(model, tokenizer, prompts, 10, 1.0, greedy=True)
    tokenizer.padding_side = "left"
    enc = tokenizer(prompts, return_tensors="pt", padding=True)
    assert torch.equal(query_responses[:, : enc.input_ids.shape[1]], enc.input_ids)
    expected = model.generate(**enc, max_new_tokens=10, do_sample=False, pad_token_id=tokenizer.pad_token_id,
                              eos_token_id=tokenizer.eos_token_id)[:, enc.input_ids.shape[1] :]
    mask, _ = ppo.response_mask(expected, tokenizer.eos_token_id)
    expected = torch.where(mask.bool(), expected, tokenizer.pad_token_id)  # nothing after EOS
    assert torch.equal(responses, expected[:, : responses.shape[1]])
    assert (expected[:, responses.shape[1] :] == tokenizer.pad_token_id).all()  # stopped only when all had ended


def test_sampling_draws_from_the_distribution():
    """The inverse-CDF draw picks each token with its probability (and never one of probability 0)."""
    torch.manual_seed(0)
    probs = torch.tensor([[0.5, 0.0, 0.3, 0.2], [0.0, 0.0, 0.0, 1.0]])
    draws = torch.stack([forwards._sample(probs.log()) for _ in range(4000)])
    assert (draws[:, 1] == 3).all()
    share = torch.bincount(draws[:, 0], minlength=4).float() / 4000
    assert share[1] == 0 and torch.allclose(share, probs[0], atol=0.03)


def rollout_batch(model, tokenizer, spec, prompts, max_new_tokens=12, temperature=1.0):
    query_responses, query_mask, responses = forwards.generate(
        model, tokenizer, [spec.format_prompt(p) for p in prompts], max_new_tokens, temperature)
    mask, _ = ppo.response_mask(responses, tokenizer.eos_token_id)
    return query_responses, torch.cat([query_mask, mask.long()], dim=1), query_mask.shape[1], mask


def test_old_logprobs_are_those_of_the_training_forward_in_bf16(tiny_cache):
    """PPO's old log-probs and values come from the training forward run without gradients, on the very
    minibatches the first epoch trains on: under bf16 autocast the first update's ratio is exactly 1. (Other
    minibatches, other widths: here up to 3e-3 nats apart in bf16, a ratio off 1 before any update.)"""
    spec = registry.get("tiny-llama")
    path = registry.resolve(spec)
    tokenizer = loading.load_tokenizer(path, spec)
    policy = AutoModelForCausalLM.from_pretrained(path)
    model = forwards.ActorCritic(policy, AutoModelForSequenceClassification.from_pretrained(path, num_labels=1)).eval()
    torch.manual_seed(0)
    prompts = ["sort: d a c b", "reverse: a b c d e f g h i j", "count: x y", "sort: q w e r t y u i o p a s"]
    qr, attention, context, mask = rollout_batch(policy, tokenizer, spec, prompts, temperature=0.7)
    r = Rollout(prompts, qr, attention, qr[:, context:], mask, mask.bool().any(1))
    minibatches = [torch.tensor([0, 2]), torch.tensor([3, 1])]
    p = ppo_stage.PPOSettings(temperature=0.7)
    scorer = scoring.RewardScorer(model.critic, tokenizer, spec, tokenizer, spec)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        old = rl_steps.score(model, policy, scorer, r, p, minibatches)
        for rows in minibatches:
            new = forwards.actor_critic_forward(model, qr[rows], attention[rows], context, 0.7)
            m = mask[rows].bool()
            assert new.logprobs.requires_grad
            assert torch.equal(new.logprobs[m], old.logprobs[rows][m])
            assert torch.equal(new.values[m], old.values[rows][m])
    assert torch.equal(old.ref_logprobs[mask.bool()], old.logprobs[mask.bool()])  # reference = policy: KL 0


def test_generation_never_samples_the_pad_token(tiny_cache):
    spec = registry.get("tiny-llama")
    path = registry.resolve(spec)
    tokenizer = loading.load_tokenizer(path, spec)
    policy = AutoModelForCausalLM.from_pretrained(path)
    with torch.no_grad():
        policy.lm_head.weight[tokenizer.pad_token_id] = policy.lm_head.weight.abs().max() * 50  # pad would win
    torch.manual_seed(0)
    _, _, responses = forwards.generate(policy, tokenizer, [spec.format_prompt("sort: b a")] * 4, 6, 1.0)
    mask, _ = ppo.response_mask(responses, tokenizer.eos_token_id)
    assert (responses[mask.bool()] != tokenizer.pad_token_id).all()


def test_packed_layout_computes_each_row_as_alone(tiny_cache):
    """Minibatch forwards lay each row out from column 0 (less padding, on the right only); every response
    token's log-prob and value, and the reward model's score, must be the ones the row computes alone."""
    spec = registry.get("tiny-llama")
    path = registry.resolve(spec)
    policy = AutoModelForCausalLM.from_pretrained(path)
    critic = AutoModelForSequenceClassification.from_pretrained(path, num_labels=1)
    model = forwards.ActorCritic(policy, critic).eval()
    # rollout layout, context 6: prompts of 3, 4 and 6 tokens; responses of 3, 4 and 2 tokens
    ids = torch.tensor([[0, 0, 0, 5, 6, 7, 8, 9, 1, 0, 0], [0, 0, 4, 5, 6, 7, 8, 9, 10, 1, 0],
                        [3, 4, 5, 6, 7, 8, 9, 1, 0, 0, 0]])
    attention = torch.tensor([[0, 0, 0, 1, 1, 1, 1, 1, 1, 0, 0], [0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 0],
                              [1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0]])
    packed = forwards.pack(ids, attention, 6)
    assert packed.input_ids.shape == (3, 8)  # the longest row (8 tokens), not 6 + 4
    assert packed.attention_mask.tolist() == [[1] * 6 + [0, 0], [1] * 8, [1] * 8]  # padding on the right only
    assert packed.input_ids[0, :6].tolist() == [5, 6, 7, 8, 9, 1] and packed.input_ids[2].tolist() == [
        3,
        4,
        5,
        6,
        7,
        8,
        9,
        1,
    ]
    assert packed.last.tolist() == [5, 7, 7]
    with torch.no_grad():
        scored = forwards.actor_critic_forward(model, ids, attention, 6, 1.0)
        ref_logprobs, _ = forwards.policy_forward(policy, ids, attention, 6, 1.0)
        assert scored.logprobs.shape == scored.values.shape == (3, 5)
        for i in range(3):
            row = ids[i][attention[i].bool()][None]
            prompt, response = int(attention[i, :6].sum()), int(attention[i, 6:].sum())
            logits = policy(row).logits
            expected = ppo.logprobs_from_logits(logits[:, prompt - 1 : -1], row[:, prompt:])[0]
            for got in (scored.logprobs[i, :response], ref_logprobs[i, :response]):
                assert torch.allclose(got, expected, atol=1e-5)
            row_values = forwards.position_scores(critic, row, torch.ones_like(row))
            assert torch.allclose(scored.values[i, :response], row_values[0, prompt - 1 : -1], atol=1e-5)
    tokenizer = loading.load_tokenizer(path, spec)
    assert critic.config.pad_token_id == tokenizer.pad_token_id == 0  # the padding in ids above
    scorer = scoring.RewardScorer(critic, tokenizer, spec, tokenizer, spec)  # same tokens: scored packed
    with torch.no_grad():
        scores = scorer(["unused"] * 3, ids, attention, ids[:, 6:])
        for i in range(3):
            row = ids[i][attention[i].bool()][None]
            pooled = critic(input_ids=row).logits[0, 0]  # transformers' own pooling, at the last token
            assert torch.allclose(scores[i], pooled, atol=1e-5)


class FullyMaskedRows:
    """Records, for every scaled_dot_product_attention call, whether some query row attends to no key."""

    def __init__(self):
        self.calls, self.fully_masked = 0, 0
        self.original = torch.nn.functional.scaled_dot_product_attention

    def __call__(self, query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, **kwargs):
        self.calls += 1
        if attn_mask is not None:
            allowed = attn_mask if attn_mask.dtype == torch.bool else attn_mask > float("-inf")
            allowed = allowed.expand(*query.shape[:-1], key.shape[-2])
            self.fully_masked += int((~allowed.any(-1)).any())
        return self.original(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, **kwargs)


def test_no_training_forward_holds_a_fully_masked_attention_row(tiny_cache, monkeypatch):
    """cuDNN's attention backward returns NaN for a query row that attends to nothing (the default kernel on
    H100/H200): every forward PPO trains through must give each position at least one key. The rollout layout
    (prompts left-padded) has such rows; the packed layout must not."""
    spec = registry.get("tiny-llama")
    path = registry.resolve(spec)
    tokenizer = loading.load_tokenizer(path, spec)
    policy = AutoModelForCausalLM.from_pretrained(path, attn_implementation="sdpa")
    critic = AutoModelForSequenceClassification.from_pretrained(path, num_labels=1, attn_implementation="sdpa")
    model = forwards.ActorCritic(policy, critic)
    torch.manual_seed(0)
    qr, attention, context, _ = rollout_batch(policy, tokenizer, spec, ["sort: d a c b", "reverse: a b c d e f g h"])
    assert (attention[:, 0] == 0).any()  # left padding in the rollout: the case to handle
    probe = FullyMaskedRows()
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", probe)
    policy(input_ids=qr, attention_mask=attention)  # the rollout layout as it is: detected
    assert probe.calls and probe.fully_masked
    probe.calls = probe.fully_masked = 0
    forwards.actor_critic_forward(model, qr, attention, context, 1.0).logprobs.sum().backward()
    assert probe.calls == 2 * policy.config.num_hidden_layers  # policy and critic, every layer seen
    assert probe.fully_masked == 0


def test_packed_rows_train_on_the_same_loss_as_padded_batches(tiny_cache):
    """SFT batches packed into rows (batching.PackedRows) hold each sequence once, within max_length, and give
    the loss and gradients of the same batch padded; models that cannot keep packed sequences apart are found."""
    spec = registry.get("tiny-llama")
    model = AutoModelForCausalLM.from_pretrained(registry.resolve(spec)).eval()
    assert forwards.reads_packed_rows(model)
    bloom = AutoModelForCausalLM.from_pretrained(registry.resolve(registry.get("tiny-bloom")))
    assert not forwards.reads_packed_rows(bloom)  # ALiBi reads the attention mask: padded batches instead

    generator = torch.Generator().manual_seed(0)
    lengths = [9, 3, 14, 6, 11, 5, 7]
    examples = []
    for n in lengths:
        ids = torch.randint(3, 200, (n,), generator=generator).tolist()
        examples.append({"input_ids": ids, "labels": [-100] * (n // 3) + ids[n // 3 :]})  # prompt masked out
    batch = batching.PackedRows(pad_token_id=0)(examples)
    rows = batch["input_ids"]
    assert rows.shape[0] < len(examples) and rows.shape[1] == max(lengths)
    assert (rows != 0).sum() == sum(lengths)  # every token once, padding apart
    assert (batch["labels"] != -100).sum() == sum(n - n // 3 for n in lengths)

    padded_ids = torch.zeros(len(examples), max(lengths), dtype=torch.long)
    padded_labels = torch.full_like(padded_ids, -100)
    for i, e in enumerate(examples):
        padded_ids[i, : len(e["input_ids"])] = torch.tensor(e["input_ids"])
        padded_labels[i, : len(e["labels"])] = torch.tensor(e["labels"])

    def loss_and_grad(**inputs):
        model.zero_grad()
        loss = model(**inputs).loss
        loss.backward()
        return loss.detach(), model.model.embed_tokens.weight.grad.clone()

    packed_loss, packed_grad = loss_and_grad(**batch)
    padded_loss, padded_grad = loss_and_grad(input_ids=padded_ids, attention_mask=(padded_ids != 0).long(),
                                             labels=padded_labels)
    assert torch.allclose(packed_loss, padded_loss, atol=1e-5)
    assert torch.allclose(packed_grad, padded_grad, atol=1e-6)


@pytest.mark.parametrize("local_rank", ["0", "1"])
def test_quantized_weights_load_on_the_device_of_their_process(monkeypatch, tiny_cache, local_rank):
    """Each process of a multi-GPU launch asks bitsandbytes for its own GPU (LOCAL_RANK), never all for the first."""
    asked = {}

    def from_pretrained(path, **kwargs):
        asked.update(kwargs)
        raise RuntimeError("stop: only the request matters here")

    monkeypatch.setenv("LOCAL_RANK", local_rank)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", from_pretrained)
    spec = registry.get("tiny-llama")
    with pytest.raises(RuntimeError, match="stop"):
        loading.load_model(registry.resolve(spec), AutoModelForCausalLM, spec, "4bit")
    assert asked["device_map"] == {"": f"cuda:{local_rank}"}
    assert asked["quantization_config"].load_in_4bit


@pytest.mark.parametrize("n_prompts", [3, 8, 21])
def test_every_process_gets_an_equal_share_of_every_step_even_from_few_prompts(n_prompts):
    """The prompt queue holds a whole step before a step takes from it: with fewer prompts than a step needs
    (3 prompts, 2 processes x 4 per step) each process still gets its 4 (the gathers of a step need equal shares),
    every prompt comes round before any comes round again, and two processes draw the same queue."""
    import types

    from alignment.rl.types import RLState

    per_step, taken = 8, {0: [], 1: []}
    for rank in (0, 1):
        state, order = RLState(config={}, kl_coef=0.0, moments={}), torch.Generator().manual_seed(0)
        accelerator = types.SimpleNamespace(process_index=rank, num_processes=2)
        for _ in range(5):
            mine = rl_steps.next_prompts(state, n_prompts, per_step, order, accelerator)
            assert len(mine) == per_step // 2
            taken[rank].append(mine)
    assert taken[0] != taken[1]  # each its own share of the same queue
    queue = [i for step in range(5) for pair in zip(taken[0][step], taken[1][step]) for i in pair]  # as drawn
    for start in range(0, len(queue) - n_prompts + 1, n_prompts):
        assert sorted(queue[start:start + n_prompts]) == list(range(n_prompts))  # one permutation after another
