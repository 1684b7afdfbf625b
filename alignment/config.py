"""Configs: dataclass defaults, then a YAML file, then `key=value` overrides from the command line.

Every stage has a dataclass whose fields carry their help text; nested dataclasses are sections
(`ppo.steps=50`). Unknown keys and values of the wrong type are errors that name the key, never
silently ignored: a typo in a sweep must not train the default.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import sys
import types
import typing
from pathlib import Path
from typing import Any

import torch.distributed as dist
import yaml

from alignment import data, presets
from alignment.registry import RegistryError
from alignment.store import StoreError


class ConfigError(ValueError):
    pass


def _check_type(key: str, value: Any, hint: Any) -> Any:
    """Returns value converted to hint (int -> float only), or raises ConfigError naming the key."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(hint)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _check_type(key, value, arg)
            except ConfigError:
                pass
        raise ConfigError(f"{key}: expected {_type_name(hint)}, got {value!r}")
    if origin is list:
        (item,) = typing.get_args(hint) or (Any,)
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return [_check_type(f"{key}[{i}]", v, item) for i, v in enumerate(value)]
    if origin is dict or hint is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return value
    if hint is Any:
        return value
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint is float and isinstance(value, str):  # YAML 1.1 reads "1e-5" (no dot) as a string
        try:
            return float(value)
        except ValueError:
            pass
    if hint is int and isinstance(value, bool) or not isinstance(value, hint):
        raise ConfigError(f"{key}: expected {_type_name(hint)}, got {value!r}")
    return value


def _type_name(hint: Any) -> str:
    return getattr(hint, "__name__", None) or str(hint).replace("typing.", "")


def _apply(obj: Any, values: dict, prefix: str = "") -> None:
    hints = typing.get_type_hints(type(obj))
    fields = {f.name for f in dataclasses.fields(obj)}
    for name, value in values.items():
        key = f"{prefix}{name}"
        if name not in fields:
            close = difflib.get_close_matches(name, fields, n=1)
            hint = f" (did you mean '{prefix}{close[0]}'?)" if close else f" (known: {', '.join(sorted(fields))})"
            raise ConfigError(f"unknown config key '{key}'{hint}")
        current = getattr(obj, name)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise ConfigError(f"{key}: is a section; set its keys, e.g. {key}.<name>=...")
            _apply(current, value, prefix=f"{key}.")
        else:
            setattr(obj, name, _check_type(key, value, hints[name]))


def parse_overrides(args: list[str]) -> dict:
    """['ppo.steps=50', 'model=tiny-bloom'] -> {'ppo': {'steps': 50}, 'model': 'tiny-bloom'}; values are YAML."""
    tree: dict = {}
    for arg in args:
        key, sep, raw = arg.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {arg!r} is not of the form key=value")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError as e:
            problem = getattr(e, "problem", None) or str(e).splitlines()[0]
            raise ConfigError(
                f"{key}: {raw!r} is not a YAML value ({problem}); make's ARGS splits at spaces, so "
                f"give a mapping key by key ({key}.<name>=<value>) or in a --config/CONFIG file"
            ) from None
        *parents, leaf = key.split(".")
        node = tree
        for p in parents:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {arg!r} conflicts with an earlier one")
        node[leaf] = value
    return tree


def load(cls: type, yaml_path: str | Path | None = None, overrides: list[str] = ()) -> Any:
    """Builds cls from its defaults, the presets for its model's size (alignment/presets.py; a stage's config
    only), the YAML file's `presets:` section for that size, the rest of the YAML file (if any) and the overrides,
    in that order. The presets chosen are kept as cfg.preset (None for a config that is not a stage's)."""
    values = {}
    if yaml_path is not None:
        with open(yaml_path) as f:
            values = yaml.safe_load(f) or {}
        if not isinstance(values, dict):
            raise ConfigError(f"{yaml_path}: expected a mapping of config keys at the top level")
    by_size = values.pop("presets", None) or {}
    if not isinstance(by_size, dict) or set(by_size) - set(presets.LEARNING_RATES):
        raise ConfigError(f"{yaml_path}: presets: expected a mapping from a size class "
                          f"({', '.join(presets.LEARNING_RATES)}) to settings")
    for size, section in by_size.items():  # every class's checked now, not when a model of its size comes
        if not isinstance(section, dict) or {"model", "lora"} & set(section):
            raise ConfigError(f"{yaml_path}: presets.{size}: expected stage settings (the model and LoRA choose the "
                              "class, so they cannot be set there)")
        _from_file(cls(), section, f"{yaml_path}: presets.{size}")
    tree = parse_overrides(list(overrides))
    probe = cls()  # what the file and the overrides say of the model and LoRA, which the presets depend on
    _from_file(probe, values, yaml_path)
    _apply(probe, tree)
    preset = presets.of(probe) if dataclasses.is_dataclass(probe) else None
    cfg = cls()
    if preset is not None:
        _apply(cfg, preset.settings())
        _from_file(cfg, by_size.get(preset.size_class) or {}, f"{yaml_path}: presets.{preset.size_class}")
    _from_file(cfg, values, yaml_path)
    _apply(cfg, tree)
    _check(cfg)
    cfg.preset = preset
    line = preset.warning(getattr(cfg, preset.stage).learning_rate) if preset is not None else None
    if line and os.environ.get("RANK", "0") == "0":  # once per launch
        print(line, flush=True)
    return cfg


def _from_file(cfg: Any, values: dict, where) -> None:
    try:
        _apply(cfg, values)
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None


def _check(obj: Any) -> None:
    """Calls check() of every section that has one: settings that cannot work together raise ConfigError."""
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            _check(value)
    if callable(getattr(obj, "check", None)):
        obj.check()


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def cli(cls: type, argv: list[str], default_yaml: str | Path | None = None) -> Any:
    """`stage.py [--config FILE] key=value ...` -> config. Exits with the error message on bad input."""
    yaml_path, rest, show = default_yaml, [], False
    it = iter(argv)
    for arg in it:
        if arg == "--config" or arg.startswith("--config="):
            yaml_path = arg.split("=", 1)[1] if "=" in arg else next(it, "")
            if (
                not yaml_path
                or yaml_path.startswith("-")
                or "=" in yaml_path
                and not yaml_path.endswith((".yaml", ".yml"))
            ):
                sys.exit(f"config error: --config needs a YAML file path\n{usage()}")
        elif arg == "--print-config":
            show = True
        elif arg in ("-h", "--help"):
            print(f"{usage()}\n\nKeys (key = default    meaning):\n{help_text(cls)}")
            sys.exit(0)
        elif arg.startswith("-"):
            sys.exit(f"config error: unknown option {arg!r}; settings are key=value\n{usage()}")
        else:
            rest.append(arg)
    try:
        cfg = load(cls, yaml_path, rest)
    except (ConfigError, FileNotFoundError) as e:
        sys.exit(f"config error: {e}")
    if show:
        print(resolved(cfg, yaml_path), end="")
        sys.exit(0)
    return cfg


def resolved(cfg: Any, yaml_path: str | Path | None) -> str:
    """The settings a stage would run with, as YAML, saying where they came from (--print-config)."""
    sources = ["defaults"]
    if cfg.preset is not None:
        sources.append(f"presets for {cfg.preset.describe()}")
    sources += [str(yaml_path)] if yaml_path else []
    return (f"# resolved: {' < '.join([*sources, 'command line'])}\n"
            + yaml.safe_dump(to_dict(cfg), sort_keys=False, default_flow_style=None))


def usage() -> str:
    script = Path(sys.argv[0]) if sys.argv else Path()
    stage = script.stem if script.suffix == ".py" and script.parent.name == "stages" else "<stage>"
    return (f"usage: python -m stages.{stage} [--config FILE.yaml] [--print-config] [key=value ...]   "
            "(make: ARGS=\"key=value ...\")")


def help_text(cls: type, prefix: str = "") -> str:
    lines = []
    for f in dataclasses.fields(cls):
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        if dataclasses.is_dataclass(default):
            lines.append(help_text(type(default), prefix=f"{prefix}{f.name}."))
        else:
            lines.append(f"  {prefix}{f.name} = {default!r}    {f.metadata.get('help', '')}")
    return "\n".join(lines)


def field(default: Any, help: str) -> Any:
    """A dataclass field with help text; mutable defaults are copied per instance."""
    if isinstance(default, (list, dict)) or dataclasses.is_dataclass(default):
        factory = (lambda d=default: type(d)(**dataclasses.asdict(d))) if dataclasses.is_dataclass(default) else (
            lambda d=default: type(d)(d)
        )
        return dataclasses.field(default_factory=factory, metadata={"help": help})
    return dataclasses.field(default=default, metadata={"help": help})


# ---- sections shared by the stages ------------------------------------------------------------------


@dataclasses.dataclass
class LoraSettings:
    enabled: bool = field(False, "train LoRA adapters instead of all weights")
    r: int = field(8, "adapter rank")
    alpha: int = field(16, "adapter scaling numerator (scale = alpha / r)")
    dropout: float = field(0.0, "dropout on the adapter input")
    target_modules: list[str] = field([], "module names to adapt; empty: the registry entry's")


@dataclasses.dataclass
class TrainerSettings:
    """What every stage run by a TRL trainer (sft, rm, dpo) sets; a stage's section extends it with its own keys
    and may redeclare a key with another default. training.trainer_config turns it into the trainer's arguments."""

    epochs: float = field(1.0, "passes over the training data")
    batch_size: int = field(32, "examples per device per forward (per optimizer step without accumulation)")
    gradient_accumulation_steps: int = field(1, "forwards summed into one optimizer step: the effective batch is "
                                             "batch_size x this x processes")
    learning_rate: float = field(1e-4, "peak AdamW learning rate")
    lr_scheduler_type: str = field("cosine", "learning-rate schedule after warm-up (transformers' names: cosine, "
                                   "linear, constant, ...)")
    warmup_ratio: float = field(0.05, "share of steps with linear warm-up")
    weight_decay: float = field(0.0, "AdamW weight decay")
    max_grad_norm: float = field(1.0, "clip the gradient's global norm to this")
    max_length: int = field(512, "longest sequence in tokens")
    group_by_length: bool = field(False, "batch examples of similar length together: less padding")
    activation_checkpointing: bool = field(True, "recompute activations in the backward pass instead of keeping "
                                           "them (gradient checkpointing): less memory, more compute (TRL's default)")
    logging_steps: int = field(20, "log every N optimizer steps")
    trainer_args: dict = field({}, "any other argument of the stage's TRL config, as is: trainer_args.adam_beta2=0.95 "
                               "on the command line, {adam_beta2: 0.95, optim: adafactor} in YAML; one this section or "
                               "the stage already sets is refused")


@dataclasses.dataclass
class StageConfig:
    model: str = field("tiny-llama", "the base model: a registry name, a local model folder or a hub id (org/name)")
    run: str = field("", "run name in the store; empty: the model name")
    store: str = field("store", "root folder of the checkpoint store")
    data: str = field(
        "task",
        "the data: a built-in name (task, hh-rlhf: configs/data/) or the path of a YAML data file "
        "(alignment/data.py says what it holds)",
    )
    on_error: str = field("", "bad records: raise (name file, record, problem) or skip (count); empty: the data file's")
    template: str = field("", "prompt template (see alignment/registry.py) or auto (the tokenizer's own chat "
                          "template); empty: the data file's, else the model's")
    seed: int = field(0, "seed for weights of new heads, data order and sampling")
    threads: int = field(0, "torch CPU threads; 0: torch's default")
    limit: int = field(0, "use only the first N records of each data split (0: all), for smoke runs")
    resume: bool = field(True, "continue from the last complete saved state of this stage, if there is one")
    allow_stale: bool = field(False, "build on an input checkpoint even if it is stale (a parent of it was replaced "
                              "or removed since it was trained; see `make store`), with a warning instead of an error")
    save_every: int = field(50, "optimizer steps (PPO: PPO steps) between resumable states")
    max_bad_steps: int = field(5, "stop after this many updates in a row with non-finite loss or gradients")
    check_sync: bool = field(False, "after every optimizer step, check all processes hold identical parameters")
    quantization: str = field("", "load weights in 8 or 4 bit through bitsandbytes: '8bit', '4bit' (nf4, double "
                              "quantization); trained models then need lora.enabled (QLoRA)")
    compute_dtype: str = field("float32", "dtype of the 4-bit layers' matmuls: float32, bfloat16, float16")
    precision: str = field("auto", "training arithmetic: bf16 (autocast), fp32, or auto: bf16 on a GPU that has it "
                           "and on a CPU whose bf16 matmul is measured faster than fp32 at start-up, else fp32")

    def check(self) -> None:
        """The keys every stage has (config.load calls this; a stage's Config that has its own calls it too)."""
        if self.save_every < 1:
            raise ConfigError(f"save_every={self.save_every}: it takes 1 or more (optimizer steps between resumable "
                              "states)")

    def check_combinations(self, trains_weights: bool, lora: bool) -> None:
        """Settings that cannot work together stop here, at start-up, saying what to change."""
        if self.precision not in ("auto", "bf16", "fp32"):
            raise SystemExit(f"precision: {self.precision!r} is not 'auto', 'bf16' or 'fp32'")
        if self.quantization not in ("", "8bit", "4bit"):
            raise SystemExit(f"quantization: {self.quantization!r} is not '', '8bit' or '4bit'")
        if self.quantization and trains_weights and not lora:
            raise SystemExit(f"quantization={self.quantization}: quantized weights cannot be trained directly; "
                             "set lora.enabled=true (QLoRA) or quantization=''")
        if self.quantization and os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE") == "3":
            raise SystemExit(f"quantization={self.quantization} does not work with DeepSpeed ZeRO-3, which shards "
                             "weights; use ZeRO-2 (configs/accelerate/zero2.yaml) or quantization=''")

    @property
    def run_name(self) -> str:
        """The run: as given, else the model name, suffixed with the data's name unless it is the default."""
        name, data_name = Path(self.model.rstrip("/")).name, data.short_name(self.data)
        return self.run or (name if data_name == "task" else f"{name}-{data_name}")


# How far the running stage has come, for the one line that Ctrl-C ends with: the stages keep it up to date
# (stage name, step reached, and a function giving the last complete resumable state, or None).
PROGRESS: dict = {}


def interrupted_line() -> str:
    stage, step, state = PROGRESS.get("stage", "stage"), PROGRESS.get("step"), PROGRESS.get("state")
    saved = state() if callable(state) else None
    reached = f" after step {step}" if step is not None else " before its first step"
    if saved:
        return f"[{stage}] stopped by Ctrl-C{reached}; the last resumable state is {saved}: the same command resumes it"
    return f"[{stage}] stopped by Ctrl-C{reached}; no resumable state was saved yet (save_every sets how often)"


def lost_process_line(error: BaseException) -> str | None:
    """The one line for a collective that failed because another process of the run is gone (killed, its machine
    down, the network between them cut), None for any other error. Only in a run of several processes."""
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return None
    text = str(error)
    lost = isinstance(error, dist.DistError) or (isinstance(error, RuntimeError) and any(
        clue in text for clue in ("Connection closed by peer", "Connection reset by peer", "Broken pipe",
                                  "NCCL communicator was aborted", "Socket Timeout", "Connection refused")))
    if not lost:
        return None
    stage, step, state = PROGRESS.get("stage", "stage"), PROGRESS.get("step"), PROGRESS.get("state")
    saved = state() if callable(state) else None
    reached = f"after step {step}" if step is not None else "before its first step"
    how = f"resume from the last saved state, {saved}" if saved else \
        "start over (no resumable state was saved yet; save_every sets how often)"
    cause = text.strip().splitlines()[0][:200] if text.strip() else type(error).__name__
    return (f"[{stage}] process {dist.get_rank()} lost a process of the run {reached} (another process or machine "
            f"stopped, or the network between them failed: {cause}); it stops too. The same command on every "
            f"machine will {how}")


FINAL_SAVE_TIMEOUT_S = 6 * 3600  # what the other processes give the main one to write the result


def wait_for_the_main_process() -> None:
    """The end of a multi-process run: the main process writes (gathered weights, hashes, fsync: at 70B hundreds of
    GB) while the others wait, through the launch's key-value store with a timeout of its own
    (FINAL_SAVE_TIMEOUT_S), not in a collective: a collective would time out with the process group (10-30 min),
    and the failed process's launcher would then stop the main one in the middle of its write."""
    from alignment.distributed import after_the_main_process

    after_the_main_process("alignment/main-process-done", FINAL_SAVE_TIMEOUT_S)
    dist.barrier()  # (the main process is done: this one returns at once)


def stop_if_lost(error: Exception) -> None:
    """Where error says another process of the run is gone: its one line, and this process ends at once."""
    line = lost_process_line(error)
    if line is None:
        return
    print(line, file=sys.stderr, flush=True)
    sys.stdout.flush()
    os._exit(1)  # the process group is broken: its teardown (and DeepSpeed's threads) could wait forever


def run(main) -> None:
    """Runs a stage's main(argv); a missing input, bad data or an unusable model ends with its message instead of
    a traceback, and so does a run of several processes that lost one of them."""
    try:
        main(sys.argv[1:])
    except (StoreError, data.DataError, RegistryError) as e:
        sys.exit(f"error: {e}")
    except KeyboardInterrupt:
        print(interrupted_line(), file=sys.stderr, flush=True)
        sys.exit(130)
    except Exception as e:
        stop_if_lost(e)
        raise
    # In a multi-process run only the main process writes the result: the others wait for it here and all
    # leave the process group together (a process exiting alone can abort its peers' gloo/NCCL teardown).
    if dist.is_available() and dist.is_initialized():
        try:
            wait_for_the_main_process()
        except Exception as e:  # (the main process failed in its write, and its machine's launcher went with it)
            stop_if_lost(e)
            raise
        dist.destroy_process_group()
        # The run is complete and saved. Left to the interpreter's exit, a communication thread still joinable
        # (DeepSpeed's on gloo) can abort a process ("terminate called without an active exception", 1 run in
        # about 30 here) and fail a finished run: leave now.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
