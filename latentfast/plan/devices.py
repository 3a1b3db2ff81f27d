"""GPUs the planner answers for: memory, peak dense bf16 tensor FLOP/s and memory bandwidth
from the vendors' spec sheets, and the efficiencies assumed to turn peaks into a step time.

Sources (dense = without 2:4 sparsity):
- RTX 4090: NVIDIA Ada Lovelace architecture whitepaper (v2.0), Table "GeForce RTX 4090":
  peak BF16 tensor TFLOPS with FP32 accumulate 165.2 (330.4 sparse), 24 GB GDDR6X, 1008 GB/s.
- A100 40/80 GB SXM: NVIDIA A100 datasheet: BF16 tensor core 312 TFLOPS (624 sparse);
  bandwidth 1,555 GB/s (40 GB HBM2) and 2,039 GB/s (80 GB HBM2e).
- H100 SXM: NVIDIA H100 datasheet: BF16 tensor core 1,979 TFLOPS *with sparsity*, so 989.5
  dense; 80 GB HBM3, 3.35 TB/s.
- H200 SXM: NVIDIA H200 datasheet: BF16 1,979 TFLOPS with sparsity (989.5 dense), 141 GB HBM3e,
  4.8 TB/s.
Memory is what ``torch.cuda.mem_get_info`` reports as total on these boards, approximately
(24 GB = 23.99 GiB; the datasheets' "80 GB" is 80 GiB on A100 and 79.6 GiB on H100).
"""
from __future__ import annotations

from dataclasses import dataclass

GiB = 1 << 30

# Efficiencies assumed (stated with every time the planner prints): large training GEMMs
# reach ~45 % of the dense peak in eager PyTorch (MFU of well-tuned dense training is 40-55 %),
# memory-bound phases (decode, optimizer) ~80 % of the spec bandwidth (gpt-fast reports 82 %
# of the empirical peak on an A100). A roofline under these is a lower bound on the step time.
COMPUTE_EFFICIENCY = 0.45
BANDWIDTH_EFFICIENCY = 0.80
# Not in torch's allocator but on the card: the CUDA context + cuBLAS/cuDNN handles and
# workspaces (typically 0.3-0.6 GiB on Ampere/Hopper with lazy module loading).
CUDA_CONTEXT_BYTES = int(0.5 * GiB)
# The caching allocator rounds blocks (512 B small, 2 MiB segments for large ones) and
# fragments: a reserve of this share of the allocator peak is kept as headroom.
ALLOCATOR_OVERHEAD = 0.05


@dataclass(frozen=True)
class Device:
    name: str
    memory_bytes: int
    bf16_flops: float  # dense tensor-core peak, FLOP/s
    bandwidth: float  # bytes/s
    source: str

    @property
    def usable_bytes(self) -> int:
        """What the allocator can hand out: memory less the CUDA context."""
        return self.memory_bytes - CUDA_CONTEXT_BYTES


DEVICES = {
    "4090": Device("RTX 4090 24 GB", int(23.99 * GiB), 165.2e12, 1008e9, "Ada whitepaper"),
    "a100-40": Device("A100 40 GB SXM", 40 * GiB, 312e12, 1555e9, "A100 datasheet"),
    "a100-80": Device("A100 80 GB SXM", 80 * GiB, 312e12, 2039e9, "A100 datasheet"),
    "h100": Device("H100 80 GB SXM", int(79.6 * GiB), 989.5e12, 3.35e12, "H100 datasheet"),
    "h200": Device("H200 141 GB SXM", int(140.4 * GiB), 989.5e12, 4.8e12, "H200 datasheet"),
}
ALIASES = {"a100": "a100-80", "rtx4090": "4090", "h100-80": "h100", "a100-80gb": "a100-80", "a100-40gb": "a100-40"}


def get_device(name: str, memory_gb: float | None = None) -> Device:
    """A device by name (``4090``, ``a100-40``, ``a100-80``, ``h100``, ``h200``); ``memory_gb``
    overrides its memory (GiB) -- a custom card keeps the named one's FLOP/s and bandwidth."""
    key = ALIASES.get(name.lower(), name.lower())
    if key not in DEVICES:
        raise ValueError(f"--device: expected one of {sorted(DEVICES)}, got {name!r}")
    dev = DEVICES[key]
    if memory_gb is not None:
        if memory_gb <= 0:
            raise ValueError(f"--device_memory: expected GiB > 0, got {memory_gb!r}")
        dev = Device(f"{dev.name} (memory set to {memory_gb:g} GiB)", int(memory_gb * GiB), dev.bf16_flops,
                     dev.bandwidth, dev.source)
    return dev


def card_of(gpu_name: str, memory_bytes: int | None = None) -> str | None:
    """The ``DEVICES`` key of a GPU as ``torch.cuda.get_device_name()`` names it ("NVIDIA H100
    80GB HBM3", "NVIDIA A100-SXM4-40GB", "NVIDIA GeForce RTX 4090", ...); an A100's size from
    ``memory_bytes`` when its name does not say. None for a card the planner has no figures for."""
    n = gpu_name.upper()
    if "H200" in n:
        return "h200"
    if "H100" in n:
        return "h100"
    if "4090" in n:
        return "4090"
    if "A100" in n:
        if "40GB" in n.replace(" ", "") or (memory_bytes is not None and memory_bytes < 60 * GiB):
            return "a100-40"
        return "a100-80"
    return None
