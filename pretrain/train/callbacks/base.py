"""What a callback is, what it sees of the trainer, and the order callbacks run in.

A callback overrides some of six hooks. They run in descending `priority` (ties keep the order in
which they were added); the order is fixed when `fit()` starts. The built-in priorities:

    GUARD     100  the non-finite policy: acts on a step before anything logs or saves it
    DEFAULT     0  a callback that declares none (probes, fault injection): sees the step after the
                   guard and before the built-in metrics
    MEASURE   -10  throughput, loss, LR, grad norm, MFU
    EVALUATE  -20  validation loss
    SAVE      -30  checkpoint cadence and stop signals
    CHECK     -40  replica consistency
    REPORT    -50  sinks: console, metrics.jsonl, TensorBoard (-50, -51, -52)
    PLOT      -60  the plot, from metrics.jsonl once the writer has closed it
    WATCH    -100  the watchdog: a step counts as done after its evaluation and save

Callbacks see the trainer through `TrainerView` (what they may read, and the requests they may
make); they do not change the trainer's fields. A callback with state that must survive a restart
sets `state_name` and implements `state_dict`/`load_state_dict`: the trainer registers it in the
run's checkpointed state.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar, Protocol

if TYPE_CHECKING:
    from pretrain.checkpoint.state import RunState
    from pretrain.config import Config
    from pretrain.data import DistributedBatches
    from pretrain.parallel import DistInfo, TrainingEngine
    from pretrain.train.trainer import Rollback, TrainState

GUARD, DEFAULT, MEASURE, EVALUATE, SAVE, CHECK, REPORT, PLOT, WATCH = (
    100,
    0,
    -10,
    -20,
    -30,
    -40,
    -50,
    -60,
    -100,
)


class TrainerView(Protocol):
    """The part of the trainer callbacks use: read-only state, and requests the loop carries out."""

    @property
    def cfg(self) -> Config: ...
    @property
    def dist(self) -> DistInfo: ...
    @property
    def state(self) -> TrainState: ...
    @property
    def engine(self) -> TrainingEngine: ...
    @property
    def train_batches(self) -> DistributedBatches: ...
    @property
    def val_batches(self) -> DistributedBatches | None: ...
    @property
    def run_state(self) -> RunState: ...
    @property
    def last_lr(self) -> float: ...

    def log(self, record: dict[str, Any]) -> None: ...
    def check_losses(self) -> None: ...
    def take_losses(self) -> list[tuple[int, float]]: ...
    def take_reduced_losses(self) -> list[tuple[int, float]]: ...
    def grad_norm(self) -> float | None: ...
    def evaluate(self) -> float: ...
    def excuse_step(self, step: int) -> None: ...
    def request_rollback(self, rollback: Rollback) -> None: ...


class Callback:
    priority: ClassVar[int] = DEFAULT

    def on_train_start(self, trainer: TrainerView) -> None:
        pass

    def on_step_end(self, trainer: TrainerView) -> None:
        pass

    def on_log(self, trainer: TrainerView, record: dict[str, Any]) -> None:
        pass

    def on_train_end(self, trainer: TrainerView) -> None:
        pass

    def on_restore(self, trainer: TrainerView) -> None:
        """The loop went back to a checkpoint mid-run (a rollback)."""

    def on_abort(self, trainer: TrainerView) -> None:
        """fit() is leaving through an exception (a signal's save, a failure); release what is held."""

    def on_close(self, trainer: TrainerView) -> None:
        """The process is about to exit, however fit() ended: stop and join this callback's threads, so
        that nothing runs while the process groups are destroyed and the interpreter shuts down."""


def ordered(callbacks: list[Callback]) -> list[Callback]:
    """Highest priority first; a stable sort, so equal priorities keep the order they were added in."""
    return sorted(callbacks, key=lambda c: -c.priority)


def due(step: int, interval: int, last_step: int) -> bool:
    return step == last_step or (interval > 0 and step % interval == 0)
