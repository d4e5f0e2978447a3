"""`ovi-server generate` (prompt to MP4 with a progress bar) and `ovi-server weights check|download`."""

from __future__ import annotations

import argparse
import base64
import mimetypes
import os
import re
import sys
import time
from pathlib import Path

from ovi_server.config import EngineConfig, SamplingDefaults
from ovi_server.request import SOLVERS
from ovi_server.shapes import DEFAULT_RESOLUTION, FAL_RESOLUTIONS

SAMPLING = SamplingDefaults()  # the help shows the defaults the variants' configs start from

DEFAULT_WEIGHTS_DIR = "weights"


def flag_from_env(name: str) -> bool:
    return (os.environ.get(name) or "").lower() in ("1", "true", "yes", "on")


def env_option(parser, flag: str, env: str, help: str, default: str | None = None, **kw) -> None:
    """An option whose default comes from `env`; --help shows both."""
    shown = f" (default: {default})" if default is not None else ""
    parser.add_argument(flag, default=os.environ.get(env, default), help=f"{help} [env {env}]{shown}", **kw)


def add_model_options(parser, weights_default: str | None = None) -> None:
    """Which model: --variant, --weights, --fp8 (serve, generate, weights)."""
    env_option(
        parser,
        "--variant",
        "OVI_VARIANT",
        "720x720_5s, 960x960_5s, 960x960_10s, tiny (random weights, CPU demo) or a config path",
        "tiny",
    )
    env_option(
        parser,
        "--weights",
        "OVI_WEIGHTS_DIR",
        "weights directory in the reference's layout, weights/README.md (none: random weights, tiny only)",
        weights_default,
    )
    parser.add_argument(
        "--fp8",
        action="store_true",
        default=flag_from_env("OVI_FP8"),
        help="the fp8 checkpoint (720x720_5s), kept fp8 in memory [env OVI_FP8]",
    )


def add_runtime_options(parser) -> None:
    """How the model runs: device, precision, attention kernel, offloading, tiling, compile."""
    env_option(parser, "--device", "OVI_DEVICE", "auto, cpu, cuda or cuda:N", "auto")
    env_option(parser, "--dtype", "OVI_DTYPE", "auto (bf16 on GPU, fp32 on CPU), bf16 or fp32", "auto")
    env_option(
        parser,
        "--attention",
        "OVI_ATTENTION",
        "a diffusers attention backend: native (PyTorch SDPA), _native_cudnn, flash, _flash_3, sage",
        "native",
    )
    env_option(
        parser,
        "--offload",
        "OVI_OFFLOAD",
        "keep models in host memory, on the GPU per stage (model) or per block (block)",
        "none",
        choices=["none", "model", "block"],
    )
    env_option(
        parser,
        "--vae-tiling",
        "OVI_VAE_TILING",
        "tiled video VAE decode: auto (only when an untiled decode would not fit in free GPU memory), on, off",
        "auto",
        choices=["auto", "on", "off"],
    )
    parser.add_argument(
        "--compile",
        action="store_true",
        default=flag_from_env("OVI_COMPILE"),
        help="torch.compile the fusion blocks [env OVI_COMPILE]",
    )
    env_option(
        parser,
        "--sp",
        "OVI_SP",
        "sequence-parallel degree: one request runs on this many GPUs (processes on the CPU), "
        "the token streams split between them (Ulysses)",
        "1",
        type=int,
    )
    parser.add_argument(
        "--cfg-parallel",
        action="store_true",
        default=flag_from_env("OVI_CFG_PARALLEL"),
        help="run the positive and negative guidance passes on two groups of --sp GPUs each "
        "(2 x --sp in all) [env OVI_CFG_PARALLEL]",
    )


def engine_config(args: argparse.Namespace) -> EngineConfig:
    return EngineConfig(
        variant=args.variant,
        weights_dir=Path(args.weights) if args.weights else None,
        device=args.device,
        dtype=args.dtype,
        attention=args.attention,
        offload=args.offload,
        fp8=args.fp8,
        compile=args.compile,
        vae_tiling=args.vae_tiling,
        sp=int(args.sp),
        cfg_parallel=args.cfg_parallel,
    )


def add_generate_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "generate",
        help="generate one MP4 from a prompt (and optionally a first-frame image)",
        description="Prompt (+ image) to MP4 with speech and sound, on this machine.",
    )
    p.add_argument("prompt", help="e.g. 'A man says <S>We ship today.<E> Audio: keyboard clicks'")
    p.add_argument("--image", help="first frame (image-to-video): a file path, an http(s) URL or a data: URI")
    p.add_argument(
        "--resolution",
        default=DEFAULT_RESOLUTION,
        help=f"WIDTHxHEIGHT, snapped to the variant's area (fal's: {', '.join(FAL_RESOLUTIONS)}) "
        f"(default {DEFAULT_RESOLUTION}; ignored with --image)",
    )
    p.add_argument(
        "--steps", type=int, help=f"denoising steps (default: the variant's, {SAMPLING.steps}; tiny: 4)"
    )
    p.add_argument("--seed", type=int, help="random seed (default: random, printed)")
    p.add_argument("--solver", choices=SOLVERS, help=f"default {SAMPLING.solver}")
    p.add_argument("--video-guidance", type=float, help=f"default {SAMPLING.video_guidance_scale}")
    p.add_argument("--audio-guidance", type=float, help=f"default {SAMPLING.audio_guidance_scale}")
    p.add_argument("--negative-prompt", help="video negative prompt")
    p.add_argument("--audio-negative-prompt", help="audio negative prompt")
    add_model_options(p)
    add_runtime_options(p)
    p.add_argument("-o", "--output", default="out.mp4", help="where to write the MP4 (default out.mp4)")
    p.set_defaults(func=generate)


def parse_size(text: str) -> tuple[int, int]:
    match = re.fullmatch(r"\s*(\d+)\s*[xX]\s*(\d+)\s*", text)
    if not match:
        raise argparse.ArgumentTypeError(
            f"--resolution {text!r}: expected WIDTHxHEIGHT, e.g. {DEFAULT_RESOLUTION}"
        )
    return int(match.group(1)), int(match.group(2))


def image_source(value: str) -> str:
    """URLs and data URIs pass through; a local file becomes a data URI (the pipeline never opens paths)."""
    if value.startswith(("http://", "https://", "data:")):
        return value
    from PIL import Image, UnidentifiedImageError

    from ovi_server.errors import InvalidInput

    path = Path(value).expanduser()
    if not path.is_file():
        raise InvalidInput("--image", f"{value}: no such file")
    try:
        with Image.open(path) as image:
            image.verify()  # the header and structure; the pipeline decodes it fully later
    except (UnidentifiedImageError, OSError, SyntaxError) as exc:
        raise InvalidInput(
            "--image", f"{value}: not an image we can read ({exc}); use PNG, JPEG or WebP"
        ) from None
    mime = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
    return f"data:{mime};base64,{base64.b64encode(path.read_bytes()).decode()}"


def generate(args: argparse.Namespace) -> int:
    from ovi_server.config import load_variant
    from ovi_server.errors import OviError
    from ovi_server.request import GenerationRequest, Progress, check_request

    started = time.monotonic()
    try:
        size = parse_size(args.resolution)
    except argparse.ArgumentTypeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    engine = engine_config(args)
    try:
        image = image_source(args.image) if args.image else None
    except OviError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    request = GenerationRequest(
        prompt=args.prompt,
        image=image,
        size=size,
        steps=args.steps,
        seed=args.seed,
        solver=args.solver,
        video_guidance_scale=args.video_guidance,
        audio_guidance_scale=args.audio_guidance,
        video_negative_prompt=args.negative_prompt,
        audio_negative_prompt=args.audio_negative_prompt,
    )
    try:  # before anything heavy is imported or loaded: a typo costs milliseconds
        check_request(load_variant(args.variant), request)
    except OviError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2

    from tqdm import tqdm

    from ovi_server.engine.pipeline import OviPipeline

    bars: dict[str, tqdm] = {}

    def on_progress(event: Progress) -> None:
        bar = bars.get(event.stage)
        if bar is None:
            bar = bars[event.stage] = tqdm(
                total=event.total,
                desc=f"{event.stage:<12}",
                unit="step" if event.stage == "denoise" else "it",
                leave=True,
                file=sys.stderr,
            )
        bar.update(event.done - bar.n)
        if event.done >= event.total:
            bar.close()

    try:
        print(f"loading {args.variant} ...", file=sys.stderr)
        pipeline = OviPipeline.from_config(engine)
        try:
            clip = pipeline.generate(request, Path(args.output), on_progress)
        finally:
            pipeline.close()
    except OviError as exc:
        for bar in bars.values():
            bar.close()
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(
        f"wrote {clip.path}  seed={clip.seed}  {clip.width}x{clip.height}  {clip.num_frames} frames "
        f"{clip.duration_s:.2f}s @ {clip.fps} fps  in {time.monotonic() - started:.1f}s"
    )
    return 0


def add_weights_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("weights", help="check or download the official checkpoint files")
    wsub = p.add_subparsers(dest="weights_command", required=True, metavar="ACTION")
    check = wsub.add_parser(
        "check", help="list the variant's files, their sizes and whether their keys match"
    )
    add_model_options(check, DEFAULT_WEIGHTS_DIR)
    check.set_defaults(func=weights_check)
    download = wsub.add_parser("download", help="fetch the variant's official files with huggingface_hub")
    add_model_options(download, DEFAULT_WEIGHTS_DIR)
    download.set_defaults(func=weights_download)


def weights_check(args: argparse.Namespace) -> int:
    from ovi_server import weights
    from ovi_server.config import load_variant
    from ovi_server.errors import OviError

    try:
        cfg = load_variant(args.variant)
        reports = weights.check(Path(args.weights), cfg, fp8=args.fp8)
    except OviError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"{cfg.name}: {Path(args.weights).resolve()}")
    for report in reports:
        print("  " + report.line())
    bad = [r for r in reports if not r.present or r.keys_ok is False]
    print(f"{len(reports) - len(bad)} ok, {len(bad)} missing or bad")
    if any(r.present for r in bad):
        print(f"fix: delete the BAD files above, then run: {fix_command(args)}")
    elif bad:
        print(f"fix: {fix_command(args)}")
    return 1 if bad else 0


def fix_command(args: argparse.Namespace) -> str:
    """The `weights download` command for the same variant and directory (it skips files already there)."""
    import shlex

    fp8 = " --fp8" if args.fp8 else ""
    return f"ovi-server weights download --variant {shlex.quote(args.variant)} --weights {shlex.quote(args.weights)}{fp8}"


def weights_download(args: argparse.Namespace) -> int:
    from ovi_server import weights
    from ovi_server.config import load_variant
    from ovi_server.errors import OviError

    try:
        paths = weights.download(Path(args.weights), load_variant(args.variant), fp8=args.fp8)
    except OviError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for path in paths:
        print(path)
    return 0
