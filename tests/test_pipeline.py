"""All three stages end to end on a minuscule config: finite losses, trained weights, loadable checkpoints,
manifests linking sft -> rm -> ppo."""

import json
import math

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from alignment import modeling, registry
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


def run_pipeline(store_root, model, sft_extra=(), rm_extra=()):
    common = [f"store={store_root}", f"model={model}", *SMALL]
    sft_stage.main([*common, *SFT, *sft_extra])
    rm_stage.main([*common, *RM, *rm_extra])
    ppo_stage.main([*common, *PPO])
    return Store(store_root)


@pytest.mark.parametrize("model", ["tiny-llama", "tiny-bloom"])
def test_sft_rm_ppo_end_to_end(tmp_path, tiny_cache, model):
    store = run_pipeline(tmp_path / "store", model)
    sft, rm, ppo = (store.get(model, s) for s in ("sft", "rm", "ppo"))

    # lineage
    assert sft.manifest["parents"] == [] and rm.manifest["parents"] == [sft.id]
    assert ppo.manifest["parents"] == [sft.id, rm.id]
    assert ppo.manifest["parent_uids"] == [sft.manifest["uid"], rm.manifest["uid"]]
    for c in (sft, rm, ppo):
        assert c.manifest["model"] == model and c.manifest["status"] == "complete"
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
    store = run_pipeline(tmp_path / "store", "tiny-llama", sft_extra=[*lora, "sft.learning_rate=1e-2"], rm_extra=lora)
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
    reward_model = modeling.load_model(rm.path, AutoModelForSequenceClassification, registry.get("tiny-llama"))
    assert reward_model.score.weight.abs().sum() > 0

    # PPO's policy starts from the merged SFT model, and ends as a plain full model
    ppo = store.get("tiny-llama", "ppo")
    assert ppo.manifest["parents"] == ["tiny-llama/sft", "tiny-llama/rm"]
    merged_sft = modeling.load_model(sft.path, AutoModelForCausalLM, registry.get("tiny-llama"))
    assert changed(merged_sft.state_dict(), weights(ppo.path)) > 0.5


def test_rm_without_sft_says_what_to_run(tmp_path):
    with pytest.raises(Exception, match="no complete 'sft' checkpoint for run 'tiny-llama'.*make sft"):
        rm_stage.main([f"store={tmp_path}", "model=tiny-llama"])
