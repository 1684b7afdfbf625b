"""Data no input can crash: valid records of every format, mutated at random (Hypothesis) the ways a user's files go
wrong (fields deleted, nulled, retyped, emptied; records wrapped in lists or replaced by scalars; lines cut short;
bytes that are not UTF-8; JSON escapes of half a UTF-16 surrogate pair), give a counted skip or one line naming the
file, never a traceback: when a stage loads them (data.load, as every stage does) and in make data-check, whose
tokenizer then reads every record that loaded."""

import contextlib
import io
import json
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from alignment import data, data_check
from alignment.data import DataError

# (format, split): a valid record of it
USER, BOT = {"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}
VALID = {
    ("records", "sft_train"): {"prompt": "Say hi", "completion": "hi"},
    ("records", "prefs_train"): {"prompt": "Pick one", "chosen": "this", "rejected": "that"},
    ("records", "prompts_train"): {"prompt": [USER]},
    ("alpaca", "sft_train"): {"instruction": "Add", "input": "1 and 2", "output": "3"},
    ("hh", "prefs_train"): {"chosen": "\n\nHuman: hi\n\nAssistant: hello",
                            "rejected": "\n\nHuman: hi\n\nAssistant: go"},
    ("messages", "sft_train"): {"messages": [USER, BOT]},
    ("messages", "prefs_train"): {"chosen": [USER, BOT], "rejected": [USER, {**BOT, "content": "bye"}]},
}
ON_A_VALUE = ("delete", "null", "int", "list", "dict", "empty", "surrogate")  # at one place inside a record
ON_A_RECORD = ("wrap in a list", "scalar")
ON_A_LINE = ("cut short", "not UTF-8")


def places(value, path=()):
    """Every path to a value inside a record (keys and list indices)."""
    if isinstance(value, dict):
        for key, inner in value.items():
            yield path + (key,)
            yield from places(inner, path + (key,))
    elif isinstance(value, list):
        for i, inner in enumerate(value):
            yield path + (i,)
            yield from places(inner, path + (i,))


def mutated_value(record, path, how):
    record = json.loads(json.dumps(record))
    *parents, last = path
    holder = record
    for key in parents:
        holder = holder[key]
    if how == "delete":
        del holder[last]
    else:
        holder[last] = {"null": None, "int": 7, "list": ["x"], "dict": {"a": 1}, "empty": "",
                        "surrogate": "half \ud800 a pair"}[how]
    return record


@st.composite
def broken_file(draw):
    (fmt, split), record = draw(st.sampled_from(sorted(VALID.items())))
    records = [json.loads(json.dumps(record)) for _ in range(draw(st.integers(2, 4)))]
    lines = []
    for mutation in draw(st.lists(st.sampled_from(ON_A_VALUE + ON_A_RECORD + ON_A_LINE), min_size=1, max_size=3)):
        i = draw(st.integers(0, len(records) - 1))
        if mutation in ON_A_VALUE:
            if paths := list(places(records[i])):  # (none in a record made a scalar already)
                records[i] = mutated_value(records[i], draw(st.sampled_from(paths)), mutation)
        elif mutation == "wrap in a list":
            records[i] = [records[i]]
        elif mutation == "scalar":
            records[i] = draw(st.sampled_from([3, "text", None, True]))
        else:
            lines.append((i, mutation))
    text = [json.dumps(r).encode() for r in records]  # (escapes a lone surrogate as JSON does: \ud800)
    for i, mutation in lines:
        text[i] = text[i][: len(text[i]) // 2] if mutation == "cut short" else text[i][:3] + b"\xff\xfe" + text[i][3:]
    return fmt, split, b"\n".join(text) + b"\n"


@pytest.mark.usefixtures("tiny_cache")
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(broken_file(), st.sampled_from(["raise", "skip"]))
def test_mutated_records_of_every_format_are_one_line_or_a_counted_skip(case, on_error):
    fmt, split, content = case
    with tempfile.TemporaryDirectory() as folder:
        folder = Path(folder)
        (folder / "mine.jsonl").write_bytes(content)
        (folder / "mine.yaml").write_text(f"on_error: {on_error}\n{split}: {{path: mine.jsonl, format: {fmt}}}\n")
        try:
            loaded = data.load_split(str(folder / "mine.yaml"), split)
        except DataError as e:  # one line, naming the file (and the record where there is one)
            assert "\n" not in str(e) and "mine." in str(e), str(e)
        else:
            assert on_error == "skip" or not loaded.skipped
            for r in loaded.records:  # what loaded is text a tokenizer and a terminal take
                json.dumps(r, ensure_ascii=False).encode("utf-8")
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            code = data_check.main([str(folder / "mine.yaml")])  # tokenizes what loaded, prints a first record
        assert code in (0, 1)
        assert "Traceback" not in out.getvalue()
