"""The model registry: one table of named base models, and how to turn a name into weights on disk.

A real entry names a hub id (or a local path) and is loaded with the standard `from_pretrained`. A tiny
twin (`tiny-llama`, `tiny-bloom`, ...) has the same architecture at a toy size: it is built from its
config class with random weights, plus a byte-level BPE tokenizer trained here on the embedded data,
saved once to the cache, and from then on loaded through exactly the same `from_pretrained` path.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

TEMPLATES = {
    # name -> how an instruction becomes the text the model continues; {prompt} is the instruction.
    "alpaca": "### Instruction:\n{prompt}\n\n### Response:\n",
    "llama2": "[INST] {prompt} [/INST] ",
    "plain": "{prompt}\n",
}


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    name: str
    family: str  # the transformers model_type: llama, bloom, gpt2
    source: str  # hub id or local path; empty for a tiny twin, which is built from tiny_config
    template: str  # a key of TEMPLATES
    lora_targets: tuple[str, ...]  # module names LoRA adapts in this architecture
    padding_side: str = "right"  # for training batches; generation always pads on the left
    dtype: str = "float32"  # weights dtype when loaded for training
    tiny_config: tuple[tuple[str, object], ...] = ()  # config-class kwargs of a tiny twin (a tuple: hashable)
    trust_remote_code: bool = False

    @property
    def is_tiny(self) -> bool:
        return bool(self.tiny_config)

    def format_prompt(self, prompt: str) -> str:
        return TEMPLATES[self.template].format(prompt=prompt)


_LLAMA_LORA = ("q_proj", "k_proj", "v_proj", "o_proj")
_BLOOM_LORA = ("query_key_value", "dense")
_GPT2_LORA = ("c_attn", "c_proj")

MODELS = {
    spec.name: spec
    for spec in [
        ModelSpec("llama-2-7b", "llama", "meta-llama/Llama-2-7b-hf", "alpaca", _LLAMA_LORA, dtype="bfloat16"),
        ModelSpec("llama-2-7b-chat", "llama", "meta-llama/Llama-2-7b-chat-hf", "llama2", _LLAMA_LORA, dtype="bfloat16"),
        ModelSpec("bloom-560m", "bloom", "bigscience/bloom-560m", "plain", _BLOOM_LORA),
        ModelSpec("bloomz-560m", "bloom", "bigscience/bloomz-560m", "plain", _BLOOM_LORA),
        ModelSpec("gpt2", "gpt2", "openai-community/gpt2", "plain", _GPT2_LORA),
        # Tiny twins: same architectures, ~1M parameters, built offline. vocab_size and the special-token
        # ids come from the tokenizer trained for them.
        ModelSpec(
            "tiny-llama", "llama", "", "alpaca", _LLAMA_LORA,
            tiny_config=(("hidden_size", 128), ("intermediate_size", 384), ("num_hidden_layers", 4),
                         ("num_attention_heads", 4), ("num_key_value_heads", 4), ("max_position_embeddings", 256)),
        ),
        ModelSpec(
            "tiny-bloom", "bloom", "", "plain", _BLOOM_LORA,
            tiny_config=(("hidden_size", 128), ("n_layer", 4), ("n_head", 4),
                         ("hidden_dropout", 0.0), ("attention_dropout", 0.0)),
        ),
        ModelSpec(
            "tiny-gpt2", "gpt2", "", "plain", _GPT2_LORA,
            tiny_config=(("n_embd", 128), ("n_layer", 4), ("n_head", 4), ("n_positions", 256),
                         ("resid_pdrop", 0.0), ("embd_pdrop", 0.0), ("attn_pdrop", 0.0)),
        ),
    ]
}
DEFAULT_MODEL = "tiny-llama"
TINY_VOCAB_SIZE = 512
SPECIAL_TOKENS = {"pad_token": "<|pad|>", "eos_token": "<|endoftext|>", "unk_token": "<|unk|>"}


def get(name: str) -> ModelSpec:
    """The registry entry for name; a local folder with a config.json becomes an ad-hoc entry."""
    if name in MODELS:
        return MODELS[name]
    if Path(name, "config.json").is_file():
        with open(Path(name, "config.json")) as f:
            family = json.load(f).get("model_type", "")
        base = next((s for s in MODELS.values() if s.family == family and not s.is_tiny), None)
        if base is None:
            raise KeyError(f"model folder {name!r} has model_type {family!r}, which no registry entry covers")
        return dataclasses.replace(base, name=name, source=name)
    raise KeyError(f"unknown model {name!r}; registered: {', '.join(sorted(MODELS))} (or a local model folder)")


def cache_dir() -> Path:
    return Path(os.environ.get("ALIGNMENT_CACHE", Path.home() / ".cache" / "alignment"))


def resolve(spec: ModelSpec, corpus: list[str] | None = None) -> str:
    """Where from_pretrained should load spec from: its hub id or path, or the cached build of a tiny twin.

    corpus: the text a tiny twin's tokenizer is trained on (default: the embedded task); part of the cache key.
    """
    if not spec.is_tiny:
        return spec.source
    if corpus is None:
        corpus = default_corpus(spec)
    key = hashlib.sha256(json.dumps([dataclasses.asdict(spec), TINY_VOCAB_SIZE, corpus]).encode()).hexdigest()[:16]
    path = cache_dir() / "models" / f"{spec.name}-{key}"
    if not (path / "config.json").is_file():
        _build_tiny(spec, corpus, path)
    return str(path)


def default_corpus(spec: ModelSpec) -> list[str]:
    """The embedded task's text as the model will see it: templated prompts, responses, fillers."""
    from alignment import data

    texts = []
    for r in data.read_jsonl(data.task_file("sft")):
        texts.append(spec.format_prompt(r["prompt"]) + r["completion"])
    for r in data.read_jsonl(data.task_file("prefs_train")):
        texts.append(r["chosen"])
        texts.append(r["rejected"])
    return texts


def _build_tiny(spec: ModelSpec, corpus: list[str], path: Path) -> None:
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE(unk_token=SPECIAL_TOKENS["unk_token"]))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TINY_VOCAB_SIZE,
        special_tokens=list(SPECIAL_TOKENS.values()),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # every byte is encodable: no <unk> on new text
        show_progress=False,
    )
    bpe.train_from_iterator(corpus, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, **SPECIAL_TOKENS, padding_side=spec.padding_side)

    config = AutoConfig.for_model(
        spec.family,
        vocab_size=len(tokenizer),
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.eos_token_id,
        **dict(spec.tiny_config),
    )
    torch.manual_seed(0)  # the same twin on every machine
    model = AutoModelForCausalLM.from_config(config)

    # Publish atomically: a crash mid-build, or another process building the same twin, leaves no half folder.
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}-", dir=path.parent))
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    try:
        os.rename(tmp, path)
    except OSError:  # someone else published it first
        shutil.rmtree(tmp, ignore_errors=True)
