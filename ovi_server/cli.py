"""`ovi-server`: the command line: which commands exist and which flags each takes. What a command does
lives in commands.py; its settings (flags, env vars, defaults) are fields of config.py's dataclasses,
resolved by settings.py: defaults → config file (--config / OVI_CONFIG) → environment → flags.

  serve     the fal-compatible HTTP API and its worker processes
  worker    one generation worker (start more by hand, on this or other hosts)
  generate  one MP4 from a prompt, on this machine
  weights   check or download the official checkpoint files
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from ovi_server import commands, settings
from ovi_server.config import SamplingDefaults, ServerConfig
from ovi_server.errors import ConfigError
from ovi_server.log import configure_logging
from ovi_server.request import SOLVERS
from ovi_server.shapes import DEFAULT_RESOLUTION, FAL_RESOLUTIONS

SAMPLING = SamplingDefaults()  # generate's help shows the defaults the variants' configs start from

# Defaults that differ by command, by field name (the rest are the dataclasses' own).
COMMAND_DEFAULTS: dict[str, dict] = {"weights": {"weights_dir": Path("weights")}}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ovi-server", description="Self-hosted Ovi with fal's API.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = sub.add_parser(
        "serve",
        help="run the fal-compatible HTTP server and its generation workers",
        description="Serve fal-ai/ovi and fal-ai/ovi/image-to-video over fal's queue API.",
    )
    settings.add_options(serve, "serve")
    serve.set_defaults(func=commands.serve, settings_for="serve")

    worker = sub.add_parser(
        "worker",
        help="run one generation worker: load the model once, take jobs from the queue until stopped",
        description="A worker process: claims jobs from --queue, generates, stores the MP4. Start one per "
        "GPU, on any host that reaches the queue and the file storage. SIGTERM stops it cleanly (its "
        "running job goes back to the head of the queue).",
    )
    settings.add_options(worker, "worker")
    worker.set_defaults(func=commands.worker, settings_for="worker")

    add_generate_parser(sub)

    weights = sub.add_parser("weights", help="check or download the official checkpoint files")
    actions = weights.add_subparsers(dest="weights_command", required=True, metavar="ACTION")
    check = actions.add_parser(
        "check", help="list the variant's files, their sizes and whether their keys match"
    )
    download = actions.add_parser("download", help="fetch the variant's official files with huggingface_hub")
    for action, func in ((check, commands.weights_check), (download, commands.weights_download)):
        settings.add_options(action, "weights", COMMAND_DEFAULTS["weights"])
        action.set_defaults(func=func, settings_for="weights")
    return parser


def add_generate_parser(sub: argparse._SubParsersAction) -> None:
    """generate: the request's own knobs (prompt, steps, seed, ...) are arguments, not settings."""
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
    p.add_argument(
        "--negative-prompt", help=f"video negative prompt (default {SAMPLING.video_negative_prompt!r})"
    )
    p.add_argument(
        "--audio-negative-prompt", help=f"audio negative prompt (default {SAMPLING.audio_negative_prompt!r})"
    )
    p.add_argument("-o", "--output", default="out.mp4", help="where to write the MP4 (default out.mp4)")
    settings.add_options(p, "generate")
    p.set_defaults(func=commands.generate, settings_for="generate")


def build_server_config(args: argparse.Namespace) -> ServerConfig:
    """The settings object of the parsed command (raises ConfigError on a bad value)."""
    return settings.load(args, args.settings_for, COMMAND_DEFAULTS.get(args.settings_for))


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        config = build_server_config(args)
    except ConfigError as exc:
        print(f"ovi-server {args.command}: error: {exc}", file=sys.stderr)
        return 2
    configure_logging(config.log.level, config.log.format)
    return args.func(config, args)


if __name__ == "__main__":
    sys.exit(main())
