"""Data: the formats people have, read into three record shapes, with errors that name the record.

Record shapes the stages use (a prompt is a string, or a list of {role, content} messages ending with a
user turn, rendered by the model's template):
    SFT          {"prompt", "completion"}
    preferences  {"prompt", "chosen", "rejected"}
    prompts      {"prompt"}

Formats read: `records` (already in those shapes: the embedded task, generic prompt/chosen/rejected
JSONL), `alpaca` (instruction, input, output), `hh` (Anthropic HH-RLHF: whole chosen/rejected dialogues of
"\\n\\nHuman: ... \\n\\nAssistant: ..." turns, split into the shared prompt and the two final answers,
multi-turn aware) and `messages` (conversations as lists of {role, content}). A source is a local file
(.json list, .jsonl, .jsonl.gz) or a hub data-set id read with `datasets.load_dataset`. A record that is
unusable (missing or non-string field, empty response, chosen == rejected, no Assistant turn, dialogues
that differ before the last turn) is an error naming file, record and problem, or, with on_error="skip",
skipped and counted.

A profile maps each split a stage reads to a source. `task` is the embedded default; `hh-rlhf` is the real
data in ../shared/data (Alpaca for SFT, hh-rlhf harmless-base for preferences and PPO prompts).
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import json
import os
from collections import Counter
from pathlib import Path

from alignment import task

SHARED_DATA = Path(os.environ.get("ALIGNMENT_SHARED_DATA", Path(__file__).resolve().parent.parent.parent / "shared" / "data"))
HH = SHARED_DATA / "hh-rlhf" / "harmless-base" / "test.jsonl.gz"
ALPACA = SHARED_DATA / "alpaca" / "alpaca_5000.json"
SPLITS = ("sft_train", "sft_eval", "prefs_train", "prefs_eval", "prompts_train", "prompts_eval")
KIND = {"sft_train": "sft", "sft_eval": "sft", "prefs_train": "prefs", "prefs_eval": "prefs",
        "prompts_train": "prompts", "prompts_eval": "prompts"}


class DataError(ValueError):
    pass


@dataclasses.dataclass(frozen=True)
class Source:
    path: str  # local file, or a hub data-set id
    format: str = "records"  # records | alpaca | hh | messages
    start: int = 0  # records [start, stop) of the source
    stop: int | None = None
    fields: tuple[tuple[str, str], ...] = ()  # (our name, the source's name) for other schemas
    hub_split: str = "train"


@dataclasses.dataclass(frozen=True)
class Profile:
    splits: dict  # split -> Source or a tuple of Sources (concatenated)
    on_error: str = "raise"  # raise | skip
    template: str = ""  # template override for every model; empty: the registry entry's
    tokenizer_vocab: int = 512  # vocabulary of a tiny twin's tokenizer trained on this profile's text
    rm_references: tuple[tuple[str, float], ...] = ()  # held-out accuracies a reward model is compared with


PROFILES = {
    "task": Profile({
        "sft_train": Source(str(task.DATA_DIR / "sft.jsonl")),
        "sft_eval": Source(str(task.DATA_DIR / "sft_eval.jsonl")),
        "prefs_train": Source(str(task.DATA_DIR / "prefs_train.jsonl")),
        "prefs_eval": Source(str(task.DATA_DIR / "prefs_eval.jsonl")),
        "prompts_train": Source(str(task.DATA_DIR / "prompts_train.jsonl")),
        "prompts_eval": Source(str(task.DATA_DIR / "prompts_eval.jsonl")),
    }),
    # Alpaca (first 4,800 / last 200) plus the chosen dialogues of the 2,000 hh training pairs for SFT, as
    # DeepSpeed-Chat does; hh-rlhf harmless-base: the first 2,000 pairs for training, the last 312 held out.
    # Its known quirks (4 empty final answers, 5 pairs whose dialogues differ before the final answer) are
    # skipped and counted.
    "hh-rlhf": Profile({
        "sft_train": (Source(str(ALPACA), "alpaca", 0, 4800), Source(str(HH), "hh", 0, 2000)),
        "sft_eval": Source(str(ALPACA), "alpaca", 4800, 5000),
        "prefs_train": Source(str(HH), "hh", 0, 2000),
        "prefs_eval": Source(str(HH), "hh", 2000, 2312),
        "prompts_train": Source(str(HH), "hh", 0, 2000),
        "prompts_eval": Source(str(HH), "hh", 2000, 2312),
    }, on_error="skip", template="human_assistant", tokenizer_vocab=4096,
       # measured on the same split after training on the first 2,000 pairs (../shared/data/README.md)
       rm_references=(("shorter final answer wins", 0.571), ("TF-IDF 1-2 gram logistic regression", 0.63))),
}


# ---- reading sources ---------------------------------------------------------------------------------


def read_jsonl(path: str | Path) -> list[dict]:
    """Objects of a .jsonl(.gz) file, each with its line number under '_line'."""
    records = []
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
            if not isinstance(record, dict):
                raise DataError(f"{path}:{lineno}: expected a JSON object, got {type(record).__name__}")
            record["_line"] = lineno
            records.append(record)
    return records


def read_source(source: Source) -> list[dict]:
    """The raw records of a local file or a hub data set, each with '_where' naming it for messages."""
    path = Path(source.path)
    if path.suffix == ".json":
        with open(path, encoding="utf-8") as f:
            try:
                rows = json.load(f)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None
        if not isinstance(rows, list):
            raise DataError(f"{path}: expected a JSON list of records")
        records = [{**r, "_where": f"{path}: record {i}"} if isinstance(r, dict) else {"_bad": r, "_where": f"{path}: record {i}"}
                   for i, r in enumerate(rows)]
    elif path.exists() or source.path.endswith((".jsonl", ".gz")):
        if not path.exists():
            raise DataError(f"{path}: no such file (set the data path, or see ../shared/data/README.md)")
        records = [{**r, "_where": f"{path}:{r.pop('_line')}"} for r in read_jsonl(path)]
    else:  # a hub data-set id
        from datasets import load_dataset

        rows = load_dataset(source.path, split=source.hub_split)
        records = [{**r, "_where": f"{source.path}[{source.hub_split}]: record {i}"} for i, r in enumerate(rows)]
    return records[source.start : source.stop]


# ---- parsing formats into record shapes --------------------------------------------------------------


def _text(record: dict, name: str, fields: dict, allow_empty: bool = False) -> str:
    value = record.get(fields.get(name, name))
    if value is None:
        raise DataError(f"field '{fields.get(name, name)}' is missing")
    if not isinstance(value, str):
        raise DataError(f"field '{fields.get(name, name)}' is a {type(value).__name__}, not a string")
    if not allow_empty and not value.strip():
        raise DataError(f"field '{fields.get(name, name)}' is empty")
    return value


def split_dialogue(text: str) -> list[dict]:
    """'\\n\\nHuman: a\\n\\nAssistant: b ...' -> [{role: user, content: a}, {role: assistant, content: b}, ...]."""
    turns, rest = [], text
    markers = {"\n\nHuman:": "user", "\n\nAssistant:": "assistant"}
    while rest:
        found = [(rest.find(m), m) for m in markers if rest.find(m) >= 0]
        if not found:
            if turns:
                turns[-1]["content"] += rest
            break
        at, marker = min(found)
        if turns:
            turns[-1]["content"] += rest[:at]
        turns.append({"role": markers[marker], "content": ""})
        rest = rest[at + len(marker) :]
    for t in turns:
        t["content"] = t["content"].strip()
    return turns


def _hh_pair(record: dict, fields: dict) -> dict:
    chosen = split_dialogue(_text(record, "chosen", fields))
    rejected = split_dialogue(_text(record, "rejected", fields))
    for name, turns in (("chosen", chosen), ("rejected", rejected)):
        if not turns or turns[-1]["role"] != "assistant":
            raise DataError(f"the {name} dialogue has no final Assistant turn")
        if not turns[-1]["content"]:
            raise DataError(f"the final Assistant turn of {name} is empty")
    if chosen[:-1] != rejected[:-1]:
        raise DataError("chosen and rejected differ before the final Assistant turn")
    return {"prompt": chosen[:-1], "chosen": " " + chosen[-1]["content"], "rejected": " " + rejected[-1]["content"]}


def _messages(value, where: str) -> list[dict]:
    if not isinstance(value, list) or not value:
        raise DataError(f"{where} is not a non-empty list of messages")
    for m in value:
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise DataError(f"{where} holds a message without string 'role' and 'content'")
    return [{"role": m["role"], "content": m["content"]} for m in value]


def parse(record: dict, fmt: str, kind: str, fields: dict) -> dict:
    """One raw record -> the record shape of `kind` (sft, prefs, prompts); DataError says what is wrong."""
    if "_bad" in record:
        raise DataError(f"expected a JSON object, got {type(record['_bad']).__name__}")
    if fmt == "records":
        prompt = record.get(fields.get("prompt", "prompt"))
        out = {"prompt": _messages(prompt, "field 'prompt'") if isinstance(prompt, list) else _text(record, "prompt", fields)}
        names = {"sft": ("completion",), "prefs": ("chosen", "rejected"), "prompts": ()}[kind]
        out.update({n: _text(record, n, fields) for n in names})
    elif fmt == "alpaca":
        instruction = _text(record, "instruction", fields)
        extra = _text(record, "input", fields, allow_empty=True) if fields.get("input", "input") in record else ""
        out = {"prompt": instruction + (f"\n\n{extra}" if extra.strip() else ""), "completion": _text(record, "output", fields)}
    elif fmt == "hh":
        pair = _hh_pair(record, fields)
        out = {"sft": {"prompt": pair["prompt"], "completion": pair["chosen"]}, "prefs": pair,
               "prompts": {"prompt": pair["prompt"]}}[kind]
    elif fmt == "messages":
        if kind == "prefs":
            chosen = _messages(record.get(fields.get("chosen", "chosen")), "field 'chosen'")
            rejected = _messages(record.get(fields.get("rejected", "rejected")), "field 'rejected'")
            if chosen[:-1] != rejected[:-1]:
                raise DataError("chosen and rejected differ before the final assistant message")
            out = {"prompt": chosen[:-1], "chosen": chosen[-1]["content"], "rejected": rejected[-1]["content"]}
        else:
            msgs = _messages(record.get(fields.get("messages", "messages")), "field 'messages'")
            if msgs[-1]["role"] != "assistant" and kind == "sft":
                raise DataError("the conversation does not end with an assistant message")
            out = {"prompt": msgs[:-1] if msgs[-1]["role"] == "assistant" else msgs}
            if kind == "sft":
                out["completion"] = msgs[-1]["content"]
    else:
        raise DataError(f"unknown data format {fmt!r} (records, alpaca, hh, messages)")
    if kind in ("sft", "prefs") and isinstance(out["prompt"], list) and not out["prompt"]:
        raise DataError("no prompt before the response")
    for name in ("completion", "chosen", "rejected"):
        if name in out and not out[name].strip():
            raise DataError(f"the {name} response is empty")
    if kind == "prefs" and out["chosen"] == out["rejected"]:
        raise DataError("chosen and rejected are identical")
    return out


@dataclasses.dataclass
class Loaded:
    records: list[dict]
    skipped: Counter  # problem -> count, for the log and the manifest


def load_split(profile: str, split: str, limit: int = 0, on_error: str = "") -> Loaded:
    """The records of one split of a profile (the first `limit` if > 0), parsed and checked."""
    prof = get_profile(profile)
    sources = prof.splits[split]
    sources = sources if isinstance(sources, tuple) else (sources,)
    on_error = on_error or prof.on_error
    records, skipped = [], Counter()
    for source in sources:
        raw = read_source(source)
        for r in raw:
            if limit and len(records) >= limit:
                break
            try:
                records.append(parse(r, source.format, KIND[split], dict(source.fields)))
            except DataError as e:
                if on_error != "skip":
                    raise DataError(f"{r['_where']}: {e}") from None
                skipped[str(e)] += 1
    if not records:
        raise DataError(f"profile {profile!r}, split {split}: no usable records")
    return Loaded(records, skipped)


def load(profile: str, split: str, limit: int = 0, on_error: str = "") -> list[dict]:
    loaded = load_split(profile, split, limit, on_error)
    if loaded.skipped:
        print(f"[data] {profile}/{split}: skipped {sum(loaded.skipped.values())} records: {dict(loaded.skipped)}")
    return loaded.records


def get_profile(name: str) -> Profile:
    if name not in PROFILES:
        raise DataError(f"unknown data profile {name!r}; known: {', '.join(sorted(PROFILES))}")
    return PROFILES[name]


def fingerprint(profile: str, splits: list[str]) -> str:
    """sha256 over the source files (and record ranges) a stage read, so a checkpoint says what it saw."""
    h = hashlib.sha256()
    for split in splits:
        sources = get_profile(profile).splits[split]
        for source in sources if isinstance(sources, tuple) else (sources,):
            h.update(f"{split}:{source.format}:{source.start}:{source.stop}:{source.fields}".encode())
            h.update(Path(source.path).read_bytes() if Path(source.path).is_file() else source.path.encode())
    return h.hexdigest()


def corpus(profile: str, format_prompt) -> list[str]:
    """The text a tiny twin's tokenizer is trained on for this profile: templated prompts and responses."""
    texts = []
    for r in load(profile, "sft_train", on_error="skip"):
        texts.append(format_prompt(r["prompt"]) + r["completion"])
    for r in load(profile, "prefs_train", on_error="skip"):
        texts += [r["chosen"], r["rejected"]]
    return texts
