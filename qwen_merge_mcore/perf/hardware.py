"""GPU and network specifications the planner's cost model runs on.

Peak numbers are the vendor's dense (no sparsity) tensor-core figures; bandwidths are what a
collective sees per GPU in one direction. Memory is the capacity CUDA reports (nvidia-smi's
total), before the CUDA context and libraries take their share (the planner's memory model
counts those separately).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Optional

MiB = 1 << 20
GiB = 1 << 30


@dataclass(frozen=True)
class GPUSpec:
    name: str
    memory_bytes: int
    peak_bf16_flops: float  # dense
    peak_fp8_flops: float  # dense
    hbm_bandwidth: float  # bytes/s
    nvlink_bandwidth: float  # bytes/s per GPU per direction inside a node (NVSwitch)
    network_bandwidth: float  # bytes/s per GPU per direction between nodes (one NIC per GPU)
    gpus_per_node: int = 8

    def peak_flops(self, fp8: bool) -> float:
        return self.peak_fp8_flops if fp8 else self.peak_bf16_flops


GPUS: dict[str, GPUSpec] = {
    # H100 SXM5 80 GB (DGX/HGX H100): 989.4 TFLOP/s bf16, 1978.9 fp8, HBM3 3.35 TB/s,
    # NVLink 4 900 GB/s bidirectional, ConnectX-7 NDR 400 Gb/s per GPU.
    "h100-80gb": GPUSpec("h100-80gb", memory_bytes=81559 * MiB, peak_bf16_flops=989.4e12,
                         peak_fp8_flops=1978.9e12, hbm_bandwidth=3.35e12, nvlink_bandwidth=450e9,
                         network_bandwidth=50e9),
    # H200 SXM 141 GB: same compute and links, HBM3e 4.8 TB/s.
    "h200-141gb": GPUSpec("h200-141gb", memory_bytes=143771 * MiB, peak_bf16_flops=989.4e12,
                          peak_fp8_flops=1978.9e12, hbm_bandwidth=4.8e12, nvlink_bandwidth=450e9,
                          network_bandwidth=50e9),
}


def gpu_spec(name: str) -> GPUSpec:
    if name not in GPUS:
        raise ValueError(f"unknown GPU {name!r}; known: {', '.join(GPUS)}")
    return GPUS[name]


# torch.cuda.get_device_name() of the SXM parts above ("NVIDIA H100 80GB HBM3", "NVIDIA H200").
# PCIe and NVL boards have lower clocks and peaks (H100 PCIe 756, H100/H200 NVL 835 dense bf16
# TFLOP/s) and GH200 another memory: none of them matches.
_DEVICE_NAMES = ((re.compile(r"\bH100 (80GB HBM3|SXM)"), "h100-80gb"),
                 (re.compile(r"\bH200\b(?! NVL)"), "h200-141gb"))


def gpu_spec_for_device(device_name: str) -> Optional[GPUSpec]:
    """The spec of the GPU CUDA names, or None for a part without one (set logging.peak_tflops)."""
    return next((GPUS[key] for pattern, key in _DEVICE_NAMES if pattern.search(device_name)), None)
