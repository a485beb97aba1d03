"""The CUDA paths: NCCL, bf16, flash attention, fused AdamW, checkpoints from device memory, compile.

Run with `make check-gpu` on a GPU node (PRETRAIN_TEST_GPU=1: DeepSpeed's own accelerator, NCCL).
Everywhere else these are skipped with the reason (tests/conftest.py); `gpu(gpus=2)` ones need two
GPUs. Training runs in processes of their own (tests/gpu_runs.py); the kernel-level checks run here.
"""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from conftest import REPO, TINY
from gpu_runs import cpu_env, gpu_env, launcher, run, run_on_gpus
from training_runs import step_records

# bf16 against fp32, or bf16 in another order of operations: bf16 keeps 8 significant bits (2^-9 =
# 2e-3 relative rounding per value) and ZeRO's fp32 masters and fp32 gradient accumulation keep it
# from compounding. On CPU, bf16 against fp32 drifted at most 1.7e-4 (loss) and 1.7e-3 (grad norm)
# relative over 6 steps (tests/test_engine_equivalence.py); GPU kernels round differently again
# (tensor-core matmuls, flash attention's online softmax), so these are 2.5x the CPU test's bounds.
# A wrong averaging factor, a dropped micro-batch or a missed all-reduce moves the loss by more than
# 1e-2 within a few steps and the grad norm by tens of percent. Not yet measured on a GPU: each test
# prints the spread it saw, to tighten these from.
LOSS_RTOL, GRAD_RTOL = 5e-3, 3e-2

FLASH_FORWARD = "aten._scaled_dot_product_flash_attention"
FLASH_BACKWARD = "aten._scaled_dot_product_flash_attention_backward"
PRESETS = sorted((REPO / "configs").glob("*.yaml"))
NORM = "blocks.1.mlp_norm.weight"


def by_step(records: list[dict]) -> dict[int, dict]:
    return {r["step"]: r for r in step_records(records)}


def assert_tracks(ours: list[dict], reference: list[dict], what: str) -> None:
    """Same steps; loss and grad norm within LOSS_RTOL / GRAD_RTOL of the reference; the spread printed."""
    ours_by, ref_by = by_step(ours), by_step(reference)
    assert sorted(ours_by) == sorted(ref_by) and ref_by, (sorted(ours_by), sorted(ref_by))
    spread = {
        key: max(abs(ours_by[s][key] - r[key]) / abs(r[key]) for s, r in ref_by.items())
        for key in ("loss", "grad_norm")
    }
    print(f"{what}: max relative difference: loss {spread['loss']:.2e}, grad norm {spread['grad_norm']:.2e}")
    for step, ref in ref_by.items():
        assert ours_by[step]["loss"] == pytest.approx(ref["loss"], rel=LOSS_RTOL), f"loss at step {step}"
        assert ours_by[step]["grad_norm"] == pytest.approx(ref["grad_norm"], rel=GRAD_RTOL), f"step {step}"
    last, first = ref_by[max(ref_by)], ref_by[min(ref_by)]
    assert last["loss"] < first["loss"], "the reference did not train"


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.gpu
def test_the_deepspeed_launcher_trains_the_tiny_preset_on_every_gpu_in_bf16_over_nccl(tmp_path):
    """Every visible GPU, one rank each, bf16 over NCCL, against the same global batch in fp32 on CPU
    (the loss does not depend on how the batch is split: tested on CPU)."""
    from pretrain.parallel.distributed import free_port

    gpus = torch.cuda.device_count()
    batch = gpus * max(1, 16 // gpus)
    common = ["--config", str(TINY), "train.steps=10", "logging.interval=1", "train.eval_interval=0",
              "checkpoint.interval=0", "checkpoint.save_final=false", "logging.plot=false",
              "logging.tensorboard=false", f"train.global_batch_size={batch}",
              f"train.micro_batch_size={batch // gpus}"]  # fmt: skip
    gpu_dir, cpu_dir = tmp_path / "gpu", tmp_path / "cpu"
    command = [*launcher(gpus, free_port()), "pretrain/main.py", *common, "train.precision=bf16"]
    result = run([*command, f"run.dir={gpu_dir}"], gpu_env(NCCL_DEBUG="INFO"), timeout=600)
    reference = [sys.executable, "pretrain/main.py", *common, "train.precision=fp32"]
    run([*reference, f"run.dir={cpu_dir}"], cpu_env(), timeout=600)

    summary = json.loads((gpu_dir / "run_summary.json").read_text())
    assert summary["precision"] == "bf16" and summary["world_size"] == gpus
    ranks = json.loads((gpu_dir / "launch.json").read_text())["ranks"]
    assert sorted(r["local_rank"] for r in ranks) == list(range(gpus))
    assert {r["device"] for r in ranks} == {"cuda"}
    assert "NCCL INFO" in result.stdout + result.stderr, "no NCCL communicator was created"
    assert_tracks(read_metrics(gpu_dir), read_metrics(cpu_dir), f"bf16 on {gpus} GPUs against fp32 on CPU")


class RecordedOps(TorchDispatchMode):
    """The aten operators that ran (forward and backward) while active."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: set[str] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.seen.add(str(func.overloadpacket))
        return func(*args, **(kwargs or {}))


@pytest.mark.gpu
@pytest.mark.parametrize("preset", PRESETS, ids=lambda p: p.stem)
def test_attention_runs_the_flash_kernel_for_the_shapes_of_every_preset(preset):
    """Our attention module with the preset's heads, key/value heads (grouped-query attention goes to
    SDPA as enable_gqa, not expanded) and head_dim, in bf16, short sequences. SDPA restricted to flash
    raises where our shapes, dtype or layout would fall back; the recorded operators prove SDPA's flash
    kernel ran at all (attention computed some other way would pass the restriction)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from pretrain.config import load_config
    from pretrain.model.layers import Attention

    cfg = load_config(preset).model
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device("cuda"):
            attention = Attention(cfg)
            x = torch.randn(2, 256, cfg.hidden_size, requires_grad=True)
    finally:
        torch.set_default_dtype(default)
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION), RecordedOps() as ops:
        attention(x).float().square().mean().backward()
    assert {FLASH_FORWARD, FLASH_BACKWARD} <= ops.seen, sorted(s for s in ops.seen if "attention" in s)
    assert x.grad is not None and torch.isfinite(x.grad).all()
    del attention, x
    torch.cuda.empty_cache()


@pytest.mark.gpu
def test_adamw_on_cuda_is_fused_and_steps_like_the_unfused_reference():
    """pretrain.optim on CUDA parameters: torch's fused kernel, three steps against the single-tensor
    AdamW with the same hyperparameters and gradients. Both compute the same formula in fp32, rounded
    in another order: a few ulp (1.2e-7 relative) per step; rtol 1e-6 is ~8 ulp. A lost weight decay
    moves a weight by lr x wd = 2e-4 relative per step, wrong moments or bias correction by ~lr / |w|."""
    from pretrain.config import load_config
    from pretrain.model import Transformer
    from pretrain.optim import build_optimizer
    from pretrain.optim.optimizer import parameter_groups

    cfg = load_config(TINY)
    model = Transformer(cfg.model, cfg.padded_vocab_size, seed=0).cuda()
    fused = build_optimizer(model, cfg.optim)
    assert fused.defaults["fused"] is True and fused.defaults["foreach"] is None
    twin = copy.deepcopy(model)
    o = cfg.optim
    reference = torch.optim.AdamW(parameter_groups(twin, o.weight_decay), lr=o.lr, betas=(o.beta1, o.beta2),
                                  eps=o.eps, fused=False, foreach=False)  # fmt: skip
    generator = torch.Generator(device="cuda").manual_seed(0)
    for _ in range(3):
        for p, q in zip(model.parameters(), twin.parameters(), strict=True):
            p.grad = torch.randn(p.shape, device="cuda", generator=generator) * 1e-2
            q.grad = p.grad.clone()
        fused.step()
        reference.step()
    for (name, p), q in zip(model.named_parameters(), twin.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-9, msg=name)
    assert not torch.equal(model.norm.weight, torch.ones_like(model.norm.weight)), "nothing was stepped"


RESUME = ["train.steps=6", "checkpoint.interval=3", "checkpoint.keep_last=0", "train.precision=bf16"]


@pytest.mark.gpu
def test_a_resumed_gpu_run_continues_bitwise_cuda_rng_included(tmp_path):
    """6 steps saving at step 3, against a fresh process resuming that checkpoint: steps 4-6, the final
    weights and the CUDA generator are bitwise the uninterrupted run's. Noise drawn from the CUDA
    generator enters every step (gpu_runs.train_with_cuda_noise), and the control resume, whose CUDA
    generator is reseeded after the restore, must differ: the check would see an unrestored CUDA RNG."""
    (full,) = run_on_gpus("train_with_cuda_noise", RESUME, str(tmp_path / "full"), False)
    resume = [*RESUME, f"checkpoint.resume={tmp_path / 'full' / 'checkpoints' / 'step00000003'}"]
    (resumed,) = run_on_gpus("train_with_cuda_noise", resume, str(tmp_path / "resumed"), False)
    (control,) = run_on_gpus("train_with_cuda_noise", resume, str(tmp_path / "control"), True)
    uninterrupted, continued = by_step(full["records"]), by_step(resumed["records"])
    assert sorted(continued) == [4, 5, 6]
    for step in (4, 5, 6):
        for key in ("loss", "grad_norm", "lr"):
            assert continued[step][key] == uninterrupted[step][key], f"{key} at step {step}"
    assert resumed["weights"] == full["weights"] and resumed["cuda_rng"] == full["cuda_rng"]
    assert by_step(control["records"])[4]["loss"] != uninterrupted[4]["loss"]
    assert control["cuda_rng"] != full["cuda_rng"]


@pytest.mark.gpu
def test_host_buffers_pin_the_copies_of_cuda_tensors_and_wait_for_them():
    """A pageable buffer left by a CPU tensor of the same shape is not taken for a CUDA one; the copy,
    issued without waiting behind queued GPU work, has landed when snapshot returns."""
    from pretrain.checkpoint.writer import HostBuffers

    buffers = HostBuffers()
    buffers.release(buffers.snapshot({"w": torch.ones(4, 4)}))
    a = torch.randn(4096, 4096, device="cuda")
    live = (a @ a @ a)[:4, :4]  # milliseconds of work queued ahead of the copy
    copied = buffers.snapshot({"w": live})["w"]
    assert torch.cuda.current_stream().query(), "snapshot returned before its copy was done"
    assert copied.is_pinned() and not copied.is_cuda
    assert torch.equal(copied, live.cpu())
    assert buffers.bytes_held() == {"pinned": 0, "pageable": 64}


@pytest.mark.gpu
def test_an_async_save_from_device_memory_writes_what_a_sync_save_writes(tmp_path, record_property):
    """bf16 ZeRO-1 state on the GPU, saved synchronously and then asynchronously (twice: fresh and
    reused host buffers): every tensor of the files equal bitwise, the copies in pinned memory. The
    stall against the synchronous save is measured and reported here; its target belongs to bench/."""
    (result,) = run_on_gpus("save_sync_then_async", ["train.precision=bf16"], str(tmp_path / "run"))
    assert result["module_on_cuda"]
    assert result["compared"] > 0 and result["mismatches"] == []
    assert result["buffers"]["pinned"] >= result["module_bytes"], result["buffers"]
    held, ratio = result["held_s"], result["stall_over_sync"]
    record_property("async_stall_over_sync", ratio)
    print(f"save held training: sync {held['sync']:.3f}s, async {held['async']:.4f}s (first "
          f"{held['async_cold']:.4f}s): stall / sync = {ratio:.3f}; buffers {result['buffers']}")  # fmt: skip
    assert 0 < ratio < float("inf")


@pytest.fixture(scope="module")
def eager_gpu_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("eager")
    (result,) = run_on_gpus("train_with_facts", ["train.precision=bf16"], str(run_dir))
    return result


@pytest.mark.gpu
def test_the_trainer_on_cuda_runs_bf16_over_nccl_with_fused_adamw_on_device(eager_gpu_run):
    """What build_trainer makes on a GPU: the engine on cuda:0 in bf16, the NCCL world, and DeepSpeed's
    ZeRO wrapper stepping torch's fused AdamW over fp32 partitions that live on the GPU (a CPU copy, or
    parameters moved after the optimizer was built, would make it unfused or fail)."""
    assert eager_gpu_run["device"] == "cuda:0" and eager_gpu_run["backend"] == "nccl"
    assert eager_gpu_run["precision"] == "bf16"
    assert eager_gpu_run["fused_adamw"] is True and eager_gpu_run["optimizer_devices"] == ["cuda:0"]


@pytest.mark.gpu
def test_compiled_blocks_on_gpu_train_what_the_eager_model_trains(eager_gpu_run, tmp_path):
    """train.compile=true in bf16 (Triton kernels from inductor) against eager: both bf16, they differ
    in where fused intermediates are rounded, the same kind of difference as bf16 against fp32."""
    overrides = ["train.precision=bf16", "train.compile=true"]
    (compiled,) = run_on_gpus("train_with_facts", overrides, str(tmp_path), timeout=900)
    assert compiled["graphs"] >= 1, "train.compile=true compiled nothing"
    assert_tracks(compiled["records"], eager_gpu_run["records"], "compiled against eager, bf16")


@pytest.mark.gpu
def test_the_replica_checker_gathers_over_nccl_from_device_memory():
    """NCCL cannot send host memory: the fingerprints go as CUDA tensors and come back to the host."""
    (result,) = run_on_gpus("fingerprints_over_nccl")
    assert result["backend"] == "nccl"
    assert result["device"] == "cpu" and result["shape"][0] == 1 and result["equal"]


@pytest.mark.gpu(gpus=2)
@pytest.mark.parametrize(
    ("layout", "kind"), [([], "data-parallel"), (["parallel.tp=2"], "tensor-parallel")], ids=["dp2", "tp2"]
)
def test_the_replica_checker_on_nccl_names_a_parameter_that_drifted_on_one_rank(layout, kind, tmp_path):
    """As tests/test_tensor_parallel.py on gloo: consistent at step 2, the norm weight nudged on rank 1
    after step 3 named at step 4. fp32 ZeRO-0: ZeRO would overwrite the nudge from its masters."""
    overrides = [*layout, "parallel.zero_stage=0", "train.precision=fp32"]
    records = run_on_gpus("replica_check_after_drift", overrides, str(tmp_path), 1, NORM, gpus=2)[0]
    assert [r["step"] for r in records] == [2, 4]
    assert records[0]["replica_divergence"] == []
    (problem,) = records[1]["replica_divergence"]
    assert problem.startswith(f"{NORM}: {kind} copies differ"), problem


@pytest.mark.gpu(gpus=2)
def test_tensor_and_sequence_parallel_on_nccl_train_what_tp1_trains(tmp_path):
    """TP=2 with sequence parallelism (one data-parallel rank) against TP=1 (two), bf16 on 2 GPUs."""
    common = ["train.precision=bf16", "train.steps=8"]
    tp1 = run_on_gpus("train_and_read_metrics", common, str(tmp_path / "tp1"), gpus=2)[0]
    sp = ["parallel.tp=2", "parallel.sequence_parallel=true"]
    tp2 = run_on_gpus("train_and_read_metrics", [*common, *sp], str(tmp_path / "tp2"), gpus=2)[0]
    assert_tracks(tp2, tp1, "TP=2 + sequence parallel against TP=1, bf16")
