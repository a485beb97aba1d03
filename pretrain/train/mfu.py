"""Peak FLOP/s per device for model-FLOPs utilisation (MFU).

Dense (no sparsity) tensor-core figures from NVIDIA's data sheets. Unknown devices give None and
MFU is shown as n/a: never a guess.
"""

from __future__ import annotations

import torch

# (substring of torch.cuda.get_device_name(), bf16/fp16 TFLOP/s, fp32 TFLOP/s without TF32); first match wins.
_PEAK_TFLOPS: list[tuple[str, float, float]] = [
    ("GH200", 989.4, 66.9),
    ("H200", 989.4, 66.9),
    ("H100 PCIe", 756.0, 51.2),
    ("H100 NVL", 835.0, 60.0),
    ("H100", 989.4, 66.9),  # SXM5
    ("H800", 989.4, 66.9),
    ("A100", 312.0, 19.5),
    ("A800", 312.0, 19.5),
    ("L40S", 362.05, 91.6),
    ("A10G", 125.0, 31.2),
    ("V100", 125.0, 15.7),
    ("B200", 2250.0, 80.0),
]


def peak_tflops(device: torch.device, precision: str, override: float | None = None) -> float | None:
    if override is not None:
        return override
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, half, single in _PEAK_TFLOPS:
        if key in name:
            return single if precision == "fp32" else half
    return None
