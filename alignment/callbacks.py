"""The callbacks every trainer stage (sft, rm, dpo) runs with: checkpoints marked complete, non-finite updates skipped,
progress for Ctrl-C's line, freed memory given back, the processes compared (check_sync), and the held-out curve of a
policy."""

from __future__ import annotations

import os
import time
from pathlib import Path

from transformers import TrainerCallback

from alignment import config, distributed, guard, machine, resume
from alignment.resume import COMPLETE, latest_complete


def guarded(stage: str, work_dir: Path, cfg) -> list[TrainerCallback]:
    """The callbacks of every trainer stage: checkpoints marked complete, non-finite updates skipped and counted
    (publish reads the count), progress for Ctrl-C's line, and with check_sync the processes compared."""
    return [MarkComplete(), NonFiniteGuard(cfg.max_bad_steps), ReportProgress(stage, work_dir), GiveBackMemory(),
            *([SyncCheck()] if cfg.check_sync else [])]


class GiveBackMemory(TrainerCallback):
    """Freed memory back to the system after each optimizer step and evaluation (machine.give_back_freed_memory)."""

    def on_step_end(self, args, state, control, **kwargs):
        machine.give_back_freed_memory()

    def on_evaluate(self, args, state, control, **kwargs):
        machine.give_back_freed_memory()


class ReportProgress(TrainerCallback):
    """Keeps config.PROGRESS up to date for the line Ctrl-C ends with."""

    def __init__(self, stage: str, work_dir: Path):
        config.PROGRESS.update(stage=stage, step=None, state=lambda: latest_complete(work_dir))

    def on_step_end(self, args, state, control, **kwargs):
        config.PROGRESS["step"] = state.global_step


class HeldOutCurve(TrainerCallback):
    """The held-out points of a TRL trainer's policy, at step 0 and every `every` optimizer steps (and the last):
    measure(model, step) -> {"step", "eval_reward", "eval_gold", "eval_kl", ...} (evaluation.curve_point). The
    points, with the seconds each took, go into the trainer's log_history, which its checkpoints save: a resumed run
    keeps the earlier ones. watch(points, step) -> True stops training (the collapse guard, health.watch)."""

    def __init__(self, every: int, measure, writer=None, watch=None):
        self.every, self.measure, self.writer, self.watch = every, measure, writer, watch

    def _add(self, state, model, step: int, control=None) -> None:
        was_training = model.training
        model.eval()
        started = time.time()
        point = self.measure(model, step)
        model.train(was_training)
        # its seconds under the name of an evaluation's: throughput() leaves them out of the training time
        state.log_history.append({**point, "eval_runtime": round(time.time() - started, 2)})
        if self.writer is not None:
            for key, value in point.items():
                if key != "step" and not isinstance(value, str):  # (the most frequent answer: text)
                    self.writer.add_scalar(key, value, step)
        if self.watch is not None and self.watch(self.points(state), step) and control is not None:
            control.should_training_stop = True

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if self.every and state.global_step == 0:
            self._add(state, model, 0, control)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if self.every and (state.global_step % self.every == 0 or state.global_step == state.max_steps):
            self._add(state, model, state.global_step, control)

    @staticmethod
    def points(state) -> list[dict]:
        return [e for e in state.log_history if "eval_kl" in e]


class MarkComplete(TrainerCallback):
    """After the trainer has written a checkpoint, flush it to disk and mark it complete."""

    def on_save(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            for dirpath, _, files in os.walk(folder):
                for name in files:
                    with open(os.path.join(dirpath, name), "rb") as f:
                        os.fsync(f.fileno())
            resume.record_launch(folder)  # the processes and ZeRO stage it was saved by
            (folder / COMPLETE).write_text("")


class NonFiniteGuard(TrainerCallback):
    """Skips optimizer steps whose gradients are not finite (a NaN/inf loss gives such gradients) and counts
    them; after `patience` in a row it stops the stage, naming the step. The last complete checkpoint stays."""

    def __init__(self, patience: int):
        self.patience, self.skipped, self.in_a_row = patience, 0, 0

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        if guard.grads_finite(model.parameters()):
            self.in_a_row = 0
            return
        for p in model.parameters():  # torch optimizers leave parameters without a gradient untouched
            p.grad = None
        guard.count_skip(self, "gradient", state.global_step + 1, self.patience, kept="checkpoint")


class SyncCheck(TrainerCallback):
    """assert_in_sync after every optimizer step of a trainer."""

    def on_optimizer_step(self, args, state, control, model=None, **kwargs):
        distributed.assert_in_sync(list(model.parameters()), f"step {state.global_step + 1}")
