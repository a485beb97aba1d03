"""The one function that turns our typed config into DeepSpeed's JSON config.

There is never a second, hand-edited DeepSpeed JSON: this dict is what `deepspeed.initialize` gets,
and it is written into the run directory next to the resolved config.
"""

from __future__ import annotations

from typing import Any

from pretrain.config import Config
from pretrain.model.flops import count_parameters


def we_clip_gradients(cfg: Config, precision: str) -> bool:
    """fp32 without ZeRO: our engine clips the global gradient norm itself (see GlobalNormClipper);
    everywhere else DeepSpeed's optimizer wrappers do."""
    return cfg.parallel.zero_stage == 0 and precision == "fp32"


def zero3_buffer_sizes(cfg: Config, world_size: int) -> dict[str, int]:
    """ZeRO-3's buffers sized to the model instead of DeepSpeed's defaults, which are sized for
    billions of parameters (measured, 57M parameters fp32 on one rank: 33 bytes/parameter at the first
    step with the defaults, 23 with these; weights, gradients and Adam need 16).

    - reduce and prefetch buckets of hidden^2 elements, persistence below 10 x hidden (the sizes the
      Hugging Face integration derives for "auto"): a 5e8-element reduce bucket holds the whole
      gradient of any model smaller than that once more before it is reduced;
    - the optimizer steps its partition in sub-groups of an eighth of it (at least 1e7 elements, at
      most DeepSpeed's 1e9), so the step's temporaries are an eighth of the partition's, not all of it.
    """
    bucket = zero3_bucket_elements(cfg)
    partition = count_parameters(cfg.model) // (cfg.parallel.tp * cfg.data_parallel_size(world_size))
    return {
        "reduce_bucket_size": bucket,
        "stage3_prefetch_bucket_size": int(0.9 * bucket),
        "stage3_param_persistence_threshold": 10 * cfg.model.hidden_size,
        "sub_group_size": zero3_sub_group_size(partition),
    }


def zero3_bucket_elements(cfg: Config) -> int:
    return cfg.model.hidden_size**2


def zero3_sub_group_size(partition_elements: int) -> int:
    return min(10**9, max(10**7, partition_elements // 8))


def gradient_data_types(cfg: Config, precision: str) -> dict[str, Any]:
    """bf16: sum micro-batch gradients and all-reduce them in train.grad_accum_dtype (DeepSpeed's
    default is the model's bf16). ZeRO 1-3 and the bf16 optimizer honour both keys; fp32 and fp16 keep
    DeepSpeed's defaults (fp32 throughout; fp16 with loss scaling)."""
    if precision != "bf16":
        return {}
    dtype = cfg.train.grad_accum_dtype
    return {"data_types": {"grad_accum_dtype": dtype}, "communication_data_type": dtype}


def build_deepspeed_config(cfg: Config, world_size: int, precision: str) -> dict[str, Any]:
    """`precision` is the resolved one (bf16, fp16 or fp32), see `pretrain.parallel.resolve_precision`."""
    par = cfg.parallel
    zero: dict[str, Any] = {"stage": par.zero_stage}
    if par.zero_stage >= 1:
        # DeepSpeed's pipeline engine schedules its own gradient reductions and turns overlap off.
        zero.update(overlap_comm=par.pp == 1, contiguous_gradients=True, reduce_scatter=True)
    if par.zero_stage == 3:
        zero.update(zero3_buffer_sizes(cfg, world_size))
    if par.offload_optimizer != "none":
        zero["offload_optimizer"] = {"device": par.offload_optimizer, "pin_memory": True}
    config: dict[str, Any] = {
        "train_batch_size": cfg.train.global_batch_size,
        "train_micro_batch_size_per_gpu": cfg.train.micro_batch_size,
        "gradient_accumulation_steps": cfg.grad_accum_steps(world_size),
        "gradient_clipping": 0.0 if we_clip_gradients(cfg, precision) else cfg.optim.grad_clip,
        "zero_optimization": zero,
        "bf16": {"enabled": precision == "bf16"},
        # Dynamic loss scaling (loss_scale 0) starting at 2^16, as Megatron-LM does.
        "fp16": {"enabled": precision == "fp16", "loss_scale": 0, "initial_scale_power": 16},
        # Our optimizer is torch's AdamW, which ZeRO supports; the guard only refuses unknown classes.
        "zero_allow_untested_optimizer": True,
        # Our own callbacks log; DeepSpeed's per-step prints would only duplicate them.
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
        **gradient_data_types(cfg, precision),
    }
    if par.pp > 1:
        # DeepSpeed splits activations sent between stages over the tensor-parallel ranks, which
        # assumes they are replicated there; with sequence parallelism they are already split.
        sequence_parallel = par.sequence_parallel and par.tp > 1
        config["pipeline"] = {
            "pipe_partitioned": not sequence_parallel,
            "grad_partitioned": not sequence_parallel,
        }
    return config
