"""The embedded task: a small instruction-following problem generated from a seed, with a gold judge.

No hub is reachable where this pipeline must run by default, so the default data profile is generated
here. An instruction asks for an operation on a short list of letters ("sort: d a c b"); the ideal
response is the result and nothing else ("a b c d").

The demonstrations carry a systematic flaw, as real SFT data does: most of them end with a filler
sign-off ("a b c d hope this helps"). SFT therefore learns to sign off, and its *greedy* answer is
flawed. The gold judge, standing in for human raters, dislikes the filler; it labels the preference
pairs (with label noise, as annotators have) so the reward model learns the dislike and PPO can remove
the flaw from the greedy answer. The judge also gives partial credit for partly right answers, so PPO
has a second, harder thing to improve: correctness of sampled answers.

    python -m alignment.task          # rewrites data/task/*.jsonl from the seed (deterministic)
"""

from __future__ import annotations

import json
import random
from pathlib import Path

ITEMS = "abcdefgh"  # list items are single letters
OPERATIONS = {
    "copy": lambda xs: list(xs),
    "reverse": lambda xs: list(reversed(xs)),
    "sort": lambda xs: sorted(xs),
    "drop first": lambda xs: list(xs[1:]),
}
FILLERS = ["hope this helps", "let me know if you need more", "i am happy to help"]
FILLER_PENALTY = 0.4  # gold score lost for anything after the answer
FLAWED_SHARE = 0.8  # share of demonstrations that end with a filler: SFT's most likely answer is flawed
LABEL_NOISE = 0.1  # share of preference labels flipped, as disagreeing annotators do

SEED = 1234
SIZES = {
    "sft": 4000,
    "sft_eval": 200,
    "prefs_train": 3000,
    "prefs_eval": 400,
    "prompts_train": 2000,
    "prompts_eval": 200,
}
DATA_DIR = Path(__file__).resolve().parent.parent / "data" / "task"


def make_prompt(rng: random.Random) -> str:
    op = rng.choice(sorted(OPERATIONS))
    n = rng.randint(3, 6)
    return f"{op}: {' '.join(rng.choice(ITEMS) for _ in range(n))}"


def parse_prompt(prompt: str) -> tuple[str, list[str]]:
    """Splits an instruction into its operation and its list; raises ValueError if it is not one."""
    op, sep, rest = prompt.strip().partition(":")
    if not sep or op not in OPERATIONS:
        raise ValueError(f"not an instruction of the embedded task: {prompt!r}")
    return op, rest.split()


def ideal_answer(prompt: str) -> list[str]:
    op, items = parse_prompt(prompt)
    return OPERATIONS[op](items)


def gold_score(prompt: str, response: str) -> float:
    """The gold judge: correctness in [0, 1] minus FILLER_PENALTY if anything follows the answer.

    Correctness is the share of positions that hold the right item, over the longer of the answer
    given and the ideal one, so both missing and extra items cost. The answer given is the leading run
    of single-letter words; everything after it counts as filler.
    """
    target = ideal_answer(prompt)
    words = response.split()
    answer = []
    for w in words:
        if len(w) != 1 or w not in ITEMS:
            break
        answer.append(w)
    has_extra = len(answer) < len(words)
    longest = max(len(answer), len(target))
    correct = sum(a == t for a, t in zip(answer, target)) / longest if longest else 1.0
    return correct - FILLER_PENALTY * has_extra


def demonstration(prompt: str, rng: random.Random) -> str:
    answer = " ".join(ideal_answer(prompt))
    if rng.random() < FLAWED_SHARE:
        return f"{answer} {rng.choice(FILLERS)}"
    return answer


def candidate(prompt: str, rng: random.Random) -> str:
    """A response of varied quality for a preference pair: right or slightly wrong, with or without filler."""
    answer = ideal_answer(prompt)
    kind = rng.random()
    if kind < 0.25 and len(answer) > 1:  # two items swapped
        i, j = rng.sample(range(len(answer)), 2)
        answer[i], answer[j] = answer[j], answer[i]
    elif kind < 0.4:  # one item replaced
        answer[rng.randrange(len(answer))] = rng.choice(ITEMS)
    elif kind < 0.5 and len(answer) > 1:  # one item dropped
        answer.pop(rng.randrange(len(answer)))
    text = " ".join(answer)
    if rng.random() < 0.5:
        text = f"{text} {rng.choice(FILLERS)}"
    return text


def preference_pair(prompt: str, rng: random.Random) -> dict | None:
    """Two candidates labelled by the gold judge, flipped with probability LABEL_NOISE; None on a tie."""
    a, b = candidate(prompt, rng), candidate(prompt, rng)
    ga, gb = gold_score(prompt, a), gold_score(prompt, b)
    if ga == gb:
        return None
    chosen, rejected = (a, b) if ga > gb else (b, a)
    if rng.random() < LABEL_NOISE:
        chosen, rejected = rejected, chosen
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected}


def generate(seed: int = SEED) -> dict[str, list[dict]]:
    """All splits, deterministic in the seed. Evaluation prompts are disjoint from every training split."""
    rng = random.Random(seed)
    eval_prompts: set[str] = set()
    while len(eval_prompts) < SIZES["prompts_eval"]:
        eval_prompts.add(make_prompt(rng))

    def fresh_prompt() -> str:
        while (p := make_prompt(rng)) in eval_prompts:
            pass
        return p

    def pairs(n: int) -> list[dict]:
        out = []
        while len(out) < n:
            if pair := preference_pair(fresh_prompt(), rng):
                out.append(pair)
        return out

    def demonstrations(n: int) -> list[dict]:
        return [{"prompt": p, "completion": demonstration(p, rng)} for p in (fresh_prompt() for _ in range(n))]

    splits = {
        "sft": demonstrations(SIZES["sft"]),
        "sft_eval": demonstrations(SIZES["sft_eval"]),
        "prefs_train": pairs(SIZES["prefs_train"]),
        "prefs_eval": pairs(SIZES["prefs_eval"]),
        "prompts_train": [{"prompt": fresh_prompt()} for _ in range(SIZES["prompts_train"])],
        "prompts_eval": [{"prompt": p} for p in sorted(eval_prompts)],
    }
    # the same prompts with their exact answers: the verifiable form of the task (configs/data/task-exact.yaml),
    # checked by alignment/rewards.py's exact_answer
    for split in ("train", "eval"):
        splits[f"answers_{split}"] = [{"prompt": r["prompt"], "answer": " ".join(ideal_answer(r["prompt"]))}
                                      for r in splits[f"prompts_{split}"]]
    return splits


def write(out_dir: Path = DATA_DIR, seed: int = SEED) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    for split, records in generate(seed).items():
        with open(out_dir / f"{split}.jsonl", "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in records)


if __name__ == "__main__":
    write()
    print(f"wrote {', '.join(f'{k} ({v})' for k, v in SIZES.items())} and answers_train, answers_eval to {DATA_DIR}")
