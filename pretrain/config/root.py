"""`Config`, the whole run: its sections, the quantities derived from several of them, its YAML form, and
`validate`, which gathers every section's checks with the checks across sections."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from omegaconf import OmegaConf

from pretrain.config.checkpoint import CheckpointConfig
from pretrain.config.data import DataConfig
from pretrain.config.fields import documented
from pretrain.config.model import ModelConfig
from pretrain.config.parallel import ParallelConfig
from pretrain.config.run import LoggingConfig, RunConfig, WatchdogConfig
from pretrain.config.training import OptimConfig, ScheduleConfig, TrainConfig


@dataclass
class Config:
    """The whole run."""

    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    run: RunConfig = field(default_factory=RunConfig)
    watchdog: WatchdogConfig = field(default_factory=WatchdogConfig)
    seed: int = documented("Seed for weight init and data order.", 1234)

    # ----- derived quantities (not config keys) -----

    def data_parallel_size(self, world_size: int) -> int:
        return world_size // (self.parallel.tp * self.parallel.pp)

    def grad_accum_steps(self, world_size: int) -> int:
        if self.train.grad_accum_steps is not None:
            return self.train.grad_accum_steps
        return self.train.global_batch_size // (
            self.train.micro_batch_size * self.data_parallel_size(world_size)
        )

    @property
    def padded_vocab_size(self) -> int:
        return self.model.padded_vocab_size(self.parallel.tp)

    @property
    def tokens_per_step(self) -> int:
        return self.train.global_batch_size * self.train.seq_len

    # ----- plain forms -----

    def to_dict(self) -> dict[str, Any]:
        """Every section as nested plain dicts and lists, keyed as in the YAML."""
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        # From plain dicts, not OmegaConf.structured(self): OmegaConf 2.3 (which pyproject.toml allows)
        # rejects Literal annotations; only 2.4 accepts them.
        return OmegaConf.to_yaml(self.to_dict())

    # ----- checks -----

    def problems(self) -> list[str]:
        """Impossible values and disagreements between sections, all of them, as messages with a fix."""
        # The order is the order users (and tests) have always seen: section by section, with the
        # non-finite policy between the two halves of checkpoint.*.
        return [
            *self.model.problems(),
            *self.parallel.problems(self.model, self.train),
            *self.data.problems(),
            *self.optim.problems(),
            *self.schedule.problems(),
            *self.train.problems(),
            *self.checkpoint.resume_and_retention_problems(),
            *self.train.nonfinite_problems(self.checkpoint),
            *self.checkpoint.init_weights_and_interval_problems(),
            *self.logging.problems(),
            *self.run.problems(),
            *self.watchdog.problems(),
        ]

    def warnings(self) -> list[str]:
        """Settings that are valid but probably not what was meant: logged at start, never refused."""
        return self.schedule.warnings(self.train.steps, self.optim.lr)

    def world_size_problems(self, world_size: int) -> list[str]:
        """The layout and batch arithmetic on `world_size` ranks; the first problem only, since each
        check assumes the ones before it passed. (Splitting the model into pipeline stages is checked
        by pretrain.parallel.layout, which needs the model.)"""
        par, t = self.parallel, self.train
        model_parallel = par.tp * par.pp
        if world_size % model_parallel:
            return [
                f"world size {world_size} is not divisible by parallel.tp x parallel.pp = {par.tp} x {par.pp} = "
                f"{model_parallel}; launch a multiple of {model_parallel} processes or change the layout"
            ]
        dp = world_size // model_parallel
        if dp % par.ep:
            return [
                f"parallel.ep ({par.ep}) does not divide the data-parallel size ({dp} = world size {world_size} / "
                f"(tp x pp = {model_parallel})): experts are split over data-parallel ranks; use a parallel.ep "
                f"that divides {dp}, or launch a multiple of {model_parallel * par.ep} processes"
            ]
        per_step = t.micro_batch_size * dp
        if t.grad_accum_steps is not None:
            if t.micro_batch_size * t.grad_accum_steps * dp != t.global_batch_size:
                return [
                    f"train.global_batch_size ({t.global_batch_size}) != train.micro_batch_size "
                    f"({t.micro_batch_size}) x train.grad_accum_steps ({t.grad_accum_steps}) x data-parallel "
                    f"size ({dp}) = {t.micro_batch_size * t.grad_accum_steps * dp}; set "
                    f"train.grad_accum_steps=null to derive it"
                ]
        elif t.global_batch_size % per_step:
            lower = max(per_step, t.global_batch_size // per_step * per_step)
            return [
                f"train.global_batch_size ({t.global_batch_size}) is not divisible by train.micro_batch_size "
                f"({t.micro_batch_size}) x data-parallel size ({dp}) = {per_step}, so gradient accumulation "
                f"cannot be derived; use a global batch of {lower} or {lower + per_step}, or another micro batch"
            ]
        return []


def validate(cfg: Config, world_size: int | None = None) -> list[str]:
    """Every problem of `cfg`, as messages with a fix; with `world_size`, also the layout and batch
    arithmetic on that many ranks, checked only when everything else is clean (it needs every number
    right). The pipeline split, which needs the model, is pretrain.parallel.layout's."""
    problems = cfg.problems()
    if world_size is not None and not problems:
        problems = cfg.world_size_problems(world_size)
    return problems
