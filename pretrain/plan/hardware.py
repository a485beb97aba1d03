"""The machines a layout is planned for: GPU data-sheet numbers, the cluster, and the analytic model's
assumptions, each with its source (or the plain statement that it is an assumption).

Numbers are per GPU. Bandwidths are in GB/s (10^9 bytes per second) per direction; memory in bytes.
"""

from __future__ import annotations

from dataclasses import dataclass, field

GiB = 2**30


@dataclass(frozen=True)
class GPU:
    """One accelerator model, as NVIDIA's data sheets give it (dense, no sparsity)."""

    name: str
    description: str
    memory_bytes: int  # total device memory as nvidia-smi reports it
    peak_tflops_bf16: float  # dense bf16/fp16 tensor-core peak; the same figures as pretrain/train/mfu.py
    peak_tflops_fp32: float  # fp32 without TF32
    hbm_gbps: float  # HBM bandwidth
    nvlink_gbps: float  # NVLink per GPU and direction on the usual 8-GPU SXM board (the intra-node default)
    network_gbps: float  # one NIC per GPU on the usual DGX-class node (the inter-node default)
    matmul_efficiency: float  # fraction of peak a large bf16 GEMM sustains (an assumption, see below)

    def peak_tflops(self, precision: str) -> float:
        return self.peak_tflops_fp32 if precision == "fp32" else self.peak_tflops_bf16


MiB = 2**20

# Memory: nvidia-smi's total (A100 40GB 40,960 MiB; A100 80GB 81,920 MiB; H100 SXM 81,559 MiB;
# H200 143,771 MiB). HBM: data sheets (A100 40GB 1,555 GB/s, A100 80GB SXM 2,039 GB/s, H100 SXM
# 3.35 TB/s, H200 4.8 TB/s). NVLink: A100 600 GB/s and H100/H200 900 GB/s total per GPU, half of it per
# direction. Network: DGX A100 has 8 x 200 Gb/s HDR (25 GB/s per GPU), DGX H100/H200 8 x 400 Gb/s NDR
# (50 GB/s per GPU). GEMM efficiency: an assumption, not a measurement here: large cuBLAS bf16 GEMMs
# commonly sustain about 80% of peak on A100 and about 70% on H100/H200, whose data-sheet peak assumes a
# boost clock that sustained GEMMs do not hold under the power limit. Override with --matmul-efficiency.
GPUS: dict[str, GPU] = {
    gpu.name: gpu
    for gpu in (
        GPU("a100-40gb", "A100 SXM 40GB", 40_960 * MiB, 312.0, 19.5, 1555.0, 300.0, 25.0, 0.80),
        GPU("a100-80gb", "A100 SXM 80GB", 81_920 * MiB, 312.0, 19.5, 2039.0, 300.0, 25.0, 0.80),
        GPU("h100-80gb", "H100 SXM 80GB", 81_559 * MiB, 989.4, 66.9, 3350.0, 450.0, 50.0, 0.70),
        GPU("h200", "H200 SXM 141GB", 143_771 * MiB, 989.4, 66.9, 4800.0, 450.0, 50.0, 0.70),
    )
}


@dataclass(frozen=True)
class Assumptions:
    """Every knob of the analytic model that is not a data-sheet number. Defaults are documented in
    docs/LAYOUTS.md; each can be changed from the command line."""

    comm_efficiency: float = 0.8
    """Fraction of the link bandwidth NCCL collectives reach (bus bandwidth / link rate). An assumption:
    nccl-tests on DGX systems commonly report 80-90% for large messages; smaller messages do worse."""
    hbm_efficiency: float = 0.8
    """Fraction of HBM bandwidth that memory-bound kernels (norms, activations, the optimizer) reach."""
    fragmentation: float = 0.10
    """Headroom for the caching allocator (reserved but unallocated blocks), as a fraction of the peak
    of allocated memory. An assumption; PyTorch's memory_stats commonly show 5-15% in long runs."""
    runtime_reserve_bytes: int = 2 * GiB
    """Device memory outside PyTorch's allocator: the CUDA context (about 0.5 GiB), cuBLAS workspaces
    and NCCL's buffers for the data-, tensor- and pipeline-parallel communicators. An assumption."""
    host_op_s: float = 4e-6
    """Host time per ATen operation in eager PyTorch (Python, dispatch, autograd, kernel launch). GPU
    work runs asynchronously, so a block takes the longer of its GPU time and its host time; the
    operations are counted on a real block (pretrain.plan.performance.host_ops_per_block). An
    assumption: eager overheads of 2-10 microseconds per op are common."""
    intra_node_latency_s: float = 10e-6
    """Fixed cost of one NCCL collective within a node (an assumption; small-message latency)."""
    inter_node_latency_s: float = 30e-6
    """Fixed cost of one NCCL collective across nodes (an assumption)."""
    reduce_bucket_elements: int = 500_000_000
    """DeepSpeed's default zero_optimization.reduce_bucket_size, which our DeepSpeed config does not
    set (pretrain/parallel/deepspeed_config.py); tested against DeepSpeed's own default."""
    stage3_max_live_elements: int = 1_000_000_000
    """DeepSpeed's default stage3_max_live_parameters: ZeRO-3 gathers at most this many at a time."""


@dataclass(frozen=True)
class Cluster:
    """Nodes x GPUs per node of one GPU model, and the bandwidths between them (per GPU, per direction).

    A group of ranks that fits in one node talks over NVLink (`intra_node_gbps`), any other over the
    network (`inter_node_gbps`); ranks are placed as DeepSpeed's PipeModelDataParallelTopology places
    them (tensor-parallel ranks adjacent, then data-parallel, then pipeline stages)."""

    nodes: int
    gpus_per_node: int
    gpu: GPU
    intra_node_gbps: float
    inter_node_gbps: float
    assumptions: Assumptions = field(default_factory=Assumptions)

    @property
    def world_size(self) -> int:
        return self.nodes * self.gpus_per_node

    def group_bandwidth_gbps(self, span: int) -> float:
        """Achieved bandwidth of a group whose ranks lie within `span` consecutive ranks."""
        link = self.intra_node_gbps if span <= self.gpus_per_node else self.inter_node_gbps
        return link * self.assumptions.comm_efficiency

    def group_latency_s(self, span: int) -> float:
        a = self.assumptions
        return a.intra_node_latency_s if span <= self.gpus_per_node else a.inter_node_latency_s

    def describe(self) -> str:
        return f"{self.nodes} nodes x {self.gpus_per_node} {self.gpu.description} ({self.world_size:,} GPUs)"


def make_cluster(
    nodes: int,
    gpus_per_node: int,
    gpu: str | GPU,
    intra_node_gbps: float | None = None,
    inter_node_gbps: float | None = None,
    assumptions: Assumptions | None = None,
) -> Cluster:
    """A cluster with the GPU's usual interconnect unless the bandwidths are given."""
    spec = gpu if isinstance(gpu, GPU) else GPUS[gpu]
    return Cluster(
        nodes,
        gpus_per_node,
        spec,
        intra_node_gbps if intra_node_gbps is not None else spec.nvlink_gbps,
        inter_node_gbps if inter_node_gbps is not None else spec.network_gbps,
        assumptions or Assumptions(),
    )
