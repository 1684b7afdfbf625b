"""Loading models and tokenizers from the registry or the store.

Every checkpoint loads with the standard from_pretrained. A LoRA checkpoint holds only its adapter; its
manifest names the `base` it was trained on (an absolute path or a hub id; for a parent checkpoint also its id,
`base_checkpoint`), and loading merges the adapter into that base, so the stages downstream always get a plain
model. Every checkpoint's tokenizer carries the chat template its prompts were rendered with.

Precision: a model that trains is loaded in fp32 whatever the checkpoint's dtype, and computes in bf16
under autocast (or DeepSpeed's bf16 mode, which keeps its own fp32 master copy): pure-bf16 weights updated
by AdamW lose every step smaller than half a bf16 ulp (0.004 for a weight near 1), and training stalls.
Frozen models (the reference, the reward model) load in the entry's dtype, bf16 for real models.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

from alignment import distributed, machine, registry, tokens
from alignment.registry import ModelSpec
from alignment.store import HISTORY, MANIFEST, Checkpoint, load_checkpoint

_PEFT_TASKS = {AutoModelForCausalLM: "CAUSAL_LM", AutoModelForSequenceClassification: "SEQ_CLS"}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def load_tokenizer(path: str | Path, spec: ModelSpec):
    """The tokenizer, with the ids that end a response (tokens.declared_end_ids: its EOS and its model's generation
    config's, kept on it as `end_ids`) and a pad token that is none of them (tokens.choose_pad). LLaMA, Mistral and
    GPT-2 ship without a pad, Qwen2's base models pad with their EOS; padding with an end would hide every
    response's end from the reward model, which scores a sequence at its last non-pad token. A new pad token gets
    an embedding row by fit_vocabulary()."""
    tokenizer = AutoTokenizer.from_pretrained(str(path), trust_remote_code=spec.trust_remote_code)
    tokenizer.end_ids = tokens.declared_end_ids(tokenizer, generation_source(path))
    tokens.choose_pad(tokenizer, tokenizer.end_ids)
    tokenizer.padding_side = spec.padding_side
    return tokenizer


def generation_source(path: str | Path) -> str | Path:
    """Where a checkpoint's generation config is: the checkpoint, or for a LoRA adapter (which has none) the base it
    merges into, followed down to a model (a folder or a hub id)."""
    path = Path(path)
    for _ in range(8):  # (an adapter's base is a model or a parent checkpoint; never a cycle)
        if not ((path / "adapter_config.json").is_file() and (path / MANIFEST).is_file()):
            break
        path = Path(adapter_base(load_checkpoint(path)))
    return path


def save_tokenizer(tokenizer, folder: str | Path, spec: ModelSpec) -> None:
    """save_pretrained with the chat template the prompts were rendered with (the tokenizer's own for
    template="auto", else TEMPLATES[spec.template] in Jinja): apply_chat_template(messages,
    add_generation_prompt=True) on the checkpoint then gives exactly spec.format_prompt(messages)."""
    tokenizer.chat_template = spec.chat_template or registry.chat_template(spec.template)
    tokenizer.save_pretrained(str(folder))


def base_reference(base: str | Path) -> str:
    """How a manifest names a base: a local folder by its absolute path (a store root or a model folder may be
    given relative to the working directory, which a later reader does not share), anything else (a hub id) as is."""
    return os.path.abspath(base) if Path(base).exists() else str(base)


def adapter_base(checkpoint: Checkpoint) -> str:
    """The base an adapter checkpoint merges into: the very parent checkpoint it was trained on (its id and uid
    in the manifest), found at `base`, beside the adapter in its own store, or, once a retraining replaced it,
    in that run's .history/ (a stale adapter merged into the new parent would be another model); else its
    manifest's `base`, or, where that path is gone (the store moved, or a manifest from before absolute paths,
    whose `base` was relative to the writer's directory: <root>/<run>/<stage>), the checkpoint of that id beside
    the adapter."""
    manifest, base = checkpoint.manifest, checkpoint.manifest["base"]
    parent = manifest.get("base_checkpoint")
    uid = dict(zip(manifest.get("parents") or [], manifest.get("parent_uids") or [])).get(parent)
    if parent and uid:
        root, (run, stage) = checkpoint.path.parent.parent, parent.split("/", 1)
        for candidate in (Path(base), root / parent, root / run / HISTORY / f"{stage}-{uid}"):
            if (candidate / MANIFEST).is_file() and load_checkpoint(candidate).manifest.get("uid") == uid:
                return str(candidate)
    if Path(base).exists():
        return base
    parent = checkpoint.manifest.get("base_checkpoint") or "/".join(Path(base).parts[-2:])
    beside = checkpoint.path.parent.parent / parent
    return str(beside) if (beside / MANIFEST).is_file() else base  # else a hub id (or gone: from_pretrained says)


def fit_vocabulary(model: nn.Module, tokenizer) -> None:
    """Gives every token of tokenizer an embedding row (the added pad token) and makes it the model's pad id.
    New rows are zero, in the input and the output embedding alike, so a model loaded again later gets the
    very same rows (the pad token is never attended to, and generation never samples it)."""
    rows = model.get_input_embeddings().num_embeddings  # (under ZeRO-3 the weight itself is a 0-element shard)
    if len(tokenizer) > rows:
        model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
        embeddings = [e.weight for e in (model.get_input_embeddings(), model.get_output_embeddings()) if e is not None]
        with torch.no_grad(), distributed.gathered(embeddings, modifier_rank=0):
            for weight in embeddings:
                weight[rows:] = 0
    model.config.pad_token_id = tokenizer.pad_token_id


def quantization_config(quantization: str, compute_dtype: str = "float32"):
    """bitsandbytes settings for '8bit' or '4bit' (NF4 with double quantization), None for ''."""
    from transformers import BitsAndBytesConfig

    heads = ["lm_head", "score"]  # output layers stay in full precision (the reward head is tiny and trained)
    if quantization == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=heads)
    if quantization == "4bit":
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                  bnb_4bit_compute_dtype=DTYPES[compute_dtype], llm_int8_skip_modules=heads)
    return None


def frozen_dtype(spec: ModelSpec, precision: str) -> torch.dtype:
    """The dtype a frozen model (reference, reward model, judge) is held in: the entry's (bf16 for real models,
    the size they come in), except on a machine without a GPU whose stage computes in fp32 (precision, as
    machine.use_bf16 decides it: the same in every process of a launch): a CPU without bf16 units emulates bf16
    matmuls 50-100x slower than fp32, and would run the frozen forwards so."""
    dtype = DTYPES[spec.dtype]
    if dtype == torch.bfloat16 and not torch.cuda.is_available() and not machine.use_bf16(precision):
        return torch.float32
    return dtype


def load_model(path: str | Path, auto_class, spec: ModelSpec, quantization: str = "", compute_dtype: str = "float32",
               *, tokenizer=None, trained: bool = False, precision: str | None = None, **kwargs) -> nn.Module:
    """auto_class.from_pretrained(path), optionally in 8/4 bit; an adapter-only checkpoint is merged into the base
    its manifest names (in full precision: merging into quantized weights would round the adapter away).
    tokenizer: the one the model will read (fit_vocabulary); trained: load in fp32 (see the module's docstring);
    precision: the stage's, for a frozen model (frozen_dtype), else the entry's dtype."""
    path = Path(path)
    if quantization and not (path / "adapter_config.json").is_file():
        kwargs["quantization_config"] = quantization_config(quantization, compute_dtype)
        kwargs.setdefault("dtype", DTYPES[compute_dtype])
        # bitsandbytes places quantized weights as they load: on this process's own GPU, not every process's on
        # the first one (which the trainers would only find out when they move the model, too late to fit)
        kwargs.setdefault("device_map", {"": device_of_this_process()})
    kwargs.setdefault("dtype", torch.float32 if trained else
                      frozen_dtype(spec, precision) if precision else DTYPES[spec.dtype])
    kwargs.setdefault("trust_remote_code", spec.trust_remote_code)
    kwargs.setdefault("use_safetensors", True)  # never unpickle weights: a .bin checkpoint can run code
    if auto_class is AutoModelForSequenceClassification:
        kwargs.setdefault("num_labels", 1)
    if (path / "adapter_config.json").is_file():
        from peft import PeftConfig, PeftModel

        base = load_model(adapter_base(load_checkpoint(path)), auto_class, spec, tokenizer=tokenizer, **kwargs)
        # An SFT (causal-LM) adapter merged into the body of a reward model needs no task wrapper: drop it
        # when the adapter's task differs from the class being loaded.
        adapter_config = PeftConfig.from_pretrained(str(path))
        if adapter_config.task_type != _PEFT_TASKS.get(auto_class):
            adapter_config.task_type = None
        merged = PeftModel.from_pretrained(base, str(path), config=adapter_config).merge_and_unload()
        merged.requires_grad_(True)  # peft froze the base; the caller decides what trains
        if quantization:  # quantize the merged weights by a round trip through a temporary folder
            import tempfile

            with tempfile.TemporaryDirectory() as tmp:
                merged.save_pretrained(tmp)
                return load_model(tmp, auto_class, spec, quantization, compute_dtype, tokenizer=tokenizer, **kwargs)
        return merged
    model = auto_class.from_pretrained(str(path), **kwargs)
    machine.give_back_freed_memory()  # what reading the checkpoint freed
    if tokenizer is not None:
        fit_vocabulary(model, tokenizer)
    elif model.config.pad_token_id is None:  # the reward model pools at the last non-pad token
        model.config.pad_token_id = model.config.eos_token_id
    return model


def device_of_this_process() -> str:
    """This process's device: its local rank's GPU (LOCAL_RANK, set by the launcher) where there are GPUs, else
    the CPU."""
    return f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}" if torch.cuda.is_available() else "cpu"


def on_device(model: nn.Module) -> nn.Module:
    """The model on the GPU where there is one (quantized models are placed by bitsandbytes when loaded)."""
    if torch.cuda.is_available() and not getattr(model, "is_quantized", False):
        model = model.to("cuda")
    return model


def lora_targets(model: nn.Module, wanted: list[str], model_name: str) -> list[str]:
    """wanted, checked against the model's modules: a clear stop at start-up instead of a peft error later."""
    linear = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if "Linear" in type(m).__name__ or
                     "Conv1D" in type(m).__name__})
    missing = [t for t in wanted if t not in linear]
    if not wanted:  # a model of a family the registry has no entry for
        raise SystemExit(f"lora.target_modules: none given, and {model_name} is of a family the registry has no "
                         f"entry for: name the modules to adapt; its linear layers are {linear}")
    if missing:
        raise SystemExit(f"lora.target_modules: {missing} not in {model_name}; its linear layers are {linear}")
    return wanted


def footprint(name: str, model: nn.Module) -> str:
    """A log line with a model's memory footprint (weights and buffers); under ZeRO-3, this process's partition
    of the parameters beside the whole."""
    parameters = list(model.parameters())
    if any(hasattr(p, "ds_tensor") for p in parameters):
        mine = sum(p.ds_tensor.numel() * p.ds_tensor.element_size() for p in parameters)
        whole = sum(p.ds_numel * p.ds_tensor.element_size() for p in parameters)
        return f"{name}: {mine / 2**20:.1f} MiB in this process (partitioned; whole {whole / 2**20:.1f} MiB)"
    size = model.get_memory_footprint() if hasattr(model, "get_memory_footprint") else sum(
        t.numel() * t.element_size() for t in [*parameters, *model.buffers()])
    return f"{name}: {size / 2**20:.1f} MiB in memory"


def lora_config(settings, model: nn.Module, spec: ModelSpec, task_type: str, **extra):
    """A peft LoraConfig from a config's `lora` section, its target modules checked against the model."""
    from peft import LoraConfig

    targets = lora_targets(model, settings.target_modules or list(spec.lora_targets), spec.name)
    return LoraConfig(r=settings.r, lora_alpha=settings.alpha, lora_dropout=settings.dropout, task_type=task_type,
                      target_modules=targets, **extra)


def disable_dropout(model: nn.Module) -> None:
    """RLHF models run without dropout: it would make log-probs, values and rewards noisy and the PPO ratio wrong."""
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    """The model's parameters (under ZeRO-3 the whole model's, not this process's partition)."""
    return sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters() if p.requires_grad or not trainable_only)


