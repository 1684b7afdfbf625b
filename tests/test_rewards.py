"""Reward terms (alignment/rewards.py): sources found or refused in one line, the mix by hand, the functions'
values checked, the data's kept fields, GRPO rewarded by the model and a function of a file reading a kept field,
PPO rewarded by that function alone with no reward model in the store, and `make eval` of that run."""

import json
import math
import shutil
from pathlib import Path

import pytest
import torch

from alignment import data, report, rewards, task
from alignment.config import ConfigError
from alignment.data import DataError
from alignment.store import Store
from stages import eval as eval_stage
from stages import grpo as grpo_stage
from stages import ppo as ppo_stage
from stages import rm as rm_stage
from stages import sft as sft_stage

ROOT = Path(__file__).resolve().parent.parent


def same(x):
    return x


def test_sources_are_found_and_named():
    terms = rewards.terms(["model", "alignment.rewards:length_penalty", "alignment.rewards:length_penalty"],
                          [1.0, 0.5, 2.0])
    assert [t.name for t in terms] == ["model", "length_penalty", "length_penalty_2"]
    assert [t.weight for t in terms] == [1.0, 0.5, 2.0]
    assert terms[0].function is None and terms[1].function is rewards.length_penalty
    assert [t.weight for t in rewards.terms(["model", "alignment.rewards:task_gold"], [])] == [1.0, 1.0]


def test_a_function_of_a_file(tmp_path):
    (tmp_path / "mine.py").write_text("def exact(prompts, completions, **kw):\n    return [1.0] * len(prompts)\n")
    (term,) = rewards.terms([f"{tmp_path}/mine.py:exact"], [])
    assert term.name == "exact" and term.function(prompts=["a"], completions=["b"], completion_ids=[[1]]) == [1.0]


@pytest.mark.parametrize("sources, weights, message", [
    ([], [], "rewards is empty"),
    (["model", "alignment.rewards:length_penalty"], [1.0], "2 rewards: give one per source"),
    (["length_penalty"], [], "is not 'model', 'module:function'"),
    (["no_such_module_here:f"], [], "importing no_such_module_here failed: ModuleNotFoundError"),
    (["alignment.rewards:nothing"], [], "alignment.rewards has no function 'nothing'"),
    (["/no/such/file.py:f"], [], "no file /no/such/file.py"),
    (["model"], [float("nan")], "not a finite number"),
])
def test_sources_that_cannot_work_are_one_line(sources, weights, message):
    with pytest.raises(ConfigError, match=message):
        rewards.terms(sources, weights)


def test_the_stage_refuses_them_at_start(tmp_path):
    with pytest.raises(SystemExit, match="alignment.rewards has no function 'nothing'"):
        grpo_stage.main([f"store={tmp_path}", "grpo.rewards=[model,alignment.rewards:nothing]"])
    with pytest.raises(SystemExit, match="names a reward model that rewards .without model. never reads"):
        grpo_stage.main([f"store={tmp_path}", "grpo.rewards=[alignment.rewards:length_penalty]",
                         "grpo.reward_model=other/rm"])


def test_the_reward_model_alone_is_its_score_unchanged():
    mixer = rewards.Rewards(rewards.terms(["model"], []))
    scores = torch.tensor([0.3, -1.7, float("nan")])
    mixed = mixer.mix(same, {"model": scores})
    assert torch.equal(mixed[:2], scores[:2]) and math.isnan(mixed[2])  # a broken score stays broken: step skipped


def test_a_function_alone_counts_none_as_nothing():
    mixer = rewards.Rewards(rewards.terms(["alignment.rewards:task_gold"], [2.0]))
    assert mixer.mix(same, {"task_gold": torch.tensor([0.5, float("nan")])}).tolist() == [1.0, 0.0]


def test_several_terms_each_normalised_by_its_running_moments_then_weighted():
    """model [1, 3]: mean 2, std 1 -> [-1, +1]; length [-10, None]: its one value is its mean -> 0, None -> 0;
    weights 1 and 2. A second batch moves each term's statistics by Chan's update."""
    mixer = rewards.Rewards(rewards.terms(["model", "alignment.rewards:length_penalty"], [1.0, 2.0]))
    first = mixer.mix(same, {"model": torch.tensor([1.0, 3.0]), "length_penalty": torch.tensor([-10.0, math.nan])})
    assert first.tolist() == pytest.approx([-1.0, 1.0])
    second = mixer.mix(same, {"model": torch.tensor([2.0, 2.0]), "length_penalty": torch.tensor([-10.0, -4.0])})
    # model: 4 values 1, 3, 2, 2 -> mean 2, var 0.5; length: -10, -10, -4 -> mean -8, var 8
    assert second.tolist() == pytest.approx([2 * (-2 / 8**0.5), 2 * (4 / 8**0.5)])
    saved = mixer.state_dict()
    again = rewards.Rewards(rewards.terms(["model", "alignment.rewards:length_penalty"], [1.0, 2.0]))
    again.load_state_dict(json.loads(json.dumps(saved)))  # (the resumable state is JSON)
    assert again.state_dict() == saved


def test_functions_values_are_checked_in_one_line():
    def broken(prompts, completions, **_):
        raise KeyError("answer")

    def short(prompts, completions, **_):
        return [1.0]

    def text(prompts, completions, **_):
        return ["1.0", None]

    def fine(prompts, completions, completion_ids, **columns):
        return [float(len(ids)) + columns["answer"][i] if i else None for i, ids in enumerate(completion_ids)]

    args = (["p", "q"], ["a b", "c"], [[5, 6, 2], [7, 2]], {"answer": [10, 20]}, 3, "ppo")
    for function, message in ((broken, r"step 3: reward function broken \(.*\) raised KeyError: 'answer'"),
                              (short, "returned 1 values for 2 completions"),
                              (text, "returned '1.0' for completion 0")):
        with pytest.raises(SystemExit, match=message):
            rewards.Rewards([rewards.Term(function.__name__, 1.0, function)]).call_functions(*args)
    values = rewards.Rewards([rewards.Term("fine", 1.0, fine)]).call_functions(*args)["fine"]
    assert math.isnan(values[0]) and values[1] == 22.0


def test_shipped_functions():
    assert rewards.length_penalty(completion_ids=[[1, 2, 3], []]) == [-3.0, 0.0]
    gold = rewards.task_gold(prompts=["copy: a b", "reverse: a b", "hello", [{"role": "user", "content": "x"}]],
                             completions=["a b", "a b", "hi", "x"])
    assert gold[0] == 1.0 and gold[1] < 1.0 and gold[2:] == [None, None]


def kept_data(tmp_path: Path) -> Path:
    """The embedded task with each prompt's ideal answer kept as `answer` (data file `keep`)."""
    folder = tmp_path / "data"
    folder.mkdir()
    for name in ("sft", "sft_eval", "prefs_train", "prefs_eval"):
        shutil.copy(ROOT / "data" / "task" / f"{name}.jsonl", folder)
    for name in ("prompts_train", "prompts_eval"):
        with open(ROOT / "data" / "task" / f"{name}.jsonl") as f, open(folder / f"{name}.jsonl", "w") as out:
            for line in f:
                record = json.loads(line)
                out.write(json.dumps({**record, "answer": " ".join(task.ideal_answer(record["prompt"]))}) + "\n")
    (folder / "kept.yaml").write_text(
        "gold: true\nsft_train: sft.jsonl\nsft_eval: sft_eval.jsonl\nprefs_train: prefs_train.jsonl\n"
        "prefs_eval: prefs_eval.jsonl\nprompts_eval: {path: prompts_eval.jsonl, keep: [answer]}\n"
        "prompts_train: {path: prompts_train.jsonl, keep: [answer]}\n")
    return folder / "kept.yaml"


def test_a_data_file_keeps_the_fields_it_names(tmp_path):
    profile = kept_data(tmp_path)
    records = data.load(str(profile), "prompts_train", limit=3)
    assert all(set(r) == {"prompt", "answer"} for r in records) and records[0]["answer"] == "f b h c g"
    assert set(data.load(str(profile), "prefs_eval", limit=1)[0]) == {"prompt", "chosen", "rejected"}
    default = data.fingerprint("task", ["prompts_train"])
    assert default == data.fingerprint("task", ["prompts_train"])  # (a file without keep: as before)
    assert data.fingerprint(str(profile), ["prompts_train"]) != default
    text = profile.read_text().replace("prompts_train.jsonl, keep: [answer]", "prompts_train.jsonl, keep: [solution]")
    profile.write_text(text)
    with pytest.raises(DataError, match=r"prompts_train.jsonl:1: no field 'solution', which the data file keeps"):
        data.load(str(profile), "prompts_train")
    for reserved in ("prompt", "completions"):  # ours, or an argument the reward functions get
        profile.write_text(text.replace("keep: [solution]", f"keep: [{reserved}]"))
        with pytest.raises(DataError, match="keep lists the names of more fields"):
            data.load(str(profile), "prompts_train")


def test_grpo_rewarded_by_the_model_and_a_function_reading_a_kept_field(tmp_path, tiny_cache):
    """A file's function reads the data's kept `answer`: its values and the model's are both in the log, the
    mix is what the algorithm trained on, and the function saw the kept field of every sampled prompt."""
    profile = kept_data(tmp_path)
    seen = tmp_path / "seen.jsonl"
    (tmp_path / "exact.py").write_text(
        "import json\n"
        "def exact(prompts, completions, completion_ids, answer, **_):\n"
        f"    with open({str(seen)!r}, 'a') as f:\n"
        "        f.write(json.dumps({'prompts': prompts, 'answer': answer}) + '\\n')\n"
        "    return [float(c.split() == a.split()) if i % 4 else None for i, (c, a) in "
        "enumerate(zip(completions, answer))]\n")
    store = tmp_path / "store"
    common = [f"store={store}", f"data={profile}", "limit=32", "threads=2", "run=kept"]
    sft_stage.main([*common, "sft.epochs=1", "sft.batch_size=16"])
    rm_stage.main([*common, "rm.epochs=1", "rm.batch_size=16"])
    grpo_stage.main([*common, "grpo.steps=2", "grpo.batch_size=4", "grpo.group_size=4", "grpo.mini_batch_size=16",
                     "grpo.max_new_tokens=8", "grpo.eval_every=0", "grpo.eval_samples=1",
                     f"grpo.rewards=[model,{tmp_path}/exact.py:exact]", "grpo.reward_weights=[1.0,0.5]"])
    ckpt = Store(store).get("kept", "grpo")
    log = [json.loads(line) for line in open(ckpt.path / "grpo_log.jsonl")]
    assert all({"reward/model", "reward/exact"} <= set(r) for r in log)
    assert all(0.0 <= r["reward/exact"] <= 1.0 and math.isfinite(r["reward/model"]) for r in log)
    calls = [json.loads(line) for line in open(seen)]
    assert [len(c["prompts"]) for c in calls[:2]] == [16, 16]  # a step's 4 prompts x 4 responses
    # then the final comparison's: SFT's and the policy's greedy answers to the 32 held-out prompts, then sampled
    assert [len(c["prompts"]) for c in calls[2:]] == [32, 32, 32, 32]
    for mode in ("greedy", "sampled"):
        term = ckpt.metrics[mode]["terms"]["exact"]
        assert term["prompts"] == 24  # None for every 4th response: those prompts are left out
        assert term["difference"]["ci95"][0] <= term["difference"]["mean"] <= term["difference"]["ci95"][1]
    assert all(a == " ".join(task.ideal_answer(p)) for c in calls for p, a in zip(c["prompts"], c["answer"]))
    assert ckpt.manifest["config"]["grpo"]["rewards"] == ["model", f"{tmp_path}/exact.py:exact"]
    # 2. rewarded by the function alone, with no reward model in the store: PPO's critic starts from the SFT body,
    #    the policy's parents are the SFT policy alone, the comparison holds the function's term and no RM score
    shutil.rmtree(store / "kept" / "rm")
    seen.unlink()
    ppo_stage.main([*common, "ppo.steps=2", "ppo.batch_size=8", "ppo.mini_batch_size=8", "ppo.ppo_epochs=1",
                    "ppo.max_new_tokens=8", "ppo.eval_every=1", "ppo.eval_prompts=8", "ppo.eval_samples=1",
                    f"ppo.rewards=[{tmp_path}/exact.py:exact]"])
    ckpt = Store(store).get("kept", "ppo")
    assert ckpt.manifest["parents"] == ["kept/sft"] and (ckpt.path / "value_model" / "config.json").is_file()
    log = [json.loads(line) for line in open(ckpt.path / "ppo_log.jsonl")]
    assert all(0.0 <= r["reward/exact"] <= 1.0 and "reward/model" not in r for r in log)
    for mode in ("greedy", "sampled"):
        assert "reward" not in ckpt.metrics[mode] and ckpt.metrics[mode]["terms"]["exact"]["prompts"] == 24
    assert all("eval_reward" not in p and "eval_gold" in p for p in ckpt.metrics["eval_curve"])
    # 3. `make eval` of the run without a reward model: each policy by the gold judge, its reward functions, KL and
    #    its answers' health; no reward-model score anywhere, in the JSON, the headline or the page
    eval_stage.main([f"store={store}", "run=kept", "limit=32", "threads=2", "eval.samples=1", "eval.max_new_tokens=8",
                     "eval.side_by_side=2", "eval.checkpoints=[kept/sft,kept/ppo]"])
    result = json.loads((store / "kept" / "report.json").read_text())
    entry = result["runs"]["kept"]
    assert set(entry["checkpoints"]) == {"sft", "ppo"} and [c["stage"] for c in entry["lineage"]] == ["sft", "ppo"]
    ppo = entry["checkpoints"]["ppo"]
    assert "reward" not in ppo and "win_rate_vs_sft" not in ppo and "gold" in ppo and "answers" in ppo
    for mode in ("greedy", "sampled"):
        assert set(ppo["vs_sft"][mode]) == {"gold"} and ppo["terms"][mode]["exact"]["prompts"] == 24
    row = next(r for r in result["headline"] if r["stage"] == "ppo")
    assert "gold_greedy" in row and "reward_greedy" not in row and row["terms"][0].startswith("exact − SFT: greedy")
    assert all("reward" not in x["ppo"] and "gold" in x["ppo"] for x in entry["side_by_side"])
    page = (store / "kept" / "report.html").read_text()
    assert "RM reward" not in page and "exact − SFT" in page


def test_the_report_says_each_term_against_sft():
    diff = {"mean": 5.328, "ci95": [4.953, 5.688]}
    terms = {"greedy": {"length_penalty": {"prompts": 64, "sft": -10.9, "policy": -5.5, "difference": diff},
                        "exact": {"prompts": 0}},
             "sampled": {"length_penalty": {"prompts": 64, "sft": -9.3, "policy": -8.4,
                                            "difference": {"mean": 0.891, "ci95": [-0.094, 1.844]}},
                         "exact": {"prompts": 0}}}
    assert report.term_lines(terms) == [
        "length_penalty − SFT: greedy +5.328 [+4.953, +5.688], sampled +0.891 [-0.094, +1.844]",
        "exact − SFT: applies to no held-out prompt"]


def test_names_and_values_a_user_may_give():
    import numpy as np

    terms = rewards.terms(["alignment.rewards:length_penalty", "model", "alignment.rewards:length_penalty"], [])
    assert [t.name for t in terms] == ["length_penalty", "model", "length_penalty_2"]
    with pytest.raises(ConfigError, match="names model 2 times"):
        rewards.terms(["model", "model"], [])
    numbers = rewards.Term("numbers", 1.0, lambda completions, **_: [np.float32(0.5), torch.tensor(2.0), None])
    assert rewards.values(numbers, ["p"] * 3, ["a"] * 3, [[1]] * 3, {}, "[ppo] step 1")[:2].tolist() == [0.5, 2.0]
    flag = rewards.Term("flag", 1.0, lambda completions, **_: [True])
    with pytest.raises(SystemExit, match="returned True for completion 0"):
        rewards.values(flag, ["p"], ["a"], [[1]], {}, "[ppo] step 1")


def test_prompt_splits_that_keep_other_fields_stop_before_training():
    train, held_out = [{"prompt": "a", "answer": "x"}], [{"prompt": "b"}]
    with pytest.raises(SystemExit, match=r"\[grpo\] prompts_eval record 1 keeps the fields \[\] where prompts_train"):
        rewards.kept_columns(train, held_out, "grpo")
    assert rewards.kept_columns(train, [{"prompt": "b", "answer": "y"}], "grpo") == ["answer"]
