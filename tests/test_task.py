import json

import pytest

from alignment import data, task


def test_generator_is_deterministic_and_matches_committed_files():
    a, b = task.generate(task.SEED), task.generate(task.SEED)
    assert a == b
    assert task.generate(task.SEED + 1) != a
    for split, records in a.items():
        committed = [json.loads(line) for line in open(task.DATA_DIR / f"{split}.jsonl")]
        assert committed == records, f"data/task/{split}.jsonl is stale: run `make data`"


def test_eval_prompts_are_held_out():
    splits = task.generate()
    held_out = {r["prompt"] for r in splits["prompts_eval"]}
    for split in ("sft", "prefs_train", "prompts_train"):
        assert held_out.isdisjoint(r["prompt"] for r in splits[split])


@pytest.mark.parametrize(
    "prompt, response, score",
    [
        ("sort: d a c b", "a b c d", 1.0),
        ("sort: d a c b", "a b c d hope this helps", 1.0 - task.FILLER_PENALTY),
        ("reverse: a b c", "c b a", 1.0),
        ("reverse: a b c", "c a b", 1 / 3),
        ("copy: a b", "a b a b", 0.5),  # two extra items: 2 right out of 4 positions
        ("drop first: a b c", "b", 0.5),  # one missing
        ("copy: a b", "", 0.0),
        ("copy: a b", "hello", 0.0 - task.FILLER_PENALTY),
    ],
)
def test_gold_judge(prompt, response, score):
    assert task.gold_score(prompt, response) == pytest.approx(score)


def test_demonstrations_carry_the_flaw_and_preferences_correct_it():
    splits = task.generate()
    flawed = sum(task.gold_score(r["prompt"], r["completion"]) < 1.0 for r in splits["sft"]) / len(splits["sft"])
    assert 0.7 < flawed < 0.9  # most demonstrations sign off: SFT's greedy answer inherits it
    agree = [task.gold_score(r["prompt"], r["chosen"]) > task.gold_score(r["prompt"], r["rejected"])
             for r in splits["prefs_train"]]
    assert 0.85 < sum(agree) / len(agree) < 0.95  # the judge's labels, with ~10% annotator noise


def test_loader_names_file_line_and_field(tmp_path, monkeypatch):
    bad = tmp_path / "prefs.jsonl"
    bad.write_text(
        '{"prompt": "copy: a", "chosen": "a", "rejected": "b"}\n{"prompt": "copy: a", "chosen": 3, "rejected": "b"}\n'
    )
    (tmp_path / "bad.yaml").write_text("prefs_train: prefs.jsonl\nprefs_eval: prefs.jsonl\n")
    with pytest.raises(data.DataError, match=r"prefs.jsonl:2: field 'chosen' is a number, not a string"):
        data.load(str(tmp_path / "bad.yaml"), "prefs_train")
    bad.write_text('{"prompt": "copy: a", "chosen": "a", "rejected": "a"}\n')
    with pytest.raises(data.DataError, match=r"prefs.jsonl:1: chosen and rejected are identical"):
        data.load(str(tmp_path / "bad.yaml"), "prefs_train")
    bad.write_text('{"prompt": "copy: a", "chosen": "a"\n')
    with pytest.raises(data.DataError, match=r"prefs.jsonl:1: not valid JSON"):
        data.load(str(tmp_path / "bad.yaml"), "prefs_train")
