"""One fusion-model forward (random weights), timed: for A/B runs of two checkouts of the model code.

    python -m benchmarks.forward --variant mid --device cpu --reps 5
    python -m benchmarks.forward --variant 720x720_5s --device cuda --guidance batched   # vs two-pass

Builds the variant's fusion model only (no text encoder, no VAE), runs one warm-up forward on the
variant's default t2v latent shape, then `--reps` forwards with the device synchronised around each,
and prints one JSON line (`{"bench": "forward", ...}`) with the median and the minimum. Run it from
each checkout in turn, alternating, and compare the minima (the host may be shared).

`--guidance two-pass` times one guided prediction instead (the positive and the negative pass, with the
variant's skip-layer guidance, as two forwards: sampler.guided_predict), `--guidance batched` the same
as one batch-2 forward (sampler.batched_predict, `--batch-guidance on`): an A/B of batched guidance.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from collections.abc import Sequence

import torch

from ovi_server.config import load_variant
from ovi_server.engine.device import resolve_placement
from ovi_server.engine.sampler import Conditioning, Guidance, Latents, batched_predict, guided_predict
from ovi_server.models.fusion import build_fusion
from ovi_server.models.loading import init_random_
from ovi_server.shapes import t2v_shape


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.forward", description=__doc__.splitlines()[0])
    p.add_argument("--variant", default="mid")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--attention", default="native")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument(
        "--guidance",
        choices=("none", "two-pass", "batched"),
        default="none",
        help="none: one forward; two-pass / batched: one guided prediction (both passes)",
    )
    args = p.parse_args(argv)
    torch.set_grad_enabled(False)
    cfg = load_variant(args.variant)
    placement = resolve_placement(args.device, args.dtype, attention=args.attention)
    model = init_random_(build_fusion(cfg.video, cfg.audio), placement, 0)
    model.set_attention_backend(placement.attention)
    side = round(math.sqrt(cfg.video_area))
    shape = t2v_shape(side, side, cfg.video_area, cfg.video_latent_length, cfg.audio_latent_length)
    g = torch.Generator().manual_seed(0)
    video = torch.randn(shape.video_latent_shape, generator=g).to(placement.device, placement.dtype)
    audio = torch.randn(shape.audio_latent_shape, generator=g).to(placement.device, placement.dtype)
    context = torch.randn(40, cfg.video.text_dim, generator=g).to(placement.device, placement.dtype)
    t = torch.tensor([500], device=placement.device)
    sync = torch.cuda.synchronize if placement.device.type == "cuda" else (lambda: None)
    # the negative prompts encode to fewer tokens than the positive one, as they do in a request
    negative = context[:12]
    cond = Conditioning(context, negative, negative)
    guidance = Guidance(slg_layer=cfg.sampling.slg_layer)
    predict = {"two-pass": guided_predict, "batched": batched_predict}.get(args.guidance)

    def forward() -> float:
        sync()
        started = time.perf_counter()
        if predict is None:
            model([video], [audio], t, [context], [context])
        else:
            predict(model, Latents(video, audio), t[0], cond, guidance)
        sync()
        return time.perf_counter() - started

    forward()  # warm-up
    times = [forward() for _ in range(args.reps)]
    print(json.dumps({
        "bench": "forward", "variant": cfg.name, "device": str(placement.device), "guidance": args.guidance,
        "video_tokens": shape.video_tokens, "audio_tokens": shape.audio_latent_shape[0],
        "median_s": round(statistics.median(times), 4), "min_s": round(min(times), 4),
        "times_s": [round(x, 4) for x in times], "random_weights": True,
    }))  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
