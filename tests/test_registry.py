import collections
import contextlib
import dataclasses
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.models.auto.configuration_auto import CONFIG_MAPPING

from alignment import loading, registry

ROOT = Path(__file__).resolve().parent.parent
TINY = [s for s in registry.MODELS.values() if s.is_tiny]
REAL = [s for s in registry.MODELS.values() if not s.is_tiny]
# An instruct model's kind of template: special tokens, roles, and the header the answer follows.
CHAT_TEMPLATE = ("{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}{{ eos_token }}\n"
                 "{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}")


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
        assert registry._is_hub_id(spec.source)  # a hub id: loading code is real


@pytest.mark.parametrize("spec", registry.MODELS.values(), ids=lambda s: s.name)
def test_lora_targets_exist_in_the_architecture(spec):
    twin = tiny_twin_of(spec.family)  # every family the registry knows has a tiny twin
    config = CONFIG_MAPPING[spec.family](vocab_size=64, **dict(twin.tiny_config))
    model = AutoModelForCausalLM.from_config(config)
    names = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    assert set(spec.lora_targets) <= names


def test_unknown_name_lists_the_registry():
    with pytest.raises(registry.RegistryError, match="unknown model 'llama-9000'.*tiny-llama.*hub id"):
        registry.get("llama-9000")
    with pytest.raises(registry.RegistryError, match="unknown template 'alpacca'.*auto"):
        registry.get("tiny-llama", template="alpacca")


def test_local_folder_becomes_an_entry_of_its_family(tiny_cache):
    path = registry.resolve(registry.get("tiny-bloom"))
    spec = registry.get(path)
    assert spec.family == "bloom" and spec.source == path and not spec.is_tiny
    assert spec.lora_targets == registry.get("bloom-560m").lora_targets
    assert registry.get(os.path.relpath(path)) == spec  # named by its absolute path: a later stage may run elsewhere


def test_real_entry_fails_clearly_offline(hub_cache):
    """HF_HUB_OFFLINE=1 (conftest) and not in the cache: one line saying what to do, before from_pretrained."""
    spec = registry.get("gpt2")
    started = time.time()
    with pytest.raises(registry.RegistryError) as failed:
        registry.resolve(spec)
    assert time.time() - started < 1
    message = str(failed.value)
    assert "\n" not in message and "openai-community/gpt2 is not in the local Hugging Face cache" in message
    assert "HF_HUB_OFFLINE=1" in message and "hf download openai-community/gpt2" in message


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


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    """An empty local HF hub cache where huggingface_hub and transformers look: they read HF_HUB_CACHE once, at
    import, into the constant they use when called."""
    from huggingface_hub import constants

    path = tmp_path / "hf" / "hub"
    path.mkdir(parents=True)
    monkeypatch.setenv("HF_HUB_CACHE", str(path))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(path))
    return path


def cache_as_download(hub_cache: Path, repo_id: str, folder: Path) -> None:
    """folder as the hub cache holds a download of repo_id: models--org--name/snapshots/<rev>/ and refs/main."""
    repo, revision = hub_cache / f"models--{repo_id.replace('/', '--')}", "0" * 40
    shutil.copytree(folder, repo / "snapshots" / revision)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revision)


@contextlib.contextmanager
def closed_port():
    """A hub endpoint that refuses every connection (bound, never listening): no network, whatever the machine has."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        yield f"http://127.0.0.1:{s.getsockname()[1]}"


@pytest.fixture
def chat_model(tiny_cache, tmp_path):
    """A tiny LLaMA whose tokenizer ships a chat template, as an instruct model's does."""
    folder = tmp_path / "tiny-llama-chat"
    shutil.copytree(registry.resolve(registry.get("tiny-llama")), folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(folder)
    return folder


def test_hub_id_loads_from_the_local_cache_offline(hub_cache, chat_model):
    """HF_HUB_OFFLINE=1 (conftest): an unregistered hub id in the cache is an entry of its family, and loads."""
    cache_as_download(hub_cache, "someorg/tiny-llama-chat", chat_model)
    spec, llama = registry.get("someorg/tiny-llama-chat"), registry.get("llama-2-7b")
    assert (spec.name, spec.source, spec.family) == ("someorg/tiny-llama-chat", "someorg/tiny-llama-chat", "llama")
    # the family's settings, but prompts in the chat template its tokenizer ships (an instruct model's)
    assert spec.template == "auto" and spec.chat_template == CHAT_TEMPLATE
    assert dataclasses.replace(spec, name=llama.name, source=llama.source, template=llama.template, chat_template="",
                               chat_tokens=()) == llama
    path = registry.resolve(spec)
    model = loading.load_model(path, AutoModelForCausalLM, spec, tokenizer=loading.load_tokenizer(path, spec))
    assert model.config.model_type == "llama" and model.dtype == torch.bfloat16
    # a later stage resolves the manifest's model again, and template=auto reads the cached tokenizer
    assert registry.get(spec.name, template="auto").chat_template == CHAT_TEMPLATE


def test_hub_out_of_reach_loads_a_cached_model_at_once(hub_cache, chat_model, monkeypatch, capsys):
    """HF_HUB_OFFLINE unset and the hub not answering: the process switches to offline mode and the cached model
    loads without a retry (huggingface_hub alone took 3.5 min for this model here)."""
    from huggingface_hub import constants

    cache_as_download(hub_cache, "someorg/tiny-llama-chat", chat_model)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(registry, "_FROM_CACHE", set())
    registry._hub_unreachable.cache_clear()
    try:
        with closed_port() as endpoint:
            monkeypatch.setattr(constants, "ENDPOINT", endpoint)
            started = time.time()
            spec = registry.get("someorg/tiny-llama-chat")
            path = registry.resolve(spec)
            loading.load_model(path, AutoModelForCausalLM, spec, tokenizer=loading.load_tokenizer(path, spec))
            assert time.time() - started < 10
        assert constants.HF_HUB_OFFLINE and os.environ["HF_HUB_OFFLINE"] == "1"
    finally:
        registry._hub_unreachable.cache_clear()
    out = capsys.readouterr().out
    assert out.count(f"{endpoint} cannot be reached") == 1 and "loads from the local HF cache" in out


def test_no_network_fails_in_seconds_and_leaves_no_folder(tmp_path):
    """The sft stage on a hub id not in the cache, the hub out of reach and HF_HUB_OFFLINE unset: one line saying
    what to do, within seconds (huggingface_hub alone retries for about a minute), and nothing in the store.
    Timed from the end of the imports, which alone take 6-12 s on a shared 2-core machine."""
    code = ("import time; import stages.sft as sft; from alignment import config; "
            "print('imported at', time.time(), flush=True); config.run(sft.main)")
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_HUB_CACHE")}
    store = tmp_path / "store"
    with closed_port() as endpoint:
        started = time.time()
        out = subprocess.run([sys.executable, "-c", code, "model=someorg/some-model", f"store={store}"], cwd=ROOT,
                             env={**env, "HF_ENDPOINT": endpoint, "HF_HOME": str(tmp_path / "hf")},
                             capture_output=True, text=True, timeout=300)
    ended = time.time()
    assert out.returncode == 1
    [line] = out.stderr.strip().splitlines()  # one line, no traceback
    assert line.startswith("error: someorg/some-model is not in the local Hugging Face cache"), line
    assert f"{endpoint} cannot be reached" in line and "HF_HUB_OFFLINE=1" in line and "local model folder" in line
    imported = float(out.stdout.split("imported at ")[1].split()[0])
    assert ended - imported < 10, f"failed {ended - imported:.1f} s after the imports ({ended - started:.1f} s in all)"
    assert not store.exists()  # not even the run's folder


def test_unknown_family_lists_the_families_and_takes_settings(tmp_path):
    folder = tmp_path / "phi"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "phi3", "dtype": "bfloat16"}))
    with pytest.raises(registry.RegistryError) as failed:
        registry.get(str(folder))
    message = str(failed.value)
    assert (
        "'phi3'" in message and "bloom, gpt2, gpt_neox, llama, mistral, opt, qwen2" in message and "\n" not in message
    )
    assert "template=<" in message and "lora.target_modules" in message and "alignment/registry.py" in message
    spec = registry.get(str(folder), template="chatml")  # the settings given: usable
    assert (spec.family, spec.template, spec.lora_targets, spec.dtype) == ("phi3", "chatml", (), "bfloat16")
    with pytest.raises(SystemExit, match=r"lora.target_modules: none given.*linear layers are \['fc'\]"):
        loading.lora_targets(torch.nn.Sequential(collections.OrderedDict(fc=torch.nn.Linear(2, 2))), [], spec.name)


def test_template_auto_renders_with_the_tokenizers_chat_template(chat_model, tmp_path):
    spec = registry.get(str(chat_model), template="auto")
    assert (spec.template, spec.chat_template) == ("auto", CHAT_TEMPLATE)
    tokenizer = AutoTokenizer.from_pretrained(chat_model)
    conversation = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "copy: a"},
                    {"role": "assistant", "content": "a"}, {"role": "user", "content": "sort: b a"}]
    for prompt, messages in [("sort: b a", [{"role": "user", "content": "sort: b a"}]), (conversation, conversation)]:
        assert spec.format_prompt(prompt) == tokenizer.apply_chat_template(messages, tokenize=False,
                                                                           add_generation_prompt=True)
    assert spec.format_prompt("sort: b a") == "<|user|>\nsort: b a<|endoftext|>\n<|assistant|>\n"
    # "auto" round-trips: from the checkpoint's tokenizer (saved by a stage, pad token added) a later stage gets
    # the very same entry
    checkpoint = tmp_path / "checkpoint"
    loading.save_tokenizer(loading.load_tokenizer(chat_model, spec), checkpoint, spec)
    assert registry.get(str(chat_model), template=spec.template, tokenizer=checkpoint) == spec


def test_template_auto_leaves_the_bos_to_a_tokenizer_that_adds_it(chat_model):
    """LLaMA-3's and Gemma's templates start with bos_token and their tokenizers add it too: a prompt encoded the
    stages' way (special tokens added) must start with one BOS, as apply_chat_template's own encoding does."""
    from tokenizers import processors

    tokenizer = AutoTokenizer.from_pretrained(chat_model)
    tokenizer.add_special_tokens({"bos_token": "<s>"})
    tokenizer.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", tokenizer.bos_token_id)])
    tokenizer.save_pretrained(chat_model)
    tokenizer = AutoTokenizer.from_pretrained(chat_model)
    assert tokenizer("x").input_ids[0] == tokenizer.bos_token_id

    spec = registry.get(str(chat_model), template="auto")
    messages = [{"role": "user", "content": "sort: b a"}]
    ids = tokenizer(spec.format_prompt("sort: b a")).input_ids
    assert ids == tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=False)
    assert ids.count(tokenizer.bos_token_id) == 1


def test_template_auto_falls_back_to_the_family_template(tiny_cache, capsys):
    path = registry.resolve(registry.get("tiny-llama"))  # its tokenizer ships no chat template
    assert registry.get(path, template="auto") == registry.get(path)  # the family's: alpaca, as llama-2-7b
    assert registry.get("tiny-qwen2", template="auto").template == "chatml"  # a tiny twin's tokenizer has none
    out = capsys.readouterr().out.splitlines()
    assert out[0] == f"[registry] template=auto: {path} ships no chat template; prompts use its family's 'alpaca'"


def test_the_expected_head_swap_report_is_quiet_and_any_other_shows(tiny_cache, capfd):
    import logging

    from transformers import AutoModelForSequenceClassification

    AutoModelForSequenceClassification.from_pretrained(registry.resolve(registry.get("tiny-llama")), num_labels=1)
    assert "LOAD REPORT" not in capfd.readouterr().err  # lm_head unused, score new: by design, every time
    swap = next(
        f for f in logging.getLogger("transformers.modeling_utils").filters if type(f).__name__ == "_ExpectedHeadSwap"
    )
    report = "X LOAD REPORT from: m\nKey | Status\nlm_head.weight | UNEXPECTED\n{} | MISSING\n"

    def passes(missing: str) -> bool:
        return swap.filter(logging.LogRecord("t", logging.WARNING, "", 0, report.format(missing), None, None))

    assert not passes("score.weight") and passes("model.layers.0.mlp.up_proj.weight")


def test_frozen_models_follow_the_stage_into_fp32_on_a_cpu(monkeypatch):
    """A bf16 entry's frozen models (reference, reward model, judge) stay bf16 where the stage computes in bf16
    or on a GPU, and load in fp32 on a CPU whose stage computes in fp32 (there bf16 may be emulated, 50-100x
    slower)."""
    import torch

    from alignment import loading

    monkeypatch.delenv("ACCELERATE_MIXED_PRECISION", raising=False)
    bf16_entry = registry.get("llama-3.2-1b-instruct")
    assert bf16_entry.dtype == "bfloat16"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert loading.frozen_dtype(bf16_entry, "fp32") == torch.float32
    assert loading.frozen_dtype(bf16_entry, "bf16") == torch.bfloat16
    assert loading.frozen_dtype(registry.get("tiny-llama"), "bf16") == loading.DTYPES[registry.get("tiny-llama").dtype]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert loading.frozen_dtype(bf16_entry, "fp32") == torch.bfloat16
