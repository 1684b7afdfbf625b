"""Fault injection for multi-process tests, loaded by every Python process whose PYTHONPATH starts here (each
variable is described where it is read).

ALIGNMENT_NAN_LOSS="<rank>:<call>,<call>" makes alignment.ppo.policy_loss return a NaN loss on those calls
(1-based) in the process of that rank only: one bad process must make all of them skip the update.
ALIGNMENT_NAN_TRAINER_LOSS does the same to transformers' Trainer.compute_loss (the SFT stage's loss).
"""

import os

_spec = os.environ.get("ALIGNMENT_NAN_LOSS", "")
if _spec and os.environ.get("RANK") == _spec.split(":")[0]:
    from alignment import ppo as _ppo

    _calls = {int(c) for c in _spec.split(":")[1].split(",")}
    _original, _count = _ppo.policy_loss, [0]

    def _policy_loss(*args, **kwargs):
        _count[0] += 1
        out = _original(*args, **kwargs)
        return out._replace(loss=out.loss * float("nan")) if _count[0] in _calls else out

    _ppo.policy_loss = _policy_loss

_spec = os.environ.get("ALIGNMENT_NAN_TRAINER_LOSS", "")
if _spec and os.environ.get("RANK") == _spec.split(":")[0]:
    from transformers import Trainer as _Trainer

    _trainer_calls = {int(c) for c in _spec.split(":")[1].split(",")}
    _trainer_loss, _trainer_count = _Trainer.compute_loss, [0]

    def _compute_loss(self, *args, **kwargs):
        _trainer_count[0] += 1
        out = _trainer_loss(self, *args, **kwargs)
        if _trainer_count[0] not in _trainer_calls:
            return out
        return (out[0] * float("nan"), *out[1:]) if isinstance(out, tuple) else out * float("nan")

    _Trainer.compute_loss = _compute_loss

# ALIGNMENT_FAIL_TRAINER_LOSS="<call>" makes Trainer.compute_loss raise on that call in every process: a run that
# stops after a checkpoint was saved (save_every), leaving it to resume from.
_spec = os.environ.get("ALIGNMENT_FAIL_TRAINER_LOSS", "")
if _spec:
    from transformers import Trainer as _FailingTrainer

    _fail_at, _fail_loss, _fail_count = int(_spec), _FailingTrainer.compute_loss, [0]

    def _failing_loss(self, *args, **kwargs):
        _fail_count[0] += 1
        if _fail_count[0] == _fail_at:
            raise RuntimeError("fault injection: the run stops here")
        return _fail_loss(self, *args, **kwargs)

    _FailingTrainer.compute_loss = _failing_loss

# ALIGNMENT_FAIL_COMPARISON=1 makes the RL stages' final comparison with SFT raise in every process: the run stops
# after its last step's state was saved.
if os.environ.get("ALIGNMENT_FAIL_COMPARISON"):
    from alignment import evaluation as _evaluation

    def _failing_comparison(*args, **kwargs):
        raise RuntimeError("fault injection: the run stops before the comparison")

    _evaluation.compare_policies = _failing_comparison

# ALIGNMENT_SAME_ANSWERS_FROM_STEP=<step> makes every held-out point from that step on see the same answer to every
# prompt: a collapse, for the guard (guard_collapse) to catch, in every process alike.
if _spec := os.environ.get("ALIGNMENT_SAME_ANSWERS_FROM_STEP"):
    from alignment import evaluation as _held_out

    _from_step, _point = int(_spec), _held_out.held_out_point

    def _same_answers(r, prompts, step):
        same = ["a a a"] * len(r["responses"])  # sampled and greedy alike
        return _point({**r, "responses": same, "greedy_responses": same} if step >= _from_step else r, prompts, step)

    _held_out.held_out_point = _same_answers
