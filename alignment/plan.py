"""The memory plan (`make plan`): the bytes each process holds in every stage, before any GPU is rented.

No weights are needed. The model's parameters are counted exactly by building it on the meta device from its config
(a registry entry's published shape, a folder's config.json, or a hub id's from the local HF cache), as a causal LM
(policy, reference) and as a one-label sequence classifier (critic, reward model). The stage's settings come from
its own config class and YAML (configs/, configs/hh-rlhf/) through alignment/config.py, so key=value overrides
apply as they would to the stage.

How this codebase holds memory, which is what is counted here:
- A trained model loads in fp32 (loading.py). Without DeepSpeed it keeps fp32 weights (4 bytes a parameter), fp32
  gradients (4) and AdamW's two moments (8), whole in every process, and computes in bf16 under autocast, whose
  cache holds a bf16 copy of every trained weight while a forward's graph lives; DDP adds its gradient buckets (4).
  Under DeepSpeed's bf16 mode, as the ZeRO paper counts it: bf16 weights 2 + bf16 gradients 2 + fp32 master copy 4
  + Adam 8; ZeRO-1 divides the optimizer states by the number of processes, ZeRO-2 the gradients too, ZeRO-3 the
  weights too. In fp32 weights and gradients take 4 each, and ZeRO-3 keeps no master copy apart (DeepSpeed's stage 3
  uses the fp32 partition itself; ZeRO-1/2 clone it). Offload moves the optimizer states (with the gradient
  partitions) and then the parameters to CPU memory.
- PPO trains one module: the policy and a critic, a sequence classifier of the same body (no LM head, a one-output
  score head); GRPO has no critic. The reference is the frozen SFT policy, the reward model a frozen sequence
  classifier, both in the entry's dtype (bf16 for the real entries); under ZeRO-3 they are partitioned inference
  engines (1/N each, in the launch's dtype) that may live in CPU memory (ppo.offload_frozen), else whole in every
  process. With LoRA the reference is the policy with its adapters off: nothing of its own.
- PPO and GRPO generate with the whole policy: under ZeRO-3 it is gathered in every process for the duration
  (never the critic). Generation keeps a KV cache of every sampled row; the held-out evaluation generates up to
  EVAL_ROWS prompts per call (evaluation.rollout_scores). DPO holds a frozen reference, under ZeRO-3 a second whole
  one for its held-out evaluation (stages/dpo.py), and the reward model whole as the judge of that evaluation.
- Training keeps each layer's activations for the backward pass, or only each layer's input with activation
  checkpointing. The RL loop computes logits at response positions only and takes its fp32 log-softmax ROWS_AT_ONCE
  rows at a time (alignment/ppo.py); autograd still keeps each chunk's output for the backward.
- 4-bit weights (NF4, double quantization) take about 0.516 bytes a parameter, 8-bit about 1, in the body's linear
  layers; embeddings, norms and heads stay in compute_dtype. Quantized weights cannot be partitioned (no ZeRO-3).

The figures are upper bounds at the configured lengths (prompts of max_prompt_length, rows of max_length); a
process's fixed cost (CUDA context, or on a CPU the imports) is apart, and allocator fragmentation is not counted.
bench/memory.py prints the plan beside what a run measured; alignment/plan_report.py writes the plan as text.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import functools
import importlib.util
import itertools
import math
import subprocess
import sys
from pathlib import Path
from typing import NamedTuple

import yaml

from alignment import config, distributed, pipeline, registry
from alignment.config import ConfigError

ROOT = Path(__file__).resolve().parent.parent
STAGES = pipeline.ALL
RL_STAGES = pipeline.RL
GiB = 2**30
CUDA_CONTEXT = 0.5 * GiB  # assumed, not measured: a CUDA context with torch's kernels loaded takes 0.3-0.8 GiB
EVAL_ROWS = 100  # prompts per generate() call of the held-out evaluation (evaluation.rollout_scores' batch_size)
ROWS_AT_ONCE = 8  # as alignment/ppo.py (not imported: it would bring torch's functional API for one number)
QUANTIZED_BYTES = {"4bit": 0.5 + 1 / 64 + 4 / (64 * 256), "8bit": 1.0}  # NF4 + double-quantized absmax; int8
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
HELD, ROLLOUT, EVALUATION, TRAINING = "held throughout", "while generating", "held-out evaluation", "while training"
STEP = "at the optimizer step"
PHASES = (ROLLOUT, EVALUATION, TRAINING, STEP)  # apart in time: the peak is the largest


class PlanError(Exception):
    """A plan that cannot be made as asked, saying what to do instead (the command prints it as one line)."""


# ---- the model's shape, counted on the meta device ---------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Shape:
    """What the plan needs of a model, counted exactly from its config."""

    lm_parameters: int  # the causal LM: policy, reference
    classifier_parameters: int  # the one-label sequence classifier of the same body: critic, reward model
    layers: int
    hidden: int
    intermediate: int
    kv_width: int  # key/value heads x head dim: one token's keys (or values) in one layer
    vocab: int
    gated_mlp: bool  # LLaMA's gate/up/down MLP keeps four intermediate-wide tensors per token, GPT-2's two
    largest_block: int  # parameters of the largest piece ZeRO-3 gathers at once: a decoder layer or an embedding
    quantized_weights: int  # the weights of the body's linear layers: what bitsandbytes quantizes
    linear_widths: tuple[tuple[str, int], ...]  # per linear module name: the sum of its in + out features


def shape_of(model_config) -> Shape:
    """The Shape of a transformers config, from models built on the meta device (no memory, no weights)."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    classifier_config = copy.deepcopy(model_config)
    classifier_config.num_labels = 1
    lm = registry.on_meta(AutoModelForCausalLM, model_config)
    classifier = registry.on_meta(AutoModelForSequenceClassification, classifier_config)
    hidden, heads = model_config.hidden_size, model_config.num_attention_heads
    kv_heads = getattr(model_config, "num_key_value_heads", None) or heads
    head_dim = getattr(model_config, "head_dim", None) or hidden // heads
    intermediate = (getattr(model_config, "intermediate_size", None) or getattr(model_config, "ffn_dim", None)
                    or getattr(model_config, "n_inner", None) or 4 * hidden)
    body = _body_linears(lm)
    widths: dict[str, int] = {}
    for name, (fan_in, fan_out) in body.items():
        leaf = name.rsplit(".", 1)[-1]
        widths[leaf] = widths.get(leaf, 0) + fan_in + fan_out
    return Shape(
        lm_parameters=_count(lm), classifier_parameters=_count(classifier), layers=model_config.num_hidden_layers,
        hidden=hidden, intermediate=intermediate, kv_width=kv_heads * head_dim, vocab=model_config.vocab_size,
        gated_mlp=any(name.endswith("gate_proj") for name in body), largest_block=_largest_block(lm),
        quantized_weights=sum(fan_in * fan_out for fan_in, fan_out in body.values()),
        linear_widths=tuple(sorted(widths.items())),
    )


def _count(model) -> int:
    return sum(p.numel() for p in model.parameters())  # tied weights once: parameters() yields each once


def _body_linears(model) -> dict[str, tuple[int, int]]:
    """(in, out) features of every linear layer but the output head: what LoRA adapts and bitsandbytes quantizes
    (GPT-2's Conv1D holds its weight as [in, out], nn.Linear as [out, in]: the product and the sum are the same)."""
    head = model.get_output_embeddings()
    return {name: tuple(m.weight.shape) for name, m in model.named_modules()
            if type(m).__name__ in ("Linear", "Conv1D") and m is not head}


def _largest_block(model) -> int:
    """The largest of the decoder layers (the children of the largest ModuleList) and single weights (an
    embedding): ZeRO-3 holds one such piece gathered at a time."""
    from torch import nn

    lists = [m for m in model.modules() if isinstance(m, nn.ModuleList)]
    layers = max(lists, key=_count) if lists else []
    return max([_count(layer) for layer in layers] + [p.numel() for p in model.parameters()])


class Model(NamedTuple):
    name: str
    shape: Shape
    dtype: str  # the entry's: what its frozen copies load in
    lora_targets: tuple[str, ...]  # the entry's: what LoRA adapts where lora.target_modules is empty


@functools.cache
def model(name: str) -> Model:
    """A named model's Shape and the entry settings the plan reads."""
    model_config_, spec = registry.model_config(name)
    return Model(name, shape_of(model_config_), spec.dtype, spec.lora_targets)


# ---- the launch and the stage's settings -------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Launch:
    """How the processes run: how many, under which ZeRO stage (0: no DeepSpeed; DDP with several), what is
    offloaded to CPU memory, on what device."""

    processes: int = 1
    zero: int = 0
    offload_optimizer: bool = False
    offload_parameters: bool = False
    device: str = "gpu"  # gpu: offloaded bytes leave the accelerator; cpu: every byte is the process's memory


def launch_from(accelerate_config: str | Path | None, processes: int, device: str = "gpu") -> Launch:
    """The Launch of `make ... NPROC=processes ACCELERATE_CONFIG=file` (the Makefile passes NPROC as the number
    of processes, whatever the file says)."""
    if not accelerate_config:
        return Launch(processes, device=device)
    path = Path(accelerate_config)
    if not path.is_file():
        known = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "configs" / "accelerate").glob("*.yaml"))
        raise PlanError(f"accelerate config {accelerate_config} not found: give one of {', '.join(known)}, or a "
                        "file of yours")
    launch = yaml.safe_load(path.read_text()) or {}
    if launch.get("distributed_type") != "DEEPSPEED":
        return Launch(processes, device=device)
    ds = launch.get("deepspeed_config") or {}
    return Launch(processes, zero=int(ds.get("zero_stage", 2)), device=device,
                  offload_optimizer=ds.get("offload_optimizer_device", "none") not in ("none", None),
                  offload_parameters=ds.get("offload_param_device", "none") not in ("none", None))


@dataclasses.dataclass(frozen=True)
class Workload:
    """What a stage's config decides about memory, per process."""

    stage: str
    bf16: bool
    micro_batch: int  # examples per training forward (RL: ppo.mini_batch_size sequences; rm, dpo: pairs)
    rows_per_example: int  # 2 for preference pairs (chosen and rejected go through one forward)
    width: int  # tokens of a training row: max_length, or max_prompt_length + max_new_tokens
    logit_positions: int  # positions of a row whose vocabulary-wide logits are computed (0: a score head)
    activation_checkpointing: bool
    lora: bool = False
    lora_r: int = 8
    lora_targets: tuple[str, ...] = ()
    quantization: str = ""
    compute_dtype: str = "float32"
    frozen_dtype: str = "float32"  # the entry's dtype: the reference's and the reward model's, outside ZeRO-3
    accumulation: int = 1  # trainer stages' gradient_accumulation_steps (the effective batch is kept by the fixes)
    rollout_rows: int = 0  # RL: sequences generated at once, batch_size x group_size
    prompt_tokens: int = 0  # longest prompt of a generation
    new_tokens: int = 0  # longest response of a generation
    offload_frozen: str = "auto"  # RL under ZeRO-3: where the frozen partitions live (auto: as offload_param)


def planned_peak_mb(stage: str, cfg, launch: Launch) -> float | None:
    """The plan's peak per process (MB, above the fixed cost of a process) of a stage run with cfg as launched, for
    its manifest beside the measured peaks; None where the model cannot be planned, with one line saying why. Never
    raises: a figure of the plan must not cost a trained model its save."""
    try:
        m = model(cfg.model)
        return round(for_stage(stage, m.shape, launch, workload(stage, cfg, m, launch.device)).peak / 2**20, 1)
    except Exception as e:  # noqa: BLE001 (any: see above)
        print(f"[{stage}] no memory plan for the manifest: {str(e).splitlines()[0] if str(e) else type(e).__name__}")
        return None


def resolve_bf16(precision: str, device: str) -> bool:
    """The stage's precision: auto is bf16 on a GPU (every GPU rented for this has it) and fp32 on a CPU (where
    a stage measures whether bf16 pays: on CPUs without bf16 units it does not)."""
    return precision == "bf16" or (precision == "auto" and device == "gpu")


def workload(stage: str, cfg, m: Model, device: str = "gpu") -> Workload:
    """The Workload of a stage's loaded config (its section `stage` holds the stage's own settings) for model m."""
    s = getattr(cfg, stage)
    common = dict(stage=stage, bf16=resolve_bf16(cfg.precision, device), lora=cfg.lora.enabled, lora_r=cfg.lora.r,
                  lora_targets=tuple(cfg.lora.target_modules or m.lora_targets), quantization=cfg.quantization,
                  compute_dtype=cfg.compute_dtype, frozen_dtype=m.dtype,
                  activation_checkpointing=s.activation_checkpointing)
    if stage in RL_STAGES:
        return Workload(**common, micro_batch=s.mini_batch_size, rows_per_example=1,
                        width=s.max_prompt_length + s.max_new_tokens, logit_positions=s.max_new_tokens,
                        rollout_rows=s.batch_size * getattr(s, "group_size", 1), prompt_tokens=s.max_prompt_length,
                        new_tokens=s.max_new_tokens, offload_frozen=s.offload_frozen)
    pairs = 2 if stage in ("rm", "dpo") else 1
    evaluation = dict(prompt_tokens=s.max_prompt_length, new_tokens=s.max_new_tokens) if stage == "dpo" else {}
    return Workload(**common, micro_batch=s.batch_size, rows_per_example=pairs, width=s.max_length,
                    logit_positions=0 if stage == "rm" else s.max_length, accumulation=s.gradient_accumulation_steps,
                    **evaluation)


def stage_config_class(stage: str):
    """The stage's Config dataclass, the one source of its keys and defaults. Nothing imports a stage
    (tests/test_imports.py): its file is executed under a name of its own, as `python -m alignment eval` runs
    stages/eval.py, and registered so that dataclasses and config's type checks can resolve its annotations."""
    name = f"_alignment_plan_{stage}"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, ROOT / "stages" / f"{stage}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name].Config


def stage_configs(stages: tuple[str, ...], configs: str | Path, overrides: list[str]) -> dict:
    """stage -> its config: configs/<stage>.yaml (or another folder's), then the overrides that are keys of that
    stage; an override no stage has is an error, as the stages make it (naming the closest key)."""
    classes = {stage: stage_config_class(stage) for stage in stages}
    keys = {stage: {f.name for f in dataclasses.fields(c)} for stage, c in classes.items()}
    for override in overrides:
        top = override.partition("=")[0].split(".")[0]
        if not any(top in k for k in keys.values()):
            known = sorted(set().union(*keys.values()))
            close = difflib.get_close_matches(top, known, n=1)
            raise ConfigError(f"unknown config key '{top}' in {override!r}"
                              + (f" (did you mean '{close[0]}'?)" if close else f" (known: {', '.join(known)})"))
    out = {}
    for stage, cls in classes.items():
        mine = [o for o in overrides if o.partition("=")[0].split(".")[0] in keys[stage]]
        yaml_path = Path(configs) / f"{stage}.yaml"
        out[stage] = config.load(cls, yaml_path if yaml_path.is_file() else None, mine)
    return out


# ---- the formulas ------------------------------------------------------------------------------------------


class States(NamedTuple):
    """Bytes per process of a trained model's states."""

    weights: float
    gradients: float
    optimizer: float  # Adam's two moments, and DeepSpeed's fp32 master copy


def trained_states(parameters: int, launch: Launch, bf16: bool) -> States:
    """Weights, gradients and optimizer states of `parameters` trained parameters, per process (see the module's
    docstring for the bytes a parameter and which ZeRO stage divides what by the number of processes)."""
    n = launch.processes
    if not launch.zero:
        return States(4.0 * parameters, 4.0 * parameters, 8.0 * parameters)
    weight = 2 if bf16 else 4
    master = 0 if launch.zero == 3 and not bf16 else 4
    return States(weight * parameters / (n if launch.zero >= 3 else 1),
                  weight * parameters / (n if launch.zero >= 2 else 1),
                  (master + 8) * parameters / n)


def lora_parameters(shape: Shape, targets: tuple[str, ...], r: int) -> int:
    """Parameters LoRA trains: A (r x in) and B (out x r) for every linear layer named in targets."""
    return r * sum(width for name, width in shape.linear_widths if name in targets)


def quantized_bytes(parameters: int, shape: Shape, bits: str, compute_bytes: int) -> float:
    """A model of `parameters` loaded in 4 or 8 bit: the body's linear weights quantized, everything else
    (embeddings, norms, biases, heads) in the compute dtype."""
    return shape.quantized_weights * QUANTIZED_BYTES[bits] + (parameters - shape.quantized_weights) * compute_bytes


def kv_cache_bytes(rows: int, tokens: int, shape: Shape, dtype_bytes: int) -> float:
    """Keys and values of every layer for rows x tokens positions."""
    return 2 * shape.layers * rows * tokens * shape.kv_width * dtype_bytes


def layer_activation_bytes(shape: Shape, compute_bytes: int, residual_bytes: int) -> float:
    """Bytes one token keeps in one layer for the backward pass, without activation checkpointing: the inputs of
    the linear layers and the attention (the normed input twice, queries, keys, values, the attention output:
    4 x hidden + 2 x kv width), the MLP's intermediate tensors (gate, its activation, up and their product: 4;
    an ungated MLP 2), in the compute dtype; and each of the two norms' input (in the residual stream's dtype)
    and fp32 normalised value. Attention itself (SDPA, flash) keeps no seq x seq scores."""
    h = shape.hidden
    matmul_inputs = 4 * h + 2 * shape.kv_width + (4 if shape.gated_mlp else 2) * shape.intermediate
    return compute_bytes * matmul_inputs + 2 * h * (residual_bytes + 4)


def activation_bytes(rows: int, tokens: int, shape: Shape, compute_bytes: int, residual_bytes: int,
                     checkpointing: bool) -> float:
    """What a trained model's forward keeps for its backward over rows x tokens: every layer's activations, or with
    activation checkpointing every layer's input and one layer's activations while it is recomputed."""
    per_layer = layer_activation_bytes(shape, compute_bytes, residual_bytes)
    if checkpointing:
        return rows * tokens * (shape.layers * shape.hidden * residual_bytes + per_layer)
    return rows * tokens * shape.layers * per_layer


def logits_bytes(rows: int, positions: int, vocab: int, compute_bytes: int, chunked: bool,
                 gradients: bool = True) -> float:
    """Vocabulary-wide tensors of a forward. chunked (the RL loop, ppo.logprobs_from_logits): the logits in the
    compute dtype, with gradients the fp32 log-softmax output autograd keeps for every row, and ROWS_AT_ONCE rows'
    fp32 temporaries (the upcast, the scaled copy, the log-softmax). Else (the trainers' loss): the logits, their
    fp32 copy and the fp32 log-softmax output, for every row."""
    per_row = positions * vocab
    if chunked:
        kept = 4 if gradients else 0
        return rows * per_row * (compute_bytes + kept) + min(rows, ROWS_AT_ONCE) * per_row * 12
    return rows * per_row * (compute_bytes + 8)


def forward_working_bytes(rows: int, tokens: int, shape: Shape, compute_bytes: int) -> float:
    """A forward without gradients (a generation's prefill) keeps one layer's tensors at a time: the MLP's
    intermediate ones (three at once in a gated MLP, two otherwise) and two hidden-wide ones."""
    return rows * tokens * ((3 if shape.gated_mlp else 2) * shape.intermediate + 2 * shape.hidden) * compute_bytes


def zero3_working_bytes(shape: Shape, parameter_bytes: int) -> float:
    """What ZeRO-3 gathers at once while a partitioned model runs: the largest block, the prefetch bucket (0.9 x
    hidden^2 elements) and the reduce bucket (hidden^2), as distributed.fit_zero3 sizes them."""
    return (shape.largest_block + 1.9 * shape.hidden**2) * parameter_bytes


# ---- a stage's plan ----------------------------------------------------------------------------------------


class Item(NamedTuple):
    name: str
    phase: str  # HELD, or the phase it exists in: one of PHASES
    bytes: float
    note: str = ""  # how it was counted
    host: bool = False  # offloaded to CPU memory (on a GPU launch: not on the accelerator)


@dataclasses.dataclass
class Plan:
    stage: str
    launch: Launch
    work: Workload
    items: list[Item]

    def total(self, phase: str) -> float:
        """Bytes of phase on the device (offloaded ones count on a CPU launch, where the device is CPU memory)."""
        return sum(i.bytes for i in self.items if i.phase == phase and (not i.host or self.launch.device == "cpu"))

    @property
    def peak_phase(self) -> str:
        phases = [p for p in PHASES if any(i.phase == p for i in self.items)]
        return max(phases, key=self.total)

    @property
    def peak(self) -> float:
        """The most the device holds at once: what is held throughout and the largest phase."""
        return self.total(HELD) + self.total(self.peak_phase)

    @property
    def host(self) -> float:
        """CPU memory the offloaded items take (per process) on a GPU launch."""
        return sum(i.bytes for i in self.items if i.host) if self.launch.device == "gpu" else 0.0


def for_stage(stage: str, shape: Shape, launch: Launch, work: Workload) -> Plan:
    """The plan of a stage: every item each process holds, with the phase it is held in."""
    items = (_trained_items(stage, shape, launch, work) + _frozen_items(stage, shape, launch, work)
             + _generation_items(stage, shape, launch, work) + _training_items(stage, shape, launch, work))
    return Plan(stage, launch, work, [i for i in items if i.bytes > 0])


def _trained(stage: str, shape: Shape, work: Workload) -> list[tuple[str, int, int]]:
    """(model, trained parameters, frozen base parameters) of the models a stage trains. LoRA trains adapters on
    a frozen base; PPO's critic is trained whole unless it is quantized (then it has adapters of its own and a
    trained score head, loading.py)."""
    targets = work.lora_targets
    adapters = lora_parameters(shape, targets, work.lora_r)
    lm, classifier = shape.lm_parameters, shape.classifier_parameters
    models = [("reward model", classifier)] if stage == "rm" else [("policy", lm)]
    if stage == "ppo":
        models.append(("critic", classifier))
    out = []
    for name, parameters in models:
        lora = work.lora if name != "critic" else bool(work.quantization)
        head = shape.hidden if name != "policy" else 0  # a classifier's score head trains whole (modules_to_save)
        out.append((name, adapters + head, parameters) if lora else (name, parameters, 0))
    return out


def _weight_bytes(launch: Launch, work: Workload) -> int:
    """Bytes a parameter of a trained model's weights: fp32 as loaded, or bf16 in DeepSpeed's bf16 mode."""
    return 2 if launch.zero and work.bf16 else 4


def _compute_bytes(work: Workload) -> int:
    return 2 if work.bf16 else 4


def _residual_bytes(launch: Launch, work: Workload) -> int:
    """Bytes of a value in the residual stream (and of a computation outside autocast): the dtype of the trained
    model's embeddings, fp32 as loaded, bf16 in DeepSpeed's bf16 mode, compute_dtype when quantized."""
    if work.quantization:
        return DTYPE_BYTES[work.compute_dtype]
    return _weight_bytes(launch, work)


def _trained_items(stage: str, shape: Shape, launch: Launch, work: Workload) -> list[Item]:
    models = _trained(stage, shape, work)
    trained = sum(p for _, p, _ in models)
    names = " + ".join(f"{name} {count_text(p)}" for name, p, _ in models)
    states = trained_states(trained, launch, work.bf16)
    partitioned = f", 1/{launch.processes}" if launch.zero >= 3 and launch.processes > 1 else ""
    precision = "bf16" if launch.zero and work.bf16 else "fp32"
    offloaded_states = launch.offload_optimizer and launch.zero
    items = [
        Item("trained weights", HELD, states.weights, f"{names}, {precision}{partitioned}",
             host=bool(launch.offload_parameters and launch.zero == 3)),
        Item("gradients", HELD if launch.zero else TRAINING, states.gradients,
             f"{precision}" + (f", 1/{launch.processes}" if launch.zero >= 2 and launch.processes > 1 else ""),
             host=bool(offloaded_states)),
        Item("optimizer states", HELD, states.optimizer,
             ("fp32 master copy + Adam's two moments" if launch.zero and not (launch.zero == 3 and not work.bf16)
              else "Adam's two fp32 moments") + (f", 1/{launch.processes}" if launch.zero and launch.processes > 1
                                                 else ""), host=bool(offloaded_states)),
    ]
    if not launch.zero and launch.processes > 1:
        items.append(Item("DDP gradient buckets", HELD, 4.0 * trained, "a second fp32 copy of the gradients"))
    if launch.zero == 3:  # DeepSpeed 0.19, stage3.py: _prepare_fp32_grad_for_sub_group flattens them anew, one
        # sub-group at a time: the RL loop sizes those (distributed.zero3_sizes), the trainers leave DeepSpeed's 1e9
        # a sub-group closes once past its size: up to one more parameter's partition (bounded by the largest block)
        partition = trained / launch.processes
        sub_group = distributed.zero3_sizes(shape.hidden)["sub_group_size"] if stage in RL_STAGES else 1e9
        sub_group += shape.largest_block / launch.processes
        items.append(Item("gradients flattened for the step", STEP, 4.0 * min(partition, sub_group),
                          f"fp32, 1/{launch.processes}: ZeRO-3 copies the gradient partition into one buffer"
                          + (", a sub-group at a time" if sub_group < partition else ""),
                          host=bool(offloaded_states)))
    if not launch.zero and work.bf16:
        items.append(Item("autocast weight copies", TRAINING, 2.0 * trained, "bf16 casts of the trained weights"))
        if stage in RL_STAGES:
            items.append(Item("autocast weight copies", ROLLOUT, 2.0 * models[0][1], "the policy's"))
    items += [_base_item(f"{name}'s frozen base", base, shape, launch, work) for name, _, base in models if base]
    return items


def _base_item(name: str, parameters: int, shape: Shape, launch: Launch, work: Workload) -> Item:
    """LoRA's frozen base weights: quantized, or as the trained model's weights are held (fp32, DeepSpeed's bf16)."""
    if work.quantization:
        return Item(name, HELD, quantized_bytes(parameters, shape, work.quantization,
                                                DTYPE_BYTES[work.compute_dtype]),
                    f"{count_text(parameters)}, {work.quantization}, the rest {_short(work.compute_dtype)}")
    share = launch.processes if launch.zero == 3 else 1
    return Item(name, HELD, _weight_bytes(launch, work) * parameters / share,
                f"{count_text(parameters)}, " + ("bf16" if _weight_bytes(launch, work) == 2 else "fp32")
                + (f", 1/{share}" if share > 1 else ""),
                host=bool(launch.offload_parameters and launch.zero == 3))


def _frozen_items(stage: str, shape: Shape, launch: Launch, work: Workload) -> list[Item]:
    """The reference and the reward model (PPO, GRPO), DPO's reference(s) and judge."""
    lm, classifier = shape.lm_parameters, shape.classifier_parameters
    if stage in RL_STAGES:
        models = [] if work.lora else [("reference", lm)]
        models.append(("reward model", classifier))
        offload = work.offload_frozen == "cpu" or (work.offload_frozen == "auto" and launch.offload_parameters)
        return [_frozen_item(name, p, shape, launch, work, partitioned=True, offloaded=offload) for name, p in models]
    if stage != "dpo":
        return []
    items = []
    if not work.lora:
        items.append(_frozen_item("reference", lm, shape, launch, work, partitioned=True,
                                  offloaded=launch.offload_parameters))
        if launch.zero == 3:  # TRL's engine serves the loss; the held-out evaluation has its own (stages/dpo.py)
            items.append(_frozen_item("reference for the held-out evaluation", lm, shape, launch, work,
                                      partitioned=True, offloaded=launch.offload_parameters))
    items.append(_frozen_item("judge (reward model)", classifier, shape, launch, work, partitioned=True,
                              offloaded=launch.offload_parameters))
    return items


def _frozen_item(name: str, parameters: int, shape: Shape, launch: Launch, work: Workload, partitioned: bool,
                 offloaded: bool = False) -> Item:
    """A frozen model: quantized; under ZeRO-3 (where partitioned) 1/N in the launch's dtype; else whole in the
    entry's dtype."""
    if work.quantization:
        return Item(name, HELD, quantized_bytes(parameters, shape, work.quantization, DTYPE_BYTES[work.compute_dtype]),
                    f"{count_text(parameters)}, {work.quantization}")
    if partitioned and launch.zero == 3:
        dtype = "bfloat16" if work.bf16 else "float32"
        return Item(name, HELD, DTYPE_BYTES[dtype] * parameters / launch.processes,
                    f"{count_text(parameters)}, {_short(dtype)}, 1/{launch.processes}", host=offloaded)
    return Item(name, HELD, DTYPE_BYTES[work.frozen_dtype] * parameters,
                f"{count_text(parameters)}, {_short(work.frozen_dtype)}, whole")


def _generation_items(stage: str, shape: Shape, launch: Launch, work: Workload) -> list[Item]:
    """Sampling (PPO, GRPO) and the held-out evaluation (PPO, GRPO, DPO): the policy gathered under ZeRO-3, the KV
    cache of every row, the prefill's working tensors, and the evaluation's KL forwards' logits."""
    if stage not in (*RL_STAGES, "dpo"):
        return []
    tokens = work.prompt_tokens + work.new_tokens
    phases = [(ROLLOUT, work.rollout_rows)] if stage in RL_STAGES else []
    items = []
    for phase, rows in [*phases, (EVALUATION, EVAL_ROWS)]:
        # sampling runs under autocast; the held-out evaluation in the weights' own dtype (fp32 as loaded)
        c = _compute_bytes(work) if phase == ROLLOUT else _residual_bytes(launch, work)
        if launch.zero == 3:
            items.append(Item("gathered policy", phase, _weight_bytes(launch, work) * shape.lm_parameters,
                              f"{count_text(shape.lm_parameters)} whole in every process for the generation"))
        items.append(Item("KV cache", phase, kv_cache_bytes(rows, tokens, shape, c),
                          f"{rows} rows x {tokens} tokens"))
        items.append(Item("prefill working memory", phase, forward_working_bytes(rows, work.prompt_tokens, shape, c),
                          "one layer at a time"))
        if phase == EVALUATION:
            items.append(Item("logits of the KL forwards", phase,
                              logits_bytes(rows, work.new_tokens, shape.vocab, c, chunked=True, gradients=False),
                              f"{rows} rows x {work.new_tokens} positions, no gradients"))
    return items


def _training_items(stage: str, shape: Shape, launch: Launch, work: Workload) -> list[Item]:
    """Activations (each trained model's), the logits, and ZeRO-3's gathered blocks, for one micro batch."""
    rows = work.micro_batch * work.rows_per_example
    c = _compute_bytes(work)
    residual = _residual_bytes(launch, work)
    models = len(_trained(stage, shape, work))
    per_model = activation_bytes(rows, work.width, shape, c, residual, work.activation_checkpointing)
    checkpointed = ", checkpointed" if work.activation_checkpointing else ""
    items = [Item("activations", TRAINING, models * per_model,
                  f"{models} model(s) x {rows} rows x {work.width} tokens{checkpointed}")]
    if work.logit_positions:
        items.append(Item("logits", TRAINING,
                          logits_bytes(rows, work.logit_positions, shape.vocab, c, chunked=stage in RL_STAGES),
                          f"{rows} rows x {work.logit_positions} positions x {shape.vocab} tokens"))
    if launch.zero == 3:
        items.append(Item("ZeRO-3 gathered block", TRAINING, zero3_working_bytes(shape, _weight_bytes(launch, work)),
                          "the largest layer or embedding, and the buckets"))
    return items


def count_text(parameters: int) -> str:
    return f"{parameters / 1e9:.2f}B" if parameters >= 1e8 else f"{parameters / 1e6:.1f}M"


def _short(dtype: str) -> str:
    return {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}[dtype]


# ---- whether it fits, and the first change that makes it fit ------------------------------------------------


def fixed_cost(device: str) -> tuple[float, str]:
    """(bytes, what they are) of a process before any model: a CUDA context (assumed), or on a CPU the resident
    memory of a process that imports a stage (measured once, in a process of its own)."""
    if device == "gpu":
        return CUDA_CONTEXT, "a CUDA context (assumed, not measured)"
    return _measured_imports(), "the resident memory of a process after `import stages.ppo` (measured here)"


@functools.cache
def _measured_imports() -> float:
    probe = "import resource, stages.ppo; print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)"
    out = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, check=True)
    return float(out.stdout.split()[-1]) * 1024  # Linux reports KiB


@dataclasses.dataclass(frozen=True)
class Setup:
    """One way to run a stage: the launch and the settings."""

    launch: Launch
    work: Workload

    def with_launch(self, **changes) -> Setup:
        return dataclasses.replace(self, launch=dataclasses.replace(self.launch, **changes))

    def with_work(self, **changes) -> Setup:
        return dataclasses.replace(self, work=dataclasses.replace(self.work, **changes))


def _zero3(s: Setup) -> list[Setup]:
    if s.launch.zero == 3 or s.work.quantization:  # quantized weights cannot be partitioned
        return []
    return [s.with_launch(zero=3, offload_optimizer=False, offload_parameters=False)]


def _offload(s: Setup) -> list[Setup]:
    """The optimizer states to CPU memory, then the parameters too (ZeRO-3 only: a quantized model gets ZeRO-2)."""
    zero = 3 if not s.work.quantization else 2
    out = [s.with_launch(zero=zero, offload_optimizer=True, offload_parameters=False)]
    if zero == 3:
        out.append(s.with_launch(zero=3, offload_optimizer=True, offload_parameters=True))
    return [c for c in out if c.launch != s.launch]


def _lora(s: Setup) -> list[Setup]:
    return [] if s.work.lora else [s.with_work(lora=True)]


def _four_bit(s: Setup) -> list[Setup]:
    """QLoRA: 4-bit weights with adapters, the unquantized parts in bf16 where the stage computes in it; under a
    ZeRO-3 launch ZeRO-2 instead (4-bit weights stop a ZeRO-3 launch at start-up), the optimizer still offloaded."""
    if s.work.quantization == "4bit":
        return []
    compute = "bfloat16" if s.work.bf16 else s.work.compute_dtype
    out = s.with_work(quantization="4bit", lora=True, compute_dtype=compute)
    return [out.with_launch(zero=2, offload_parameters=False) if s.launch.zero == 3 else out]


def _smaller_micro_batch(s: Setup) -> list[Setup]:
    """Halvings of the micro batch down to 1; a trainer stage's gradient accumulation grows to keep its batch."""
    out, m = [], s.work.micro_batch
    while m > 1:
        m //= 2
        out.append(s.with_work(micro_batch=m, accumulation=s.work.accumulation * s.work.micro_batch // m))
    return out


def _checkpointing(s: Setup) -> list[Setup]:
    return [] if s.work.activation_checkpointing else [s.with_work(activation_checkpointing=True)]


# The ordered list of changes a plan tries: each gives its candidates, lightest first.
CHANGES = (("ZeRO-3", _zero3), ("offload", _offload), ("LoRA", _lora), ("4-bit", _four_bit),
           ("smaller micro batch", _smaller_micro_batch), ("activation checkpointing", _checkpointing))


class Fit(NamedTuple):
    setup: Setup  # the first that fits (the given one if it does); where none does, the given one
    plan: Plan
    fits: bool
    change: str  # the changes of CHANGES made ("" for the setup as given)
    why_not: list[Blocker]  # where nothing fits: what stands in the way, per route


class Blocker(NamedTuple):
    route: str  # the lightest setup of a route: ZeRO-3 with everything offloaded, or 4-bit weights
    text: str  # what stands in the way there
    short: str  # the same in a few words


def refused(launch: Launch, work: Workload) -> str:
    """Why a stage would stop at start-up with these settings (config.StageConfig.check_combinations), or ""."""
    if work.quantization and not work.lora:
        return f"quantization={work.quantization} trains only through adapters: it needs lora.enabled=true"
    if work.quantization and launch.zero == 3:
        return f"quantization={work.quantization} does not work with ZeRO-3, which partitions the weights"
    return ""


def fits(plan: Plan, budget: float, fixed: float, host_budget: float = math.inf) -> bool:
    """The device's peak and the fixed cost within budget, what is offloaded within host_budget (CPU memory a
    process may use; infinite: not checked), and settings the stage takes."""
    return plan.peak + fixed <= budget and plan.host <= host_budget and not refused(plan.launch, plan.work)


def plan_of(stage: str, shape: Shape, setup: Setup) -> Plan:
    return for_stage(stage, shape, setup.launch, setup.work)


def first_fit(stage: str, shape: Shape, setup: Setup, budget: float, fixed: float,
              host_budget: float = math.inf) -> Fit:
    """The setup as given if it fits; else the fewest changes of CHANGES that make it fit, the earliest in the
    list first (one change alone before any two), each change's lightest candidate first; else why not."""
    if fits(plan_of(stage, shape, setup), budget, fixed, host_budget):
        return Fit(setup, plan_of(stage, shape, setup), True, "", [])
    for size in range(1, len(CHANGES) + 1):
        for combination in itertools.combinations(CHANGES, size):
            for candidate in _applied(setup, [change for _, change in combination]):
                if fits(plan_of(stage, shape, candidate), budget, fixed, host_budget):
                    names = " + ".join(name for name, _ in combination)
                    return Fit(candidate, plan_of(stage, shape, candidate), True, names, [])
    return Fit(setup, plan_of(stage, shape, setup), False, "",
               why_not(stage, shape, setup, budget, fixed, host_budget))


def _applied(setup: Setup, changes: list) -> list[Setup]:
    """Every setup the changes give, one after another, lightest candidates first."""
    if not changes:
        return [setup]
    return [out for candidate in changes[0](setup) for out in _applied(candidate, changes[1:])]


def why_not(stage: str, shape: Shape, setup: Setup, budget: float, fixed: float,
            host_budget: float = math.inf) -> list[Blocker]:
    """What stands in the way on the two routes there are, each at its lightest: ZeRO-3 with everything
    offloaded, LoRA, micro batch 1 and activation checkpointing; and 4-bit weights (ZeRO-2) with the same."""
    lightest = dict(micro_batch=1, activation_checkpointing=True, lora=True)
    zero3 = setup.with_launch(zero=3, offload_optimizer=True, offload_parameters=True).with_work(quantization="",
                                                                                                   **lightest)
    four_bit = _four_bit(setup)[0] if setup.work.quantization != "4bit" else setup
    four_bit = four_bit.with_launch(zero=2, offload_optimizer=True, offload_parameters=False).with_work(**lightest)
    out = []
    for route, short, s in (("ZeRO-3 with everything offloaded, LoRA, micro batch 1, activation checkpointing",
                             "under ZeRO-3", zero3),
                            ("4-bit (ZeRO-2), micro batch 1, activation checkpointing", "in 4-bit", four_bit)):
        plan = plan_of(stage, shape, s)
        largest = max((i for i in plan.items if not i.host or plan.launch.device == "cpu"), key=lambda i: i.bytes)
        texts, shorts = [], []
        if largest.bytes + fixed > budget:
            texts.append(f"the {largest.name} alone is {largest.bytes / GiB:.1f} GiB ({largest.note})")
            shorts.append(f"{short} the {largest.name} alone is {largest.bytes / GiB:.0f} GiB")
        elif plan.peak + fixed > budget or plan.host <= host_budget:
            top = sorted((i for i in plan.items if i.phase in (HELD, plan.peak_phase)), key=lambda i: -i.bytes)[:3]
            texts.append(f"{plan.peak / GiB:.1f} GiB at the peak ({plan.peak_phase}), mostly "
                         + ", ".join(f"{i.name} {i.bytes / GiB:.1f}" for i in top))
            shorts.append(f"{short} {plan.peak / GiB:.0f} GiB at the peak")
        if plan.host > host_budget:  # (on the device it may fit, or not: both are said)
            texts.append(f"{plan.host / GiB:.1f} GiB of CPU memory a process offloaded, over the "
                         f"{host_budget / GiB:g} GiB there are")
            shorts.append(f"{short} {plan.host / GiB:.0f} GiB of CPU memory a process")
        out.append(Blocker(route, "; ".join(texts), "; ".join(shorts)))
    return out


# ---- the table's search: the lightest departure from full-parameter training that fits ---------------------


def lightest_fit(stage: str, shape: Shape, setup: Setup, budget: float, fixed: float,
                 host_budget: float = math.inf) -> Fit:
    """For the table of docs/memory-plan.md: full parameters, then LoRA, then 4-bit QLoRA; for each, the launch
    without DeepSpeed, then ZeRO-3, with the optimizer offloaded, with everything offloaded (4-bit: ZeRO-2 with the
    optimizer offloaded); for each, the configured micro batch, halved down to 1, then the same with activation
    checkpointing. The first that fits, else why not."""
    base = setup.with_launch(zero=0, offload_optimizer=False, offload_parameters=False)
    for method in (base, *_lora(base), *_four_bit(base)):
        launches = [method] + (_offload(method) if method.work.quantization else [*_zero3(method), *_offload(
            method.with_launch(zero=3))])
        for launch in launches:
            for checkpointing in (launch, *_checkpointing(launch)):
                for candidate in (checkpointing, *_smaller_micro_batch(checkpointing)):
                    if fits(plan_of(stage, shape, candidate), budget, fixed, host_budget):
                        return Fit(candidate, plan_of(stage, shape, candidate), True, "", [])
    return Fit(setup, plan_of(stage, shape, setup), False, "",
               why_not(stage, shape, setup, budget, fixed, host_budget))
