"""Host-resident weights that visit the device: whole models per stage, the fusion model block by block,
or the text encoder layer by layer.

Why not diffusers' group offloading for `--offload block`: it groups only module lists that are direct
children of the model. OviFusion's children are the two towers, so everything landed in one
catch-all group (the whole 21.7 GiB moved to the GPU before every forward), and naming the towers'
block lists does not fit either: `WanDiT.forward` is never called (the fusion model calls `embed`
and `unembed`), and each `WanBlock` runs twice per forward (self and cross phases), interleaved
with the other tower's block. The unit that runs contiguously is a *fusion block* (video block i
and audio block i together), so that is what `BlockStreamer` streams.

Both classes keep one master copy of each weight in host memory (page-locked on CUDA, so copies are
asynchronous DMA) and point the module's parameters at a device copy while it is needed; going
back to the host is free: the parameters are pointed at the master copy again and the device copy
is released. Nothing is ever copied back.
"""

from __future__ import annotations

import logging
import mmap
import weakref
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

logger = logging.getLogger(__name__)


class HostWeights:
    """The parameters and buffers of `modules`, mastered in host memory, onloaded as a unit.

    The masters are views into one host block of exactly their size, page-locked when `pin`. Not
    `Tensor.pin_memory()`: torch's pinned-memory allocator rounds every block up to a power of two, so
    per-tensor pinning locked 35.7 GiB of host memory for the 21.7 GiB fusion model and 14.0 GiB for
    the 10.6 GiB umt5 (summed over the 720x720_5s tensors' sizes): 50 GiB under --offload block,
    where 32 GiB is the need."""

    def __init__(self, modules: Iterable[nn.Module], pin: bool):
        # (owning module, attribute, is_parameter, the Parameter or buffer): a Parameter two modules
        # share is one object (its `.data` is a new one at every access), so it is mastered once
        found = [entry for module in modules for owner in module.modules() for entry in _owned(owner)]
        offsets: dict[int, int] = {}
        size = 0
        for *_, tensor in found:
            if id(tensor) not in offsets:
                offsets[id(tensor)] = size
                size += -(-tensor.numel() * tensor.element_size() // HOST_ALIGN) * HOST_ALIGN
        self.block = host_block(size)  # uint8 [size]
        masters: dict[int, Tensor] = {}
        self.entries: list[tuple[nn.Module, str, bool, Tensor]] = []  # (..., the host master)
        for owner, name, is_param, tensor in found:
            if id(tensor) not in masters:
                start, nbytes = offsets[id(tensor)], tensor.numel() * tensor.element_size()
                view = self.block[start : start + nbytes].view(tensor.dtype).view(tensor.shape)
                masters[id(tensor)] = view.copy_(tensor.data)
            host = masters[id(tensor)]
            # pointed at its master at once: the old copy is freed as we go, not all at the end
            _point(owner, name, is_param, host)
            self.entries.append((owner, name, is_param, host))
        if pin:  # after filling: locking first would hold the block and the old copies at once
            lock_pages(self.block)
        self.on_device = False

    @property
    def nbytes(self) -> int:
        return sum(host.numel() * host.element_size() for *_, host in self.entries)

    def onload(self, device: torch.device) -> list[Tensor]:
        """Points every tensor at a fresh device copy (copies are queued on the current stream)."""
        copies: dict[int, Tensor] = {}  # one device copy of a master two entries share
        for owner, name, is_param, host in self.entries:
            # copy=True: on the CPU too, so a test can tell an onloaded tensor from its master
            copy = copies.get(id(host))
            if copy is None:
                copy = copies[id(host)] = host.to(device, non_blocking=True, copy=True)
            _point(owner, name, is_param, copy)
        self.on_device = True
        return list(copies.values())

    def offload(self) -> None:
        """Points every tensor back at its host master; the device copies are released."""
        for owner, name, is_param, host in self.entries:
            _point(owner, name, is_param, host)
        self.on_device = False

    def is_onloaded(self) -> bool:
        """Whether the module tensors are the device copies (not the host masters)."""
        owner, name, is_param, host = self.entries[0]
        current = getattr(owner, name).data if is_param else owner._buffers[name]
        return current.data_ptr() != host.data_ptr()


def _owned(owner: nn.Module) -> list[tuple[nn.Module, str, bool, Tensor]]:
    """(owner, attribute, is_parameter, the Parameter or buffer) for `owner`'s own tensors."""
    return [(owner, n, True, p) for n, p in owner.named_parameters(recurse=False)] + [
        (owner, n, False, b) for n, b in owner.named_buffers(recurse=False)
    ]


def _point(owner: nn.Module, name: str, is_param: bool, tensor: Tensor) -> None:
    """Makes `owner.name` (a parameter keeps its Parameter object) refer to `tensor`."""
    if is_param:
        getattr(owner, name).data = tensor
    else:
        owner._buffers[name] = tensor


HOST_ALIGN = 512  # bytes: every master starts on a boundary of this in its host block


def host_block(nbytes: int) -> Tensor:
    """uint8 [nbytes] of page-aligned host memory: an anonymous mmap, returned to the system when the
    last view of it goes (`torch.frombuffer` keeps the mapping alive)."""
    region = mmap.mmap(-1, max(nbytes, 1))
    return torch.frombuffer(region, dtype=torch.uint8)[:nbytes]


def lock_pages(block: Tensor) -> None:
    """Page-locks `block` (a `host_block`) with cudaHostRegister, exactly its size, so copies from it are
    asynchronous DMA; unregistered when `block` is garbage collected."""
    nbytes = block.numel()
    if nbytes == 0:
        return
    cudart = torch.cuda.cudart()
    pointer = block.data_ptr()
    # 1 = cudaHostRegisterPortable: pinned for every device's context, not only the current one's
    error = int(cudart.cudaHostRegister(pointer, nbytes, 1))
    if error:
        raise RuntimeError(
            f"cudaHostRegister of {nbytes / 2**30:.2f} GiB of host memory failed: error {error}"
        )
    # when the owner drops the block (views of it may live on: unpinned then, never freed under them);
    # the storage rides along so that the memory outlives its registration
    weakref.finalize(block, _unregister, cudart, pointer, block.untyped_storage())


def _unregister(cudart: Any, pointer: int, storage: torch.UntypedStorage) -> None:
    cudart.cudaHostUnregister(pointer)


class GroupStreamer:
    """Groups of weights mastered in host memory, each on the device only while it runs: `enter(i)` before
    group i computes (it waits for its copy and starts group i + 1's on a side stream, so the next copy
    overlaps this compute), `leave(i)` after. Peak: two groups in use and at most two more waiting to be
    freed, plus whatever the caller keeps resident."""

    def __init__(self, groups: Sequence[Sequence[nn.Module]], device: torch.device, pin: bool | None = None):
        self.pin = device.type == "cuda" if pin is None else pin
        self.device = device
        self.groups = [HostWeights(group, self.pin) for group in groups]
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self.ready: dict[int, torch.cuda.Event | None] = {}  # onloaded groups -> copy-done event
        self.copies: dict[int, list[Tensor]] = {}
        self.computed: deque[torch.cuda.Event] = deque()  # CUDA: where the compute stream left each group

    def enter(self, i: int) -> None:
        for j in [j for j in self.ready if j < i]:  # e.g. a block skip-layer guidance skipped
            self._release(j)
        self._prefetch(i)
        self._wait(i)
        # The host runs ahead of the device: unchecked, it would queue every group's copy, and each stays
        # allocated until the compute stream has passed it. Waiting here until the device is done with
        # all groups but the last one left keeps that to four, with no gap in the device's queue (the
        # group before this one still runs while this one is queued).
        while len(self.computed) > 1:
            self.computed.popleft().synchronize()
        if i + 1 < len(self.groups):
            self._prefetch(i + 1)  # overlaps with group i's compute

    def leave(self, i: int) -> None:
        if self.stream is not None:
            event = torch.cuda.Event(blocking=True)  # its synchronize sleeps instead of spinning a core
            event.record(torch.cuda.current_stream(self.device))
            self.computed.append(event)
        self._release(i)

    def _prefetch(self, i: int) -> None:
        if i in self.ready:
            return
        if self.stream is None:
            self.copies[i] = self.groups[i].onload(self.device)
            self.ready[i] = None
            return
        with torch.cuda.stream(self.stream):
            self.copies[i] = self.groups[i].onload(self.device)
            event = torch.cuda.Event()
            event.record(self.stream)
        self.ready[i] = event

    def _wait(self, i: int) -> None:
        event = self.ready[i]
        if event is None:
            return
        compute = torch.cuda.current_stream(self.device)
        compute.wait_event(event)
        for copy in self.copies[i]:
            # allocated on the side stream, used on the compute stream: keep it until that use is done
            copy.record_stream(compute)
        self.ready[i] = None

    def _release(self, i: int) -> None:
        self.groups[i].offload()
        self.ready.pop(i, None)
        self.copies.pop(i, None)

    def release_all(self) -> None:
        for i in list(self.ready):
            self._release(i)


class BlockStreamer(GroupStreamer):
    """`--offload block`: fusion block i (video block i + audio block i) is on the device only while
    it runs, block i + 1 is copied on a side stream meanwhile; embeddings and heads stay resident.

    It wraps the model's `fusion_block(i, v, a)` (the unit the forward calls per block), so the
    model code knows nothing of it. Peak device memory: the resident parts, two fusion blocks
    (0.36 GiB each in bf16 for the full model), and the activations.
    """

    def __init__(self, model: nn.Module, device: torch.device, pin: bool | None = None):
        towers = (model.video_model, model.audio_model)
        blocks = [[model.video_model.blocks[i], model.audio_model.blocks[i]] for i in range(model.num_blocks)]
        super().__init__(blocks, device, pin)
        for tower in towers:
            for name, child in tower.named_children():
                if name != "blocks":
                    child.to(device)
        self._run_block: Callable = model.fusion_block
        model.fusion_block = self.fusion_block  # instance attribute: shadows the method
        logger.info(
            "block offload: %d fusion blocks of %.2f GiB streamed from %s host memory; "
            "embeddings and heads resident on %s",
            len(self.groups),
            self.groups[0].nbytes / 2**30 if self.groups else 0.0,
            "pinned" if self.pin else "pageable",
            device,
        )

    def fusion_block(self, i: int, v, a):
        self.enter(i)
        try:
            return self._run_block(i, v, a)
        finally:
            self.leave(i)


class LayerStreamer(GroupStreamer):
    """A model whose `layers` run once each, in order, per forward (the text encoder: its embedding
    table, then its blocks): each layer is on the device only while it runs, the next one copied
    meanwhile; the rest of `model` (a final norm) moves to the device for good. Forward hooks on the
    layers do it, so the model code knows nothing of it. After a forward that raised, `release_all`."""

    def __init__(
        self, model: nn.Module, layers: Sequence[nn.Module], device: torch.device, pin: bool | None = None
    ):
        super().__init__([[layer] for layer in layers], device, pin)
        streamed = {id(t) for layer in layers for t in (*layer.parameters(), *layer.buffers())}
        for owner in model.modules():
            for _, name, is_param, tensor in _owned(owner):
                if id(tensor) not in streamed:
                    _point(owner, name, is_param, tensor.data.to(device))
        logger.info(
            "%s visits %s layer by layer: %d layers, %.2f GiB at most, from %s host memory",
            type(model).__name__,
            device,
            len(self.groups),
            max((g.nbytes for g in self.groups), default=0) / 2**30,
            "pinned" if self.pin else "pageable",
        )
        for i, layer in enumerate(layers):
            layer.register_forward_pre_hook(lambda *_, i=i: self.enter(i))
            layer.register_forward_hook(lambda *_, i=i: self.leave(i))
