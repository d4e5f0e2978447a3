"""`--compile`: torch.compile of the fusion blocks, applied from outside so model code stays plain PyTorch.

Each block's forward is compiled once per (tower, phase) graph, i.e. four graphs per token count
(more for i2v, whose time embedding is per token). With `dynamic=False` every new resolution adds
four more, and torch's recompile limit (8 per code object) is reached after about two shapes, after
which new shapes silently run uncompiled. `dynamic=None` is torch's automatic dynamic shapes: the
first shape compiles static, and a second one recompiles with the dimension that changed (the
token count) symbolic, so later resolutions reuse those graphs. Recompiles are logged (torch's
`recompiles` log) so a slow request can be traced to one.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from ovi_server.errors import ConfigError

logger = logging.getLogger(__name__)

# (tower x phase) x (static, dynamic) graphs, for t2v and i2v, with room to spare
RECOMPILE_LIMIT = 32


def wants_compile(setting: str, device: torch.device, fp8: bool, offload: str, parallel: bool) -> bool:
    """--compile auto|on|off -> whether to compile. auto: only where compiling was measured faster and
    works without graph breaks: one CUDA device, resident bf16 weights (not --fp8, --offload, --sp).
    "on" with --fp8 is refused earlier, by `check_compile` before loading."""
    if setting != "auto":
        return setting == "on"
    return device.type == "cuda" and not fp8 and offload == "none" and not parallel


def check_compile(fp8: bool) -> None:
    """fp8 storage swaps weights around every Linear call: under torch.compile each is a graph break."""
    if fp8:
        raise ConfigError(
            "--fp8 with --compile: fp8 weights are upcast layer by layer outside the compiled graph, "
            "which breaks it at every Linear (slower than eager). Use one or the other."
        )


def compile_blocks(model: nn.Module, backend: str = "inductor") -> None:
    """Compiles the model's repeated blocks (diffusers' `compile_repeated_blocks`) with dynamic token counts."""
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, RECOMPILE_LIMIT)
    torch._logging.set_logs(recompiles=True)
    model.compile_repeated_blocks(dynamic=None, backend=backend)
    logger.info(
        "fusion blocks compiled (automatic dynamic shapes, recompile limit %d)",
        torch._dynamo.config.recompile_limit,
    )


def uncompile_blocks(model: nn.Module) -> None:
    """Undoes `compile_blocks`: every block runs its plain forward again (nn.Module.compile keeps the
    compiled callable in `_compiled_call_impl`), and torch's compile caches are dropped."""
    for module in model.modules():
        if getattr(module, "_compiled_call_impl", None) is not None:
            module._compiled_call_impl = None
    torch._dynamo.reset()
