"""Checkpoints that travel: every tokenizer saved with the chat template its prompts were rendered with, adapter
bases named by absolute path, and `python -m alignment export` folders that plain transformers loads from any
directory and that answer exactly as the pipeline does."""

import dataclasses
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_pipeline import PPO, RM, SFT  # (pytest puts tests/ on sys.path)
from tokenizers import Tokenizer, models
from transformers import AutoModelForSequenceClassification, AutoTokenizer, PreTrainedTokenizerFast

from alignment import __main__ as cli
from alignment import data, forwards, loading, registry, scoring
from alignment.store import MANIFEST, Store
from stages import ppo as ppo_stage
from stages import rm as rm_stage
from stages import sft as sft_stage

RUN = "tiny-llama"
CONVERSATIONS = [
    "sort: c a b",
    [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "copy: x y"}],
    [{"role": "user", "content": "sort: b a"}, {"role": "assistant", "content": "a b"},
     {"role": "user", "content": "reverse: a b c\n{not a field} \"quoted\" {{ not jinja }}"}],
    [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "count: q w"},
     {"role": "assistant", "content": "2"}, {"role": "user", "content": "ünïcode: é ß"}],
]


def messages(prompt) -> list[dict]:
    return [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt


@pytest.mark.parametrize("template", sorted(registry.TEMPLATES))
def test_saved_chat_template_renders_as_the_registry(template, tmp_path):
    spec = registry.get("tiny-llama", template=template)
    word_level = Tokenizer(models.WordLevel({"<unk>": 0}, unk_token="<unk>"))  # any tokenizer: only the text matters
    loading.save_tokenizer(PreTrainedTokenizerFast(tokenizer_object=word_level, unk_token="<unk>"), tmp_path, spec)
    tokenizer = AutoTokenizer.from_pretrained(tmp_path)
    for conversation in CONVERSATIONS:
        applied = tokenizer.apply_chat_template(messages(conversation), tokenize=False, add_generation_prompt=True)
        assert applied == registry.render(template, conversation) == spec.format_prompt(conversation)
    assert tokenizer.apply_chat_template(messages("sort: c a b"), tokenize=False) == spec.format_prompt("sort: c a b")


def test_every_entry_saves_the_template_it_prompts_with(tmp_path):
    word_level = Tokenizer(models.WordLevel({"<unk>": 0}, unk_token="<unk>"))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=word_level, unk_token="<unk>")
    for spec in registry.MODELS.values():
        loading.save_tokenizer(tokenizer, tmp_path / spec.name, spec)
        saved = AutoTokenizer.from_pretrained(tmp_path / spec.name)
        assert saved.apply_chat_template(messages("sort: c a b"), tokenize=False, add_generation_prompt=True) == \
            spec.format_prompt("sort: c a b"), spec.name
    # a tokenizer's own template (template="auto") is saved as it is
    own = dataclasses.replace(registry.get("tiny-llama"), chat_template="{{ messages[0]['content'] | upper }}")
    loading.save_tokenizer(tokenizer, tmp_path / "own", own)
    assert AutoTokenizer.from_pretrained(tmp_path / "own").apply_chat_template(messages("hi"), tokenize=False) == "HI"


@pytest.fixture(scope="module")
def pipeline(tiny_cache, tmp_path_factory):
    """A LoRA SFT, a LoRA reward model and a full-weights PPO policy of tiny-llama, in a store given by a path
    relative to the working directory (as `store=store` is): manifests must name bases absolutely all the same."""
    root = os.path.relpath(tmp_path_factory.mktemp("export") / "store", Path.cwd())
    assert not Path(root).is_absolute()
    lora = ["lora.enabled=true", "lora.r=4"]
    common = [f"store={root}", f"model={RUN}", "limit=16", "threads=2"]
    # two optimizer steps each: the first, in warm-up, has learning rate 0
    sft_stage.main([*common, *SFT, *lora, "sft.learning_rate=1e-2", "sft.batch_size=8"])
    rm_stage.main([*common, *RM, *lora, "rm.batch_size=8"])
    ppo_stage.main([*common, *PPO, "ppo.eval_every=0"])
    return Store(os.path.abspath(root))


def test_manifests_name_bases_absolutely_and_tokenizers_carry_the_template(pipeline):
    sft, rm, ppo = (pipeline.get(RUN, s) for s in ("sft", "rm", "ppo"))
    assert sft.manifest["base"] == registry.resolve(registry.get(RUN)) and "base_checkpoint" not in sft.manifest
    for c in (rm, ppo):
        assert c.manifest["base"] == str(sft.path) and Path(c.manifest["base"]).is_absolute()
        assert c.manifest["base_checkpoint"] == sft.id
    spec = registry.get(RUN)
    for c in (sft, rm, ppo):
        tokenizer = AutoTokenizer.from_pretrained(c.path)
        for conversation in CONVERSATIONS:
            assert tokenizer.apply_chat_template(messages(conversation), tokenize=False, add_generation_prompt=True) \
                == spec.format_prompt(conversation)


def test_adapter_base_loads_from_any_directory_old_relative_manifests_too(pipeline, tmp_path, monkeypatch):
    spec = registry.get(RUN)
    ids = torch.tensor([[5, 6, 7, 8]])
    rm = pipeline.get(RUN, "rm")
    expected = loading.load_model(rm.path, AutoModelForSequenceClassification, spec).eval()(ids).logits
    # a copy of the run in another store, its manifest as written before: base relative to the writer's directory
    moved = tmp_path / "moved"
    shutil.copytree(pipeline.root / RUN, moved / RUN)
    manifest = json.loads((moved / RUN / "rm" / MANIFEST).read_text())
    manifest["base"] = os.path.relpath(moved / RUN / "sft", Path.cwd())
    del manifest["base_checkpoint"]
    (moved / RUN / "rm" / MANIFEST).write_text(json.dumps(manifest))
    (tmp_path / "a" / "b" / "c").mkdir(parents=True)
    for cwd in (Path.cwd(), tmp_path / "a" / "b" / "c"):  # the writer's directory, and one where base is not
        monkeypatch.chdir(cwd)
        for path in (rm.path, moved / RUN / "rm"):
            model = loading.load_model(path, AutoModelForSequenceClassification, spec).eval()
            assert torch.equal(model(ids).logits, expected)
    assert not Path(manifest["base"]).exists()  # (from the last directory: found through the store's layout)
    # the store moved: the absolute base is gone, base_checkpoint finds the parent in the adapter's own store
    manifest["base"], manifest["base_checkpoint"] = str(tmp_path / "gone" / RUN / "sft"), f"{RUN}/sft"
    (moved / RUN / "rm" / MANIFEST).write_text(json.dumps(manifest))
    model = loading.load_model(moved / RUN / "rm", AutoModelForSequenceClassification, spec).eval()
    assert torch.equal(model(ids).logits, expected)


def test_an_adapter_merges_into_the_parent_it_was_trained_on_even_after_a_retraining(pipeline, tmp_path):
    from safetensors.torch import save_file

    spec = registry.get(RUN)
    ids = torch.tensor([[5, 6, 7, 8]])
    store = tmp_path / "store"
    shutil.copytree(pipeline.root / RUN, store / RUN)
    rm_path, sft_path = store / RUN / "rm", store / RUN / "sft"
    rm_manifest = json.loads((rm_path / MANIFEST).read_text())
    (rm_path / MANIFEST).write_text(json.dumps({**rm_manifest, "base": str(sft_path)}))  # as if written here
    expected = loading.load_model(rm_path, AutoModelForSequenceClassification, spec).eval()(ids).logits
    # SFT retrained: the old one goes to .history, a new one (other weights, other uid) takes its place
    old = json.loads((sft_path / MANIFEST).read_text())
    (store / RUN / ".history").mkdir()
    shutil.copytree(sft_path, store / RUN / ".history" / f"sft-{old['uid']}")
    weights = next(sft_path / f for f in ("model.safetensors", "adapter_model.safetensors") if (sft_path / f).is_file())
    save_file({k: v + 0.5 for k, v in load_file(str(weights)).items()}, str(weights), metadata={"format": "pt"})
    (sft_path / MANIFEST).write_text(json.dumps({**old, "uid": "retrained"}))
    found = loading.adapter_base(Store(store).get(RUN, "rm"))
    assert found == str(store / RUN / ".history" / f"sft-{old['uid']}")
    model = loading.load_model(rm_path, AutoModelForSequenceClassification, spec).eval()
    assert torch.equal(model(ids).logits, expected)


# Loads exported folders with transformers alone, in a fresh interpreter started in /: any import of the project
# fails, and the project is not on sys.path.
OUTSIDE = r"""
import importlib.abc, json, os, sys
job = json.loads(sys.argv[1])

class NoProject(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("alignment", "stages", "tests"):
            raise ImportError(f"an export needs {name}")

sys.meta_path.insert(0, NoProject())
assert not any(os.path.isfile(os.path.join(p, "alignment", "__init__.py")) for p in sys.path)
import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

def chat(prompt):
    return [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt

out = {}
for name, folder in job["policies"].items():
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    prompts = [tokenizer.apply_chat_template(chat(p), tokenize=False, add_generation_prompt=True)
               for p in job["prompts"]]
    enc = tokenizer(prompts, return_tensors="pt", padding=True)
    with torch.no_grad():
        ids = model.generate(**enc, max_new_tokens=job["max_new_tokens"], do_sample=False)[:, enc.input_ids.shape[1]:]
    texts = tokenizer.batch_decode(ids, skip_special_tokens=True)
    out[name] = {"prompts": prompts, "ids": ids.tolist(), "texts": texts}
tokenizer = AutoTokenizer.from_pretrained(job["rm"])
model = AutoModelForSequenceClassification.from_pretrained(job["rm"]).eval()
texts = [tokenizer.apply_chat_template(chat(p), tokenize=False, add_generation_prompt=True) + r + tokenizer.eos_token
         for p, r in job["pairs"]]
with torch.no_grad():
    out["rm"] = model(**tokenizer(texts, return_tensors="pt", padding=True)).logits[:, 0].tolist()
out["project_modules"] = sorted(m for m in sys.modules if m.split(".")[0] in ("alignment", "stages"))
print(json.dumps(out))
"""


def export(*args: str) -> None:
    cli.main(["export", *map(str, args)])


def test_exports_load_with_plain_transformers_and_answer_as_the_pipeline(pipeline, tmp_path):
    root = str(pipeline.root)
    export(f"{RUN}/sft", tmp_path / "sft", "--root", root)  # LoRA: merged into its base
    export(f"{RUN}/sft", tmp_path / "sft-adapter", "--no-merge", "--root", root)
    export(f"{RUN}/ppo", tmp_path / "ppo", "--root", root)  # full weights
    export(f"{RUN}/rm", tmp_path / "rm", "--root", root)  # LoRA with its score head: merged
    assert {"model.safetensors", "README.md", "tokenizer_config.json"} <= {f.name for f in (tmp_path / "sft").iterdir()}
    assert not (tmp_path / "sft" / "adapter_config.json").exists()
    adapter_config = json.loads((tmp_path / "sft-adapter" / "adapter_config.json").read_text())
    assert adapter_config["base_model_name_or_path"] == registry.resolve(registry.get(RUN))
    assert not (tmp_path / "ppo" / "value_model").exists()
    base = load_file(str(Path(registry.resolve(registry.get(RUN))) / "model.safetensors"))
    merged = load_file(str(tmp_path / "sft" / "model.safetensors"))
    assert any(not torch.equal(base[k], merged[k]) for k in base if "q_proj" in k)  # the adapter is in the weights
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "ppo")
    generation = json.loads((tmp_path / "ppo" / "generation_config.json").read_text())
    # decoding as forwards.generate: stop at EOS, pad after it, never emit the pad token
    assert (generation["eos_token_id"], generation["pad_token_id"], generation["suppress_tokens"]) == \
        (tokenizer.eos_token_id, tokenizer.pad_token_id, [tokenizer.pad_token_id])

    prompts = [r["prompt"] for r in data.load("task", "prompts_eval", limit=4)] + CONVERSATIONS[1:3]
    pairs = [(r["prompt"], r[side]) for r in data.load("task", "prefs_eval", limit=2)
             for side in ("chosen", "rejected")]
    job = {"prompts": prompts, "pairs": pairs, "max_new_tokens": 12, "rm": str(tmp_path / "rm"),
           "policies": {name: str(tmp_path / name) for name in ("sft", "sft-adapter", "ppo")}}
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run([sys.executable, "-I", "-c", OUTSIDE, json.dumps(job)], cwd="/", capture_output=True,
                          text=True, env={**env, "HF_HUB_OFFLINE": "1"}, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    outside = json.loads(done.stdout.strip().splitlines()[-1])
    assert outside["project_modules"] == []

    # the pipeline's own greedy answers: the checkpoint as `python -m alignment generate` loads it, forwards.generate
    for name, stage in (("sft", "sft"), ("sft-adapter", "sft"), ("ppo", "ppo")):
        model, tokenizer, spec = cli.load_policy(f"{RUN}/{stage}", root)
        rendered = [spec.format_prompt(p) for p in prompts]
        _, _, responses = forwards.generate(model, tokenizer, rendered, job["max_new_tokens"], 1.0, greedy=True)
        assert outside[name]["prompts"] == rendered
        # token for token, the same length (both stop when every row has its EOS, and pad after it)
        assert outside[name]["ids"] == responses.tolist(), name
        assert outside[name]["texts"] == tokenizer.batch_decode(responses, skip_special_tokens=True)
        assert any(text.strip() for text in outside[name]["texts"])  # answers to compare, not all an immediate EOS

    # the reward model scores as the pipeline's scorer does
    spec = registry.get(RUN)
    rm = pipeline.get(RUN, "rm")
    tokenizer = loading.load_tokenizer(rm.path, spec)
    reward_model = loading.load_model(rm.path, AutoModelForSequenceClassification, spec, tokenizer=tokenizer).eval()
    expected, _ = scoring.score_texts(reward_model, tokenizer, [spec.format_prompt(p) + r for p, r in pairs])
    assert outside["rm"] == pytest.approx(expected, abs=1e-5)
    assert len(set(expected)) == len(expected)  # distinct scores: the comparison means something


def test_model_card_names_lineage_data_config_and_metrics(pipeline, tmp_path):
    export(f"{RUN}/ppo", tmp_path / "ppo", "--root", str(pipeline.root))
    card = (tmp_path / "ppo" / "README.md").read_text()
    ppo, sft, rm = (pipeline.get(RUN, s) for s in ("ppo", "sft", "rm"))
    for parent in (sft, rm):
        assert f"`{parent.id}` (uid `{parent.manifest['uid']}`)" in card
    front = card.split("---")[1]
    assert f"uid: {ppo.manifest['uid']}" in front and f"id: {sft.id}" in front and f"base: {sft.path}" in front
    assert ppo.manifest["data"]["fingerprint"] in card and '"kl_coef"' in card and '"greedy"' in card


def test_export_refuses_in_one_line(pipeline, tmp_path):
    root = str(pipeline.root)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "notes.txt").write_text("mine")
    (tmp_path / "file").write_text("")
    (tmp_path / "empty").mkdir()
    for args, message in [
        ((f"{RUN}/sft", tmp_path / "full"), "exists and is not empty"),
        ((f"{RUN}/sft", tmp_path / "file"), "exists and is not empty"),
        ((f"{RUN}/sft", tmp_path / "file" / "below"), "cannot write"),
        (("no-such-run/sft", tmp_path / "new"), "no complete 'sft' checkpoint for run 'no-such-run'"),
        (("../sft", tmp_path / "new"), "invalid run name"),
        ((RUN, tmp_path / "new"), "neither a checkpoint folder nor a store id"),
        ((f"{RUN}/rm", tmp_path / "new", "--no-merge"), "is itself a LoRA adapter"),  # its base: the LoRA SFT
    ]:
        with pytest.raises(SystemExit) as stopped:
            export(*args, "--root", root)
        assert str(stopped.value).startswith("error: ") and message in str(stopped.value)
        assert "\n" not in str(stopped.value)
    assert (tmp_path / "full" / "notes.txt").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "file", "full"]  # nothing written, nothing left
    export(f"{RUN}/rm", tmp_path / "empty", "--root", root)  # an empty folder is filled
    assert (tmp_path / "empty" / "model.safetensors").is_file()
