"""The typed configuration tree.

One dataclass per section, each in its module with its own checks next to its fields; every field
carries the documentation that `--help-config` (and the README's reference) is generated from. Presets
are YAML files in `configs/`; the command line adds dotted overrides (`optim.lr=3e-4
parallel.zero_stage=2`). Loading is strict: unknown keys, wrong types and impossible values are
collected and reported together in one `ConfigError`.

    fields.py      documented fields, Literal choices, the wording of the common checks
    model.py       model.*                      parallel.py   parallel.*
    data.py        data.*                       training.py   optim.*, schedule.*, train.*
    checkpoint.py  checkpoint.*, RESUME_GUARDED_KEYS
    run.py         logging.*, run.*, watchdog.*
    root.py        Config: sections, derived sizes, YAML, checks across sections; validate
    loader.py      load_config: YAML, overrides, interpolation, strict building, suggestions
    reference.py   describe_fields, reference_markdown

This package imports only the standard library, omegaconf (and its PyYAML) and pretrain.errors, so every layer (and
launch/) can read a configuration without torch. Checks that need the model (the split into pipeline
stages) are pretrain.parallel.layout's.
"""

from pretrain.config.checkpoint import (
    RESUME_GUARDED_KEYS,
    RESUME_VERIFICATION,
    CheckpointConfig,
    ResumeVerification,
)
from pretrain.config.data import DataConfig
from pretrain.config.loader import all_keys, load_config
from pretrain.config.model import ModelConfig
from pretrain.config.moe import MoEConfig
from pretrain.config.parallel import (
    PIPELINE_PARTITIONS,
    RECOMPUTE_MODES,
    ZERO_STAGES,
    ParallelConfig,
    PipelinePartition,
    RecomputeMode,
    ZeroStage,
)
from pretrain.config.reference import describe_fields, reference_markdown
from pretrain.config.root import Config, validate
from pretrain.config.run import LoggingConfig, RunConfig, WatchdogConfig
from pretrain.config.training import (
    NONFINITE_POLICIES,
    PRECISIONS,
    SCHEDULES,
    NonfinitePolicy,
    OptimConfig,
    Precision,
    Schedule,
    ScheduleConfig,
    TrainConfig,
)
from pretrain.errors import ConfigError

__all__ = [
    "NONFINITE_POLICIES",
    "PIPELINE_PARTITIONS",
    "PRECISIONS",
    "RECOMPUTE_MODES",
    "RESUME_GUARDED_KEYS",
    "RESUME_VERIFICATION",
    "SCHEDULES",
    "ZERO_STAGES",
    "CheckpointConfig",
    "Config",
    "ConfigError",
    "DataConfig",
    "LoggingConfig",
    "MoEConfig",
    "ModelConfig",
    "NonfinitePolicy",
    "OptimConfig",
    "ParallelConfig",
    "PipelinePartition",
    "Precision",
    "RecomputeMode",
    "ResumeVerification",
    "RunConfig",
    "Schedule",
    "ScheduleConfig",
    "TrainConfig",
    "WatchdogConfig",
    "ZeroStage",
    "all_keys",
    "describe_fields",
    "load_config",
    "reference_markdown",
    "validate",
]
