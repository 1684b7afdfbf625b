"""Fault injection for multi-process tests, loaded by every Python process whose PYTHONPATH starts here.

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
