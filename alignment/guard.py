"""Non-finite updates: skipped and counted, and the stage stopped after too many in a row. One rule for the
trainer stages (callbacks.NonFiniteGuard) and the RL loop (rl.steps.optimizer_step)."""

from __future__ import annotations

import torch


class NonFiniteError(RuntimeError):
    pass


def grads_finite(parameters) -> bool:
    return all(torch.isfinite(p.grad).all() for p in parameters if p.grad is not None)


def count_skip(counter, what: str, step: int, patience: int, method: str = "", kept: str = "state") -> None:
    """One more update skipped for a non-finite `what` at `step`: counted in counter (its `skipped` and `in_a_row`;
    a success sets in_a_row back to 0); the patience-th in a row stops the stage, the last complete `kept` intact."""
    counter.skipped += 1
    counter.in_a_row += 1
    print(f"[guard] step {step}: non-finite {what}, update skipped ({counter.skipped} so far)")
    if counter.in_a_row >= patience:
        at = f"{method} step" if method else "step"
        raise NonFiniteError(f"stopping at {at} {step}: {counter.in_a_row} updates in a row had a non-finite {what}; "
                             f"the last complete {kept} is kept for resuming")
