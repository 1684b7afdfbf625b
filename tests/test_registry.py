import dataclasses

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.models.auto.configuration_auto import CONFIG_MAPPING

from alignment import loading, registry

TINY = [s for s in registry.MODELS.values() if s.is_tiny]
REAL = [s for s in registry.MODELS.values() if not s.is_tiny]


def tiny_twin_of(family):
    return next(s for s in TINY if s.family == family)


@pytest.mark.parametrize("spec", TINY, ids=lambda s: s.name)
def test_tiny_twin_builds_once_and_loads_with_from_pretrained(spec, tiny_cache):
    path = registry.resolve(spec)
    assert registry.resolve(spec) == path  # cached: same folder, not rebuilt
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path)
    assert model.config.model_type == spec.family
    assert tokenizer.pad_token_id != tokenizer.eos_token_id
    text = spec.format_prompt("sort: d a c b") + "a b c d hope this helps"
    ids = tokenizer(text).input_ids
    assert tokenizer.decode(ids) == text  # byte-level BPE: lossless
    assert len(ids) < len(text) / 2  # and it learned the corpus' words
    assert tokenizer.unk_token_id not in tokenizer("Ünïcode text it never saw").input_ids
    logits = model(torch.tensor([ids])).logits
    assert logits.shape == (1, len(ids), len(tokenizer)) and torch.isfinite(logits).all()
    assert loading.count_parameters(model) < 2_000_000


@pytest.mark.parametrize("spec", registry.MODELS.values(), ids=lambda s: s.name)
def test_every_entry_resolves_its_settings(spec):
    assert spec.family in CONFIG_MAPPING
    assert spec.template in registry.TEMPLATES and "sort: b a" in spec.format_prompt("sort: b a")
    assert spec.padding_side in ("left", "right")
    assert spec.dtype in loading.DTYPES
    assert not spec.trust_remote_code
    if not spec.is_tiny:
        assert registry.resolve(spec) == spec.source and "/" in spec.source  # a hub id: loading code is real


@pytest.mark.parametrize("spec", registry.MODELS.values(), ids=lambda s: s.name)
def test_lora_targets_exist_in_the_architecture(spec):
    twin = tiny_twin_of(spec.family)  # every family the registry knows has a tiny twin
    config = CONFIG_MAPPING[spec.family](vocab_size=64, **dict(twin.tiny_config))
    model = AutoModelForCausalLM.from_config(config)
    names = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    assert set(spec.lora_targets) <= names


def test_unknown_name_lists_the_registry():
    with pytest.raises(KeyError, match="unknown model 'llama-9000'.*tiny-llama"):
        registry.get("llama-9000")


def test_local_folder_becomes_an_entry_of_its_family(tiny_cache):
    path = registry.resolve(registry.get("tiny-bloom"))
    spec = registry.get(path)
    assert spec.family == "bloom" and spec.source == path and not spec.is_tiny
    assert spec.lora_targets == registry.get("bloom-560m").lora_targets


def test_real_entry_fails_clearly_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    spec = registry.get("gpt2")
    with pytest.raises(OSError):
        loading.load_tokenizer(registry.resolve(spec), spec)


def test_default_model_is_registered():
    assert registry.DEFAULT_MODEL in registry.MODELS
    assert dataclasses.is_dataclass(registry.get(registry.DEFAULT_MODEL))


def test_a_tokenizer_without_pad_gets_its_own_and_the_reward_model_reads_eos(tiny_cache, tmp_path):
    """Real LLaMA/Mistral/GPT-2 tokenizers have no pad token: padding with EOS would hide every response's EOS from
    the reward model (it scores a sequence at its last non-pad token). A pad of its own, with a zero embedding row."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from alignment import scoring

    spec = registry.get("tiny-llama")
    source = registry.resolve(spec)
    tokenizer = AutoTokenizer.from_pretrained(source)
    tokenizer.pad_token = None  # as a real LLaMA tokenizer ships
    tokenizer.save_pretrained(tmp_path)
    AutoModelForSequenceClassification.from_pretrained(source, num_labels=1).save_pretrained(tmp_path)

    tokenizer = loading.load_tokenizer(tmp_path, spec)
    assert tokenizer.pad_token_id is not None and tokenizer.pad_token_id != tokenizer.eos_token_id
    model = loading.load_model(tmp_path, AutoModelForSequenceClassification, spec, tokenizer=tokenizer)
    embeddings = model.get_input_embeddings().weight
    assert embeddings.shape[0] == len(tokenizer) and model.config.pad_token_id == tokenizer.pad_token_id
    assert torch.equal(embeddings[tokenizer.pad_token_id], torch.zeros_like(embeddings[0]))
    again = loading.load_model(tmp_path, AutoModelForSequenceClassification, spec, tokenizer=tokenizer)
    assert torch.equal(again.get_input_embeddings().weight, embeddings)  # the same rows every time

    texts = ["### Instruction:\nsort: b a\n\n### Response:\na b", "### Instruction:\ncopy: a\n\n### Response:\na a a"]
    scores, _ = scoring.score_texts(model, tokenizer, texts)
    with torch.no_grad():
        for text, score in zip(texts, scores):
            ids = tokenizer(text + tokenizer.eos_token, return_tensors="pt").input_ids
            assert ids[0, -1] == tokenizer.eos_token_id
            assert abs(model(input_ids=ids).logits[0, 0].item() - score) < 1e-5  # pooled at the EOS
