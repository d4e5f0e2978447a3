"""Where and in which precision the models run, decided once at start-up."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Literal

import torch

from ovi_server.errors import ConfigError
from ovi_server.placement import CPU_FP32, Placement

__all__ = ["CPU_FP32", "Placement", "resolve_placement"]  # Placement lives in ovi_server/placement.py

logger = logging.getLogger(__name__)


_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


def resolve_placement(
    device: str = "auto",
    dtype: str = "auto",
    offload: Literal["auto", "none", "model", "block"] = "none",
    attention: str = "native",
    fp8_storage: bool = False,
    gpu_memory_gib: float | None = None,
) -> Placement:
    """The only place that asks torch which devices exist. `gpu_memory_gib` caps what this process may
    allocate on a CUDA device (PyTorch's caching allocator refuses more, as a smaller card would)."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(
            f"device {device!r} requested but CUDA is not available on this host; use --device cpu"
        )
    if dtype == "auto":
        dt = torch.bfloat16 if dev.type == "cuda" else torch.float32
    elif dtype in _DTYPES:
        dt = _DTYPES[dtype]
    else:
        raise ConfigError(f"unknown dtype {dtype!r}; expected one of {sorted(_DTYPES)} or 'auto'")
    if offload not in ("none", "auto") and dev.type == "cpu":
        logger.warning(
            "offload=%s has no effect on the CPU (the models already live in host memory)", offload
        )
    if dev.type == "cpu":
        offload = "none"  # "auto" on a GPU is decided from the models' sizes (engine/pipeline.py)
    memory_limit = None
    if gpu_memory_gib is not None and dev.type != "cuda":
        logger.warning("--gpu-memory has no effect on the CPU")
    elif gpu_memory_gib is not None:
        memory_limit = _limit_memory(dev, gpu_memory_gib)
    return Placement(dev, dt, offload, attention, fp8_storage, memory_limit)


def _limit_memory(device: torch.device, gib: float) -> int:
    total = torch.cuda.get_device_properties(device).total_memory
    limit = int(gib * 2**30)
    if limit > total:
        raise ConfigError(
            f"--gpu-memory {gib:g} GiB is more than {device} has ({total / 2**30:.1f} GiB); "
            "leave it unset to use the whole card"
        )
    # process-wide for this device, as a smaller card would be; the CUDA context (about 0.5 GiB) is
    # outside the allocator and not counted
    # an index: set_per_process_memory_fraction refuses a bare "cuda" (get_device_properties takes it)
    index = device.index if device.index is not None else torch.cuda.current_device()
    torch.cuda.set_per_process_memory_fraction(limit / total, index)
    logger.info("GPU memory: this process uses at most %.1f of %s's %.1f GiB (--gpu-memory)",
                limit / 2**30, device, total / 2**30)  # fmt: skip
    return limit


def free_memory(device: torch.device, limit: int | None = None) -> int | None:
    """Bytes this process could still allocate on a CUDA device (what the caching allocator holds counts
    as free), within `limit` (Placement.memory_limit) if set; None elsewhere."""
    if device.type != "cuda":
        return None
    free, _ = torch.cuda.mem_get_info(device)
    allocated = torch.cuda.memory_allocated(device)
    free += torch.cuda.memory_reserved(device) - allocated
    return free if limit is None else min(free, limit - allocated)


def total_memory(device: torch.device, limit: int | None = None) -> int | None:
    """Total bytes of a CUDA device, or `limit` (Placement.memory_limit) if smaller; None elsewhere."""
    if device.type != "cuda":
        return None
    total = torch.cuda.get_device_properties(device).total_memory
    return total if limit is None else min(total, limit)


def synchronize(device: torch.device) -> None:
    """Waits for the queued kernels of `device` (of that device, not the current one); no-op on the CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextmanager
def ieee_float32() -> Iterator[None]:
    """float32 matmuls and convolutions in full precision, not TF32, inside the block.

    torch 2.13 defaults cuDNN convolutions to TF32 on Ampere and later; the float32 golden cases
    (atol 5e-5) fail under it (emulated on a CPU: errors of 1.3e-3 to 2.3e-3 on the fusion cases).
    """
    backends = (torch.backends.cuda.matmul, torch.backends.cudnn.conv, torch.backends.cudnn.rnn)
    saved = [b.fp32_precision for b in backends]
    for b in backends:
        b.fp32_precision = "ieee"
    try:
        yield
    finally:
        for b, value in zip(backends, saved, strict=True):
            b.fp32_precision = value
