"""Topology, DeepSpeed engine construction and (in later issues) tensor and pipeline parallelism."""

from pretrain.parallel.deepspeed_config import build_deepspeed_config
from pretrain.parallel.distributed import DistInfo, all_reduce_mean, init_distributed
from pretrain.parallel.engine import build_engine, resolve_precision

__all__ = [
    "DistInfo",
    "all_reduce_mean",
    "build_deepspeed_config",
    "build_engine",
    "init_distributed",
    "resolve_precision",
]
