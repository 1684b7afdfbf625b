"""The measures that need no judge, against values counted by hand; a collapse found in a fabricated collapsed
policy and not in SFT; the report's words and marks for it."""

import pytest

from alignment import health, report

PROMPTS = ["How do I bake bread?", "What is the capital of France?", "Tell me a joke", "How do I fix a bike?",
           "Name a color"]
SFT = ["Mix flour, water and yeast, then bake the bread.", "The capital of France is Paris.",
       "Why did the chicken cross the road?", "Check the chain of the bike first.",
       "Blue is a color, and so are green, red, yellow and many others."]  # 12, 7, 8, 8 and 17 words: 10.4
COLLAPSED = ["I don't see", "I don't see", "i  don't SEE", "I't see", "I don't see"]


def test_measures_by_hand():
    m = health.measures(PROMPTS, COLLAPSED)
    # "i don't see" four times (case and spacing aside), "i't see" once
    assert m["distinct_responses"] == 2 / 5 and m["top_response_share"] == 4 / 5 and m["top_response"] == "i don't see"
    # words: i, don, ', t, see (5) x4 and i, ', t, see (4): 24 unigrams, 5 distinct
    assert m["distinct_1_all"] == pytest.approx(5 / 24)
    # bigrams: (i don)(don ')(' t)(t see) x4 + (i ')(' t)(t see): 19, distinct: i-don, don-', '-t, t-see, i-' = 5
    assert m["distinct_2_all"] == pytest.approx(5 / 19)
    assert m["mean_length"] == pytest.approx(24 / 5)
    # prompt 1 "how do i bake bread ?" shares "i" of {i, don, ', t, see}: 1/5; prompts 2, 3 and 5 none; prompt 4
    # "how do i fix a bike ?" shares "i" of {i, ', t, see}: 1/4
    assert m["prompt_overlap"] == pytest.approx((1 / 5 + 0 + 0 + 1 / 4 + 0) / 5)


def test_prompt_overlap_reads_conversations():
    conversation = [{"role": "user", "content": "name a fruit"}, {"role": "assistant", "content": "apple"},
                    {"role": "user", "content": "another"}]
    assert health.measures([conversation], ["another fruit"])["prompt_overlap"] == 1.0


def test_a_collapsed_policy_is_flagged_and_sft_is_not():
    sft, collapsed = health.measures(PROMPTS, SFT), health.measures(PROMPTS, COLLAPSED)
    assert sft["distinct_responses"] == 1.0 and sft["top_response_share"] == 0.2 and sft["mean_length"] == 10.4
    assert health.collapse(sft, sft) == []
    signs = health.collapse(collapsed, sft)
    assert len(signs) == 3, signs  # distinct share halved, one answer to 75%, answers under half SFT's length
    assert "only 40% of its answers are distinct (SFT: 100%)" in signs[0]
    assert "80% of the prompts get the same answer" in signs[1] and "\"i don't see\"" in signs[1]
    assert "average 4.8 words against SFT's 10.4" in signs[2]
    line = health.collapse_line("ppo", collapsed, sft, reward_gain=0.46)
    assert line.startswith("ppo's answers collapsed while its reward-model score rose by +0.460: only 40%")
    assert health.collapse_line("sft", sft, sft) is None


def test_one_shared_answer_alone_is_not_a_collapse():
    """Two prompts of five answered alike where SFT also repeats itself: not 3x SFT's share, no warning."""
    sft = health.measures(PROMPTS, [SFT[0], SFT[0], SFT[2], SFT[3], SFT[4]])
    policy = health.measures(PROMPTS, [SFT[1], SFT[1], SFT[2], SFT[3], SFT[4]])
    assert health.collapse(policy, sft) == []


def test_shorter_distinct_answers_alone_are_not_a_collapse():
    """Each answer cut to its first two words, all still distinct (the embedded task's right answers are short):
    no sign, though they average under half SFT's length."""
    sft = health.measures(PROMPTS, SFT)
    short = health.measures(PROMPTS, [" ".join(a.split()[:2]) for a in SFT])
    assert short["mean_length"] < health.LENGTH_FALL * sft["mean_length"] and short["distinct_responses"] == 1.0
    assert health.collapse(short, sft) == []


def entry(answers_by_stage: dict) -> dict:
    """A report run entry with what collapse_signs and answers_table read."""
    return {"checkpoints": {stage: {"kind": "policy", "answers": {"greedy": health.measures(PROMPTS, answers)}}
                            for stage, answers in answers_by_stage.items()}}


def test_the_report_marks_and_tabulates_a_collapsed_policy():
    e = entry({"sft": SFT, "ppo": COLLAPSED, "dpo": SFT[::-1]})
    assert report.collapse_signs(e, "ppo") and not report.collapse_signs(e, "dpo")
    rows = {row["stage"]: row for row in report.answers_table(e)}
    assert rows["ppo"]["signs"] and not rows["sft"]["signs"] and rows["sft"]["length_vs_sft"] == 1.0
    assert rows["ppo"]["length_vs_sft"] == pytest.approx(4.8 / 10.4)


def test_a_held_out_point_watches_greedy_and_sampled_answers(capsys):
    """Sampled answers can stay apart while the greedy ones fall together: the point holds both, each is watched."""
    from alignment import evaluation

    def point(step, sampled, greedy, reward):
        r = {"reward": [reward] * 5, "gold": [], "kl": [0.0] * 5, "responses": sampled, "greedy_responses": greedy}
        return evaluation.held_out_point(r, PROMPTS, step)

    first = point(0, SFT, SFT, 0.1)
    assert first["eval_greedy_distinct_responses"] == 1.0 and first["eval_distinct_responses"] == 1.0
    assert health.watch([first, point(10, SFT[::-1], SFT, 0.2)], "ppo", True) == []
    signs = health.watch([first, point(20, SFT[::-1], COLLAPSED, 0.5)], "ppo", True)
    assert signs and all(s.startswith("greedy: ") for s in signs)
    out = capsys.readouterr().out
    assert out.startswith("[ppo] held-out point of step 20: the policy's greedy answers collapsed while its "
                          "reward-model score rose by +0.400")
    assert f"get the same answer, {COLLAPSED[0].lower()!r} (SFT's most frequent: 20%)" in out  # the answer quoted
    assert health.watch([], "ppo", True) == []
