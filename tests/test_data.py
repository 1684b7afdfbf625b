"""Loaders on the real files in ../shared/data and on malformed files: exact messages and counts."""

import gzip
import json

import pytest

from alignment import data, registry
from alignment.data import DataError, Profile, Source

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


def profile_of(tmp_path, monkeypatch, text, fmt, split="prefs_train", name="bad.jsonl", on_error="raise"):
    path = tmp_path / name
    path.write_text(text)
    monkeypatch.setitem(data.PROFILES, "t", Profile({split: Source(str(path), fmt)}, on_error=on_error))
    return path


@pytest.mark.parametrize("fmt, split, line, message", [
    ("records", "sft_train", '{"prompt": "p"}', "bad.jsonl:1: field 'completion' is missing"),
    ("records", "sft_train", '{"prompt": "p", "completion": 5}', "bad.jsonl:1: field 'completion' is a int, not a string"),
    ("records", "sft_train", '{"prompt": "p", "completion": "  "}', "bad.jsonl:1: field 'completion' is empty"),
    ("records", "prefs_train", '{"prompt": "p", "chosen": "a", "rejected": "a"}', "bad.jsonl:1: chosen and rejected are identical"),
    ("records", "prefs_train", '[1, 2]', "bad.jsonl:1: expected a JSON object, got list"),
    ("hh", "prefs_train", '{"chosen": "\\n\\nHuman: hi", "rejected": "\\n\\nHuman: hi\\n\\nAssistant: yo"}',
     "bad.jsonl:1: the chosen dialogue has no final Assistant turn"),
    ("hh", "prefs_train", '{"chosen": "\\n\\nHuman: hi\\n\\nAssistant:", "rejected": "\\n\\nHuman: hi\\n\\nAssistant: yo"}',
     "bad.jsonl:1: the final Assistant turn of chosen is empty"),
    ("hh", "prefs_train", '{"chosen": "\\n\\nHuman: a\\n\\nAssistant: x", "rejected": "\\n\\nHuman: b\\n\\nAssistant: y"}',
     "bad.jsonl:1: chosen and rejected differ before the final Assistant turn"),
    ("hh", "prefs_train", '{"chosen": "\\n\\nAssistant: x", "rejected": "\\n\\nAssistant: y"}', "bad.jsonl:1: no prompt before the response"),
    ("alpaca", "sft_train", '{"instruction": "do", "input": "", "output": ""}', "bad.jsonl:1: field 'output' is empty"),
    ("alpaca", "sft_train", '{"input": "", "output": "x"}', "bad.jsonl:1: field 'instruction' is missing"),
    ("messages", "sft_train", '{"messages": [{"role": "user", "content": "hi"}]}',
     "bad.jsonl:1: the conversation does not end with an assistant message"),
    ("messages", "sft_train", '{"messages": [{"role": "user"}]}', "bad.jsonl:1: field 'messages' holds a message without"),
    ("messages", "prefs_train", '{"chosen": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "x"}], '
     '"rejected": [{"role": "user", "content": "b"}, {"role": "assistant", "content": "y"}]}',
     "bad.jsonl:1: chosen and rejected differ before the final assistant message"),
    ("records", "sft_train", '{"prompt": "p", "completion": "c"', "bad.jsonl:1: not valid JSON"),
])
def test_malformed_record_names_file_line_and_problem(tmp_path, monkeypatch, fmt, split, line, message):
    profile_of(tmp_path, monkeypatch, line + "\n", fmt, split)
    with pytest.raises(DataError) as e:
        data.load("t", split)
    assert message in str(e.value)


def test_skip_mode_counts_each_problem(tmp_path, monkeypatch):
    lines = ['{"prompt": "p", "chosen": "a", "rejected": "b"}', '{"prompt": "p", "chosen": "a", "rejected": "a"}',
             '{"prompt": "p", "chosen": "", "rejected": "b"}', '{"prompt": "p", "chosen": "a", "rejected": "a"}']
    profile_of(tmp_path, monkeypatch, "\n".join(lines) + "\n", "records", on_error="skip")
    loaded = data.load_split("t", "prefs_train")
    assert len(loaded.records) == 1
    assert dict(loaded.skipped) == {"chosen and rejected are identical": 2, "field 'chosen' is empty": 1}


def test_formats_and_field_mapping(tmp_path, monkeypatch):
    alpaca = tmp_path / "a.json"
    alpaca.write_text(json.dumps([{"instruction": "Add", "input": "1 and 2", "output": "3"},
                                  {"instruction": "Say hi", "input": "", "output": "hi"}]))
    monkeypatch.setitem(data.PROFILES, "a", Profile({"sft_train": Source(str(alpaca), "alpaca")}))
    assert data.load("a", "sft_train") == [{"prompt": "Add\n\n1 and 2", "completion": "3"},
                                           {"prompt": "Say hi", "completion": "hi"}]
    other = tmp_path / "o.jsonl.gz"
    with gzip.open(other, "wt") as f:
        f.write(json.dumps({"question": "q", "good": "g", "bad": "b"}) + "\n")
    monkeypatch.setitem(data.PROFILES, "o", Profile({"prefs_train": Source(
        str(other), "records", fields=(("prompt", "question"), ("chosen", "good"), ("rejected", "bad")))}))
    assert data.load("o", "prefs_train") == [{"prompt": "q", "chosen": "g", "rejected": "b"}]
    conv = tmp_path / "c.jsonl"
    conv.write_text(json.dumps({"messages": [{"role": "user", "content": "u"}, {"role": "assistant", "content": "a"}]}) + "\n")
    monkeypatch.setitem(data.PROFILES, "c", Profile({"sft_train": Source(str(conv), "messages")}))
    assert data.load("c", "sft_train") == [{"prompt": [{"role": "user", "content": "u"}], "completion": "a"}]


def test_hub_ids_go_through_datasets(monkeypatch):
    calls = []

    def fake_load_dataset(name, split):
        calls.append((name, split))
        return [{"prompt": "p", "completion": "c"}]

    import datasets

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    monkeypatch.setitem(data.PROFILES, "h", Profile({"sft_train": Source("someone/some-dataset")}))
    assert data.load("h", "sft_train") == [{"prompt": "p", "completion": "c"}]
    assert calls == [("someone/some-dataset", "train")]
