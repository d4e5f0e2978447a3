"""`Placement`: where and in which precision a module runs. Low enough for models/ and media/ to share
without importing the engine; `engine/device.py` decides it once at start-up (`resolve_placement`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch


@dataclass(frozen=True)
class Placement:
    device: torch.device
    dtype: torch.dtype  # bf16 on GPU, fp32 on CPU and in tests
    offload: Literal["auto", "none", "model", "block"] = (
        "none"  # "auto" is decided by OviPipeline.from_config
    )
    attention: str = "native"  # a diffusers attention backend name; checked at start-up
    fp8_storage: bool = False  # keep Linear weights as float8_e4m3fn, upcast per layer (low-VRAM mode)
    memory_limit: int | None = None  # bytes of the device this process may use (--gpu-memory); None: all


CPU_FP32 = Placement(torch.device("cpu"), torch.float32)
