"""`logging.*`, `run.*` and `watchdog.*`: what the run reports and where it writes, and the deadlines past
which it counts as hung; with their checks."""

from __future__ import annotations

from dataclasses import dataclass

from pretrain.config.fields import documented, positive


@dataclass
class LoggingConfig:
    """Console, metrics.jsonl, TensorBoard and plots."""

    interval: int = documented("Log metrics every this many steps.", 10)
    tensorboard: bool = documented("Write TensorBoard event files to run.dir/tensorboard.", True)
    plot: bool = documented("Write run.dir/metrics.png (loss, LR, tokens/s) at the end of the run.", True)
    peak_tflops: float | None = documented(
        "Peak TFLOP/s per device for MFU; null looks the detected GPU up in a table (n/a when unknown).", None
    )

    def problems(self) -> list[str]:
        p = positive("logging.interval", self.interval)
        if self.peak_tflops is not None:
            p += positive("logging.peak_tflops", self.peak_tflops)
        return p


# How often a run touches run.dir/run.lock (pretrain.train.run_lock); a stale rule shorter than two beats
# would take a live run's lock.
LOCK_HEARTBEAT_S = 30.0


@dataclass
class RunConfig:
    """Where the run writes everything."""

    dir: str = documented(
        "Run directory: config, metrics, TensorBoard, plots and checkpoints go here.", "runs/default"
    )
    overwrite: bool = documented(
        "Start fresh in a run.dir that already holds a run, deleting its metrics, TensorBoard events and checkpoints.",
        False,
    )

    lock_stale_after: float = documented(
        "Seconds without a heartbeat (every 30 s) after which run.dir/run.lock of a run on another node counts "
        "as stale and a new start takes it over; a holder on the same node that is gone, or an earlier "
        "incarnation of a requeued SLURM job, is taken over at once.",
        600.0,
    )

    def problems(self) -> list[str]:
        p = [] if self.dir else ["run.dir must not be empty"]
        if self.lock_stale_after < 2 * LOCK_HEARTBEAT_S:
            p.append(
                f"run.lock_stale_after={self.lock_stale_after:g} is shorter than two lock heartbeats "
                f"({2 * LOCK_HEARTBEAT_S:g} s): a live run's lock would be taken over; use {2 * LOCK_HEARTBEAT_S:g} or more"
            )
        return p


# The watchdog polls, dumps its stacks and waits for every rank's report (pretrain.train.watchdog):
# a collective must not be aborted under it meanwhile.
COLLECTIVE_MARGIN_S = 60.0
DERIVED_MARGIN_S = 300.0


@dataclass
class WatchdogConfig:
    """Deadlines for joining, the first step and every later step; what happens past them."""

    join_timeout: float = documented(
        "Seconds rank 0 waits for every rank to join the rendezvous; past it every rank that joined exits "
        "(code 7) with the missing ranks and the nodes they should have come from.",
        300.0,
    )
    first_step_timeout: float = documented(
        "Seconds from the start of the training loop (after data loading and any resume) to the end of the "
        "first step (compilation, warm-up); past it the job is treated as hung, as for step_timeout. 0 disables.",
        1800.0,
    )
    step_timeout: float = documented(
        "Seconds without a completed step (its evaluation and checkpoint save included); past it every rank "
        "writes its Python stacks to run.dir/hang/<time>/, report.txt names the ranks that are behind, and "
        "the job exits with code 6. 0 disables.",
        600.0,
    )

    collective_timeout: float | None = documented(
        "Seconds after which torch.distributed gives up on a collective (every group, DeepSpeed's too; "
        "NCCL aborts the job). It must outlast step_timeout and first_step_timeout by "
        f"{COLLECTIVE_MARGIN_S:g} s, so the watchdog, not NCCL, reports a hang with every rank's stacks. "
        f"null: {DERIVED_MARGIN_S:g} s more than the longer of the two (or torch's default when both are 0).",
        None,
    )

    @property
    def watched(self) -> float:
        """The longest time the watchdog lets a step run (0: it watches nothing)."""
        return max(self.step_timeout, self.first_step_timeout)

    def resolved_collective_timeout(self) -> float | None:
        """Seconds for init_process_group and every later group; None leaves torch's default."""
        if self.collective_timeout is not None:
            return self.collective_timeout
        return self.watched + DERIVED_MARGIN_S if self.watched > 0 else None

    def problems(self) -> list[str]:
        p = positive("watchdog.join_timeout", self.join_timeout)
        for name in ("first_step_timeout", "step_timeout"):
            if getattr(self, name) < 0:
                p.append(f"watchdog.{name} must be >= 0 seconds (0 disables it), got {getattr(self, name)}")
        timeout = self.collective_timeout
        if timeout is not None and timeout <= 0:
            p.append(f"watchdog.collective_timeout must be > 0 seconds (or null), got {timeout}")
        elif timeout is not None and self.watched > 0 and timeout < self.watched + COLLECTIVE_MARGIN_S:
            longer = "step_timeout" if self.step_timeout >= self.first_step_timeout else "first_step_timeout"
            p.append(
                f"watchdog.collective_timeout={timeout:g} does not outlast watchdog.{longer}={self.watched:g} "
                f"by {COLLECTIVE_MARGIN_S:g} s: a stuck collective would be aborted by NCCL before the "
                f"watchdog dumps the stacks that say which rank is behind. Use watchdog.collective_timeout="
                f"{self.watched + DERIVED_MARGIN_S:g} (or null), or lower watchdog.{longer}"
            )
        return p
