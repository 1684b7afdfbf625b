"""Data files and loaders: the real files in ../shared/data, YAML data files, and malformed files with exact
messages and counts (as the stages and `make data-check` see them)."""

import gzip
import json

import pytest

from alignment import data, data_check, registry
from alignment.data import DataError

REAL = pytest.mark.skipif(not data.HH.is_file() or not data.ALPACA.is_file(),
                          reason=f"real data not found under {data.SHARED_DATA} (see ../shared/data/README.md)")


@REAL
def test_hh_rlhf_profile_handles_the_known_quirks():
    train = data.load_split("hh-rlhf", "prefs_train")
    assert len(train.records) == 1992  # first 2,000 pairs less the known quirks
    assert dict(train.skipped) == {"the final Assistant turn of chosen is empty": 4,
                                   "chosen and rejected differ before the final Assistant turn": 4}
    held_out = data.load_split("hh-rlhf", "prefs_eval")
    assert len(held_out.records) + sum(held_out.skipped.values()) == 312
    assert held_out.skipped["chosen and rejected differ before the final Assistant turn"] == 1  # line 2036
    pair = train.records[0]
    assert pair["prompt"][0] == {"role": "user", "content": "what are some pranks with a pen i can do?"}
    roles = [m["role"] for m in pair["prompt"]]
    assert len(roles) > 1 and roles == ["user", "assistant"] * (len(roles) // 2) + ["user"]  # multi-turn history
    assert pair["chosen"].startswith(" No, sorry!  All of these involve a pen") and pair["chosen"] != pair["rejected"]


@REAL
def test_hh_strict_mode_names_the_record():
    with pytest.raises(DataError, match=r"test.jsonl.gz:87: the final Assistant turn of chosen is empty"):
        data.load("hh-rlhf", "prefs_train", on_error="raise")  # 0-based line 86


@REAL
def test_alpaca_and_hh_prompts_and_sft_mix():
    sft = data.load_split("hh-rlhf", "sft_train")
    assert len(sft.records) == 4798 + 1992  # Alpaca (2 empty outputs skipped) + chosen hh dialogues
    assert sft.skipped["field 'output' is empty"] == 2
    with_input = next(r for r in sft.records if "\n\n" in r["prompt"] if isinstance(r["prompt"], str))
    assert with_input["completion"]
    prompts = data.load("hh-rlhf", "prompts_eval")
    assert all(isinstance(p["prompt"], list) and p["prompt"][-1]["role"] == "user" for p in prompts)


@REAL
def test_templates_render_hh_dialogues():
    prompt = data.load("hh-rlhf", "prefs_train")[0]["prompt"]
    text = registry.render("human_assistant", prompt)
    assert text.startswith("\n\nHuman: what are some pranks") and text.endswith("\n\nAssistant:")
    users = sum(m["role"] == "user" for m in prompt)
    assert text.count("\n\nHuman:") == users and text.count("\n\nAssistant:") == users
    assert registry.render("chatml", prompt).endswith("<|im_start|>assistant\n")
    assert registry.render("llama2", prompt).startswith("[INST] what are some pranks")
    assert registry.render("llama3", "hi").endswith("<|start_header_id|>assistant<|end_header_id|>\n\n")



def data_file(tmp_path, content, fmt="records", split="prefs_train", name="bad.jsonl", on_error="raise", extra=""):
    """Writes content (text or bytes) to name and a YAML data file naming it for split; returns the YAML's path."""
    path = tmp_path / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    yaml_path = tmp_path / "data.yaml"
    yaml_path.write_text(f"on_error: {on_error}\n{split}: {{path: {name}, format: {fmt}}}\n{extra}")
    return str(yaml_path)


def gz(text: str) -> bytes:
    return gzip.compress(text.encode())


PAIR = '{"prompt": "p", "chosen": "a", "rejected": "b"}\n'
HH_OK = '{"chosen": "\\n\\nHuman: hi\\n\\nAssistant: x", "rejected": "\\n\\nHuman: hi\\n\\nAssistant: y"}\n'

# (format, split, file name, content, the one line expected: file, line or record, problem)
MALFORMED = [
    ("records", "sft_train", "bad.jsonl", '{"prompt": "p"}', "bad.jsonl:1: field 'completion' is missing"),
    (
        "records",
        "sft_train",
        "bad.jsonl",
        '{"prompt": "p", "completion": null}',
        "bad.jsonl:1: field 'completion' is null",
    ),
    (
        "records",
        "sft_train",
        "bad.jsonl",
        '{"prompt": "p", "completion": 5}',
        "bad.jsonl:1: field 'completion' is a number, not a string",
    ),
    (
        "records",
        "sft_train",
        "bad.jsonl",
        '{"prompt": "p", "completion": "  "}',
        "bad.jsonl:1: field 'completion' is empty",
    ),
    (
        "records",
        "prefs_train",
        "bad.jsonl",
        '{"prompt": "p", "chosen": "a", "rejected": "a"}',
        "bad.jsonl:1: chosen and rejected are identical",
    ),
    ("records", "prefs_train", "bad.jsonl", "[1, 2]", "bad.jsonl:1: expected a JSON object, got a list"),
    ("records", "sft_train", "bad.jsonl", '{"prompt": "p", "completion": "c"', "bad.jsonl:1: not valid JSON"),
    (
        "hh",
        "prefs_train",
        "bad.jsonl",
        '{"chosen": "\\n\\nHuman: hi", "rejected": "\\n\\nHuman: hi\\n\\nAssistant: yo"}',
        "bad.jsonl:1: the chosen dialogue has no final Assistant turn",
    ),
    (
        "hh",
        "prefs_train",
        "bad.jsonl",
        '{"chosen": "\\n\\nHuman: hi\\n\\nAssistant:", "rejected": "\\n\\nHuman: hi\\n\\nAssistant: yo"}',
        "bad.jsonl:1: the final Assistant turn of chosen is empty",
    ),
    (
        "hh",
        "prefs_train",
        "bad.jsonl",
        '{"chosen": "\\n\\nHuman: a\\n\\nAssistant: x", "rejected": "\\n\\nHuman: b\\n\\nAssistant: y"}',
        "bad.jsonl:1: chosen and rejected differ before the final Assistant turn",
    ),
    (
        "hh",
        "prefs_train",
        "bad.jsonl",
        '{"chosen": "\\n\\nAssistant: x", "rejected": "\\n\\nAssistant: y"}',
        "bad.jsonl:1: no prompt before the response",
    ),
    (
        "alpaca",
        "sft_train",
        "bad.jsonl",
        '{"instruction": "do", "input": "", "output": ""}',
        "bad.jsonl:1: field 'output' is empty",
    ),
    ("alpaca", "sft_train", "bad.jsonl", '{"input": "", "output": "x"}', "bad.jsonl:1: field 'instruction' is missing"),
    (
        "messages",
        "sft_train",
        "bad.jsonl",
        '{"messages": [{"role": "user", "content": "hi"}]}',
        "bad.jsonl:1: the conversation does not end with an assistant message",
    ),
    (
        "messages",
        "sft_train",
        "bad.jsonl",
        '{"messages": [{"role": "user"}]}',
        "bad.jsonl:1: field 'messages' holds a message without",
    ),
    (
        "messages",
        "sft_train",
        "bad.jsonl",
        '{"messages": [{"role": "user", "content": "hi"}, {"role": "bot", "content": "yo"}]}',
        "bad.jsonl:1: field 'messages': message 1 has role 'bot'; roles are system, user, assistant",
    ),
    (
        "messages",
        "prefs_train",
        "bad.jsonl",
        ('{"chosen": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "x"}], '
        '"rejected": [{"role": "user", "content": "b"}, {"role": "assistant", "content": "y"}]}'),
        "bad.jsonl:1: chosen and rejected differ before the final assistant message",
    ),
    (
        "records",
        "prefs_train",
        "bad.json",
        '{"data": [1]}',
        "bad.json: expected a JSON list of records, got an object with keys data",
    ),
    (
        "records",
        "prefs_train",
        "bad.json",
        "[" + PAIR.strip() + "] trailing",
        "bad.json:1: unexpected data after the end of the JSON document",
    ),
    (
        "records",
        "prefs_train",
        "bad.json",
        PAIR + PAIR,
        ("bad.json:2: unexpected data after the end of the JSON document (one JSON object per line? name the file "
        ".jsonl)"),
    ),
    (
        "records",
        "prefs_train",
        "bad.json",
        "[1, " + PAIR.strip() + "]",
        "bad.json: record 0: expected a JSON object, got a number",
    ),
    ("records", "prefs_train", "bad.jsonl", "", "bad.jsonl: empty file (no records)"),
    ("records", "prefs_train", "bad.jsonl", "\n\n  \n", "bad.jsonl: empty file (no records)"),
    ("records", "prefs_train", "bad.json", "", "bad.json: empty file"),
    (
        "records",
        "prefs_train",
        "bad.jsonl",
        PAIR.encode() + b'{"prompt": "p\xff", "chosen": "a", "rejected": "b"}\n',
        f"bad.jsonl:2: invalid UTF-8 at byte offset {len(PAIR) + 13} of the file",
    ),
    (
        "records",
        "prefs_train",
        "bad.json",
        b'[{"prompt": "caf\xe9", "chosen": "a", "rejected": "b"}]',
        "bad.json:1: invalid UTF-8 at byte offset 16 of the file",
    ),
    ("records", "prefs_train", "bad.jsonl.gz", gz(PAIR * 200)[:-30], "bad.jsonl.gz: truncated gzip file"),
    (
        "records",
        "prefs_train",
        "bad.jsonl.gz",
        PAIR.encode(),
        "bad.jsonl.gz: not a gzip file, though its name ends in .gz",
    ),
    ("records", "prefs_train", "bad.csv", "prompt,chosen,rejected\n", "bad.csv: unknown file type"),
    # JSON escapes of half a UTF-16 pair read into strings no tokenizer or terminal takes
    ("records", "prefs_train", "bad.jsonl", '{"prompt": "p\\ud800", "chosen": "a", "rejected": "b"}',
     "bad.jsonl:1: field 'prompt' holds a lone surrogate ('\\ud800' at character 1)"),
    ("records", "sft_train", "bad.jsonl", '{"prompt": [{"role": "user", "content": "\\udfff"}], "completion": "c"}',
     "bad.jsonl:1: field 'prompt': message 0 holds a lone surrogate"),
    ("alpaca", "sft_train", "bad.json", '[{"instruction": "i", "input": "\\udc80", "output": "o"}]',
     "bad.json: record 0: field 'input' holds a lone surrogate"),
    ("hh", "prefs_train", "bad.jsonl", ('{"chosen": "\\n\\nHuman: hi\\n\\nAssistant: \\ud83d", '
                                        '"rejected": "\\n\\nHuman: hi\\n\\nAssistant: y"}'),
     "bad.jsonl:1: field 'chosen' holds a lone surrogate"),
]


@pytest.mark.parametrize(
    "fmt, split, name, content, message", MALFORMED, ids=[m[-1].split(": ", 1)[1][:40] for m in MALFORMED]
)
def test_malformed_file_is_one_line_naming_file_record_and_problem(
    tmp_path, fmt, split, name, content, message, capsys
):
    yaml_path = data_file(tmp_path, content, fmt, split, name)
    with pytest.raises(DataError) as e:
        data.load(yaml_path, split)
    assert str(tmp_path / message) in str(e.value) and "\n" not in str(e.value)
    # make data-check: exit 1, and the same problem on one line that names the file
    assert data_check.main([yaml_path, "count_tokens=false"]) == 1
    out = capsys.readouterr().out
    lines = [line for line in out.splitlines() if str(tmp_path / message) in line]
    assert len(lines) == 1, out  # splits made from the same file refer to it: "as prefs_train, above"


def test_data_check_reports_a_huge_response_and_odd_but_valid_files_load(tmp_path, capsys):
    huge = json.dumps({"prompt": "p", "completion": "word " * 5000})
    lines = ['{"prompt": "p", "completion": "c"}\r', "", "   ", huge, '{"prompt": "q", "completion": "d"}', ""]
    yaml_path = data_file(tmp_path, "\ufeff" + "\n".join(lines), split="sft_train", name="odd.jsonl",
                          extra="sft_eval: {path: odd.jsonl}\n")
    assert len(data.load(yaml_path, "sft_train")) == 3  # a byte-order mark, CRLF and blank lines are fine
    assert data_check.main([yaml_path, "model=tiny-llama"]) == 0
    out = capsys.readouterr().out
    assert (
        f"1 longer than sft.max_length=512 tokens (the prompt loses its beginning); first: {tmp_path}/odd.jsonl:4"
        in out
    )
    assert "first record" in out and "### Instruction:" in out
    assert "data-check: ok" in out


def test_skip_mode_counts_each_problem_and_data_check_passes(tmp_path, capsys):
    lines = [
        PAIR.strip(),
        '{"prompt": "p", "chosen": "a", "rejected": "a"}',
        '{"prompt": "p", "chosen": "", "rejected": "b"}',
        '{"prompt": "p", "chosen": "a", "rejected": "a"}',
        "not json",
    ]
    yaml_path = data_file(tmp_path, "\n".join(lines) + "\n", on_error="skip", extra="prefs_eval: bad.jsonl\n")
    loaded = data.load_split(yaml_path, "prefs_train")
    assert len(loaded.records) == 1
    assert dict(loaded.skipped) == {"chosen and rejected are identical": 2, "field 'chosen' is empty": 1,
                                    "not valid JSON (Expecting value at column 1)": 1}
    assert data_check.main([yaml_path, "count_tokens=false"]) == 0
    out = capsys.readouterr().out
    assert f"skipped: {tmp_path}/bad.jsonl:2: chosen and rejected are identical (and 1 more)" in out


def test_formats_and_field_mapping(tmp_path):
    alpaca = tmp_path / "a.json"
    alpaca.write_text(json.dumps([{"instruction": "Add", "input": "1 and 2", "output": "3"},
                                  {"instruction": "Say hi", "input": "", "output": "hi"}]))
    other = tmp_path / "o.jsonl.gz"
    other.write_bytes(gz(json.dumps({"question": "q", "good": "g", "bad": "b"}) + "\n"))
    conv = tmp_path / "c.jsonl"
    conv.write_text(
        json.dumps({"messages": [{"role": "user", "content": "u"}, {"role": "assistant", "content": "a"}]}) + "\n"
    )
    (tmp_path / "d.yaml").write_text(
        "sft_train: {path: a.json, format: alpaca}\nsft_eval: {path: c.jsonl, format: messages}\n"
        "prefs_train: {path: o.jsonl.gz, fields: {prompt: question, chosen: good, rejected: bad}}\n"
        "prefs_eval: o.jsonl.gz\n"
    )
    d = str(tmp_path / "d.yaml")
    assert data.load(d, "sft_train") == [
        {"prompt": "Add\n\n1 and 2", "completion": "3"},
        {"prompt": "Say hi", "completion": "hi"},
    ]
    assert data.load(d, "prefs_train") == [{"prompt": "q", "chosen": "g", "rejected": "b"}]
    assert data.load(d, "sft_eval") == [{"prompt": [{"role": "user", "content": "u"}], "completion": "a"}]
    assert data.load(d, "prompts_train") == [{"prompt": "q"}]  # prompts_* come from prefs_*
    with pytest.raises(DataError, match="field 'prompt' is missing"):  # prefs_eval names no field mapping
        data.load(d, "prefs_eval")


def test_parquet_source(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist([{"prompt": "p", "completion": "c"}, {"prompt": "q", "completion": "d"}]),
                   tmp_path / "s.parquet")
    (tmp_path / "d.yaml").write_text("sft_train: s.parquet\nsft_eval: s.parquet\n")
    assert data.load(str(tmp_path / "d.yaml"), "sft_eval") == [
        {"prompt": "p", "completion": "c"},
        {"prompt": "q", "completion": "d"},
    ]


def test_absent_eval_splits_are_carved_from_train_seeded_and_disjoint(tmp_path):
    rows = "".join(json.dumps({"prompt": f"p{i}", "chosen": f"a{i}", "rejected": f"b{i}"}) + "\n" for i in range(100))
    (tmp_path / "pairs.jsonl").write_text(rows)
    d = tmp_path / "d.yaml"
    d.write_text("eval_share: 0.1\nprefs_train: pairs.jsonl\n")
    train, held = data.load(str(d), "prefs_train"), data.load(str(d), "prefs_eval")
    assert len(train) == 90 and len(held) == 10
    assert not {r["prompt"] for r in train} & {r["prompt"] for r in held}
    assert [r["prompt"] for r in data.load(str(d), "prompts_eval")] == [r["prompt"] for r in held]
    assert [r["prompt"] for r in data.load(str(d), "prompts_train")] == [r["prompt"] for r in train]
    assert data.load(str(d), "prefs_eval") == held  # the same records every time
    d.write_text("eval_share: 0.1\nseed: 1\nprefs_train: pairs.jsonl\n")
    assert data.load(str(d), "prefs_eval") != held  # another seed, another carve
    with pytest.raises(DataError, match=r"d.yaml: no sft_train split, which the sft stage needs: add `sft_train: "):
        data.load(str(d), "sft_train")


@pytest.mark.parametrize("text, message", [
    ("sft_tran: x.jsonl\n", "unknown key 'sft_tran'"),
    ("sft_train: {path: x.jsonl, format: csv}\n", "unknown format 'csv'; known: records, alpaca, hh, messages"),
    ("sft_train: {format: alpaca}\n", "a source needs a 'path'"),
    ("sft_train: {path: x.jsonl, colour: red}\n", "unknown source key 'colour'"),
    ("on_error: ignore\nsft_train: x.jsonl\n", "on_error is 'ignore', not 'raise' or 'skip'"),
    ("template: 5\nsft_train: x.jsonl\n", "template should be a str"),
    ("- a\n- b\n", "expected a mapping"),
    ("on_error: skip\n", "names no split"),
    ("sft_train: [x.jsonl\n", "not valid YAML"),
])
def test_data_file_mistakes_are_one_line(tmp_path, text, message):
    (tmp_path / "d.yaml").write_text(text)
    with pytest.raises(DataError) as e:
        data.get_profile(str(tmp_path / "d.yaml"))
    assert message in str(e.value) and str(tmp_path / "d.yaml") in str(e.value) and "\n" not in str(e.value)


def test_unknown_data_names_the_built_in_ones_and_what_to_do(tmp_path):
    with pytest.raises(
        DataError,
        match=r"unknown data 'alpaca': give a built-in name \(hh-rlhf, task, task-exact\) or the path of a YAML",
    ):
        data.get_profile("alpaca")
    with pytest.raises(DataError, match="data file nothere.yaml not found"):
        data.get_profile("nothere.yaml")


def test_paths_are_relative_to_the_data_file_whatever_the_working_directory(tmp_path, monkeypatch):
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "s.jsonl").write_text(
        '{"prompt": "p", "completion": "c"}\n{"prompt": "q", "completion": "d"}\n'
    )
    (tmp_path / "sub" / "d.yaml").write_text("sft_train: s.jsonl\n")
    monkeypatch.chdir(tmp_path)
    profile = data.get_profile("sub/d.yaml")
    assert profile.name == str(tmp_path / "sub" / "d.yaml")  # what manifests record: loads from anywhere
    monkeypatch.chdir("/")
    assert len(data.load(profile.name, "sft_train")) == 1 and len(data.load(profile.name, "sft_eval")) == 1
    assert data.short_name("sub/d.yaml") == "d" and data.short_name("hh-rlhf") == "hh-rlhf"


def test_built_in_data_files_read_as_before():
    task = data.get_profile("task")
    assert task.gold and set(task.splits) == set(data.SPLITS)
    assert len(data.load("task", "prompts_eval")) == 200
    hh = data.get_profile("hh-rlhf")
    assert (
        not hh.gold and hh.template == "human_assistant" and hh.on_error == "skip" and "prompts_train" not in hh.splits
    )
    assert dict(hh.rm_references)["shorter final answer wins"] == 0.571


def test_hub_ids_go_through_datasets(monkeypatch, tmp_path):
    calls = []

    def fake_load_dataset(name, split):
        calls.append((name, split))
        return [{"prompt": "p", "completion": "c"}]

    import datasets

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    (tmp_path / "d.yaml").write_text(
        "sft_train: someone/some-dataset\nsft_eval: {path: someone/some-dataset, hub_split: test}\n"
    )
    assert data.load(str(tmp_path / "d.yaml"), "sft_eval") == [{"prompt": "p", "completion": "c"}]
    assert calls == [("someone/some-dataset", "test")]

    def offline(name, split):
        raise ConnectionError("Couldn't reach 'someone/some-dataset' on the Hub (LocalEntryNotFoundError)")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(
        DataError, match=r"data set 'someone/some-dataset' \(split train\) could not be loaded: .*Without network"
    ):
        data.load(str(tmp_path / "d.yaml"), "sft_train")
