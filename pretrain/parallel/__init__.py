"""Topology (DP x TP x PP), tensor-parallel layers and their plan, pipeline assembly, DeepSpeed engine."""

from pretrain.parallel.deepspeed_config import build_deepspeed_config
from pretrain.parallel.distributed import DistInfo, all_reduce_mean, init_distributed
from pretrain.parallel.engine import TrainingEngine, build_engine, resolve_precision
from pretrain.parallel.parallelize import parallelize_model
from pretrain.parallel.topology import ParallelContext, build_parallel_context

__all__ = [
    "DistInfo",
    "ParallelContext",
    "TrainingEngine",
    "all_reduce_mean",
    "build_deepspeed_config",
    "build_engine",
    "build_parallel_context",
    "init_distributed",
    "parallelize_model",
    "resolve_precision",
]
