"""ZeRO-3 construction: each layer is cut into this rank's partitions as soon as it is built.

DeepSpeed's `zero.Init(module=...)`, applied to one finished layer at a time: the layer is built whole
(from its own seed, or read from checkpoint.init_weights), sliced for tensor parallelism, cast to the
training dtype as DeepSpeed's engine would cast a whole model, then partitioned over the data-parallel
group. So a rank never holds more than its partitions plus one whole layer, and the partitions hold
exactly the numbers every other layout starts from. `deepspeed.initialize` then finds the parameters
partitioned already (they carry a ds_id) and leaves them as they are.

Building the whole layer under `zero.Init`'s context instead would partition each weight before our
seeded initialisation runs, which would then have to gather every weight again to write it.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from pretrain.config import Config
from pretrain.parallel.topology import ParallelContext

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def zero3_partitioner(cfg: Config, ctx: ParallelContext, precision: str) -> Callable[[nn.Module], None]:
    """A function that partitions one built layer in place (see the module docstring)."""
    import deepspeed

    from pretrain.parallel.deepspeed_config import build_deepspeed_config

    ds_config = build_deepspeed_config(cfg, ctx.dp * ctx.tp * ctx.pp, precision)
    dtype = DTYPES[precision]

    def partition(layer: nn.Module) -> None:
        for param in layer.parameters():
            param.data = param.data.to(dtype)  # buffers (rotary tables) stay fp32, as the engine keeps them
        deepspeed.zero.Init(
            module=layer, config_dict_or_path=ds_config, mpu=ctx.grid, data_parallel_group=ctx.dp_group
        )

    return partition
