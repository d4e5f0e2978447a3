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
) -> Placement:
    """The only place that asks torch which devices exist."""
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
    return Placement(dev, dt, offload, attention, fp8_storage)


def free_memory(device: torch.device) -> int | None:
    """Free bytes on a CUDA device (what the caching allocator holds counts as free); None elsewhere."""
    if device.type != "cuda":
        return None
    free, _ = torch.cuda.mem_get_info(device)
    return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)


def total_memory(device: torch.device) -> int | None:
    """Total bytes of a CUDA device; None elsewhere."""
    if device.type != "cuda":
        return None
    return torch.cuda.get_device_properties(device).total_memory


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
