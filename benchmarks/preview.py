"""What a live preview costs next to a denoising step.

    python -m benchmarks.preview --variant mid --device cpu --steps 5 [--shapes 720x720_5s,960x960_10s]

Runs `denoise()` on the variant (random weights; full-size variants need a GPU) with a step callback that, after each step, renders the
preview exactly as the worker does (`engine/preview.py: preview_png` on the step's video latents) and
stores it in a SQLite job store (`put_preview` + the "preview i/N" log line). The step clock stops before
the preview and restarts after it, so each step and each preview are timed apart; step 1 is the warm-up.
`--shapes` also times the preview alone on the latents of other variants (random values of their full
size, on the same device and dtype), for the variants too large to denoise here. One JSON line at the end.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from benchmarks.run import _random_weights_config
from ovi_server.config import EngineConfig, load_variant
from ovi_server.engine.pipeline import OviPipeline
from ovi_server.engine.preview import preview_png
from ovi_server.engine.sampler import Conditioning, Guidance, Latents, denoise, initial_noise, make_plan
from ovi_server.jobs.sqlite import SqliteJobStore
from ovi_server.jobs.store import NewJob
from ovi_server.shapes import t2v_shape

PROMPT = "A street violinist plays under a bridge. <AUDCAP>Solo violin, distant traffic<ENDAUDCAP>"


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.preview", description=__doc__.split("\n")[0])
    p.add_argument("--variant", default="mid", help="the variant to denoise (random weights); mid on a CPU")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--steps", type=int, default=5, help="denoising steps (>= 2; step 1 is the warm-up)")
    p.add_argument("--shapes", default="720x720_5s,960x960_10s", help="variants whose latents to time too")
    p.add_argument("--reps", type=int, default=20, help="timed previews per --shapes entry")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory() as configs:  # full-size variants get random weights, as in run.py
        variant = _random_weights_config(load_variant(args.variant), None, Path(configs))
        engine = EngineConfig(variant=str(variant), device=args.device, dtype=args.dtype)
        pipeline = OviPipeline.from_config(engine)
    cfg, device, dtype = pipeline.cfg, pipeline.placement.device, pipeline.placement.dtype
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    side = round(math.sqrt(cfg.video_area))
    shape = t2v_shape(side, side, cfg.video_area, cfg.video_latent_length, cfg.audio_latent_length)
    positive, video_negative, audio_negative = pipeline.encode_prompts(
        [PROMPT, cfg.sampling.video_negative_prompt, cfg.sampling.audio_negative_prompt]
    )
    noise = initial_noise(shape.video_latent_shape, shape.audio_latent_shape, 0, device, dtype)
    plan = make_plan(
        "unipc", args.steps, cfg.sampling.shift, Guidance(slg_layer=cfg.sampling.slg_layer), device
    )
    cond = Conditioning(positive, video_negative, audio_negative)

    with tempfile.TemporaryDirectory() as tmp:
        store = SqliteJobStore(Path(tmp) / "jobs.sqlite3")
        job = store.submit(NewJob(app="fal-ai/ovi", request=None))
        step_s: list[float] = []
        render_s: list[float] = []
        store_s: list[float] = []
        clock = [0.0]

        def on_step(done: int, total: int, x: Latents) -> None:
            sync()
            step_s.append(time.perf_counter() - clock[0])
            started = time.perf_counter()
            png = preview_png(x.video)  # copies one frame to the host: waits for the device
            rendered = time.perf_counter()
            store.put_preview(job.id, png)
            store.append_log(job.id, f"preview {done}/{total}")
            render_s.append(rendered - started)
            store_s.append(time.perf_counter() - rendered)
            sync()
            clock[0] = time.perf_counter()

        sync()
        clock[0] = time.perf_counter()
        denoise(pipeline.fusion, noise, cond, plan, on_step)
        store.close()

    step, render, stored = (statistics.median(s[1:]) for s in (step_s, render_s, store_s))
    report = {
        "bench": "preview",
        "variant": cfg.name,
        "device": str(device),
        "dtype": str(dtype).removeprefix("torch."),
        "video_latent": list(shape.video_latent_shape),
        "steps_timed": len(step_s) - 1,
        "step_s_p50": round(step, 6),
        "preview_render_ms_p50": round(render * 1e3, 3),
        "preview_store_ms_p50": round(stored * 1e3, 3),
        "preview_over_step": round((render + stored) / step, 5),
        "png_bytes": len(preview_png(noise.video)),
        "shapes": {},
    }
    for name in filter(None, args.shapes.split(",")):
        other = load_variant(name)
        other_side = round(math.sqrt(other.video_area))
        other_shape = t2v_shape(
            other_side, other_side, other.video_area, other.video_latent_length, other.audio_latent_length
        )
        latents = torch.randn(other_shape.video_latent_shape, device=device, dtype=dtype)
        times = []
        for i in range(args.reps + 2):
            sync()
            started = time.perf_counter()
            preview_png(latents)
            if i >= 2:  # two warm-ups
                times.append(time.perf_counter() - started)
        report["shapes"][name] = {
            "video_latent": list(other_shape.video_latent_shape),
            "preview_render_ms_p50": round(statistics.median(times) * 1e3, 3),
        }
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
