"""The whole GPU check as one command: is it right, how fast, how much memory.

    python -m benchmarks.acceptance [--device cuda] [--variant 720x720_5s] [--reference DIR] [--json PATH]

Each item ends PASS, FAIL (measured value and target) or SKIP (with the reason); the last line is
`acceptance: N passed, M failed, K skipped`. Weights are random and full size (speed does not depend on
their values). On a CPU (`--device cpu --variant tiny`) every item that can run on a CPU runs on the tiny
model and checks what a CPU can check (outputs, not H100 targets); the rest are skipped with the reason.

The last items run fal's default request as the server would on a 32 GB and on a 24 GB card: a fresh
process per card, limited with --gpu-memory (the allocator refuses more, as the card would), making its
own automatic choices; about a minute and a half each on an H200 (`--skip card` leaves them out).

A CUDA run appends its table to benchmarks/RESULTS.md; a CPU run only with --record. The JSON (--json)
is rewritten after every item, so a run cut short still leaves what it measured.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import gc
import json
import logging
import os
import shlex
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from benchmarks.run import (
    GB,
    PROMPT,
    REPO_ROOT,
    _random_weights_config,
    _synchronizer,
    compare_with_reference,
    environment,
    peak_rss_gb,
    summarize,
)
from ovi_server.config import EngineConfig, load_variant
from ovi_server.engine.attention_check import check_attention_backend
from ovi_server.engine.compiling import compile_blocks, uncompile_blocks
from ovi_server.engine.device import ieee_float32, resolve_placement
from ovi_server.engine.offload import BlockStreamer
from ovi_server.engine.pipeline import OviPipeline
from ovi_server.engine.sampler import (
    Conditioning,
    Latents,
    Predict,
    batched_predict,
    denoise,
    guided_predict,
    initial_noise,
    make_plan,
)
from ovi_server.errors import ConfigError
from ovi_server.media.mux import probe, video_to_uint8
from ovi_server.media.video_vae import decode_memory_estimate
from ovi_server.models.fp8 import apply_fp8_weights
from ovi_server.models.fusion import layerwise_cast_params
from ovi_server.request import GenerationRequest, Progress
from ovi_server.shapes import GenerationShape, t2v_shape

RESULTS = REPO_ROOT / "benchmarks" / "RESULTS.md"
FAL_SIZE = (992, 512)  # fal's default request: 992x512, 30 steps
FAL_STEPS = 30
STEP_SIZE = (704, 704)  # the side by side with the reference
TIMED_STEPS = 3  # per step measurement: the first is the warm-up
E2E_TARGET_S = 32.0
PEAK_TARGET_GB = 32.0  # GiB (2**30 bytes, as GB in benchmarks/run.py), the unit of "24 GB" cards
OFFLOAD_PEAK_TARGET_GB = 24.0
# Smaller cards, emulated on the one we have with --gpu-memory (PyTorch's allocator refuses more, as the
# card would): the GiB each reports (RTX 5090: 32607 MiB, RTX 4090: 24564 MiB), less the CUDA context,
# which is outside the allocator. Each runs fal's default request in a process of its own.
CARDS = (("32 GB card", 31.8), ("24 GB card", 24.0))
CUDA_CONTEXT_GB = 0.5
CARD_TIMEOUT_S = 300
OFFLOAD_STEP_TARGET = 1.15  # x the resident step
STEP_RATIO_TARGET = 0.6  # x the reference's eager step
BF16_AGREEMENT = 2e-2  # relative L2 distance between two bf16 runs of the same maths
FP32_AGREEMENT = 1e-5
DRIFT_BLOCKS = 6  # the bf16 drift is measured on the first blocks of the full-width model (memory)
DRIFT_PROMPTS = (  # the drift's inputs: one noise seed and text context each, contexts of different lengths
    PROMPT,
    "A man at a desk says <S>We ship today.<E> Audio: keyboard clicks",
    "Rain on a tin roof at night, a dog sleeps by the stove. <AUDCAP>Steady rain, a crackling fire<ENDAUDCAP>",
    "Two kids race down a hill on bikes.",
)


@dataclass
class Result:
    item: str
    status: str  # PASS, FAIL or SKIP
    measured: str = ""
    target: str = ""
    note: str = ""
    seconds: float = 0.0
    data: dict[str, Any] = field(default_factory=dict)


class Skip(Exception):
    """An item that cannot run here; the message is the reason."""


@dataclass
class Context:
    args: argparse.Namespace
    device: torch.device
    dtype: torch.dtype
    pipe: OviPipeline
    sync: Callable[[], None]
    scratch: Path
    measured: dict[str, Any] = field(default_factory=dict)  # figures one item leaves for another

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.acceptance", description=__doc__.split("\n")[0])
    p.add_argument("--device", default="auto", help="auto (cuda when available), cuda, cuda:N or cpu")
    p.add_argument("--variant", help="default: 720x720_5s on a GPU, tiny on a CPU")
    p.add_argument("--reference", type=Path, help="a character-ai/Ovi checkout, for the side-by-side items")
    p.add_argument("--json", type=Path, help="write every item's result here (rewritten after each)")
    p.add_argument("--skip", action="append", default=[], help="skip items whose name contains this")
    p.add_argument(
        "--record",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="append the table to --results (default: on for CUDA runs, off on a CPU)",
    )
    p.add_argument("--results", type=Path, default=RESULTS, help="the RESULTS.md to append to")
    # internal: the card items' child process (fal's default request under --gpu-memory GIB, JSON to --json)
    p.add_argument("--card-child", type=float, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.card_child is not None:
        return card_child(args)
    placement = resolve_placement(args.device, "auto")
    device = placement.device
    variant = args.variant or ("720x720_5s" if device.type == "cuda" else "tiny")
    cfg = load_variant(variant)
    if cfg.random_weights_seed is None and device.type != "cuda":
        print(f"acceptance: variant {cfg.name} is full size; on a CPU use --variant tiny", file=sys.stderr)
        return 2
    env = environment(device)
    command = "python -m benchmarks.acceptance " + shlex.join(args.argv)
    results: list[Result] = []
    built: dict[str, Any] = {}
    run_started = time.perf_counter()
    _log_engine()

    def report() -> dict[str, Any]:
        counts = {s: sum(r.status == s for r in results) for s in ("PASS", "FAIL", "SKIP")}
        return {
            "bench": "acceptance",
            "variant": cfg.name,
            "device": str(device),
            "dtype": str(placement.dtype).removeprefix("torch."),
            "random_weights": True,
            "command": command,
            "environment": env,
            "items": [asdict(r) for r in results],
            "summary": counts,
            "pipeline": built,
            "seconds": time.perf_counter() - run_started,
        }

    def record(result: Result) -> None:
        results.append(result)
        print(_row(result), flush=True)
        if args.json is not None:
            args.json.write_text(json.dumps(report(), indent=2) + "\n")

    print(f"acceptance  variant={cfg.name} device={device} dtype={placement.dtype}  RANDOM weights")
    print(f"{'item':<36}{'status':<7}{'measured':<34}{'target':<26}note")
    for result in _run("pytest -m gpu", args, lambda: gpu_tests(device)):
        record(result)
    with tempfile.TemporaryDirectory(prefix="ovi-acceptance-") as tmp:
        started = time.perf_counter()
        config_path = _random_weights_config(cfg, None, Path(tmp))
        pipe = OviPipeline.from_config(EngineConfig(variant=str(config_path), device=str(device)))
        build_s = time.perf_counter() - started
        ctx = Context(args, device, placement.dtype, pipe, _synchronizer(device), Path(tmp))
        built = {"build_s": build_s, "compiled": pipe.compiled, "warm_up_s": pipe.warm_up_s}
        print(
            f"pipeline built in {build_s:.0f} s (random weights; compiled: {pipe.compiled}, "
            f"warm-up {pipe.warm_up_s:.0f} s of it)",
            flush=True,
        )
        for name, item in ITEMS:
            for result in _run(name, args, lambda item=item, ctx=ctx: item(ctx)):
                record(result)
        del ctx, pipe
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()  # the card items run in processes of their own: leave them the device
        for card, card_gb in CARDS:
            item = f"{card}: end to end"
            for result in _run(item, args, lambda c=card_gb: card_e2e(device, config_path, c, Path(tmp))):
                record(result)
    env["load_average_end"] = list(os.getloadavg())
    counts = report()["summary"]
    recording = args.record if args.record is not None else device.type == "cuda"
    if recording:
        append_results(args.results, report())
        print(f"appended to {args.results}")
    print(f"acceptance: {counts['PASS']} passed, {counts['FAIL']} failed, {counts['SKIP']} skipped")
    return 1 if counts["FAIL"] else 0


def _run(name: str, args: argparse.Namespace, item: Callable[[], Result | list[Result]]) -> list[Result]:
    """Runs one item; its first result takes the item's name (items with several name the others)."""
    if any(s in name for s in args.skip):
        return [Result(name, "SKIP", note="--skip")]
    started = time.perf_counter()
    print(f"... {name}", file=sys.stderr, flush=True)  # which item a run cut short was in
    try:
        results = item()
    except Skip as reason:
        results = Result(name, "SKIP", note=str(reason))
    except Exception as exc:  # an item that crashes is a failure with its error, and the run goes on
        results = Result(name, "FAIL", note=f"{type(exc).__name__}: {exc}"[:300])
    results = results if isinstance(results, list) else [results]
    results[0].item = results[0].item or name
    results[0].seconds = time.perf_counter() - started
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return results


def _row(r: Result) -> str:
    return f"{r.item:<36}{r.status:<7}{r.measured:<34}{r.target:<26}{r.note}"


# ------------------------------------------------------------------------------------------- items
def gpu_tests(device: torch.device) -> Result:
    if device.type != "cuda":
        raise Skip("needs a CUDA device (the gpu tests skip themselves without one)")
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider", "tests/gpu"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    last = (done.stdout.strip().splitlines() or ["(no output)"])[-1]
    return Result("", "PASS" if done.returncode == 0 else "FAIL", last, "exit 0", done.stderr[-200:])


def e2e_default_request(ctx: Context) -> Result:
    """fal's default request through OviPipeline.generate: 992x512, 30 steps (tiny: its own defaults)."""
    size, steps = (FAL_SIZE, FAL_STEPS) if ctx.cuda else (None, None)
    request = GenerationRequest(PROMPT, size=size, steps=steps, seed=0)
    stage_peaks: dict[str, float] = {}  # GiB allocated at most during each stage

    def on_progress(event: Progress) -> None:
        if ctx.cuda and event.done == 0 and event.stage not in stage_peaks:
            _close_stage(ctx, stage_peaks)
            stage_peaks[event.stage] = 0.0

    if ctx.cuda:
        torch.cuda.reset_peak_memory_stats(ctx.device)
    ctx.sync()
    started = time.perf_counter()
    clip = ctx.pipe.generate(request, ctx.scratch / "e2e.mp4", on_progress)
    ctx.sync()
    seconds = time.perf_counter() - started
    _close_stage(ctx, stage_peaks)
    info = probe(clip.path)
    frames_ok = info["num_frames"] == clip.num_frames and info["video_codec"] == "h264"
    data = {
        "s": seconds,
        "valid_mp4": frames_ok,
        "timings": clip.timings,
        "size": [clip.width, clip.height],
        "frames": clip.num_frames,
    }
    measured = f"{seconds:.1f} s ({clip.width}x{clip.height}, {request.steps or 'default'} steps)"
    if ctx.cuda:
        peak = max(stage_peaks.values())
        ctx.measured["e2e_peak_gb"] = peak
        ctx.measured["e2e_stage_peaks_gb"] = stage_peaks
        data["peak_gb"] = peak
        data["stage_peaks_gb"] = stage_peaks
        ok = frames_ok and seconds <= E2E_TARGET_S
        return Result("", "PASS" if ok else "FAIL", measured, f"<= {E2E_TARGET_S:g} s (H100)", "", data=data)
    ctx.measured["e2e_rss_gb"] = peak_rss_gb()
    return Result(
        "",
        "PASS" if frames_ok else "FAIL",
        measured,
        "a valid MP4",
        "the 32 s target is for an H100",
        data=data,
    )


def _close_stage(ctx: Context, stage_peaks: dict[str, float]) -> None:
    """The peak of the stage that just ended, then a fresh count for the next."""
    if stage_peaks:
        last = next(reversed(stage_peaks))
        stage_peaks[last] = torch.cuda.max_memory_allocated(ctx.device) / GB
        torch.cuda.reset_peak_memory_stats(ctx.device)


def e2e_peak_memory(ctx: Context) -> Result:
    if not ctx.cuda:
        raise Skip(f"device memory is a CUDA figure (process peak RSS: {peak_rss_gb():.2f} GiB)")
    if "e2e_peak_gb" not in ctx.measured:
        raise Skip("the end-to-end item did not run")
    peak = ctx.measured["e2e_peak_gb"]
    resident = "umt5 resident" if "text_encoder" not in ctx.pipe.visitors else "umt5 visits layer by layer"
    stages = ctx.measured.get("e2e_stage_peaks_gb", {})
    resident += "; by stage " + ", ".join(f"{k} {v:.1f}" for k, v in stages.items())
    return Result(
        "",
        "PASS" if peak <= PEAK_TARGET_GB else "FAIL",
        f"{peak:.1f} GiB allocated",
        f"<= {PEAK_TARGET_GB:g} GiB",
        resident,
        data={"peak_gb": peak},
    )


def decode_estimate(ctx: Context) -> Result:
    """The untiled video decode of the e2e shape against the estimate `plan_tiling` decides with: the
    estimate must not be below what the decode really allocates."""
    if not ctx.cuda:
        raise Skip(
            "the estimate is for the full Wan2.2 VAE on a GPU (its CPU measurement: media/video_vae.py)"
        )
    shape = _shape(ctx, FAL_SIZE)
    latent = torch.randn(1, *shape.video_latent_shape, device=ctx.device, dtype=ctx.dtype)
    estimate = decode_memory_estimate(tuple(latent.shape), ctx.pipe.cfg.video_vae)
    with ctx.pipe._on_device("video_vae") as vae:
        ctx.sync()
        torch.cuda.reset_peak_memory_stats(ctx.device)
        before = torch.cuda.memory_allocated(ctx.device)
        _decode_as_served(vae, latent)
        ctx.sync()
        used = torch.cuda.max_memory_allocated(ctx.device) - before
    return Result(
        "",
        "PASS" if used <= estimate else "FAIL",
        f"{used / GB:.1f} GiB",
        f"<= estimate {estimate / GB:.1f} GiB",
        f"untiled, chunked, {shape.width}x{shape.height}, {shape.num_frames} frames; ratio {used / estimate:.2f}",
        data={"used_gb": used / GB, "estimate_gb": estimate / GB},
    )


def decode_autotune(ctx: Context) -> Result:
    """The chunked video decode of fal's default shape (as the pipeline runs it, untiled) with cuDNN's
    autotuner (torch.backends.cudnn.benchmark, off by default and in the reference) against without:
    whether picking the fastest convolution algorithms pays, and how much the frames change."""
    if not ctx.cuda:
        raise Skip("cuDNN's autotuner is CUDA's")
    shape = _shape(ctx, FAL_SIZE)
    generator = torch.Generator(ctx.device).manual_seed(0)
    latent = torch.randn(
        1, *shape.video_latent_shape, generator=generator, device=ctx.device, dtype=ctx.dtype
    )

    def decode() -> tuple[float, Tensor]:
        with ctx.pipe._on_device("video_vae") as vae:
            ctx.sync()
            started = time.perf_counter()
            frames = _decode_as_served(vae, latent)
            ctx.sync()
            return time.perf_counter() - started, frames

    decode()  # warm, as a serving process is
    off_s, off = decode()
    before = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = True
    try:
        tuning_s, _ = decode()  # the first decode of a shape pays for the tuning
        on_s, on = decode()
    finally:
        torch.backends.cudnn.benchmark = before
    levels = (on.int() - off.int()).abs()
    changed = (levels > 0).float().mean().item()
    return Result(
        "",
        "PASS" if on.shape == off.shape else "FAIL",
        f"{on_s:.2f} s vs {off_s:.2f} s ({off_s / on_s:.2f}x)",
        "reported (same frame count)",
        f"autotuned vs default, {shape.width}x{shape.height}; first autotuned decode {tuning_s:.2f} s; "
        f"uint8 values changed {100 * changed:.3f}%, at most by {levels.max().item()}",
        data={
            "off_s": off_s,
            "on_s": on_s,
            "tuning_s": tuning_s,
            "changed": changed,
            "max_levels": levels.max().item(),
        },
    )


def attention_backends(ctx: Context) -> list[Result]:
    """Each backend that can run here against native (PyTorch SDPA), one forward on the same inputs."""
    names = (
        ["_native_cudnn", "flash", "_flash_3", "sage"]
        if ctx.cuda
        else ["_native_math", "_native_cudnn", "flash"]
    )
    results = []
    for name in names:
        for result in _run(
            f"attention {name} vs native", ctx.args, lambda name=name: attention_backend(ctx, name)
        ):
            results.append(result)
    return results


def attention_backend(ctx: Context, name: str) -> Result:
    cfg = ctx.pipe.cfg
    try:
        check_attention_backend(
            name, ctx.device, ctx.dtype, {(c.num_heads, c.head_dim) for c in (cfg.video, cfg.audio)}
        )
    except ConfigError as exc:
        raise Skip(str(exc)[:200]) from exc
    inputs = _forward_inputs(ctx, STEP_SIZE if ctx.cuda else None)
    fusion = ctx.pipe.fusion
    with _eager():  # the kernels themselves, not a recompiled graph per backend
        native = _forward(fusion, inputs)
        fusion.set_attention_backend(name)
        try:
            other = _forward(fusion, inputs)
        finally:
            fusion.set_attention_backend(ctx.pipe.placement.attention)
    distance = _relative(other, native)
    tolerance = BF16_AGREEMENT if ctx.dtype != torch.float32 else FP32_AGREEMENT
    return Result(
        "",
        "PASS" if distance <= tolerance else "FAIL",
        f"rel. L2 {distance:.2e}",
        f"<= {tolerance:.0e}",
        str(ctx.dtype).removeprefix("torch."),
        data={"relative_l2": distance},
    )


def bf16_drift(ctx: Context) -> list[Result]:
    """Our bf16 forward and the reference's bf16 forward, each against float32 on the same weights:
    ours must drift no more than the reference's own. Our float32 forward stands in for the
    reference's float32 one (the float32 goldens hold them within 5e-5)."""
    if ctx.args.reference is None:
        raise Skip("needs --reference DIR (a character-ai/Ovi checkout)")
    if not ctx.cuda:
        raise Skip(
            "the reference's bf16 path runs under CUDA autocast; on a CPU its source is rewritten to float32"
        )
    from benchmarks.reference import reference_forward
    from ovi_server.models.fusion import OviFusion

    cfg = ctx.pipe.cfg
    video_cfg = dataclasses.replace(cfg.video, num_layers=DRIFT_BLOCKS)
    audio_cfg = dataclasses.replace(cfg.audio, num_layers=DRIFT_BLOCKS)
    state = {
        k: v
        for k, v in ctx.pipe.fusion.state_dict().items()
        if ".blocks." not in k or int(k.split(".blocks.")[1].split(".")[0]) < DRIFT_BLOCKS
    }
    with torch.device("meta"):
        ours = OviFusion.from_configs(video_cfg, audio_cfg)
    ours.load_state_dict(state, strict=True, assign=True)
    ours32 = copy.deepcopy(ours).float()
    reference = _reference(ctx)
    theirs = reference.build_fusion(video_cfg, audio_cfg, state)
    # one pair of bf16 forwards differs from float32 by about as much as the two differ from each other
    # (benchmarks/drift.py: ratios 0.986-1.010 at parity), so the item compares means over several inputs
    cases = [_forward_inputs(ctx, STEP_SIZE, seed, prompt) for seed, prompt in enumerate(DRIFT_PROMPTS)]
    with ieee_float32():  # float32 means float32: no TF32 convolutions in the ground truth
        truths = [_forward(ours32, inputs, torch.float32) for inputs in cases]
    del ours32

    def drift(run: Callable[[tuple], Sequence[Tensor]]) -> list[float]:
        return [_relative(list(run(inputs)), truth) for inputs, truth in zip(cases, truths, strict=True)]

    ref = drift(lambda inputs: reference_forward(theirs, *inputs, ctx.dtype))
    ref_mean = sum(ref) / len(ref)
    where = f"first {DRIFT_BLOCKS} blocks, 704x704, mean of {len(cases)} inputs"
    paths = [("", drift(lambda inputs: _forward(ours, inputs)), "eager")]
    if ctx.pipe.compiled:  # the path the server runs by default on CUDA (--compile auto)
        compile_blocks(ours)
        paths.append(("bf16 drift vs reference, compiled", drift(lambda inputs: _forward(ours, inputs)), ""))
    results = []
    for name, values, how in paths:
        mean = sum(values) / len(values)
        ratios = "/".join(f"{a / b:.3f}" for a, b in zip(values, ref, strict=True))
        results.append(
            Result(
                name,
                "PASS" if mean <= ref_mean else "FAIL",
                f"ours {mean:.2e}",
                f"<= reference {ref_mean:.2e}",
                f"{where}; {how + '; ' if how else ''}ours/reference {mean / ref_mean:.4f} (per input {ratios})",
                data={"ours": values, "reference": ref, "ratio": mean / ref_mean},
            )
        )
    return results


def step_vs_reference(ctx: Context) -> Result:
    if ctx.args.reference is None:
        raise Skip("needs --reference DIR (a character-ai/Ovi checkout)")
    size = STEP_SIZE if ctx.cuda else None
    request = GenerationRequest(PROMPT, size=size, steps=TIMED_STEPS + 1, seed=0, solver="unipc")
    shape = _shape(ctx, size)
    bench_args = argparse.Namespace(reference=ctx.args.reference, forward_reps=1, rounds=1)
    side = compare_with_reference(ctx.pipe, request, shape, bench_args, ctx.sync)
    ratio, parity = side["step_ratio"], side["parity"]["max_abs_err"]
    ours_step = side["stages"]["step"]["ours"]["p50_s"]
    ctx.measured["resident_step_s"] = ours_step
    data = {"step_ratio": ratio, "parity_max_abs_err": parity, "stages": side["stages"]}
    if ctx.cuda:
        ok = ratio <= STEP_RATIO_TARGET
        return Result(
            "",
            "PASS" if ok else "FAIL",
            f"{ratio:.2f}x ({ours_step:.2f} s)",
            f"<= {STEP_RATIO_TARGET}x",
            f"parity {parity:.1e}",
            data=data,
        )
    ok = parity <= 1e-4
    return Result(
        "",
        "PASS" if ok else "FAIL",
        f"parity {parity:.1e}",
        "<= 1e-4",
        f"step ratio {ratio:.2f} (target for cuda)",
        data=data,
    )


def offload_block(ctx: Context) -> list[Result]:
    """--offload block: the same output as the resident model; on CUDA its peak and step time."""
    inputs = _forward_inputs(ctx, STEP_SIZE if ctx.cuda else None)
    fusion = ctx.pipe.fusion
    resident_out = _forward(fusion, inputs)
    if not ctx.cuda:
        model = copy.deepcopy(fusion)
        BlockStreamer(model, ctx.device)
        same = all(torch.equal(a, b) for a, b in zip(_forward(model, inputs), resident_out, strict=True))
        return [
            Result(
                "",
                "PASS" if same else "FAIL",
                "equal" if same else "differs",
                "the resident output",
                "blocks streamed on the CPU",
            ),
            Result("offload block: peak memory", "SKIP", note="device memory is a CUDA figure"),
            Result("offload block: step time", "SKIP", note="host-to-device copies exist only on CUDA"),
        ]
    resident_step = _step_time(ctx, STEP_SIZE)
    parked = [
        name for name in ("text_encoder", "video_vae", "audio_decoder") if name not in ctx.pipe.visitors
    ]
    for name in parked:  # a --offload block server keeps them in host memory between their stages
        getattr(ctx.pipe, name).to("cpu")
    fusion.to("cpu")
    torch.cuda.empty_cache()
    streamer = BlockStreamer(fusion, ctx.device)
    try:
        torch.cuda.reset_peak_memory_stats(ctx.device)
        offloaded_out = _forward(fusion, inputs)
        offload_step = _step_time(ctx, STEP_SIZE)
        peak = torch.cuda.max_memory_allocated(ctx.device) / GB
    finally:
        streamer.release_all()
        del fusion.fusion_block  # the instance attribute shadowing the method
        fusion.to(ctx.device)
        for name in parked:
            getattr(ctx.pipe, name).to(ctx.device)
    distance = _relative(offloaded_out, resident_out)
    ratio = offload_step / resident_step
    return [
        Result(
            "",
            "PASS" if distance <= 1e-3 else "FAIL",
            f"rel. L2 {distance:.1e}",
            "<= 1e-3 (same kernels)",
            "",
        ),
        Result(
            "offload block: peak memory",
            "PASS" if peak <= OFFLOAD_PEAK_TARGET_GB else "FAIL",
            f"{peak:.1f} GiB",
            f"<= {OFFLOAD_PEAK_TARGET_GB:g} GiB",
            "denoising at 704x704",
            data={"peak_gb": peak},
        ),
        Result(
            "offload block: step time",
            "PASS" if ratio <= OFFLOAD_STEP_TARGET else "FAIL",
            f"{ratio:.2f}x ({offload_step:.2f} s)",
            f"<= {OFFLOAD_STEP_TARGET}x resident",
            f"resident {resident_step:.2f} s",
            data={"ratio": ratio, "offload_s": offload_step, "resident_s": resident_step},
        ),
    ]


def compile_step(ctx: Context) -> Result:
    """The compiled step against the eager one. On CUDA the pipeline compiles by default (--compile auto)
    and warmed up at start-up: that warm-up is the compile time. Elsewhere the blocks are compiled here."""
    if not ctx.cuda:
        raise Skip(
            "inductor's C++ build takes minutes on a CPU; tests/engine/test_compiling.py checks the graphs"
        )
    fusion = ctx.pipe.fusion
    inputs = _forward_inputs(ctx, STEP_SIZE)
    with _eager():
        reference = _forward(fusion, inputs)
        eager = _step_time(ctx, STEP_SIZE)
    compiled_here = not ctx.pipe.compiled
    if compiled_here:
        compile_blocks(fusion)
    try:
        ctx.sync()
        started = time.perf_counter()
        compiled_out = _forward(fusion, inputs)  # compiles, unless the start-up warm-up did
        ctx.sync()
        compile_s = time.perf_counter() - started if compiled_here else ctx.pipe.warm_up_s
        step = _step_time(ctx, STEP_SIZE)
    finally:
        if compiled_here:
            uncompile_blocks(fusion)
    distance = _relative(compiled_out, reference)
    when = "first forward (compile)" if compiled_here else "start-up warm-up (compile)"
    return Result(
        "",
        "PASS" if distance <= BF16_AGREEMENT else "FAIL",
        f"{step:.2f} s/step ({eager / step:.2f}x eager)",
        f"output rel. L2 <= {BF16_AGREEMENT:.0e}",
        f"eager {eager:.2f} s, {when} {compile_s:.0f} s, rel. L2 {distance:.1e}",
        data={"step_s": step, "eager_step_s": eager, "compile_s": compile_s, "relative_l2": distance},
    )


def batch_guidance(ctx: Context) -> Result:
    """Both guidance passes as one batch-2 forward (--batch-guidance) against two forwards: the same
    prediction, and the step time of each, compiled (where the pipeline is) and eager."""
    size = STEP_SIZE if ctx.cuda else None
    shape = _shape(ctx, size)
    noise = initial_noise(shape.video_latent_shape, shape.audio_latent_shape, 0, ctx.device, ctx.dtype)
    cond = Conditioning(*_contexts(ctx))
    guidance = ctx.pipe.resolve(GenerationRequest(PROMPT)).guidance
    t = torch.tensor(999.0, device=ctx.device)
    with torch.inference_mode():
        two = guided_predict(ctx.pipe.fusion, noise, t, cond, guidance)
        one = batched_predict(ctx.pipe.fusion, noise, t, cond, guidance)
    distance = _relative([x.float() for x in one], [x.float() for x in two])
    tolerance = BF16_AGREEMENT if ctx.dtype != torch.float32 else FP32_AGREEMENT
    times, peaks = {}, {}
    for name, predict in (("two-pass", guided_predict), ("batched", batched_predict)):
        for stance in ("compiled", "eager") if ctx.pipe.compiled else ("eager",):
            if ctx.cuda:
                torch.cuda.reset_peak_memory_stats(ctx.device)
            with _eager() if stance == "eager" else contextlib.nullcontext():
                times[f"{name} {stance}"] = _step_time(ctx, size, predict)
            if ctx.cuda:
                peaks[f"{name} {stance}"] = torch.cuda.max_memory_allocated(ctx.device) / GB
    stance = "compiled" if ctx.pipe.compiled else "eager"
    batched, two_pass = times[f"batched {stance}"], times[f"two-pass {stance}"]
    note = ", ".join(f"{k} {v:.3f} s" for k, v in times.items())
    if peaks:
        note += "; peak " + ", ".join(f"{k} {v:.1f} GiB" for k, v in peaks.items())
    return Result(
        "",
        "PASS" if distance <= tolerance else "FAIL",
        f"{batched:.2f} s ({two_pass / batched:.2f}x two-pass, {stance})",
        f"same prediction: rel. L2 <= {tolerance:.0e}",
        f"rel. L2 {distance:.1e}; {note}",
        data={"relative_l2": distance, "step_s": times, "peak_gb": peaks},
    )


def _in_eager(item: Callable[[Context], Any]) -> Callable[[Context], Any]:
    """Items about configurations the server runs uncompiled (--offload, --fp8: --compile auto is off)."""

    def run(ctx: Context) -> Any:
        with _eager():
            return item(ctx)

    return run


def fp8_storage(ctx: Context) -> Result:
    """Linear weights stored in fp8 and upcast per layer (--fp8), biases and norms in bf16. Last item on
    CUDA: it converts the shared model's weights in place."""
    inputs = _forward_inputs(ctx, STEP_SIZE if ctx.cuda else None)
    fusion = ctx.pipe.fusion if ctx.cuda else copy.deepcopy(ctx.pipe.fusion)
    reference = _forward(fusion, inputs)
    params = dict(fusion.named_parameters())
    for name in layerwise_cast_params(fusion):
        if name.endswith(".weight"):
            params[name].data = params[name].data.to(torch.float8_e4m3fn)
    apply_fp8_weights(fusion, ctx.dtype)
    fp8_gb = sum(p.numel() * p.element_size() for p in fusion.parameters()) / GB
    if ctx.cuda:
        for name in ("text_encoder", "video_vae", "audio_decoder"):
            getattr(ctx.pipe, name).to("cpu")
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(ctx.device)
    out = _forward(fusion, inputs)
    distance = _relative(out, reference)
    # the issue sets no fp8 target: the figures are reported, and the item passes when the output is
    # finite (quantising random weights moves a deep net's output: its rel. L2 is information)
    finite = all(bool(torch.isfinite(x).all()) for x in out)
    note = f"weights {fp8_gb:.2f} GiB, output rel. L2 {distance:.3f} vs unquantised"
    if not ctx.cuda:
        return Result("", "PASS" if finite else "FAIL", "runs, finite", "finite output", note)
    step = _step_time(ctx, STEP_SIZE)
    peak = torch.cuda.max_memory_allocated(ctx.device) / GB
    return Result(
        "",
        "PASS" if finite else "FAIL",
        f"peak {peak:.1f} GiB, {step:.2f} s/step",
        "reported (finite output)",
        note,
        data={"peak_gb": peak, "step_s": step, "weights_gb": fp8_gb, "relative_l2": distance},
    )


def card_e2e(device: torch.device, variant: Path, card_gb: float, scratch: Path) -> Result:
    """fal's default request as the server runs it on a smaller card: a fresh process limited with
    --gpu-memory, its own automatic choices (offload, where umt5 lives, tiling, compile), the whole
    pipeline built and run. Target: it completes, within the card."""
    if device.type != "cuda":
        raise Skip("--gpu-memory limits CUDA memory (a tiny run: tests/gpu/test_cuda.py)")
    budget = card_gb - CUDA_CONTEXT_GB
    out = scratch / f"card-{budget:g}.json"
    command = [sys.executable, "-m", "benchmarks.acceptance", "--card-child", f"{budget:g}"]
    command += ["--device", str(device), "--variant", str(variant), "--json", str(out)]
    # its log goes to our stderr as it runs: what a cut-short run was doing
    done = subprocess.run(command, cwd=REPO_ROOT, timeout=CARD_TIMEOUT_S, check=False)
    if done.returncode != 0 or not out.exists():
        return Result("", "FAIL", f"exit code {done.returncode}", f"completes within {budget:g} GiB")
    data = json.loads(out.read_text())
    stages = ", ".join(f"{k} {v:.1f}" for k, v in data["stage_peaks_gb"].items())
    note = (
        f"--gpu-memory {budget:g}: offload {data['offload']}, umt5 {data['text_encoder']}, decode "
        f"{'tiled' if data['tiled'] else 'untiled'}, compiled {data['compiled']}; built in {data['build_s']:.0f} s; "
        f"peak GiB by stage {stages}; timings "
        + ", ".join(f"{k} {v:.1f} s" for k, v in data["timings"].items())
    )
    ok = data["valid_mp4"] and data["peak_gb"] <= budget
    return Result(
        "",
        "PASS" if ok else "FAIL",
        f"{data['s']:.1f} s, peak {data['peak_gb']:.1f} GiB",
        f"completes within {budget:g} GiB",
        note,
        data=data,
    )


def card_child(args: argparse.Namespace) -> int:
    """The card item's process: builds the pipeline under --gpu-memory and runs the e2e item."""
    _log_engine()
    started = time.perf_counter()
    pipe = OviPipeline.from_config(
        EngineConfig(variant=args.variant, device=args.device, gpu_memory=args.card_child)
    )
    build_s = time.perf_counter() - started
    with tempfile.TemporaryDirectory(prefix="ovi-card-") as tmp:
        placement = pipe.placement
        ctx = Context(
            args, placement.device, placement.dtype, pipe, _synchronizer(placement.device), Path(tmp)
        )
        result = e2e_default_request(ctx)
    data = {
        **result.data,
        "build_s": build_s,
        "offload": placement.offload,
        "text_encoder": "visits layer by layer" if "text_encoder" in pipe.visitors else "resident",
        "tiled": bool(pipe.video_vae.autoencoder.use_tiling),
        "compiled": pipe.compiled,
    }
    args.json.write_text(json.dumps(data, indent=2) + "\n")
    return 0


# in this order: the offload, compile and fp8 items change the shared model and put it back (fp8: last)
ITEMS: list[tuple[str, Callable[[Context], Result | list[Result]]]] = [
    ("end to end: fal default request", e2e_default_request),
    ("end to end: peak memory", e2e_peak_memory),
    ("video decode memory vs estimate", decode_estimate),
    ("video decode: cuDNN autotune", decode_autotune),
    ("attention backends", attention_backends),
    ("bf16 drift vs reference", bf16_drift),
    ("step vs reference", step_vs_reference),
    ("batch guidance: step time", batch_guidance),
    ("offload block: output", _in_eager(offload_block)),
    ("compile: step time", compile_step),
    ("fp8: peak memory", _in_eager(fp8_storage)),
]


# ------------------------------------------------------------------------------------------ helpers
def _log_engine() -> None:
    """The engine's own account of loading (where models live, compile warm-up) on stderr, not
    diffusers' chatter."""
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("ovi_server").setLevel(logging.INFO)


def _decode_as_served(vae, latent: Tensor) -> Tensor:
    """The untiled video decode the pipeline runs: chunk by chunk, each to uint8 and off the device.
    Returns uint8 [B, 3, T, H, W] on the host."""
    vae.set_tiling(False)
    return torch.cat([video_to_uint8(chunk).cpu() for chunk in vae.decode_chunks(latent)], dim=2)


def _eager():
    """The blocks as plain PyTorch even where the pipeline compiled them (--compile auto on CUDA)."""
    return torch.compiler.set_stance("force_eager")


def _shape(ctx: Context, size: tuple[int, int] | None) -> GenerationShape:
    cfg = ctx.pipe.cfg
    width, height = size or ctx.pipe.resolve(GenerationRequest(PROMPT)).size
    return t2v_shape(height, width, cfg.video_area, cfg.video_latent_length, cfg.audio_latent_length)


def _contexts(ctx: Context, prompt: str = PROMPT) -> list[Tensor]:
    req = ctx.pipe.resolve(GenerationRequest(prompt))
    with torch.inference_mode():
        return ctx.pipe.encode_prompts([req.prompt, req.video_negative_prompt, req.audio_negative_prompt])


def _forward_inputs(ctx: Context, size: tuple[int, int] | None, seed: int = 0, prompt: str = PROMPT) -> tuple:
    shape = _shape(ctx, size)
    noise = initial_noise(shape.video_latent_shape, shape.audio_latent_shape, seed, ctx.device, ctx.dtype)
    positive = _contexts(ctx, prompt)[0]
    return noise.video, noise.audio, torch.full((1,), 999.0, device=ctx.device), positive, positive


def _forward(model, inputs: tuple, dtype: torch.dtype | None = None) -> list[Tensor]:
    video, audio, t, video_ctx, audio_ctx = inputs
    if dtype is not None:
        video, audio, video_ctx, audio_ctx = (x.to(dtype) for x in (video, audio, video_ctx, audio_ctx))
    with torch.inference_mode():
        video_pred, audio_pred = model([video], [audio], t, [video_ctx], [audio_ctx])
    return [video_pred[0].float(), audio_pred[0].float()]


def _relative(ours: Sequence[Tensor], truth: Sequence[Tensor]) -> float:
    """The larger of the video and audio relative L2 distances."""
    return max(
        ((a.float() - b.float()).norm() / b.float().norm()).item() for a, b in zip(ours, truth, strict=True)
    )


def _step_time(ctx: Context, size: tuple[int, int] | None, predict: Predict | None = None) -> float:
    """Median seconds of a denoising step (both guidance passes + solver) after a warm-up step, with the
    pipeline's guidance unless `predict` names another."""
    shape = _shape(ctx, size)
    noise = initial_noise(shape.video_latent_shape, shape.audio_latent_shape, 0, ctx.device, ctx.dtype)
    positive, video_negative, audio_negative = _contexts(ctx)
    req = ctx.pipe.resolve(GenerationRequest(PROMPT, steps=TIMED_STEPS))
    plan = make_plan("unipc", TIMED_STEPS, req.shift, req.guidance, ctx.device)
    marks: list[float] = []

    def on_step(done: int, total: int, x: Latents) -> None:
        ctx.sync()
        marks.append(time.perf_counter())

    ctx.sync()
    marks.append(time.perf_counter())
    with torch.inference_mode():
        cond = Conditioning(positive, video_negative, audio_negative)
        denoise(ctx.pipe.fusion, noise, cond, plan, on_step, predict or ctx.pipe.predict)
    steps = [b - a for a, b in zip(marks, marks[1:], strict=False)][1:]
    return summarize(steps)["p50_s"]


def _reference(ctx: Context):
    from benchmarks.reference import load_reference

    return load_reference(ctx.args.reference, ctx.device)  # imported once per process


def _loads(values: Sequence[float]) -> str:
    return "/".join(f"{v:.1f}" for v in values) or "?"


def append_results(path: Path, report: dict[str, Any]) -> None:
    env, built = report["environment"], report.get("pipeline", {})
    machine = env.get("gpu") or f"{env['cpu']} ({env['cpu_count']} CPUs)"
    lines = [
        "",
        f"## acceptance, {report['variant']} on {report['device']} ({env['date_utc']})",
        "",
        f"- machine: {machine}; torch {env['torch']}, diffusers {env['diffusers']}"
        + (f", CUDA {env['cuda']}" if "cuda" in env else ""),
        f"- git `{env['git']}`; load average (1/5/15 min) {_loads(env['load_average_start'])} at the start, "
        f"{_loads(env.get('load_average_end', []))} at the end; {report.get('seconds', 0):.0f} s in all",
        f"- command: `{report['command']}`; random weights, {report['dtype']}",
        f"- pipeline built in {built.get('build_s', 0):.0f} s (compiled: {built.get('compiled')}, "
        f"start-up warm-up {built.get('warm_up_s', 0):.0f} s)",
        "",
        "| item | status | measured | target | note |",
        "| --- | --- | --- | --- | --- |",
    ]
    for item in report["items"]:
        cells = (item["item"], item["status"], item["measured"], item["target"], item["note"])
        lines.append("| " + " | ".join(str(c).replace("|", "/") for c in cells) + " |")
    s = report["summary"]
    lines += ["", f"`acceptance: {s['PASS']} passed, {s['FAIL']} failed, {s['SKIP']} skipped`", ""]
    with path.open("a") as f:
        f.write("\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())
