"""Data: the files people have, read into three record shapes, with errors that name the file and record.

Record shapes the stages use (a prompt is a string, or a list of {role, content} messages ending with a
user turn, rendered by the model's template):
    SFT          {"prompt", "completion"}
    preferences  {"prompt", "chosen", "rejected"}
    prompts      {"prompt"}

A data file (YAML) maps each split a stage reads to one source or a list of sources (concatenated):

    template: alpaca            # optional: the prompt template for every model (registry.TEMPLATES)
    on_error: skip              # raise (default: stop at the first bad record, naming it) or skip (count)
    sft_train: {path: my_alpaca.json, format: alpaca}
    prefs_train:
      path: my_pairs.jsonl
      fields: {prompt: question, chosen: good, rejected: bad}   # our name: the file's name

A source is a local file (`.json` list, `.jsonl`, `.jsonl.gz`, `.parquet`; a relative path is relative to
the YAML file) or a hub data-set id read with `datasets.load_dataset`, with `format` one of `records` (already
in those shapes), `alpaca` (instruction, input, output), `hh` (Anthropic HH-RLHF whole dialogues of
"\\n\\nHuman: ... \\n\\nAssistant: ..." turns, split into the shared history and the two final answers) or
`messages` (lists of {role, content}), `start`/`stop` to take a range of records, and `keep` to keep more fields
of each record as they are (`keep: [answer]`: a reward function gets them, alignment/rewards.py). An absent `*_eval`
split is carved from its train split (`eval_share`, seeded by `seed`); absent `prompts_*` are the prompts
of `prefs_*`. The built-in names `task` and `hh-rlhf` are such files in configs/data/.

A record that is unusable (missing or non-string field, empty response, chosen == rejected, no Assistant
turn, dialogues that differ before the last turn, broken JSON, invalid UTF-8) is an error naming file,
record and problem, or, with on_error=skip, skipped and counted. A file that cannot be read at all (missing,
empty, truncated gzip, not a JSON list) is always an error, in one line.
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import json
import os
import random
import zlib
from collections import Counter
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
PROFILE_DIR = ROOT / "configs" / "data"  # the built-in data files: <name>.yaml
SHARED_DATA = ROOT.parent / "shared" / "data"
HH = SHARED_DATA / "hh-rlhf" / "harmless-base" / "test.jsonl.gz"
ALPACA = SHARED_DATA / "alpaca" / "alpaca_5000.json"
SPLITS = ("sft_train", "sft_eval", "prefs_train", "prefs_eval", "prompts_train", "prompts_eval")
KIND = {"sft_train": "sft", "sft_eval": "sft", "prefs_train": "prefs", "prefs_eval": "prefs",
        "prompts_train": "prompts", "prompts_eval": "prompts"}
NEEDED_BY = {"sft": "the sft stage", "prefs": "the rm stage", "prompts": "the ppo stage"}
FORMATS = ("records", "alpaca", "hh", "messages")
ROLES = ("system", "user", "assistant")
FILE_TYPES = (".json", ".jsonl", ".jsonl.gz", ".json.gz", ".parquet")


class DataError(ValueError):
    pass


@dataclasses.dataclass(frozen=True)
class Source:
    path: str  # a local file (absolute once read from a data file), or a hub data-set id
    format: str = "records"  # records | alpaca | hh | messages
    start: int = 0  # records [start, stop) of the source
    stop: int | None = None
    fields: tuple[tuple[str, str], ...] = ()  # (our name, the source's name) for other schemas
    hub_split: str = "train"
    keep: tuple[str, ...] = ()  # more fields of each record, kept as they are (e.g. an answer a reward function reads)

    @property
    def is_file(self) -> bool:
        return Path(self.path).is_absolute()


@dataclasses.dataclass(frozen=True)
class Profile:
    name: str  # a built-in name, or the data file's absolute path
    splits: dict  # split -> tuple of Sources (concatenated); only the splits the file names
    on_error: str = "raise"  # raise | skip
    template: str = ""  # template override for every model; empty: the registry entry's
    tokenizer_vocab: int = 512  # vocabulary of a tiny twin's tokenizer trained on this data's text
    eval_share: float = 0.05  # share of a train split held out where the file names no *_eval split
    seed: int = 0  # seeds that carving
    gold: bool = False  # the embedded task's gold judge scores these prompts' answers
    rm_references: tuple[tuple[str, float], ...] = ()  # held-out accuracies a reward model is compared with
    file: str = ""  # the YAML file it was read from


_TOP_KEYS = {"template": str, "on_error": str, "tokenizer_vocab": int, "eval_share": float, "seed": int,
             "gold": bool, "rm_references": dict, "description": str}
_SOURCE_KEYS = {"path": str, "format": str, "fields": dict, "start": int, "stop": int, "hub_split": str, "keep": list}
# not a kept field's name: the fields of the record shapes, and the arguments a reward function gets beside them
OURS = ("prompt", "completion", "chosen", "rejected", "prompts", "completions", "completion_ids")


def get_profile(name: str) -> Profile:
    """A built-in data name (configs/data/<name>.yaml) or the path of a YAML data file, read and checked."""
    name = str(name)
    if name.endswith((".yaml", ".yml")) or os.sep in name:
        path = Path(name).expanduser()
        if not path.is_file():
            raise DataError(f"data file {name} not found")
        return read_profile(path.resolve(), str(path.resolve()))
    path = PROFILE_DIR / f"{name}.yaml"
    if not path.is_file():
        known = ", ".join(sorted(p.stem for p in PROFILE_DIR.glob("*.yaml")))
        raise DataError(f"unknown data {name!r}: give a built-in name ({known}) or the path of a YAML data file "
                        "(README.md, 'Your own data')")
    return read_profile(path, name)


def short_name(name: str) -> str:
    """How runs are named after their data: the built-in name, or the data file's name without suffix."""
    return Path(name).stem if str(name).endswith((".yaml", ".yml")) else str(name)


def read_profile(path: Path, name: str) -> Profile:
    try:
        with open(path, encoding="utf-8") as f:
            spec = yaml.safe_load(f) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(spec, dict):
        raise DataError(f"{path}: expected a mapping of settings and splits at the top level")
    for key, value in spec.items():
        if key not in _TOP_KEYS and key not in SPLITS:
            raise DataError(
                f"{path}: unknown key {key!r}; splits: {', '.join(SPLITS)}; settings: {', '.join(_TOP_KEYS)}"
            )
        if key in _TOP_KEYS and not _is(value, _TOP_KEYS[key]):
            raise DataError(f"{path}: {key} should be a {_TOP_KEYS[key].__name__}, got {value!r}")
    if spec.get("on_error", "raise") not in ("raise", "skip"):
        raise DataError(f"{path}: on_error is {spec['on_error']!r}, not 'raise' or 'skip'")
    if not 0 < spec.get("eval_share", 0.05) < 1:
        raise DataError(f"{path}: eval_share should be between 0 and 1, got {spec['eval_share']!r}")
    splits = {}
    for split in SPLITS:
        if split in spec:
            entries = spec[split] if isinstance(spec[split], list) else [spec[split]]
            if not entries:
                raise DataError(f"{path}: {split} lists no sources")
            splits[split] = tuple(_source(path, split, e) for e in entries)
    if not splits:
        raise DataError(f"{path}: names no split; give at least one of {', '.join(SPLITS)}")
    top = {k: spec[k] for k in ("template", "on_error", "tokenizer_vocab", "eval_share", "seed", "gold") if k in spec}
    references = tuple((str(k), float(v)) for k, v in (spec.get("rm_references") or {}).items())
    return Profile(name, splits, rm_references=references, file=str(path), **top)


def _is(value, kind) -> bool:
    if kind is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, kind)


def _source(profile_path: Path, split: str, entry) -> Source:
    where = f"{profile_path}: {split}"
    if isinstance(entry, str):
        entry = {"path": entry}
    if not isinstance(entry, dict):
        raise DataError(f"{where}: a source is a mapping with at least 'path', got {entry!r}")
    for key, value in entry.items():
        if key not in _SOURCE_KEYS:
            raise DataError(f"{where}: unknown source key {key!r}; known: {', '.join(_SOURCE_KEYS)}")
        if value is not None and not _is(value, _SOURCE_KEYS[key]):
            raise DataError(f"{where}: {key} should be a {_SOURCE_KEYS[key].__name__}, got {value!r}")
    if not entry.get("path"):
        raise DataError(f"{where}: a source needs a 'path' (a local file or a hub data-set id)")
    fmt = entry.get("format", "records")
    if fmt not in FORMATS:
        raise DataError(f"{where}: unknown format {fmt!r}; known: {', '.join(FORMATS)}")
    fields = entry.get("fields") or {}
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in fields.items()):
        raise DataError(f"{where}: fields maps our field names to the file's, both strings")
    keep = entry.get("keep") or []
    if not all(isinstance(k, str) and k and k not in OURS and not k.startswith("_") for k in keep):
        raise DataError(f"{where}: keep lists the names of more fields to keep, none of {', '.join(OURS)}")
    raw = os.path.expandvars(str(entry["path"]))
    local = Path(raw).expanduser()
    local = local if local.is_absolute() else profile_path.parent / local
    # A path that exists, or that names a data file, is local; anything else is a hub data-set id.
    is_file = local.exists() or raw.endswith(FILE_TYPES) or raw.startswith((".", "/", "~"))
    return Source(str(local.resolve()) if is_file else raw, fmt, entry.get("start") or 0, entry.get("stop"),
                  tuple(sorted(fields.items())), entry.get("hub_split") or "train", tuple(keep))


# ---- reading sources ---------------------------------------------------------------------------------


def read_jsonl(path: str | Path) -> list[dict]:
    """Objects of a .jsonl(.gz) file this project wrote (logs), each with its line number under '_line'."""
    return [
        {**r, "_line": int(r.pop("_where").rsplit(":", 1)[1])}
        for r in _jsonl_records(Path(path), _read_bytes(Path(path)))
        if "_error" not in r
    ]


def _read_bytes(path: Path) -> bytes:
    """The file's bytes, gunzipped for .gz; a missing, unreadable or truncated file is one DataError line."""
    try:
        if path.name.endswith(".gz"):
            with gzip.open(path, "rb") as f:
                return f.read()
        return path.read_bytes()
    except FileNotFoundError:
        raise DataError(f"{path}: no such file") from None
    except EOFError:
        raise DataError(f"{path}: truncated gzip file: it ends before its compressed data does "
                        "(copy or compress it again)") from None
    except gzip.BadGzipFile:
        raise DataError(f"{path}: not a gzip file, though its name ends in .gz") from None
    except zlib.error as e:
        raise DataError(f"{path}: corrupt gzip data ({e})") from None
    except OSError as e:
        raise DataError(f"{path}: cannot be read ({e.strerror or e})") from None


def _jsonl_records(path: Path, raw: bytes) -> list[dict]:
    """One record per non-blank line, '_where' = file:line. A line that is not valid UTF-8 or JSON, or not an
    object, becomes a record carrying '_error', so that on_error decides between stopping and skipping."""
    records, offset = [], 0
    for lineno, line in enumerate(raw.split(b"\n"), 1):
        where = f"{path}:{lineno}"
        start, offset = offset, offset + len(line) + 1
        if lineno == 1 and line.startswith(b"\xef\xbb\xbf"):  # a byte-order mark, as some editors write
            line, start = line[3:], 3
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError as e:
            records.append({"_error": f"invalid UTF-8 at byte offset {start + e.start} of the file", "_where": where})
            continue
        if not text.strip():
            continue
        try:
            record = json.loads(text)
        except json.JSONDecodeError as e:
            records.append({"_error": f"not valid JSON ({e.msg} at column {e.colno})", "_where": where})
            continue
        if not isinstance(record, dict):
            records.append({"_error": f"expected a JSON object, got {_json_type(record)}", "_where": where})
            continue
        records.append({**record, "_where": where})
    return records


def _json_type(value) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean", type(None): "null"}.get(
        type(value), "a number")


def _json_list(path: Path, raw: bytes) -> list[dict]:
    """A .json file holding one list of records."""
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise DataError(f"{path}:{line}: invalid UTF-8 at byte offset {e.start} of the file") from None
    if not text.strip():
        raise DataError(f"{path}: empty file")
    try:
        rows = json.loads(text)
    except json.JSONDecodeError as e:
        if e.msg == "Extra data":
            hint = " (one JSON object per line? name the file .jsonl)" if text.lstrip().startswith("{") else ""
            raise DataError(f"{path}:{e.lineno}: unexpected data after the end of the JSON document{hint}") from None
        raise DataError(f"{path}:{e.lineno}: not valid JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(rows, list):
        keys = f" with keys {', '.join(list(rows)[:5])}" if isinstance(rows, dict) else ""
        raise DataError(f"{path}: expected a JSON list of records, got {_json_type(rows)}{keys}")
    return [{**r, "_where": f"{path}: record {i}"} if isinstance(r, dict) else
            {"_error": f"expected a JSON object, got {_json_type(r)}", "_where": f"{path}: record {i}"}
            for i, r in enumerate(rows)]


def _parquet(path: Path) -> list[dict]:
    import pyarrow.parquet as pq

    if not path.is_file():
        raise DataError(f"{path}: no such file")
    try:
        rows = pq.read_table(path).to_pylist()
    except Exception as e:  # noqa: BLE001 - pyarrow raises several types for a damaged file
        raise DataError(f"{path}: not a readable Parquet file ({str(e).splitlines()[0]})") from None
    return [{**r, "_where": f"{path}: row {i}"} for i, r in enumerate(rows)]


def _hub(source: Source) -> list[dict]:
    from datasets import load_dataset

    try:
        rows = load_dataset(source.path, split=source.hub_split)
    except Exception as e:  # noqa: BLE001 - no network, unknown id, unknown split: one line that says what to do
        raise DataError(f"data set {source.path!r} (split {source.hub_split}) could not be loaded: "
                        f"{str(e).splitlines()[0] if str(e) else type(e).__name__}. Without network, download it "
                        "elsewhere and give the local file's path (.json, .jsonl, .jsonl.gz, .parquet)") from None
    return [{**r, "_where": f"{source.path}[{source.hub_split}]: record {i}"} for i, r in enumerate(rows)]


def read_source(source: Source) -> list[dict]:
    """The raw records of a local file or a hub data set, each with '_where' naming it for messages."""
    path = Path(source.path)
    if not source.is_file:
        records = _hub(source)
    elif path.name.endswith(".parquet"):
        records = _parquet(path)
    elif path.name.endswith((".json", ".json.gz")):
        records = _json_list(path, _read_bytes(path))
    elif path.name.endswith((".jsonl", ".jsonl.gz", ".gz")):
        records = _jsonl_records(path, _read_bytes(path))
    elif not path.exists():
        raise DataError(f"{path}: no such file")
    else:
        raise DataError(f"{path}: unknown file type; use {', '.join(FILE_TYPES)}")
    if not records:
        raise DataError(f"{path}: empty file (no records)")
    return records[source.start : source.stop]


# ---- parsing formats into record shapes --------------------------------------------------------------


def _text(record: dict, name: str, fields: dict, allow_empty: bool = False) -> str:
    value = record.get(fields.get(name, name))
    if value is None:
        raise DataError(
            f"field '{fields.get(name, name)}' is {'null' if fields.get(name, name) in record else 'missing'}"
        )
    if not isinstance(value, str):
        raise DataError(f"field '{fields.get(name, name)}' is {_json_type(value)}, not a string")
    if not allow_empty and not value.strip():
        raise DataError(f"field '{fields.get(name, name)}' is empty")
    return _encodable(value, f"field '{fields.get(name, name)}'")


def _encodable(text: str, where: str) -> str:
    """text, if it is valid Unicode: JSON can escape half of a UTF-16 surrogate pair alone ("\\ud800"), which
    Python reads into a string that no tokenizer, file or terminal takes."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise DataError(f"{where} holds a lone surrogate ({text[e.start]!a} at character {e.start}): "
                        "half of a UTF-16 pair escaped alone, not text") from None
    return text


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
    for i, m in enumerate(value):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise DataError(f"{where} holds a message without string 'role' and 'content'")
        if m["role"] not in ROLES:
            raise DataError(f"{where}: message {i} has role {m['role']!a}; roles are {', '.join(ROLES)}")
        _encodable(m["content"], f"{where}: message {i}")
    return [{"role": m["role"], "content": m["content"]} for m in value]


def parse(record: dict, fmt: str, kind: str, fields: dict) -> dict:
    """One raw record -> the record shape of `kind` (sft, prefs, prompts); DataError says what is wrong."""
    if "_error" in record:
        raise DataError(record["_error"])
    if fmt == "records":
        prompt = record.get(fields.get("prompt", "prompt"))
        out = {
            "prompt": _messages(prompt, "field 'prompt'")
            if isinstance(prompt, list)
            else _text(record, "prompt", fields)
        }
        names = {"sft": ("completion",), "prefs": ("chosen", "rejected"), "prompts": ()}[kind]
        out.update({n: _text(record, n, fields) for n in names})
    elif fmt == "alpaca":
        instruction = _text(record, "instruction", fields)
        extra = _text(record, "input", fields, allow_empty=True) if fields.get("input", "input") in record else ""
        out = {
            "prompt": instruction + (f"\n\n{extra}" if extra.strip() else ""),
            "completion": _text(record, "output", fields),
        }
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
    first: dict = dataclasses.field(default_factory=dict)  # problem -> where it first occurred
    read: int = 0  # records read from the sources (before skipping and carving)
    origin: str = ""  # how the split was made: its sources, or what it was carved or taken from


def load_split(profile: str, split: str, limit: int = 0, on_error: str = "", where: bool = False) -> Loaded:
    """The records of one split of a data file (the first `limit` if > 0), parsed and checked.
    on_error: raise | skip (empty: the file's); 'collect' skips like skip, for data-check to report.
    where: keep each record's '_where' (file and line or record), for messages about it."""
    prof = get_profile(profile)
    loaded = _split(prof, split, on_error or prof.on_error)
    if not loaded.records and on_error != "collect":
        first = next(iter(loaded.first.items()), None)
        raise DataError(
            f"{prof.file}: {split}: no usable records in {loaded.origin}"
            + (f"; {sum(loaded.skipped.values())} skipped, the first: {first[1]}: {first[0]}" if first else "")
        )
    if limit:
        loaded.records = loaded.records[:limit]
    if not where:
        loaded.records = [{k: v for k, v in r.items() if k != "_where"} for r in loaded.records]
    return loaded


def _split(prof: Profile, split: str, on_error: str) -> Loaded:
    part = split.rsplit("_", 1)[1]  # train | eval
    kind = KIND[split]
    if split in prof.splits:
        loaded = _read(prof.splits[split], kind, on_error)
        paired = f"{kind}_eval"
        if part == "train" and paired not in prof.splits:  # its eval share is carved out of it
            loaded.records = _carve(loaded.records, prof, on_error)[0]
            loaded.origin += f", less the {prof.eval_share:.0%} held out as {paired}"
        return loaded
    if part == "eval" and f"{kind}_train" in prof.splits:
        loaded = _read(prof.splits[f"{kind}_train"], kind, on_error)
        loaded.records = _carve(loaded.records, prof, on_error)[1]
        loaded.origin = f"{prof.eval_share:.0%} of {kind}_train held out (seed {prof.seed})"
        return loaded
    if kind == "prompts" and ("prefs_train" in prof.splits or f"prefs_{part}" in prof.splits):
        loaded = _split(prof, f"prefs_{part}", on_error)
        loaded.records = [{k: v for k, v in r.items() if k not in ("chosen", "rejected")} for r in loaded.records]
        loaded.origin = f"the prompts of prefs_{part} ({loaded.origin})"
        return loaded
    need = f"{kind}_train" if part == "eval" else split
    raise DataError(f"{prof.file}: no {split} split, which {NEEDED_BY[kind]} needs: add `{need}: {{path: ..., "
                    "format: ...}` to it" + (" (prompts_* can also come from prefs_*)" if kind == "prompts" else ""))


def _carve(records: list[dict], prof: Profile, on_error: str) -> tuple[list[dict], list[dict]]:
    """(train, eval): a seeded random eval_share of the records held out, both kept in file order."""
    if len(records) < 2 and on_error == "collect":  # data-check reports the records' own problems instead
        return records, []
    if len(records) < 2:
        raise DataError(f"{prof.file}: {len(records)} usable record(s): too few to hold some out for evaluation; "
                        "name an *_eval split")
    n_eval = min(len(records) - 1, max(1, round(prof.eval_share * len(records))))
    held = set(random.Random(prof.seed).sample(range(len(records)), n_eval))
    return ([r for i, r in enumerate(records) if i not in held], [r for i, r in enumerate(records) if i in held])


def _read(sources: tuple[Source, ...], kind: str, on_error: str) -> Loaded:
    records, skipped, first, read = [], Counter(), {}, 0
    for source in sources:
        raw = read_source(source)
        read += len(raw)
        for r in raw:
            try:
                records.append({**parse(r, source.format, kind, dict(source.fields)), **_kept(r, source.keep),
                                "_where": r["_where"]})
            except DataError as e:
                if on_error not in ("skip", "collect"):
                    raise DataError(f"{r['_where']}: {e}") from None
                skipped[str(e)] += 1
                first.setdefault(str(e), r["_where"])
    origin = " + ".join(f"{s.path} ({s.format}{_range(s)})" for s in sources)
    return Loaded(records, skipped, first, read, origin)


def _kept(record: dict, keep: tuple[str, ...]) -> dict:
    """The fields a source keeps (its `keep`), as they are; a record without one is a DataError."""
    missing = [k for k in keep if k not in record]
    if missing:
        raise DataError(f"no field {missing[0]!r}, which the data file keeps (keep: {', '.join(keep)})")
    return {k: record[k] for k in keep}


def _range(source: Source) -> str:
    return (
        f", records {source.start}:{source.stop if source.stop is not None else ''}"
        if source.start or source.stop
        else ""
    )


def load(profile: str, split: str, limit: int = 0, on_error: str = "") -> list[dict]:
    loaded = load_split(profile, split, limit, on_error)
    if loaded.skipped:
        print(
            f"[data] {short_name(profile)}/{split}: skipped {sum(loaded.skipped.values())} records: "
            f"{dict(loaded.skipped)}"
        )
    return loaded.records


def fingerprint(profile: str, splits: list[str]) -> str:
    """sha256 over the data file's settings and the sources a stage's splits are made from (their bytes for
    local files, the id for hub data sets), so a checkpoint says what it saw."""
    prof = get_profile(profile)
    h = hashlib.sha256(json.dumps([prof.eval_share, prof.seed, prof.on_error]).encode())
    for split in splits:
        kind, part = KIND[split], split.rsplit("_", 1)[1]
        made_of = [s for s in (split, f"{kind}_train", f"prefs_{part}", "prefs_train") if s in prof.splits][:1]
        for name in made_of:
            for source in prof.splits[name]:
                h.update(f"{split}<-{name}:{source.format}:{source.start}:{source.stop}:{source.fields}".encode())
                if source.keep:  # (only then: the fingerprints of files without it stay as they were)
                    h.update(f"keep:{source.keep}".encode())
                h.update(
                    Path(source.path).read_bytes()
                    if source.is_file and Path(source.path).is_file()
                    else source.path.encode()
                )
    return h.hexdigest()


def corpus(profile: str, format_prompt) -> list[str]:
    """The text a tiny twin's tokenizer is trained on for this data: templated prompts and responses of the
    splits the file has."""
    prof, texts = get_profile(profile), []
    if "sft_train" in prof.splits:
        texts += [
            format_prompt(r["prompt"]) + r["completion"]
            for r in load_split(profile, "sft_train", on_error="skip").records
        ]
    if "prefs_train" in prof.splits:
        for r in load_split(profile, "prefs_train", on_error="skip").records:
            texts += [r["chosen"], r["rejected"]]
    if not texts:
        texts = [format_prompt(r["prompt"]) for r in load_split(profile, "prompts_train", on_error="skip").records]
    return texts
