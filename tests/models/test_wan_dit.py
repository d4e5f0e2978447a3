"""The DiT's norms in bf16: where the reference's CUDA autocast computes in float32, so do we."""

from __future__ import annotations

import copy

import torch

from ovi_server.models.wan_dit import LayerNorm, RMSNorm


def _bf16_and_float32(module: torch.nn.Module, dim: int, seed: int = 0):
    """The module with random bf16-representable weights, in bf16 and float32, and a bf16 input [64, dim]."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_((1 + 0.2 * torch.randn(p.shape, generator=g)).bfloat16())
    x = (3 * torch.randn(64, dim, generator=g)).bfloat16()
    return copy.deepcopy(module).bfloat16(), module.float(), x


def test_rms_norm_in_bf16_is_the_float32_result_rounded_once():
    """The reference's bf16 autocast runs `pow` and `rsqrt` in float32: q and k come out of its RMSNorm
    rounded to bf16 once. Computed in bf16, the rounded per-row scale rsqrt(mean(x^2)) shifts whole rows
    and our bf16 forward drifted ~2% further from float32 than the reference's (benchmarks/drift.py)."""
    norm16, norm32, x = _bf16_and_float32(RMSNorm(3072, eps=1e-6), 3072)
    out = norm16(x)
    assert out.dtype == torch.bfloat16
    assert torch.equal(out, norm32(x.float()).bfloat16())


def test_layer_norm_in_bf16_is_the_float32_result_rounded_once():
    norm16, norm32, x = _bf16_and_float32(LayerNorm(3072, eps=1e-6, elementwise_affine=True), 3072)
    out = norm16(x)
    assert out.dtype == torch.bfloat16
    assert torch.equal(out, norm32(x.float()).bfloat16())
