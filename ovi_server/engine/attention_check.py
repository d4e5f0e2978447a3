"""Start-up check of the attention backend: one real call in the dtype and head sizes the model uses.

diffusers checks only that a backend's package imports; its per-call constraints (device, dtype,
shapes) run only when DIFFUSERS_ATTN_CHECKS is set. flash, flash-3, sage and cuDNN have no float32
kernels, so without this `--attention flash --dtype fp32` would start and then fail every request.
"""

from __future__ import annotations

import torch
from diffusers.models.attention_dispatch import (
    AttentionBackendName,
    _AttentionBackendRegistry,
    _check_attention_backend_requirements,
    dispatch_attention_fn,
)

from ovi_server.errors import ConfigError


def check_attention_backend(
    name: str, device: torch.device, dtype: torch.dtype, heads_and_dims: set[tuple[int, int]]
) -> None:
    """Raises ConfigError unless backend `name` runs q, k, v [1, 16, H, D] for each (H, D) in `dtype`."""
    try:
        backend = AttentionBackendName(name)
    except ValueError:
        known = ", ".join(b.value for b in AttentionBackendName)
        raise ConfigError(
            f"attention backend {name!r} cannot be used here: not a diffusers backend name ({known})"
        ) from None
    try:
        _check_attention_backend_requirements(backend)  # its package is installed
    except (RuntimeError, ImportError) as exc:
        raise ConfigError(f"attention backend {name!r} cannot be used here: {exc}") from exc
    dtype_name = str(dtype).removeprefix("torch.")
    for num_heads, head_dim in sorted(heads_and_dims):
        q, k, v = torch.randn(3, 1, 16, num_heads, head_dim, device=device, dtype=dtype).unbind(0)
        try:
            for constraint in _AttentionBackendRegistry._constraints.get(backend, []):
                constraint(query=q, key=k, value=v, attn_mask=None)
            out = dispatch_attention_fn(q, k, v, backend=backend)
            if out.shape != q.shape or not torch.isfinite(out).all():
                raise RuntimeError(f"returned {tuple(out.shape)} with non-finite values")
        except Exception as exc:  # every failure here is the backend's, reported as a start-up error
            hint = (
                "; use --attention native, or --dtype bf16"
                if dtype == torch.float32
                else "; use --attention native"
            )
            raise ConfigError(
                f"attention backend {name!r} cannot run {dtype_name} attention with {num_heads} heads of "
                f"size {head_dim} on {device}: {exc}{hint}"
            ) from exc
