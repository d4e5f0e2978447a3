"""Checkpoint loading: build on the meta device, read tensors memory-mapped, remap, assign strictly.

Peak host memory stays near one copy of the checkpoint: safetensors files are opened with
`safe_open` (mmap) and `.pth` files with `torch.load(mmap=True)`, and each tensor is converted
(dtype, device) on its own just before it is assigned, so no second full state dict is built.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Container, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import safe_open
from torch import Tensor, nn

from ovi_server.errors import WeightsError
from ovi_server.placement import Placement

logger = logging.getLogger(__name__)

FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)


class LazyStateDict(Mapping[str, Tensor]):
    """A read-only state dict whose tensors are materialised (memory-mapped) when indexed."""

    def __init__(self, path: Path, keys: list[str], get: Callable[[str], Tensor]):
        self.path, self._get = path, get
        self._keys = dict.fromkeys(keys)  # ordered, with O(1) membership

    def __getitem__(self, key: str) -> Tensor:
        if key not in self._keys:
            raise KeyError(key)
        return self._get(key)

    def __iter__(self) -> Iterator[str]:
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)


def read_state_dict(path: str | Path, subkey: str | None = None) -> Mapping[str, Tensor]:
    """Tensors of a `.safetensors`, `.pth` or `.pt` file, memory-mapped.

    Args:
        subkey: for `.pth` files holding `{subkey: state_dict}` (BigVGAN's `best_netG.pt` uses
            "generator"); for safetensors files the same nesting is spelled as a `subkey.` prefix.
    """
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"{path}: file not found; see weights/README.md for the expected layout")
    try:
        if path.suffix == ".safetensors":
            handle = safe_open(str(path), framework="pt", device="cpu")
            keys = list(handle.keys())
            prefix = f"{subkey}." if subkey and any(k.startswith(f"{subkey}.") for k in keys) else ""
            names = [k[len(prefix) :] for k in keys if k.startswith(prefix)]
            return LazyStateDict(path, names, lambda k: handle.get_tensor(prefix + k))
        obj = torch.load(str(path), map_location="cpu", mmap=True, weights_only=True)
    except WeightsError:
        raise
    except Exception as exc:
        raise WeightsError(f"{path}: cannot be read as a checkpoint ({type(exc).__name__}: {exc})") from exc
    if subkey is not None and isinstance(obj, Mapping) and subkey in obj:
        obj = obj[subkey]
    if not isinstance(obj, Mapping) or not all(isinstance(v, Tensor) for v in obj.values()):
        raise WeightsError(f"{path}: expected a state dict of tensors, found {type(obj).__name__}")
    return dict(obj)


def rename_key(key: str, renames: tuple[tuple[str, str], ...]) -> str:
    """The first (regex, replacement) pair whose regex matches the whole key renames it; else unchanged."""
    for pattern, target in renames:
        if re.fullmatch(pattern, key):
            return re.sub(pattern, target, key)
    return key


@contextmanager
def meta_device() -> Iterator[None]:
    """Build modules without allocating their parameters."""
    with torch.device("meta"):
        yield


def check_keys(path: Path | str, expected: set[str], found: set[str], what: str) -> None:
    """Strict: one error naming the file and the first missing / unexpected keys."""
    missing = sorted(expected - found)
    unexpected = sorted(found - expected)
    if not missing and not unexpected:
        return
    parts = []
    if missing:
        parts.append(f"{len(missing)} keys missing for {what} (first: {', '.join(missing[:3])})")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected keys (first: {', '.join(unexpected[:3])})")
    raise WeightsError(
        f"{path}: {'; '.join(parts)}. Is this the checkpoint of the configured variant? "
        "Check --variant and the files under --weights (weights/README.md lists them)."
    )


def load_module(
    module: nn.Module,
    state_dict: Mapping[str, Tensor],
    placement: Placement,
    *,
    path: Path | str,
    what: str,
    keep_fp8: bool | Container[str] = False,
    fp32_params: tuple[str, ...] = (),
) -> nn.Module:
    """Assigns `state_dict` to a (meta) module strictly, converting tensor by tensor.

    Args:
        keep_fp8: leave float8 tensors in float8 (low-VRAM storage): all of them (True) or those named
            in the container; the others are upcast to the compute dtype.
        fp32_params: name fragments of parameters kept in float32 whatever the placement dtype.
    """
    own = module.state_dict(keep_vars=True)
    check_keys(path, set(own), set(state_dict), what)
    converted: dict[str, Tensor] = {}
    for name, target in own.items():
        tensor = state_dict[name]
        if tuple(tensor.shape) != tuple(target.shape):
            raise WeightsError(
                f"{path}: {name} has shape {tuple(tensor.shape)}, the {what} config expects {tuple(target.shape)}; "
                "is this the checkpoint of the configured variant?"
            )
        dtype = tensor.dtype
        if tensor.is_floating_point():
            if dtype in FP8_DTYPES and (keep_fp8 is True or (keep_fp8 and name in keep_fp8)):
                pass
            elif any(part in name for part in fp32_params):
                dtype = torch.float32
            else:
                dtype = placement.dtype
        converted[name] = tensor.to(device=placement.device, dtype=dtype)
    module.load_state_dict(converted, strict=True, assign=True)
    return module.eval().requires_grad_(False)


def load_checkpoint(
    module: nn.Module,
    path: str | Path,
    placement: Placement,
    *,
    what: str,
    remap: Callable[[dict[str, Tensor]], dict[str, Tensor]] | None = None,
    subkey: str | None = None,
    keep_fp8: bool | Container[str] = False,
    fp32_params: tuple[str, ...] = (),
) -> nn.Module:
    """read_state_dict + optional key remap + load_module, logging what was loaded."""
    state_dict = read_state_dict(path, subkey)
    if remap is not None:
        state_dict = remap(dict(state_dict))
    load_module(
        module, state_dict, placement, path=path, what=what, keep_fp8=keep_fp8, fp32_params=fp32_params
    )
    logger.info(
        "loaded %s from %s (%d tensors) on %s as %s",
        what,
        path,
        len(state_dict),
        placement.device,
        str(placement.dtype).removeprefix("torch."),
    )
    return module


def init_random_(
    module: nn.Module, placement: Placement, seed: int, fill_device: torch.device | None = None
) -> nn.Module:
    """Materialises a meta module with random weights (tiny demo model, benchmarks): N(0, 0.02), norms 1.

    Allocated directly on the placement's device in its dtype and filled there, so a full-size model
    never exists in float32 in host memory (11.7 B parameters would be 47 GB). `fill_device` (a GPU,
    for a model that lives in host memory) draws the numbers there and copies them over: a CPU draws
    about 0.25 G numbers a second, a minute for the fusion model.
    """
    module.to(dtype=placement.dtype)  # still on the meta device: free
    module.to_empty(device=placement.device)
    # with its index ("cuda" -> "cuda:0"), to compare with the parameters' devices
    fill_device = torch.empty(0, device=placement.device if fill_device is None else fill_device).device
    generator = torch.Generator(fill_device).manual_seed(seed)
    with torch.no_grad():
        for name, param in module.named_parameters():
            leaf = name.rsplit(".", 1)[-1]
            if "norm" in name and leaf in ("weight", "gamma"):
                param.fill_(1.0)
            elif leaf == "bias":
                param.zero_()
            elif fill_device == param.device:
                param.normal_(0.0, 0.02, generator=generator)
            else:
                drawn = torch.empty(param.shape, dtype=param.dtype, device=fill_device)
                param.copy_(drawn.normal_(0.0, 0.02, generator=generator))
        for _, buf in module.named_buffers():
            if buf.is_floating_point():
                buf.zero_()
    return module.eval().requires_grad_(False)
