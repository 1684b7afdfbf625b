"""The model registry: one table of named base models, and how to turn a name into weights on disk.

A real entry names a hub id (or a local path) and is loaded with the standard `from_pretrained`. A tiny
twin (`tiny-llama`, `tiny-bloom`, ...) has the same architecture at a toy size: it is built from its
config class with random weights, plus a byte-level BPE tokenizer trained here on the embedded data,
saved once to the cache, and from then on loaded through exactly the same `from_pretrained` path.

Any other model is named by its local folder or hub id and borrows its family's entry (get()). A hub id
that is neither reachable nor in the local HF cache fails at once, in one line (_hub_unreachable()).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import re
import shutil
import string
import tempfile
from pathlib import Path

from alignment import data

# name -> (user turn, assistant turn): a conversation renders as its turns in order and ends with the user
# turn, whose text ends where the model's answer begins. "{}" is the turn's content.
TEMPLATES = {
    "alpaca": ("### Instruction:\n{}\n\n### Response:\n", "{}\n\n"),
    "llama2": ("[INST] {} [/INST] ", "{} </s><s>"),
    "llama3": (
        "<|start_header_id|>user<|end_header_id|>\n\n{}<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n",
        "{}<|eot_id|>",
    ),
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


def chat_template(template: str) -> str:
    """TEMPLATES[template] as a Jinja chat template, render() turn for turn, so that a saved tokenizer's
    apply_chat_template(messages, tokenize=False) gives exactly the text the model was trained on. A user turn
    already ends where the answer begins: add_generation_prompt adds nothing."""

    def turn(fmt: str, content: str) -> str:  # "{}" -> the content; literals as JSON strings (Jinja reads them)
        pieces = []
        for literal, field_name, _, _ in string.Formatter().parse(fmt):
            pieces += [json.dumps(literal)] if literal else []
            pieces += [content] if field_name is not None else []
        return "{{ " + " + ".join(pieces) + " }}"

    user, assistant = TEMPLATES[template]
    return ("{%- for message in messages -%}\n"
            "{%- if message['role'] == 'assistant' -%}" + turn(assistant, "message['content']") + "\n"
            "{%- elif message['role'] == 'system' -%}" + turn("{}\n\n", "message['content']") + "\n"
            "{%- else -%}" + turn(user, "message['content']") + "\n"
            "{%- endif -%}\n"
            "{%- endfor -%}")


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
    # A tokenizer's own Jinja chat template, used when template="auto" finds one (real instruct models);
    # empty: prompts render with TEMPLATES[template].
    chat_template: str = ""
    # The special tokens chat_template reads, as apply_chat_template passes them: bos_token and eos_token only
    # (the pad token differs between a base and its checkpoints, which add one).
    chat_tokens: tuple[tuple[str, str], ...] = ()
    # A real entry's published config.json numbers (layers, widths, heads, vocabulary, tied embeddings, positions)
    # as config-class kwargs: enough to build it on the meta device, so `make plan` counts its parameters offline.
    # Not compared: two entries with the same settings run alike whatever is known of their shape.
    architecture: tuple[tuple[str, object], ...] = dataclasses.field(default=(), compare=False)

    @property
    def is_tiny(self) -> bool:
        return bool(self.tiny_config)

    def format_prompt(self, prompt: str | list[dict]) -> str:
        if not self.chat_template:
            return render(self.template, prompt)
        # transformers' own renderer, the one apply_chat_template calls (same sandbox, filters and globals)
        from transformers.utils.chat_template_utils import render_jinja_template

        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
        rendered, _ = render_jinja_template([messages], chat_template=self.chat_template, add_generation_prompt=True,
                                            **dict(self.chat_tokens))
        return rendered[0]


_LLAMA_LORA = ("q_proj", "k_proj", "v_proj", "o_proj")  # also Mistral and Qwen2
_BLOOM_LORA = ("query_key_value", "dense")  # also GPT-NeoX (Pythia)
_GPT2_LORA = ("c_attn", "c_proj")
_OPT_LORA = ("q_proj", "k_proj", "v_proj", "out_proj")


def _llama(hidden: int, intermediate: int, layers: int, heads: int, kv_heads: int, vocab: int, positions: int,
           tied: bool = False) -> tuple[tuple[str, object], ...]:
    """The architecture numbers of a LLaMA-shaped config.json (also Mistral's and Qwen2's), as config kwargs."""
    return (("hidden_size", hidden), ("intermediate_size", intermediate), ("num_hidden_layers", layers),
            ("num_attention_heads", heads), ("num_key_value_heads", kv_heads), ("vocab_size", vocab),
            ("max_position_embeddings", positions), ("tie_word_embeddings", tied))


_LLAMA_2_7B = _llama(4096, 11008, 32, 32, 32, 32000, 4096)
_BLOOM_560M = (("hidden_size", 1024), ("n_layer", 24), ("n_head", 16), ("vocab_size", 250880),
               ("tie_word_embeddings", True))
_TINY = (("hidden_size", 128), ("intermediate_size", 384), ("num_hidden_layers", 4), ("num_attention_heads", 4))

MODELS = {
    spec.name: spec
    for spec in [
        ModelSpec("llama-2-7b", "llama", "meta-llama/Llama-2-7b-hf", "alpaca", _LLAMA_LORA, dtype="bfloat16",
                  architecture=_LLAMA_2_7B),
        ModelSpec("llama-2-7b-chat", "llama", "meta-llama/Llama-2-7b-chat-hf", "llama2", _LLAMA_LORA, dtype="bfloat16",
                  architecture=_LLAMA_2_7B),
        ModelSpec("bloom-560m", "bloom", "bigscience/bloom-560m", "plain", _BLOOM_LORA, architecture=_BLOOM_560M),
        ModelSpec("bloomz-560m", "bloom", "bigscience/bloomz-560m", "plain", _BLOOM_LORA, architecture=_BLOOM_560M),
        ModelSpec("llama-3-8b-instruct", "llama", "meta-llama/Meta-Llama-3-8B-Instruct", "llama3", _LLAMA_LORA,
                  dtype="bfloat16", architecture=_llama(4096, 14336, 32, 32, 8, 128256, 8192)),
        ModelSpec("mistral-7b-instruct", "mistral", "mistralai/Mistral-7B-Instruct-v0.2", "llama2", _LLAMA_LORA,
                  dtype="bfloat16", architecture=_llama(4096, 14336, 32, 32, 8, 32000, 32768)),
        ModelSpec("qwen2-0.5b-instruct", "qwen2", "Qwen/Qwen2-0.5B-Instruct", "chatml", _LLAMA_LORA, dtype="bfloat16",
                  architecture=_llama(896, 4864, 24, 14, 2, 151936, 32768, tied=True)),
        ModelSpec("pythia-410m", "gpt_neox", "EleutherAI/pythia-410m", "plain", _BLOOM_LORA,
                  architecture=(("hidden_size", 1024), ("intermediate_size", 4096), ("num_hidden_layers", 24),
                                ("num_attention_heads", 16), ("vocab_size", 50304), ("max_position_embeddings", 2048),
                                ("tie_word_embeddings", False))),
        ModelSpec("opt-350m", "opt", "facebook/opt-350m", "plain", _OPT_LORA,
                  architecture=(("hidden_size", 1024), ("ffn_dim", 4096), ("num_hidden_layers", 24),
                                ("num_attention_heads", 16), ("vocab_size", 50272), ("max_position_embeddings", 2048),
                                ("word_embed_proj_dim", 512), ("do_layer_norm_before", False),
                                ("tie_word_embeddings", True))),
        ModelSpec("gpt2", "gpt2", "openai-community/gpt2", "plain", _GPT2_LORA,
                  architecture=(("n_embd", 768), ("n_layer", 12), ("n_head", 12), ("vocab_size", 50257),
                                ("n_positions", 1024), ("tie_word_embeddings", True))),
        # The sizes of the memory plan's table (docs/memory-plan.md): 1B, 13B and 70B beside the 8B above.
        ModelSpec("llama-3.2-1b-instruct", "llama", "meta-llama/Llama-3.2-1B-Instruct", "llama3", _LLAMA_LORA,
                  dtype="bfloat16", architecture=(*_llama(2048, 8192, 16, 32, 8, 128256, 131072, tied=True),
                                                  ("head_dim", 64))),
        ModelSpec("llama-2-13b", "llama", "meta-llama/Llama-2-13b-hf", "alpaca", _LLAMA_LORA, dtype="bfloat16",
                  architecture=_llama(5120, 13824, 40, 40, 40, 32000, 4096)),
        ModelSpec("llama-3-70b-instruct", "llama", "meta-llama/Meta-Llama-3-70B-Instruct", "llama3", _LLAMA_LORA,
                  dtype="bfloat16", architecture=_llama(8192, 28672, 80, 64, 8, 128256, 8192)),
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


AUTO = "auto"  # template=auto: the tokenizer's own chat template, else the family's


class RegistryError(Exception):
    """A model or template that cannot be used, saying what to do instead: config.run prints it as one line."""


def get(name: str, template: str = "", tokenizer: str | Path = "") -> ModelSpec:
    """The registry entry for name, with its prompt template replaced by `template` if given (a data profile or
    a run may choose one). name may also be a local model folder or a hub id: an entry of its own, named by its
    absolute path or hub id (what a manifest records, so later stages get it again), with its family's settings
    (those of the registered model with the same model_type).

    template="auto": the tokenizer's own chat template (an instruct model's), read from the folder `tokenizer` if
    given (a checkpoint: the template it was trained with, whatever the hub holds since), else the model's; where
    it has none, the family's template.
    """
    if template and template != AUTO and template not in TEMPLATES:
        raise RegistryError(f"unknown template {template!r}; known: {', '.join(sorted(TEMPLATES))}, or auto (the "
                            "tokenizer's own chat template)")
    spec = MODELS[name] if name in MODELS else _unregistered(name, template)
    if _is_hub_id(spec.source):
        _hub_unreachable()  # settled before any from_pretrained, which would retry for minutes (see there)
    if template == AUTO or (not template and spec.template == AUTO):
        return _with_chat_template(spec, tokenizer)
    return dataclasses.replace(spec, template=template) if template else spec


_SAID_AUTO: set[str] = set()  # sources said to prompt with their own chat template (said once)


def _named_entry(name: str, family: str) -> ModelSpec | None:
    """The real registry entry a folder or hub id is a copy of, by name: its hub id, or its last path part spelled
    as an entry's hub name or registry name (case aside), of the same family."""
    last = Path(name.rstrip("/")).name.lower()
    for spec in MODELS.values():
        if spec.is_tiny or spec.family != family:
            continue
        if name == spec.source or last in (spec.source.rsplit("/", 1)[-1].lower(), spec.name.lower()):
            return spec
    return None


def _ships_chat_template(source: str) -> bool:
    """Whether the tokenizer at source (a folder, or a hub id in the local cache) has a chat template of its own,
    read from its files without loading it."""
    if Path(source).is_dir():
        files = {name: Path(source, name) for name in ("chat_template.jinja", "tokenizer_config.json")}
    else:
        from huggingface_hub import try_to_load_from_cache

        files = {name: try_to_load_from_cache(source, name) for name in ("chat_template.jinja",
                                                                            "tokenizer_config.json")}
        files = {name: Path(f) for name, f in files.items() if isinstance(f, str)}
    if files.get("chat_template.jinja") and files["chat_template.jinja"].is_file():
        return True
    config = files.get("tokenizer_config.json")
    try:
        return bool(config and config.is_file() and json.loads(config.read_text()).get("chat_template"))
    except (OSError, ValueError):
        return False


def _unregistered(name: str, template: str) -> ModelSpec:
    """The entry of a local model folder or hub id: its family's settings, or, for a family the registry lacks,
    generic ones if a template is given (LoRA then needs lora.target_modules: loading.lora_targets says so)."""
    if Path(name).is_dir():
        source = os.path.abspath(name)  # a later stage may run from another directory
        if not Path(source, "config.json").is_file():
            raise RegistryError(f"model folder {name!r} has no config.json: not a Hugging Face model folder")
        config = json.loads(Path(source, "config.json").read_text())
    elif _is_hub_id(name):
        source, config = name, _hub_config(name)
    else:
        raise RegistryError(f"unknown model {name!r}: not a registered name ({', '.join(sorted(MODELS))}), a local "
                            "model folder, or a hub id (org/name)")
    family = config.get("model_type", "")
    named = _named_entry(name, family)
    if named is not None:  # a download or copy of a registered model: its entry's settings, its own config.json
        return dataclasses.replace(named, name=source, source=source, architecture=())
    base = next((s for s in MODELS.values() if s.family == family and not s.is_tiny), None)
    if base is not None:
        spec = dataclasses.replace(base, name=source, source=source, architecture=())  # its own config.json
        if not template and _ships_chat_template(source):  # an instruct model: the prompts it was tuned on
            if source not in _SAID_AUTO:
                _SAID_AUTO.add(source)
                print(f"[registry] {name}: its tokenizer ships a chat template, which prompts follow (template=auto; "
                      f"template=<{'|'.join(TEMPLATES)}> chooses one of the registry's)")
            return dataclasses.replace(spec, template=AUTO)
        return spec
    if not template:
        families = sorted({s.family for s in MODELS.values()})
        raise RegistryError(
            f"{name} is a {family!r} model, a family with no registry entry (registered: {', '.join(families)}): "
            f"give its settings, template=<{'|'.join(TEMPLATES)}|auto> (and lora.target_modules=[...] with LoRA), "
            "or add an entry of its family to MODELS in alignment/registry.py")
    dtype = config.get("dtype") or config.get("torch_dtype")  # frozen copies load in the dtype it was saved in
    return ModelSpec(source, family, source, "", (), dtype=dtype if dtype in ("bfloat16", "float16") else "float32")


def _with_chat_template(spec: ModelSpec, tokenizer: str | Path) -> ModelSpec:
    """template=auto: spec rendering prompts with its tokenizer's chat template, or with its family's template."""
    source = str(tokenizer or spec.source)  # a tiny twin's tokenizer (no source) is built without one
    chat_template, tokens = _chat_template_of(source, spec.trust_remote_code) if source else ("", {})
    if chat_template:
        return dataclasses.replace(spec, template=AUTO, chat_template=chat_template,
                                   chat_tokens=tuple(sorted(tokens.items())))
    if not spec.template:
        raise RegistryError(f"template=auto: {spec.name} ships no chat template, and its family has no registry "
                            f"entry to take one from: give template=<{'|'.join(TEMPLATES)}>")
    print(f"[registry] template=auto: {spec.name} ships no chat template; prompts use its family's "
          f"'{spec.template}'")
    return spec


def _chat_template_of(source: str, trust_remote_code: bool) -> tuple[str, dict]:
    """The chat template of the tokenizer at source ("" if none) and the special tokens it reads."""
    from transformers import AutoTokenizer

    if _is_hub_id(source):
        _require_hub(source)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code)
        chat_template = tokenizer.get_chat_template() if tokenizer.chat_template else ""
    except (OSError, ValueError) as e:
        raise RegistryError(f"template=auto: cannot read the chat template of {source} ({_first_line(e)})") from None
    # A tokenizer that starts every encoding with its BOS gets none from the template: apply_chat_template encodes
    # without special tokens, but the stages encode prompts with them, and each would start with two BOS.
    adds_bos = tokenizer.bos_token is not None and tokenizer("x").input_ids[:1] == [tokenizer.bos_token_id]
    tokens = {"bos_token": "" if adds_bos else tokenizer.bos_token or "", "eos_token": tokenizer.eos_token or ""}
    return chat_template, tokens


def _is_hub_id(name: str) -> bool:
    """org/name as the hub spells it, and no local path of that name (that is a folder)."""
    return bool(re.fullmatch(r"\w[\w.-]*/[\w.-]+", name)) and not Path(name).exists()


_OFFLINE = "HF_HUB_OFFLINE=1 is set"
_FROM_CACHE: set[str] = set()  # hub ids said to load from the cache (said once)


@functools.cache
def _hub_unreachable() -> str:
    """Why this process cannot use the hub ("" if it can), found out once per process.

    Out of reach, huggingface_hub retries every request with backoff: measured here without network, a hub id
    not in the cache failed after 25 s of retries (`make sft MODEL=gpt2`: 54 s), and a cached tiny model took
    3.5 min to load (each file's update check retried). A probe of at most 3 s decides instead; a hub out of reach
    switches this process to offline mode, in which a cached model loads at once and any other fails at once
    (_require_hub says what to do).
    """
    from huggingface_hub import constants
    from huggingface_hub.utils import get_session

    if constants.HF_HUB_OFFLINE:
        return _OFFLINE
    try:
        get_session().head(constants.ENDPOINT, timeout=3)  # the hub's own client (proxies); any answer will do
        return ""
    except Exception as e:  # noqa: BLE001 - no DNS, refused, timed out: the transport's error classes vary between hub versions
        why = f"{constants.ENDPOINT} cannot be reached ({_first_line(e)})"
    constants.HF_HUB_OFFLINE = True  # what huggingface_hub and transformers read (the variable only at import)
    os.environ["HF_HUB_OFFLINE"] = "1"  # and what processes started from this one read
    return why


def _require_hub(repo_id: str) -> None:
    """Fails at once, in one line, where from_pretrained(repo_id) could only fail after minutes of retries: the
    hub is out of reach (or HF_HUB_OFFLINE=1) and repo_id is not in the local HF cache."""
    from huggingface_hub import constants, try_to_load_from_cache

    why = _hub_unreachable()
    if not why:
        return
    if isinstance(try_to_load_from_cache(repo_id, "config.json"), str):
        if why != _OFFLINE and repo_id not in _FROM_CACHE:
            print(f"[registry] {why}: {repo_id} loads from the local HF cache")
            _FROM_CACHE.add(repo_id)
        return
    raise RegistryError(
        f"{repo_id} is not in the local Hugging Face cache ({constants.HF_HUB_CACHE}) and {why}: download it into "
        f"that cache where there is network (hf download {repo_id}) and run with HF_HUB_OFFLINE=1, or pass a "
        "local model folder (model=/path/to/folder)")


def _hub_config(repo_id: str) -> dict:
    """The config.json of a hub model: from the local HF cache, or downloaded."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, GatedRepoError, HfHubHTTPError, RepositoryNotFoundError

    _require_hub(repo_id)
    try:
        return json.loads(Path(hf_hub_download(repo_id, "config.json")).read_text())
    except GatedRepoError:
        raise RegistryError(f"{repo_id} is gated: accept its terms on its hub page, log in (hf auth login)") from None
    except RepositoryNotFoundError:
        raise RegistryError(f"{repo_id}: no such model on the hub (a private one? hf auth login)") from None
    except EntryNotFoundError:
        raise RegistryError(f"{repo_id} has no config.json: not a transformers model") from None
    except HfHubHTTPError as e:
        raise RegistryError(f"{repo_id}: {_first_line(e)}") from None


def _first_line(error: Exception) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0]


def cache_dir() -> Path:
    return Path(os.environ.get("ALIGNMENT_CACHE", Path.home() / ".cache" / "alignment"))


def resolve(spec: ModelSpec, corpus: list[str] | None = None, vocab_size: int = 512) -> str:
    """Where from_pretrained should load spec from: its hub id or path, or the cached build of a tiny twin.

    corpus: the text a tiny twin's tokenizer is trained on (default: the embedded task), with vocab_size
    tokens; both are part of the cache key.
    """
    if not spec.is_tiny:
        if _is_hub_id(spec.source):
            _require_hub(spec.source)  # one line now rather than minutes of retries in from_pretrained
        return spec.source
    if corpus is None:
        corpus = default_corpus(spec)
    fields = {k: v for k, v in dataclasses.asdict(spec).items() if k != "architecture"}  # (the key before it existed)
    key = hashlib.sha256(json.dumps([fields, vocab_size, corpus]).encode()).hexdigest()[:16]
    path = cache_dir() / "models" / f"{spec.name}-{key}"
    if not (path / "config.json").is_file():
        _build_tiny(spec, corpus, path, vocab_size)
    return str(path)


def default_corpus(spec: ModelSpec) -> list[str]:
    """The embedded task's text as the model will see it: templated prompts, responses, fillers."""
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


# ---- a model's shape, without its weights --------------------------------------------------------------------


def model_config(name: str):
    """(transformers config, registry entry) of a model: a registry entry's published shape (offline), a tiny
    twin's built config, a local folder's config.json, or a hub id's from the local HF cache. A name that is none
    of those raises RegistryError saying what to do."""
    from transformers import AutoConfig

    spec = MODELS.get(name)
    if spec is not None and spec.architecture:
        return AutoConfig.for_model(spec.family, **dict(spec.architecture)), spec
    spec = spec or get(name)  # a folder (checked for its config.json) or a hub id (checked in the cache)
    return AutoConfig.from_pretrained(resolve(spec), trust_remote_code=spec.trust_remote_code), spec


def on_meta(auto_class, model_config_):
    """auto_class's model of model_config_ on the meta device (no memory, no weights), built by its class itself:
    from_config would, in a stage launched under ZeRO-3, build it inside DeepSpeed's zero.Init, whose collectives
    the other processes never join."""
    import torch

    model_class = auto_class._model_mapping.get(type(model_config_), None)
    with torch.device("meta"):
        return model_class(model_config_) if model_class else auto_class.from_config(model_config_)


@functools.cache
def parameters(name: str) -> int:
    """The parameters of name's causal LM (tied weights once), counted from its config alone."""
    from transformers import AutoModelForCausalLM

    return sum(p.numel() for p in on_meta(AutoModelForCausalLM, model_config(name)[0]).parameters())
