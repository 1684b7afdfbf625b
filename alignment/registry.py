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

# name -> (user turn, assistant turn): a conversation renders as its turns in order and ends with the user
# turn, whose text ends where the model's answer begins. "{}" is the turn's content.
TEMPLATES = {
    "alpaca": ("### Instruction:\n{}\n\n### Response:\n", "{}\n\n"),
    "llama2": ("[INST] {} [/INST] ", "{} </s><s>"),
    "llama3": ("<|start_header_id|>user<|end_header_id|>\n\n{}<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n",
               "{}<|eot_id|>"),
    "chatml": ("<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n", "{}<|im_end|>\n"),
    "plain": ("{}\n", "{}\n"),
    "human_assistant": ("\n\nHuman: {}\n\nAssistant:", " {}"),  # hh-rlhf; responses start with a space
}


def render(template: str, prompt: str | list[dict]) -> str:
    """A prompt (an instruction, or messages ending with a user turn) as the text the model continues."""
    user, assistant = TEMPLATES[template]
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
    parts = []
    for m in messages:
        if m["role"] == "assistant":
            parts.append(assistant.format(m["content"]))
        elif m["role"] == "system":
            parts.append(m["content"] + "\n\n")
        else:
            parts.append(user.format(m["content"]))
    return "".join(parts)


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

    def format_prompt(self, prompt: str | list[dict]) -> str:
        return render(self.template, prompt)


_LLAMA_LORA = ("q_proj", "k_proj", "v_proj", "o_proj")  # also Mistral and Qwen2
_BLOOM_LORA = ("query_key_value", "dense")  # also GPT-NeoX (Pythia)
_GPT2_LORA = ("c_attn", "c_proj")
_OPT_LORA = ("q_proj", "k_proj", "v_proj", "out_proj")
_TINY = (("hidden_size", 128), ("intermediate_size", 384), ("num_hidden_layers", 4), ("num_attention_heads", 4))

MODELS = {
    spec.name: spec
    for spec in [
        ModelSpec("llama-2-7b", "llama", "meta-llama/Llama-2-7b-hf", "alpaca", _LLAMA_LORA, dtype="bfloat16"),
        ModelSpec("llama-2-7b-chat", "llama", "meta-llama/Llama-2-7b-chat-hf", "llama2", _LLAMA_LORA, dtype="bfloat16"),
        ModelSpec("bloom-560m", "bloom", "bigscience/bloom-560m", "plain", _BLOOM_LORA),
        ModelSpec("bloomz-560m", "bloom", "bigscience/bloomz-560m", "plain", _BLOOM_LORA),
        ModelSpec("llama-3-8b-instruct", "llama", "meta-llama/Meta-Llama-3-8B-Instruct", "llama3", _LLAMA_LORA,
                  dtype="bfloat16"),
        ModelSpec("mistral-7b-instruct", "mistral", "mistralai/Mistral-7B-Instruct-v0.2", "llama2", _LLAMA_LORA,
                  dtype="bfloat16"),
        ModelSpec("qwen2-0.5b-instruct", "qwen2", "Qwen/Qwen2-0.5B-Instruct", "chatml", _LLAMA_LORA, dtype="bfloat16"),
        ModelSpec("pythia-410m", "gpt_neox", "EleutherAI/pythia-410m", "plain", _BLOOM_LORA),
        ModelSpec("opt-350m", "opt", "facebook/opt-350m", "plain", _OPT_LORA),
        ModelSpec("gpt2", "gpt2", "openai-community/gpt2", "plain", _GPT2_LORA),
        # Tiny twins: same architectures, ~1M parameters, built offline. vocab_size and the special-token
        # ids come from the tokenizer trained for them.
        ModelSpec(
            "tiny-llama", "llama", "", "alpaca", _LLAMA_LORA,
            tiny_config=(("hidden_size", 128), ("intermediate_size", 384), ("num_hidden_layers", 4),
                         ("num_attention_heads", 4), ("num_key_value_heads", 4), ("max_position_embeddings", 1024)),
        ),
        ModelSpec(
            "tiny-bloom", "bloom", "", "plain", _BLOOM_LORA,
            tiny_config=(("hidden_size", 128), ("n_layer", 4), ("n_head", 4),
                         ("hidden_dropout", 0.0), ("attention_dropout", 0.0)),
        ),
        ModelSpec("tiny-mistral", "mistral", "", "llama2", _LLAMA_LORA,
                  tiny_config=(*_TINY, ("num_key_value_heads", 2), ("max_position_embeddings", 1024))),
        ModelSpec("tiny-qwen2", "qwen2", "", "chatml", _LLAMA_LORA,
                  tiny_config=(*_TINY, ("num_key_value_heads", 2), ("max_position_embeddings", 1024))),
        ModelSpec("tiny-pythia", "gpt_neox", "", "plain", _BLOOM_LORA,
                  tiny_config=(*_TINY, ("max_position_embeddings", 1024), ("hidden_dropout", 0.0),
                               ("attention_dropout", 0.0))),
        ModelSpec("tiny-opt", "opt", "", "plain", _OPT_LORA,
                  tiny_config=(("hidden_size", 128), ("ffn_dim", 384), ("num_hidden_layers", 4),
                               ("num_attention_heads", 4), ("word_embed_proj_dim", 128),
                               ("max_position_embeddings", 1024), ("dropout", 0.0))),
        ModelSpec(
            "tiny-gpt2", "gpt2", "", "plain", _GPT2_LORA,
            tiny_config=(("n_embd", 128), ("n_layer", 4), ("n_head", 4), ("n_positions", 1024),
                         ("resid_pdrop", 0.0), ("embd_pdrop", 0.0), ("attn_pdrop", 0.0)),
        ),
    ]
}
DEFAULT_MODEL = "tiny-llama"
SPECIAL_TOKENS = {"pad_token": "<|pad|>", "eos_token": "<|endoftext|>", "unk_token": "<|unk|>"}


def get(name: str, template: str = "") -> ModelSpec:
    """The registry entry for name (a local folder with a config.json becomes an ad-hoc entry of its family),
    with its prompt template replaced by `template` if given (a data profile or a run may choose one)."""
    if name in MODELS:
        spec = MODELS[name]
    elif Path(name, "config.json").is_file():
        with open(Path(name, "config.json")) as f:
            family = json.load(f).get("model_type", "")
        base = next((s for s in MODELS.values() if s.family == family and not s.is_tiny), None)
        if base is None:
            raise KeyError(f"model folder {name!r} has model_type {family!r}, which no registry entry covers")
        spec = dataclasses.replace(base, name=name, source=name)
    else:
        raise KeyError(f"unknown model {name!r}; registered: {', '.join(sorted(MODELS))} (or a local model folder)")
    if template:
        if template not in TEMPLATES:
            raise KeyError(f"unknown template {template!r}; known: {', '.join(sorted(TEMPLATES))}")
        spec = dataclasses.replace(spec, template=template)
    return spec


def cache_dir() -> Path:
    return Path(os.environ.get("ALIGNMENT_CACHE", Path.home() / ".cache" / "alignment"))


def resolve(spec: ModelSpec, corpus: list[str] | None = None, vocab_size: int = 512) -> str:
    """Where from_pretrained should load spec from: its hub id or path, or the cached build of a tiny twin.

    corpus: the text a tiny twin's tokenizer is trained on (default: the embedded task), with vocab_size
    tokens; both are part of the cache key.
    """
    if not spec.is_tiny:
        return spec.source
    if corpus is None:
        corpus = default_corpus(spec)
    key = hashlib.sha256(json.dumps([dataclasses.asdict(spec), vocab_size, corpus]).encode()).hexdigest()[:16]
    path = cache_dir() / "models" / f"{spec.name}-{key}"
    if not (path / "config.json").is_file():
        _build_tiny(spec, corpus, path, vocab_size)
    return str(path)


def default_corpus(spec: ModelSpec) -> list[str]:
    """The embedded task's text as the model will see it: templated prompts, responses, fillers."""
    from alignment import data

    return data.corpus("task", spec.format_prompt)


def _build_tiny(spec: ModelSpec, corpus: list[str], path: Path, vocab_size: int) -> None:
    import torch
    from safetensors.torch import save_model
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE(unk_token=SPECIAL_TOKENS["unk_token"]))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
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
    # Written directly rather than by save_pretrained, which writes nothing on a rank other than 0 once a
    # process group exists: every process that builds must leave a whole folder (the rename picks one).
    config.save_pretrained(tmp)
    save_model(model, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    tokenizer.save_pretrained(tmp)
    try:
        os.rename(tmp, path)
    except OSError:  # someone else published it first
        shutil.rmtree(tmp, ignore_errors=True)
