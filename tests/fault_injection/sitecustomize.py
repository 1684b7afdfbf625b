"""Fault injection for multi-process tests, loaded by every Python process whose PYTHONPATH starts here.

ALIGNMENT_NAN_LOSS="<rank>:<call>,<call>" makes alignment.ppo.policy_loss return a NaN loss on those calls
(1-based) in the process of that rank only: one bad process must make all of them skip the update.
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
