"""The acceptance item `bf16_drift` on a CPU, at a small token count, over several seeds.

    python -m benchmarks.drift --reference DIR [--variant 720x720_5s] [--blocks 2] [--size 128x128]
                               [--seeds 0 1 2] [--context-lengths 30 110] [--json PATH]

For each seed: random weights (full width, the first `--blocks` blocks), random latents and a random text
context per length. Three forwards on the same weights and inputs: our float32 forward (the truth, as in
the acceptance item), our bf16 forward, and the reference's bf16 forward. The drift of a bf16 forward is
the larger of its video and audio relative L2 distances from the truth; the ratio ours/reference must
stay <= 1 (the acceptance target).

The reference's bf16 path runs under CUDA autocast, which does nothing on a CPU, and CPU autocast has
other op lists. So its source is loaded verbatim (bf16 casts kept, `load_reference(..., verbatim=True)`)
and run under `CudaAutocastBF16`, which applies CUDA autocast's bf16 policy to the ops it sees: matmuls
and convolutions in bf16, the ops on CUDA's float32 list (layer_norm, pow, rsqrt, softmax, sum, exp, ...)
in float32, everything else as called. Its flash_attention is SDPA in bf16 (benchmarks/reference.py), the
kernel our forward uses here too.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode

from ovi_server.config import load_variant
from ovi_server.models.fusion import OviFusion, build_fusion
from ovi_server.models.loading import init_random_
from ovi_server.placement import Placement
from ovi_server.shapes import generation_shape

aten = torch.ops.aten

# CUDA autocast's op lists (aten/src/ATen/autocast_mode.cpp), as the ops reach a dispatch mode: composite
# ops (linear, layer_norm, scaled_dot_product_attention) arrive as the ops they decompose into on a CPU.
# Arguments of the first set are cast to bf16, of the second from bf16 to float32 (float64 is left alone).
CUDA_BF16_OPS = {
    aten.mm, aten.addmm, aten.bmm, aten.baddbmm, aten.addbmm, aten.addmv, aten.addr, aten.mv, aten.matmul,
    aten.linear, aten.einsum, aten.convolution, aten._convolution, aten.conv1d, aten.conv2d, aten.conv3d, aten.prelu,
    aten._scaled_dot_product_flash_attention_for_cpu, aten.scaled_dot_product_attention,
}  # fmt: skip
CUDA_FP32_OPS = {
    aten.acos, aten.asin, aten.cosh, aten.erfinv, aten.exp, aten.expm1, aten.log, aten.log10, aten.log2,
    aten.log1p, aten.reciprocal, aten.rsqrt, aten.sinh, aten.tan, aten.pow, aten.softplus, aten.layer_norm,
    aten.native_layer_norm, aten.group_norm, aten.native_group_norm, aten.norm, aten.linalg_vector_norm,
    aten.logsumexp, aten._softmax, aten.softmax, aten._log_softmax, aten.log_softmax, aten.sum, aten.prod,
    aten.cumsum, aten.cumprod,
}  # fmt: skip


class CudaAutocastBF16(TorchDispatchMode):
    """`torch.autocast("cuda", torch.bfloat16)`'s casting policy, on whatever device the tensors live.

    The Autocast dispatch key sees an op before it is decomposed and casts its arguments; here the op is
    seen after its decomposition, which for the ops the reference calls gives the same arguments.
    """

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        packet = func.overloadpacket
        if packet in CUDA_BF16_OPS:
            args, kwargs = _cast((args, kwargs), (torch.float32, torch.float16), torch.bfloat16)
        elif packet in CUDA_FP32_OPS:
            args, kwargs = _cast((args, kwargs), (torch.bfloat16, torch.float16), torch.float32)
        return func(*args, **kwargs)


def _cast(tree, source: tuple[torch.dtype, ...], dtype: torch.dtype):
    cast = lambda u: u.to(dtype) if isinstance(u, Tensor) and u.dtype in source else u  # noqa: E731
    return torch.utils._pytree.tree_map(cast, tree)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.drift", description=__doc__.split("\n")[0])
    p.add_argument("--reference", type=Path, required=True, help="a character-ai/Ovi checkout")
    p.add_argument("--variant", default="720x720_5s", help="the widths to measure (default: 720x720_5s)")
    p.add_argument("--blocks", type=int, default=2, help="fusion blocks (default 2)")
    p.add_argument("--size", default="128x128", help="video WxH in pixels, multiples of 16 (default 128x128)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="weights, latents and text")
    p.add_argument("--context-lengths", type=int, nargs="+", default=[30, 110], help="text tokens")
    p.add_argument("--t", type=float, default=999.0, help="timestep (default 999, as the acceptance item)")
    p.add_argument("--json", type=Path, help="write every measurement here")
    return p.parse_args(argv)


def relative_l2(ours: Sequence[Tensor], truth: Sequence[Tensor]) -> list[float]:
    """Video and audio relative L2 distances."""
    return [((a.float() - b).norm() / b.norm()).item() for a, b in zip(ours, truth, strict=True)]


def our_forward(model: OviFusion, inputs: tuple, dtype: torch.dtype) -> list[Tensor]:
    video, audio, t, context = inputs
    video, audio, context = (u.to(dtype) for u in (video, audio, context))
    with torch.inference_mode():
        video_pred, audio_pred = model([video], [audio], t, [context], [context])
    return [video_pred[0].float(), audio_pred[0].float()]


def reference_bf16_forward(model: torch.nn.Module, inputs: tuple) -> list[Tensor]:
    """The reference's forward (`benchmarks.reference.reference_forward`) under emulated CUDA autocast
    instead of the device's own."""
    from benchmarks.reference import reference_forward

    video, audio, t, context = inputs
    out = reference_forward(
        model, video, audio, t, context, context, torch.bfloat16, autocast=CudaAutocastBF16()
    )
    return [x.float() for x in out]


def measure(args: argparse.Namespace, seed: int, reference) -> list[dict]:
    cfg = load_variant(args.variant)
    video_cfg = dataclasses.replace(cfg.video, num_layers=args.blocks)
    audio_cfg = dataclasses.replace(cfg.audio, num_layers=args.blocks)
    cpu = torch.device("cpu")
    ours = init_random_(build_fusion(video_cfg, audio_cfg), Placement(cpu, torch.bfloat16), seed)
    ours32 = copy.deepcopy(ours).float()
    theirs = reference.build_fusion(video_cfg, audio_cfg, ours.state_dict())
    width, height = (int(v) for v in args.size.split("x"))
    shape = generation_shape(height, width, cfg.video_latent_length, cfg.audio_latent_length)
    generator = torch.Generator().manual_seed(seed)
    video = torch.randn(shape.video_latent_shape, generator=generator).bfloat16()
    audio = torch.randn(shape.audio_latent_shape, generator=generator).bfloat16()
    t = torch.full((1,), args.t)
    rows = []
    for length in args.context_lengths:
        context = torch.randn(length, video_cfg.text_dim, generator=generator).bfloat16()
        inputs = (video, audio, t, context)
        truth = our_forward(ours32, inputs, torch.float32)
        ours_drift = relative_l2(our_forward(ours, inputs, torch.bfloat16), truth)
        ref_drift = relative_l2(reference_bf16_forward(theirs, inputs), truth)
        row = {
            "seed": seed,
            "context": length,
            "ours": max(ours_drift),
            "reference": max(ref_drift),
            "ratio": max(ours_drift) / max(ref_drift),
            "ours_video_audio": ours_drift,
            "reference_video_audio": ref_drift,
        }
        print(
            f"seed {seed} context {length:4d}: ours {row['ours']:.3e} reference {row['reference']:.3e} "
            f"ratio {row['ratio']:.4f}  (video {ours_drift[0]:.3e}/{ref_drift[0]:.3e}, "
            f"audio {ours_drift[1]:.3e}/{ref_drift[1]:.3e})",
            flush=True,
        )
        rows.append(row)
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    from benchmarks.reference import load_reference

    torch.set_grad_enabled(False)
    reference = load_reference(args.reference, torch.device("cpu"), verbatim=True)
    started = time.perf_counter()
    rows = [row for seed in args.seeds for row in measure(args, seed, reference)]
    ratios = [row["ratio"] for row in rows]
    print(
        f"ours/reference over {len(ratios)} cases: mean {statistics.mean(ratios):.4f}, "
        f"min {min(ratios):.4f}, max {max(ratios):.4f}; {time.perf_counter() - started:.0f} s"
    )
    if args.json:
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "rows": rows}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
