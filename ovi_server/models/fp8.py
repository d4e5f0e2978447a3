"""fp8 weight storage (`--fp8`): the fp8 checkpoint's Linear/Conv weights stay float8_e4m3fn in memory
and are upcast one layer at a time, for that layer's forward only.

Why not diffusers' `enable_layerwise_casting`: it stores *every* parameter of a cast layer in the
storage dtype, biases included, while the official `model_fp8_e4m3fn.safetensors` keeps the tensors
whose names contain "norm" or "bias" in bf16 and the reference computes with each tensor in the file's
own dtype. This hook (a diffusers `ModelHook`, so diffusers' tooling sees it like its own) casts only
the weight, and only for the duration of the call; the fp8 tensor itself is never rewritten.
"""

from __future__ import annotations

import torch
from diffusers.hooks import HookRegistry, ModelHook
from torch import nn

from ovi_server.models.loading import FP8_DTYPES

HOOK_NAME = "ovi_fp8_weight"


class Fp8WeightHook(ModelHook):
    """Swaps a module's fp8 `weight` for a compute-dtype copy around its forward."""

    def __init__(self, compute_dtype: torch.dtype):
        super().__init__()
        self.compute_dtype = compute_dtype
        self.stored: torch.Tensor | None = None

    def pre_forward(self, module: nn.Module, *args, **kwargs):
        self.stored = module.weight.data
        module.weight.data = self.stored.to(self.compute_dtype)
        return args, kwargs

    def post_forward(self, module: nn.Module, output):
        module.weight.data = self.stored
        self.stored = None
        return output


def apply_fp8_weights(model: nn.Module, compute_dtype: torch.dtype) -> list[str]:
    """Hooks every module whose `weight` is stored in fp8; returns their names."""
    hooked = []
    for name, module in model.named_modules():
        weight = getattr(module, "weight", None)
        if isinstance(weight, nn.Parameter) and weight.dtype in FP8_DTYPES:
            HookRegistry.check_if_exists_or_initialize(module).register_hook(
                Fp8WeightHook(compute_dtype), HOOK_NAME
            )
            hooked.append(name)
    return hooked
