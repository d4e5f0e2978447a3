"""Per-stage timings of one generation, optional checkpoint-load timing, and a side by side with the reference.

    python -m benchmarks.run --variant mid --device cpu --steps 3 [--json out.json] [--reference DIR]

Weights are random (speed does not depend on their values; no checkpoint is needed). The generation goes
through `OviPipeline.generate`, the code the server runs; its progress events mark the stage boundaries,
with the device synchronised before each clock read. The first denoising step is the warm-up and is left
out of the step statistics. See benchmarks/README.md for what each number means.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ovi_server import settings
from ovi_server.config import EngineConfig, OviConfig, load_variant
from ovi_server.engine.device import resolve_placement
from ovi_server.engine.pipeline import OviPipeline
from ovi_server.engine.sampler import (
    Conditioning,
    Latents,
    batched_predict,
    denoise,
    initial_noise,
    make_plan,
)
from ovi_server.errors import OviError
from ovi_server.models.fusion import build_fusion, load_fusion
from ovi_server.request import GenerationRequest, Progress
from ovi_server.shapes import GenerationShape, parse_size, t2v_shape

REPO_ROOT = Path(__file__).resolve().parent.parent
VARIANTS = ("tiny", "mid", "720x720_5s", "960x960_5s", "960x960_10s")
BENCH_DEFAULTS = {"variant": "mid", "device": "cpu"}  # the CPU proxy on the CPU unless told otherwise
PROMPT = (
    "A street violinist plays under a bridge while cars pass. "
    "<AUDCAP>Solo violin melody, distant traffic hum<ENDAUDCAP>"
)
GB = 1024**3
# stages of one generation, in order; denoise_step has mean/p50/p90, the others one figure
STAGES = (
    "build",
    "encode_text",
    "denoise_step",
    "denoise",
    "decode_video",
    "decode_audio",
    "mux",
    "end_to_end",
)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.run",
        description="Time one generation stage by stage (random weights), optionally next to the reference.",
    )
    # The engine settings are ovi-server's (same flags, OVI_* variables and --config file), with a
    # benchmark's own defaults: the CPU proxy variant on the CPU.
    settings.add_options(p, "bench", BENCH_DEFAULTS)
    p.add_argument("--steps", type=int, help="denoising steps (>= 2; default: the variant's)")
    p.add_argument(
        "--resolution",
        help="WxH; also sets the variant's pixel area to W*H so the size is used as given (snapped to 32)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, help="write the full report here")
    p.add_argument(
        "--checkpoint-load",
        action="store_true",
        help="also write a random bf16 checkpoint of the fusion model and time load_fusion on it "
        "(in a subprocess, for its peak RSS)",
    )
    p.add_argument("--reference", type=Path, help="a character-ai/Ovi checkout: time its step side by side")
    p.add_argument(
        "--forward-reps", type=int, default=5, help="with --reference: timed single forwards per side"
    )
    p.add_argument(
        "--rounds",
        type=int,
        default=4,
        help="with --reference: interleaved samplings of --steps steps per side",
    )
    p.add_argument(
        "--load-child", type=Path, help=argparse.SUPPRESS
    )  # internal: the checkpoint-load subprocess
    args = p.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    engine = settings.load(args, "bench", BENCH_DEFAULTS).engine
    for name in (
        "variant",
        "device",
        "dtype",
        "attention",
        "compile",
        "sp",
        "cfg_parallel",
        "batch_guidance",
    ):
        setattr(args, name, getattr(engine, name))
    return args


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = parse_args(argv)
        if args.load_child is not None:
            return _load_child(args)
        return run(args)
    except (OviError, UsageError) as exc:
        print(f"benchmarks.run: {exc}", file=sys.stderr)
        return 2


class UsageError(Exception):
    """A flag combination the benchmark refuses, with what to do instead."""


# ------------------------------------------------------------------------------------------------ run
def run(args: argparse.Namespace) -> int:
    cfg = load_variant(args.variant)
    device = torch.device(args.device)
    if cfg.random_weights_seed is None and device.type != "cuda":
        params = sum(p.numel() for p in build_fusion(cfg.video, cfg.audio).parameters())
        raise UsageError(
            f"variant {cfg.name} is too large for a CPU run: its fusion model alone has {params / 1e9:.1f} B "
            f"parameters ({params * 4 / GB:.0f} GB in float32) and one step would take hours. "
            "Run it with --device cuda, or use --variant mid (the CPU proxy) or tiny."
        )
    if args.reference is not None and (args.sp > 1 or args.cfg_parallel):
        raise UsageError("--reference compares one process with the reference; drop --sp/--cfg-parallel")
    steps = cfg.sampling.steps if args.steps is None else args.steps
    if steps < 2:
        raise UsageError(f"--steps must be at least 2 (the first step is the warm-up), got {steps}")
    size = parse_size(args.resolution, "--resolution") if args.resolution else None
    if size is not None and min(size) < 32:
        raise UsageError(f"--resolution sides must be at least 32 pixels, got {args.resolution!r}")
    placement = resolve_placement(args.device, args.dtype)
    sync = _synchronizer(placement.device)
    env = environment(placement.device)  # at the start: the sha and tree state of the code that runs

    with tempfile.TemporaryDirectory(prefix="ovi-bench-") as tmp:
        config_path = _random_weights_config(cfg, size, Path(tmp))
        engine = EngineConfig(
            variant=str(config_path),
            device=args.device,
            dtype=args.dtype,
            attention=args.attention,
            compile=args.compile,
            sp=args.sp,
            cfg_parallel=args.cfg_parallel,
            batch_guidance=args.batch_guidance,
        )
        started = time.perf_counter()
        pipe = OviPipeline.from_config(engine)
        sync()
        build_s = time.perf_counter() - started
        request = GenerationRequest(PROMPT, size=size, steps=steps, seed=args.seed, solver="unipc")
        try:
            stages, clip, memory = _time_generation(pipe, request, Path(tmp) / "bench.mp4", sync)
        finally:
            pipe.close()
        stages["build"] = {"s": build_s}
        checkpoint = (
            _time_checkpoint_load(pipe.cfg, config_path, args, Path(tmp)) if args.checkpoint_load else None
        )

    width, height = pipe.resolve(request).size  # as generate() derives the shape
    shape = t2v_shape(height, width, pipe.cfg.video_area, cfg.video_latent_length, cfg.audio_latent_length)
    report: dict[str, Any] = {
        "bench": "run",
        "variant": cfg.name,
        "device": str(placement.device),
        "dtype": str(placement.dtype).removeprefix("torch."),
        "attention": placement.attention,
        "compile": args.compile,
        "sp": args.sp,
        "cfg_parallel": args.cfg_parallel,
        "batch_guidance": pipe.predict is batched_predict,
        "steps": steps,
        "seed": args.seed,
        "random_weights": True,
        "video": {
            "width": clip.width,
            "height": clip.height,
            "frames": clip.num_frames,
            "latent_shape": list(shape.video_latent_shape),
            "tokens": shape.video_tokens,
        },
        "audio": {"latent_shape": list(shape.audio_latent_shape)},
        "stages": {name: stages[name] for name in STAGES},
        "memory": memory,
        "environment": env,
        "command": " ".join(["python -m benchmarks.run", *args.argv]),
    }
    if checkpoint is not None:
        report["checkpoint_load"] = checkpoint
    if args.reference is not None:
        report["reference"] = compare_with_reference(pipe, request, shape, args, sync)
    env["load_average_end"] = os.getloadavg()

    print_report(report)
    if args.json is not None:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    summary = {
        "bench": "run",
        "variant": cfg.name,
        "device": report["device"],
        "steps": steps,
        "step_ms_p50": round(stages["denoise_step"]["p50_s"] * 1000, 1),
        "end_to_end_s": round(stages["end_to_end"]["s"], 2),
        "peak_gb": round(memory["peak_gb"], 2),
        "random_weights": True,
    }
    print(json.dumps(summary))
    if "reference" in report:
        print(f"step_ratio={report['reference']['step_ratio']:.2f}")
    return 0


def _random_weights_config(cfg: OviConfig, size: tuple[int, int] | None, where: Path) -> Path:
    """The variant's config, written to `where` with a random-weights seed (and the --resolution area),
    so that `OviPipeline.from_config` builds it exactly as it builds the tiny variant."""
    data = dataclasses.asdict(cfg)
    if data["random_weights_seed"] is None:
        data["random_weights_seed"] = 0
    if size is not None:
        data["video_area"] = size[0] * size[1]
    path = where / f"{cfg.name}.json"
    path.write_text(json.dumps(data))
    return path


def _synchronizer(device: torch.device) -> Callable[[], None]:
    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    return lambda: None


def _time_generation(
    pipe: OviPipeline, request: GenerationRequest, out_path: Path, sync: Callable[[], None]
) -> tuple[dict[str, dict[str, float]], Any, dict[str, Any]]:
    """One `generate` call; its progress events (stage, done) are the stage boundaries."""
    marks: dict[tuple[str, int], float] = {}

    def on_progress(event: Progress) -> None:
        sync()
        marks[(event.stage, event.done)] = time.perf_counter()

    device = pipe.placement.device
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    sync()
    started = time.perf_counter()
    clip = pipe.generate(request, out_path, on_progress)
    sync()
    end_to_end = time.perf_counter() - started

    step_ends = [marks[("denoise", i)] for i in range(request.steps + 1)]
    last_decode = max(done for stage, done in marks if stage == "decode")
    step_s = np.diff(step_ends).tolist()
    stages: dict[str, dict[str, float]] = {
        "encode_text": {"s": clip.timings["encode_text"]},
        "denoise_step": {**summarize(step_s[1:]), "warmup_s": step_s[0]},
        "denoise": {"s": clip.timings["denoise"]},
        # audio first, then the video streamed into the encoder (decode_video includes the overlapped
        # H.264 encoding; "mux" is the encoder's tail and the audio)
        "decode_audio": {"s": marks[("decode", 1)] - marks[("decode", 0)]},
        "decode_video": {"s": marks[("decode", last_decode)] - marks[("decode", 1)]},
        "mux": {"s": clip.timings["mux"]},
        "end_to_end": {"s": end_to_end},
    }
    if device.type == "cuda":
        memory = {
            "kind": "cuda",
            "peak_gb": torch.cuda.max_memory_allocated(device) / GB,
            "peak_reserved_gb": torch.cuda.max_memory_reserved(device) / GB,
            "host_peak_rss_gb": peak_rss_gb(),
        }
    else:
        memory = {"kind": "rss", "peak_gb": peak_rss_gb()}
    return stages, clip, memory


def summarize(samples: Sequence[float]) -> dict[str, float]:
    values = np.asarray(samples, dtype=np.float64)
    return {
        "mean_s": float(values.mean()),
        "p50_s": float(np.percentile(values, 50)),
        "p90_s": float(np.percentile(values, 90)),
        "n": len(values),
    }


def peak_rss_gb() -> float:
    """This process's peak resident set size so far.

    Linux: VmHWM of /proc/self/status. Not ru_maxrss: a child started by fork+exec inherits its parent's
    high-water mark there, which would hide the checkpoint loader's own peak.
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024 / GB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GB  # KiB on Linux, bytes on macOS


# ------------------------------------------------------------------------------------ checkpoint load
def _time_checkpoint_load(cfg: OviConfig, config_path: Path, args: argparse.Namespace, tmp: Path) -> dict:
    """Writes a random bf16 `model.safetensors` of the variant's fusion model and times `load_fusion` on it
    in a fresh subprocess, whose peak RSS is then the loader's own (plus the interpreter and torch)."""
    from safetensors.torch import save_file

    path = tmp / "model.safetensors"
    generator = torch.Generator().manual_seed(cfg.random_weights_seed or 0)
    shapes = {name: tuple(t.shape) for name, t in build_fusion(cfg.video, cfg.audio).state_dict().items()}
    # the official checkpoint is bf16; values do not matter for load time
    state_dict = {
        name: (torch.randn(shape, generator=generator) * 0.02).to(torch.bfloat16)
        for name, shape in shapes.items()
    }
    save_file(state_dict, str(path))
    del state_dict
    command = [
        sys.executable,
        "-m",
        "benchmarks.run",
        "--variant",
        str(config_path),
        "--device",
        args.device,
        "--dtype",
        args.dtype,
        "--load-child",
        str(path),
    ]
    done = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"checkpoint-load subprocess failed ({done.returncode}):\n{done.stderr[-4000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    result["file_gb"] = path.stat().st_size / GB
    result["file_dtype"] = "bfloat16"
    return result


def _load_child(args: argparse.Namespace) -> int:
    cfg = load_variant(args.variant)
    placement = resolve_placement(args.device, args.dtype)
    sync = _synchronizer(placement.device)
    rss_before = peak_rss_gb()
    sync()
    started = time.perf_counter()
    model = load_fusion(args.load_child, cfg.video, cfg.audio, placement)
    sync()
    result: dict[str, Any] = {
        "s": time.perf_counter() - started,
        "peak_rss_gb": peak_rss_gb(),
        "rss_before_load_gb": rss_before,
        "params": sum(p.numel() for p in model.parameters()),
        "dtype": str(placement.dtype).removeprefix("torch."),
    }
    if placement.device.type == "cuda":
        result["cuda_peak_gb"] = torch.cuda.max_memory_allocated(placement.device) / GB
    print(json.dumps(result))
    return 0


# ---------------------------------------------------------------------------------------- reference
def compare_with_reference(
    pipe: OviPipeline,
    request: GenerationRequest,
    shape: GenerationShape,
    args: argparse.Namespace,
    sync: Callable[[], None],
) -> dict[str, Any]:
    """Builds the reference FusionModel with our config and weights; checks one forward for parity, then
    times single forwards and full steps of both on the same inputs (ours, then theirs, alternating)."""
    from benchmarks.reference import load_reference, reference_forward, reference_step_loop

    placement = pipe.placement
    reference = load_reference(args.reference, placement.device)
    ref_model = reference.build_fusion(pipe.cfg.video, pipe.cfg.audio, dict(pipe.fusion.state_dict()))

    req = pipe.resolve(request)
    with torch.inference_mode():  # the pipeline's path: cached, the text encoder on the GPU if it visits
        positive, video_negative, audio_negative = pipe.encode_prompts(
            [req.prompt, req.video_negative_prompt, req.audio_negative_prompt]
        )
    noise = initial_noise(
        shape.video_latent_shape, shape.audio_latent_shape, req.seed, placement.device, placement.dtype
    )
    t = torch.full((1,), 999.0, device=placement.device)

    def ours_forward(negative: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        contexts, slg_layer = (
            ((video_negative, audio_negative), req.guidance.slg_layer)
            if negative
            else ((positive, positive), 0)
        )
        with torch.inference_mode():
            video_pred, audio_pred = pipe.fusion(
                [noise.video], [noise.audio], t, [contexts[0]], [contexts[1]], slg_layer=slg_layer
            )
        return video_pred[0], audio_pred[0]

    def ref_forward(negative: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        contexts, slg_layer = (
            ((video_negative, audio_negative), req.guidance.slg_layer)
            if negative
            else ((positive, positive), 0)
        )
        return reference_forward(
            ref_model, noise.video, noise.audio, t, *contexts, placement.dtype, slg_layer=slg_layer
        )

    # parity first: a speed comparison of different maths would mean nothing. Both passes of a step:
    # positive (all blocks) and negative (negative prompts, skip-layer guidance).
    parity: dict[str, Any] = {
        "what": "the positive and the negative (slg) forward at t=999, same weights and inputs"
    }
    for negative in (False, True):
        ours_video, ours_audio = ours_forward(negative)
        ref_video, ref_audio = ref_forward(negative)
        for name, ours_x, ref_x in (("video", ours_video, ref_video), ("audio", ours_audio, ref_audio)):
            err = (ours_x.float() - ref_x.float()).abs().max().item()
            parity[f"{name}_max_abs_err"] = max(err, parity.get(f"{name}_max_abs_err", 0.0))
            parity[f"{name}_max_abs"] = max(
                ref_x.float().abs().max().item(), parity.get(f"{name}_max_abs", 0.0)
            )
    parity["max_abs_err"] = max(parity["video_max_abs_err"], parity["audio_max_abs_err"])

    forward_s: dict[str, list[float]] = {"ours": [], "reference": []}
    for _ in range(args.forward_reps):
        for side, fn in (("ours", ours_forward), ("reference", ref_forward)):
            sync()
            started = time.perf_counter()
            fn()
            sync()
            forward_s[side].append(time.perf_counter() - started)

    # Steps, interleaved so that both sides see the same machine load (the host may be shared): ours is
    # denoise(), the loop the pipeline runs; from its on_step callback one reference step runs, the body of
    # the reference's generate() loop with its own FlowUniPCMultistepScheduler. Clocks pause in between.
    # Each round is a fresh sampling of all steps; only the first step of the first round is a warm-up.
    guidance = req.guidance
    cond = Conditioning(positive, video_negative, audio_negative)
    step_s: dict[str, list[float]] = {"ours": [], "reference": []}
    for _ in range(args.rounds):
        schedulers = tuple(reference.make_scheduler(req.steps, req.shift, placement.device) for _ in range(2))
        reference_steps = reference_step_loop(
            ref_model,
            noise.video,
            noise.audio,
            (positive, video_negative, audio_negative),
            schedulers,
            guidance.video_scale,
            guidance.audio_scale,
            guidance.slg_layer,
            placement.dtype,
        )
        clock = [0.0]

        def on_step(done: int, total: int, x: Latents, reference_steps=reference_steps, clock=clock) -> None:
            sync()
            step_s["ours"].append(time.perf_counter() - clock[0])
            started = time.perf_counter()
            next(reference_steps)
            sync()
            step_s["reference"].append(time.perf_counter() - started)
            clock[0] = time.perf_counter()

        plan = make_plan("unipc", req.steps, req.shift, guidance, placement.device)
        sync()
        clock[0] = time.perf_counter()
        denoise(pipe.fusion, Latents(noise.video, noise.audio), cond, plan, on_step, pipe.predict)
        # run the generator to its end so its inference_mode/autocast contexts exit here, not at GC
        if next(reference_steps, None) is not None:
            raise RuntimeError("the reference made more steps than ours")
    paired = [a / b for a, b in zip(step_s["ours"][1:], step_s["reference"][1:], strict=True)]

    stages = {}
    for name, samples, warmup in (("forward", forward_s, 0), ("step", step_s, 1)):
        ours, theirs = summarize(samples["ours"][warmup:]), summarize(samples["reference"][warmup:])
        stages[name] = {
            "ours": ours,
            "reference": theirs,
            "ratio_p50": ours["p50_s"] / theirs["p50_s"],
            "ratio_mean": ours["mean_s"] / theirs["mean_s"],
        }
    return {
        "dir": str(reference.root),
        "attention": reference.attention,
        "float32_source": reference.float32_source,
        "parity": parity,
        "stages": stages,
        # median over adjacent (ours, reference) step pairs: robust to load bursts on a shared host
        "step_ratio": float(np.median(paired)),
        "paired_step_ratios": paired,
        "note": "forward: one conditional forward (a warm-up forward precedes, the parity check); "
        "step: two forwards + CFG + both solver steps, the two sides interleaved step by step, the first "
        "step excluded; ratio_* = ours / reference of p50 and mean; step_ratio = median of the paired "
        "per-step ratios",
    }


# ------------------------------------------------------------------------------------------- report
def environment(device: torch.device) -> dict[str, Any]:
    import diffusers

    env = {
        "date_utc": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "git": _git("describe", "--always", "--dirty", "--abbrev=12"),
        "git_sha": _git("rev-parse", "HEAD"),
        # uncommitted changes in the code under test (the engine may be edited while benchmarks run)
        "dirty_files": [
            line[3:]
            for line in _git("status", "--porcelain").splitlines()
            if line[3:].startswith(("ovi_server/", "configs/", "benchmarks/"))
        ],
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_average_start": os.getloadavg(),  # 1, 5, 15 min: the host may be shared
        "python": platform.python_version(),
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
    }
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
        env["cuda"] = torch.version.cuda
    return env


def _git(*args: str) -> str:
    """Empty answers and a host without git (a GPU box given a copy of the tree) read "unknown"."""
    try:
        done = subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True, text=True, check=False)
    except OSError:
        return "unknown"
    return done.stdout.strip() or "unknown"


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _loads(values: Sequence[float]) -> str:
    return "/".join(f"{v:.1f}" for v in values)


def print_report(report: dict[str, Any]) -> None:
    video, stages = report["video"], report["stages"]
    print(
        f"ovi benchmark  variant={report['variant']} device={report['device']} dtype={report['dtype']} "
        f"attention={report['attention']} steps={report['steps']}  RANDOM weights"
    )
    print(
        f"  video {video['width']}x{video['height']}, {video['frames']} frames, latent {video['latent_shape']}, "
        f"{video['tokens']} tokens; audio latent {report['audio']['latent_shape']}"
    )
    env = report["environment"]
    print(
        f"  {env['cpu']} ({env['cpu_count']} cpus, {env['torch_threads']} torch threads)"
        + (f", {env['gpu']}" if "gpu" in env else "")
        + f"; torch {env['torch']}, diffusers {env['diffusers']}; git {env['git']}; {env['date_utc']}"
    )
    print(
        f"  load average {_loads(env['load_average_start'])} at the start, {_loads(env['load_average_end'])} "
        f"at the end; uncommitted: {', '.join(env['dirty_files']) or 'none'}"
    )
    print(f"{'stage':<16}{'mean_s':>10}{'p50_s':>10}{'p90_s':>10}{'n':>4}")
    for name in STAGES:
        row = stages[name]
        if "mean_s" in row:
            print(
                f"{name:<16}{row['mean_s']:>10.3f}{row['p50_s']:>10.3f}{row['p90_s']:>10.3f}{row['n']:>4}"
                f"   (warm-up step {row['warmup_s']:.3f} s excluded)"
            )
        else:
            print(f"{name:<16}{row['s']:>10.3f}")
    memory = report["memory"]
    if memory["kind"] == "cuda":
        print(
            f"peak GPU memory: {memory['peak_gb']:.2f} GB allocated, {memory['peak_reserved_gb']:.2f} GB reserved "
            f"(host peak RSS {memory['host_peak_rss_gb']:.2f} GB)"
        )
    else:
        print(f"peak RSS: {memory['peak_gb']:.2f} GB (whole process: random init, generation)")
    if "checkpoint_load" in report:
        load = report["checkpoint_load"]
        print(
            f"checkpoint load: {load['s']:.3f} s for {load['file_gb']:.3f} GB bf16 -> {load['dtype']}, "
            f"peak RSS {load['peak_rss_gb']:.2f} GB ({load['rss_before_load_gb']:.2f} GB before the load)"
            + (f", GPU peak {load['cuda_peak_gb']:.2f} GB" if "cuda_peak_gb" in load else "")
        )
    if "reference" in report:
        ref = report["reference"]
        parity = ref["parity"]
        print(
            f"reference {ref['dir']}: attention {ref['attention']}, float32 source: {ref['float32_source']}"
        )
        print(
            f"parity ({parity['what']}): max_abs_err={parity['max_abs_err']:.2e} "
            f"(video {parity['video_max_abs_err']:.2e} of max |x| {parity['video_max_abs']:.2f}, "
            f"audio {parity['audio_max_abs_err']:.2e} of max |x| {parity['audio_max_abs']:.2f})"
        )
        print(f"{'stage':<10}{'ours_p50_s':>12}{'ref_p50_s':>12}{'p50 ratio':>11}{'mean ratio':>12}{'n':>4}")
        for name, row in ref["stages"].items():
            print(
                f"{name:<10}{row['ours']['p50_s']:>12.3f}{row['reference']['p50_s']:>12.3f}"
                f"{row['ratio_p50']:>11.2f}{row['ratio_mean']:>12.2f}{row['ours']['n']:>4}"
            )
        ratios = sorted(ref["paired_step_ratios"])
        print(
            f"paired step ratios ours/ref (adjacent steps): median {ref['step_ratio']:.2f}, "
            f"range {ratios[0]:.2f}..{ratios[-1]:.2f} over {len(ratios)} pairs"
        )


if __name__ == "__main__":
    sys.exit(main())
