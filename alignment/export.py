"""A store checkpoint as a standalone folder, for use outside this project.

    python -m alignment export RUN/STAGE OUT [--no-merge] [--root STORE]

OUT loads with plain transformers from any working directory: a policy (sft, ppo) as AutoModelForCausalLM, a
reward model (rm) as AutoModelForSequenceClassification (one label). It holds the weights (a LoRA adapter merged
into its base; with --no-merge the adapter alone, naming its base by absolute path or hub id, which transformers
loads with peft installed, a reward adapter given num_labels=1), the tokenizer with the chat template the prompts
were rendered with, and a model card (README.md): how to load it, lineage, data, config, metrics.
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
import tempfile
from pathlib import Path

from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from alignment import loading, pipeline, registry, tokens
from alignment.store import Checkpoint

AUTO_CLASSES = {**dict.fromkeys(pipeline.POLICIES, AutoModelForCausalLM),
                "rm": AutoModelForSequenceClassification}


class ExportError(ValueError):
    pass


def export(checkpoint: Checkpoint, out: str | Path, merge: bool = True) -> Path:
    """Writes checkpoint to the new folder out (absent or empty), atomically: into a temporary folder beside it,
    renamed into place when complete."""
    out, manifest = Path(out), checkpoint.manifest
    stage = manifest.get("stage")
    if stage not in AUTO_CLASSES:
        raise ExportError(f"{manifest.get('id', checkpoint.path)} is a {stage!r} checkpoint; export takes "
                          f"{', '.join(AUTO_CLASSES)}")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ExportError(f"{out} exists and is not empty: export writes a new folder (remove it or choose another)")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-export-", dir=out.parent))
    except OSError as e:
        raise ExportError(f"cannot write {out}: {e.strerror}") from None
    try:
        _write(checkpoint, tmp, merge)
        try:
            os.rename(tmp, out)  # replaces an empty folder; fails if out was filled meanwhile
        except OSError as e:
            raise ExportError(f"cannot write {out}: {e.strerror}") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _write(checkpoint: Checkpoint, folder: Path, merge: bool) -> None:
    manifest = checkpoint.manifest
    spec = registry.get(manifest["model"], template=manifest.get("template", ""), tokenizer=checkpoint.path)
    auto_class = AUTO_CLASSES[manifest["stage"]]
    tokenizer = loading.load_tokenizer(checkpoint.path, spec)
    if auto_class is AutoModelForCausalLM:
        tokenizer.padding_side = "left"  # a policy is exported to generate, and generation pads on the left
    adapter = (checkpoint.path / "adapter_config.json").is_file()
    if adapter and not merge:
        _write_adapter(checkpoint, folder)
    else:
        # loaded as the pipeline loads it to generate and evaluate (merged in the entry's dtype): the same weights
        model = loading.load_model(checkpoint.path, auto_class, spec, tokenizer=tokenizer)
        if auto_class is AutoModelForCausalLM:
            # generate() as forwards.generate decodes: stop at EOS, pad after it, never emit the pad token (its
            # embedding row may be an added zero row, whose logit 0 can beat every real token's)
            pad, ends = tokenizer.pad_token_id, list(tokens.end_ids(tokenizer))
            eos = ends if len(ends) > 1 else ends[0] if ends else None
            model.generation_config.update(pad_token_id=pad, eos_token_id=eos,
                                           suppress_tokens=[pad] if pad not in ends else None)
        model.save_pretrained(folder)  # safetensors
    loading.save_tokenizer(tokenizer, folder, spec)
    model_card(checkpoint, merged=adapter and merge).save(folder / "README.md")


def _write_adapter(checkpoint: Checkpoint, folder: Path) -> None:
    """The adapter as it is, its adapter_config naming the base by absolute path or hub id: transformers (with
    peft installed) loads the base from there and attaches the adapter."""
    from peft import PeftConfig

    base = loading.adapter_base(checkpoint)
    if (Path(base) / "adapter_config.json").is_file():
        raise ExportError(f"the base of {checkpoint.manifest['id']} ({base}) is itself a LoRA adapter, which "
                          "transformers cannot stack: export it merged (without --no-merge)")
    config = PeftConfig.from_pretrained(str(checkpoint.path))
    config.base_model_name_or_path = loading.base_reference(base)
    config.save_pretrained(str(folder))
    shutil.copy2(checkpoint.path / "adapter_model.safetensors", folder)


def model_card(checkpoint: Checkpoint, merged: bool):
    """README.md: how to load it, its lineage (also as front matter, for tools), data, config and metrics."""
    from huggingface_hub import ModelCard, ModelCardData

    m = checkpoint.manifest
    policy = AUTO_CLASSES[m["stage"]] is AutoModelForCausalLM
    adapter = bool(m.get("adapter")) and not merged
    parents = [{"id": p, "uid": u} for p, u in itertools.zip_longest(m.get("parents") or [],
                                                                      m.get("parent_uids") or [])]
    base, data = m.get("base", ""), m.get("data", {})
    lineage = {"id": m.get("id"), "uid": m.get("uid"), "created": m.get("created"), "model": m.get("model"),
               "template": m.get("template"), "parents": parents, "base": base,
               "base_checkpoint": m.get("base_checkpoint"),
               "weights": "adapter" if adapter else "adapter merged into base" if merged else "full",
               "data": {"profile": data.get("profile"), "fingerprint": data.get("fingerprint")}}
    hub_base = base if base and not Path(base).is_absolute() and not Path(base).exists() else None
    front = ModelCardData(library_name="transformers", base_model=hub_base, tags=["rlhf", m["stage"]],
                          pipeline_tag="text-generation" if policy else "text-classification", alignment=lineage)
    auto = "AutoModelForCausalLM" if policy else "AutoModelForSequenceClassification"
    # a reward adapter's base is a causal LM: its config says nothing of the one-label head
    load = f"{auto}.from_pretrained(folder{', num_labels=1' if adapter and not policy else ''})"
    use = ("prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)\n"
           "ids = tokenizer([prompt], return_tensors=\"pt\")\n"
           "answer = model.generate(**ids, max_new_tokens=64, do_sample=False)[0, ids.input_ids.shape[1]:]\n"
           "print(tokenizer.decode(answer, skip_special_tokens=True))") if policy else (
           "text = tokenizer.apply_chat_template(messages, tokenize=False) + \"Hi!\" + tokenizer.eos_token\n"
           "score = model(**tokenizer([text], return_tensors=\"pt\")).logits[0, 0]  # read at the last token")
    weights = ("a LoRA adapter; adapter_config.json names its base (peft must be installed)" if adapter else
               "a LoRA adapter merged into its base" if merged else "full weights")
    listed = "\n".join(f"- `{p['id']}` (uid `{p['uid']}`)" for p in parents) or "- none: trained on the base"
    decoding = ("\nGeneration stops at EOS and never emits the pad token (generation_config.json: suppress_tokens)."
                if policy and not adapter else "")
    from_checkpoint = f" (checkpoint `{m['base_checkpoint']}`)" if m.get("base_checkpoint") else ""
    body = f"""
# {m.get("id")}

The `{m["stage"]}` stage of run `{m.get("run")}` ({m.get("model")}, prompt template `{m.get("template")}`): {weights}.
Checkpoint uid `{m.get("uid")}`, created {m.get("created")}.

## Use

```python
from transformers import {auto}, AutoTokenizer

folder = "path/to/this/folder"
tokenizer = AutoTokenizer.from_pretrained(folder)
model = {load}
messages = [{{"role": "user", "content": "Hello"}}]
{use}
```

The chat template renders a conversation as in training: a user turn ends where the answer begins.{decoding}

## Lineage

Parents:
{listed}

Base: `{base}`{from_checkpoint}

## Data

Profile `{data.get("profile")}`, fingerprint `{data.get("fingerprint")}`.

## Config

```json
{json.dumps(m.get("config", {}), indent=2, default=str)}
```

## Metrics

```json
{json.dumps(m.get("metrics", {}), indent=2, default=str)}
```
"""
    return ModelCard(f"---\n{front.to_yaml()}\n---\n{body}")
