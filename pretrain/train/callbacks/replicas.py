"""The replica-consistency check (pretrain.parallel.replicas) as a training callback."""

from __future__ import annotations

from pretrain.logs import EVERY_RANK, get_logger
from pretrain.parallel.replicas import check_replicas
from pretrain.train.callbacks.base import CHECK, Callback, TrainerView

log = get_logger(__name__)


class ReplicaChecker(Callback):
    """Every parallel.check_replicas_interval steps: parameters whose copies differ across ranks are
    logged (metrics record `replica_divergence`, and stderr on the ranks that hold them). Training
    goes on: tiny drift from nondeterministic GPU kernels is a warning, not a failure."""

    priority = CHECK

    def __init__(self, interval: int):
        self.interval = interval

    def on_step_end(self, trainer: TrainerView) -> None:
        step = trainer.state.step
        if step % self.interval:
            return
        problems = check_replicas(trainer.engine.module, trainer.engine.ctx)
        if problems:
            listing = "\n  ".join(problems)
            log.warning(
                f"rank {trainer.dist.rank}, step {step}: replicas differ:\n  {listing}", extra=EVERY_RANK
            )
        trainer.log({"step": step, "replica_divergence": problems})
