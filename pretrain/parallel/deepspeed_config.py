"""The one function that turns our typed config into DeepSpeed's JSON config.

There is never a second, hand-edited DeepSpeed JSON: this dict is what `deepspeed.initialize` gets,
and it is written into the run directory next to the resolved config.
"""

from __future__ import annotations

from typing import Any

from pretrain.config import Config


def we_clip_gradients(cfg: Config, precision: str) -> bool:
    """fp32 without ZeRO: our engine clips the global gradient norm itself (see GlobalNormClipper);
    everywhere else DeepSpeed's optimizer wrappers do."""
    return cfg.parallel.zero_stage == 0 and precision == "fp32"


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
        # Gather each layer's weights just in time; keep small ones resident.
        zero.update(stage3_prefetch_bucket_size=5e7, stage3_param_persistence_threshold=1e5)
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
