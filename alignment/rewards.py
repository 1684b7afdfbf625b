"""What an RL stage is rewarded by: the reward model, Python functions, or several of them mixed with weights.

An RL stage's `rewards` names its sources, `reward_weights` their weights (empty: 1 each):

    model                        the reward model (the run's, or the stage's reward_model)
    module:function              a Python function, imported (alignment.rewards:length_penalty)
    path/to/file.py:function     a function of a Python file
    http://host:port             a reward server (make serve-rm, alignment/serve.py), scoring the responses' text

A function has TRL's reward-function signature, fn(prompts, completions, completion_ids, **columns) ->
list[float | None]: prompts as the data gives them (strings, or lists of messages), completions as text (special
tokens and what follows the end removed), completion_ids as lists of token ids up to and with the end, and the
data's kept fields (a data source's `keep: [answer]`) as keyword arguments, one list each. None: the term does not
apply to that response, which it leaves out of its sum. A term's values are logged per step as reward/<name>.

Several terms are mixed: each term's values are normalised by its own running mean and standard deviation (over
every process and every step so far: ppo.RunningMoments), weighted and summed. A term alone is taken as it is, so
settings tuned on the reward model's scale keep meaning what they did. The missing-EOS penalty is taken off the
sum.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import inspect
import math
import re
import sys
from collections.abc import Callable
from pathlib import Path

import torch

from alignment import ppo, task
from alignment.config import ConfigError

MODEL = "model"
JUDGE_FUNCTIONS = (":task_gold",)  # sources that reward by the gold judge the evaluation reads (the report says so)


@dataclasses.dataclass
class Term:
    name: str  # in the log: reward/<name>
    weight: float
    function: Callable | None  # None: the reward model


def terms(sources: list[str], weights: list[float]) -> list[Term]:
    """The terms of a stage's `rewards` and `reward_weights`; a source that cannot be found is a ConfigError
    saying what to write."""
    if not sources:
        raise ConfigError(f"rewards is empty: name at least one source ({MODEL}, module:function or "
                          "file.py:function)")
    if weights and len(weights) != len(sources):
        raise ConfigError(f"reward_weights has {len(weights)} weights for {len(sources)} rewards: give one "
                          "per source, or none (1 each)")
    if sources.count(MODEL) > 1:
        raise ConfigError(f"rewards names {MODEL} {sources.count(MODEL)} times: the reward model is one term")
    out, names = [], {MODEL}
    for source, weight in zip(sources, weights or [1.0] * len(sources), strict=True):
        if not math.isfinite(weight):
            raise ConfigError(f"reward_weights: {weight} is not a finite number")
        function = None if source == MODEL else load_function(source)
        name = MODEL if function is None else "server" if _is_url(source) else source.rpartition(":")[2]
        while function is not None and name in names:  # two of one name, or one named model: name_2, ...
            name = re.sub(r"(_\d+)?$", lambda m: f"_{int(m.group(0)[1:] or 1) + 1}", name, count=1)
        names.add(name)
        out.append(Term(name, float(weight), function))
    return out


def _is_url(source: str) -> bool:
    return source.startswith(("http://", "https://"))


def load_function(source: str) -> Callable:
    """The function `module:function` or `path/to/file.py:function` names, or the client of the reward server at
    `http://host:port` (which must answer now); a ConfigError in one line otherwise."""
    where = "rewards: "
    if _is_url(source):
        from alignment.serve import ServerReward

        server = ServerReward(source)
        try:
            server.check()
        except RuntimeError as e:
            raise ConfigError(f"{where}{e}") from None
        return server
    module_name, _, attribute = source.rpartition(":")
    if not module_name or not attribute:
        raise ConfigError(f"{where}{source!r} is not '{MODEL}', 'module:function' or 'path/to/file.py:function'")
    try:
        if module_name.endswith(".py") or "/" in module_name:
            path = Path(module_name).expanduser().resolve()
            if not path.is_file():
                raise ConfigError(f"{where}{source!r}: no file {path}")
            spec = importlib.util.spec_from_file_location(f"_rewards_{path.stem}", path)
            module = importlib.util.module_from_spec(spec)
            sys.modules[spec.name] = module
            spec.loader.exec_module(module)
        else:
            module = importlib.import_module(module_name)
    except ConfigError:
        raise
    except Exception as e:  # noqa: BLE001 - a user's module failing to import is that module's error, said in one line
        raise ConfigError(f"{where}{source!r}: importing {module_name} failed: {type(e).__name__}: {e}") from None
    function = getattr(module, attribute, None)
    if not callable(function):
        raise ConfigError(f"{where}{source!r}: {module_name} has no function {attribute!r}")
    return function


class Rewards:
    """A stage's terms, and the running statistics that mix them (part of the resumable state)."""

    def __init__(self, terms_: list[Term]):
        self.terms = terms_
        self.moments = {t.name: ppo.RunningMoments() for t in terms_}

    @property
    def uses_model(self) -> bool:
        return any(t.function is None for t in self.terms)

    def call_functions(self, prompts: list, completions: list[str], completion_ids: list[list[int]], columns: dict,
                       step: int, stage: str) -> dict[str, torch.Tensor]:
        """Each function's values for a batch: name -> [B] float tensor, NaN where it returned None (values())."""
        return {t.name: values(t, prompts, completions, completion_ids, columns, f"[{stage}] step {step}")
                for t in self.terms if t.function is not None}

    def mix(self, gather: Callable[[torch.Tensor], torch.Tensor], values: dict[str, torch.Tensor]) -> torch.Tensor:
        """The reward of each response [B] from each term's values (name -> [B]; a function's NaN: not
        applicable, the reward model's NaN: a broken score, which the sum keeps so the step is skipped). A term
        alone as it is, weighted; several each normalised by its running moments (updated with every process's
        applicable values: gather), weighted and summed over the terms that apply."""
        total = 0.0
        for term in self.terms:
            x = values[term.name].float()
            if len(self.terms) > 1:
                everyone = gather(x)
                applicable = everyone[torch.isfinite(everyone)]
                moments = self.moments[term.name]
                if applicable.numel():
                    moments.update(applicable)
                x = (x - moments.mean) / moments.std
            total = total + term.weight * (x if term.function is None else torch.nan_to_num(x, nan=0.0))
        return total

    def state_dict(self) -> dict:
        return {name: m.state_dict() for name, m in self.moments.items()}

    def load_state_dict(self, state: dict) -> None:
        for name, saved in (state or {}).items():
            if name in self.moments:
                self.moments[name].load_state_dict(saved)


def values(term: Term, prompts: list, completions: list[str], completion_ids: list[list[int]], columns: dict,
           where: str) -> torch.Tensor:
    """A function term's values [B] for a batch, NaN where it returned None. A function that raises, or returns
    something else than one finite number or None per completion, stops the stage in one line starting with
    where (e.g. "[ppo] step 3")."""
    try:
        out = term.function(prompts=prompts, completions=completions, completion_ids=completion_ids, **columns)
    except Exception as e:  # noqa: BLE001 - the user's function: its error, said in one line
        raise SystemExit(f"{where}: reward function {term.name} ({_source_file(term.function)}) raised "
                         f"{type(e).__name__}: {e}") from None
    n = len(completions)
    if not isinstance(out, list | tuple) or len(out) != n:
        got = f"{len(out)} values" if isinstance(out, list | tuple) else type(out).__name__
        raise SystemExit(f"{where}: reward function {term.name} returned {got} for {n} completions: it should "
                         "return a list of one float (or None) per completion")
    checked = []
    for i, v in enumerate(out):
        number = _number(v)
        if v is None:
            checked.append(math.nan)
        elif number is not None and math.isfinite(number):
            checked.append(number)
        else:
            raise SystemExit(f"{where}: reward function {term.name} returned {v!r} for completion {i}: each value "
                             "should be a finite number, or None where the term does not apply")
    return torch.tensor(checked)


def _number(value) -> float | None:
    """A function's value as a float: any real number (numpy's and 0-d tensors too), not a bool or a string."""
    if isinstance(value, bool | str | bytes) or value is None:
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def _source_file(function) -> str:
    try:
        return inspect.getsourcefile(function) or "?"
    except TypeError:  # a builtin, a callable object
        return "?"


def kept_columns(train: list[dict], held_out: list[dict], stage: str) -> list[str]:
    """The fields the data keeps beside each prompt (a source's `keep`), the same for every record of both prompt
    splits; else the stage stops in one line before training (a reward function would miss one after it)."""
    names = sorted(set(train[0]) - {"prompt"})
    for split, records in (("prompts_train", train), ("prompts_eval", held_out)):
        for i, record in enumerate(records):
            if sorted(set(record) - {"prompt"}) != names:
                raise SystemExit(f"[{stage}] {split} record {i + 1} keeps the fields {sorted(set(record) - {'prompt'})}"
                                 f" where prompts_train's first keeps {names}: give every prompt source of the data "
                                 "file the same keep (a reward function gets them)")
    return names


# ---- functions shipped with the pipeline ------------------------------------------------------------------


def length_penalty(completion_ids: list[list[int]], **_) -> list[float]:
    """Minus the response's length in tokens (mixed with a reward model, it pays for saying the same in fewer)."""
    return [-float(len(ids)) for ids in completion_ids]


def exact_answer(completions: list[str], answer: list[str], **_) -> list[float]:
    """1 where the completion is the data's `answer` (kept by the data file: `keep: [answer]`), case and spacing
    aside, else 0: a verifiable reward (configs/data/task-exact.yaml)."""
    return [float(" ".join(c.lower().split()) == " ".join(str(a).lower().split()))
            for c, a in zip(completions, answer, strict=True)]


def task_gold(prompts: list, completions: list[str], **_) -> list[float | None]:
    """The embedded task's gold judge (alignment/task.py) as a reward: 1 for the right answer, partial credit as
    the judge gives it; None for a prompt that is not one of the task's. A policy trained on it is trained on the
    judge its evaluation reads: its gold gains are no independent measure."""
    out = []
    for prompt, completion in zip(prompts, completions, strict=True):
        try:
            out.append(task.gold_score(prompt, completion) if isinstance(prompt, str) else None)
        except ValueError:
            out.append(None)
    return out
