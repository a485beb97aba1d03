"""When to save: every checkpoint.interval steps, at the end, and when a stop signal arrives.

Runs on every rank (its decisions involve collectives) and acts on what all ranks agreed, so every
rank saves and stops after the same step.
"""

from __future__ import annotations

from pretrain.checkpoint.store import CheckpointStore
from pretrain.checkpoint.writer import SaveOutcome
from pretrain.errors import Preempted
from pretrain.train.callbacks.base import SAVE, Callback, TrainerView

# How long a failing run waits for a save already in flight before it gives up on it.
_ABORT_WAIT_S = 600.0


class SavePolicy(Callback):
    """Saves every checkpoint.interval steps, at the end, and when a stop signal arrives; reports
    each save when it has committed. A model whose pending losses are non-finite is never saved."""

    priority = SAVE

    def __init__(self, store: CheckpointStore, interval: int, save_final: bool):
        self.store, self.interval, self.save_final = store, interval, save_final
        self.saved_step = -1  # the step of the newest save started (or resumed from)
        self._reported: SaveOutcome | None = None

    def on_train_start(self, trainer: TrainerView) -> None:
        self.store.signals.install()
        self.saved_step = max(self.saved_step, trainer.state.step if trainer.state.step > 0 else -1)
        # A signal during start-up or resume: nothing was trained since the checkpoint on disk.
        if self.store.agreement.any_rank(self.store.signals.stop_requested())[0]:
            name = self.store.signals.name or "a signal on another rank"
            raise Preempted(name, trainer.state.step, None)

    def on_restore(self, trainer: TrainerView) -> None:
        self.saved_step = trainer.state.step

    def on_step_end(self, trainer: TrainerView) -> None:
        self._report(trainer)
        outcome = self.store.writer.finished_outcome()
        stop, failed = self.store.agreement.any_rank(
            self.store.signals.stop_requested(), outcome is not None and not outcome.ok
        )
        if failed:  # every rank knows, or is about to learn, the same failed outcome
            self.store.raise_if_failed(self.store.wait())
        step = trainer.state.step
        due = (self.interval > 0 and step % self.interval == 0) or (
            self.save_final and step == trainer.cfg.train.steps
        )
        if (due or stop) and step > self.saved_step:
            self.save(trainer)
        if stop:
            outcome = self.store.wait()
            self.store.raise_if_failed(outcome)
            self._report(trainer)
            name = self.store.signals.name or "a signal on another rank"
            raise Preempted(name, step, outcome.path if outcome else None)

    def save(self, trainer: TrainerView) -> None:
        trainer.check_losses()  # raises before saving if the model went non-finite
        self.store.save(trainer.run_state, trainer.state.step)
        self.saved_step = trainer.state.step

    def on_train_end(self, trainer: TrainerView) -> None:
        self.store.raise_if_failed(self.store.wait())
        self._report(trainer)
        self.store.signals.uninstall()

    def on_abort(self, trainer: TrainerView) -> None:
        # A save already in flight is still worth finishing: the writers agree among themselves.
        # The handlers stay until the process exits, so a late signal cannot replace its exit code.
        self.store.wait(timeout=_ABORT_WAIT_S)

    def on_close(self, trainer: TrainerView) -> None:
        self.store.close()

    def _report(self, trainer: TrainerView) -> None:
        outcome = self.store.writer.finished_outcome()
        if outcome is None or outcome is self._reported or not outcome.ok:
            return
        self._reported = outcome
        trainer.log(
            {
                "step": outcome.step,
                "checkpoint": outcome.path,
                "checkpoint_bytes": outcome.total_bytes,
                "checkpoint_write_s": outcome.write_seconds,
                "checkpoint_stall_s": self.store.last_stall_seconds,
                "checkpoints_removed": outcome.removed,
            }
        )
