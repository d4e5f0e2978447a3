"""What a caller asks the engine for, and what it gets back, and the checks that need no model. No torch here."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from ovi_server.config import OviConfig
from ovi_server.errors import InvalidInput
from ovi_server.prompt import validate_prompt

# Largest seed we pick when a request has none (fits a signed 32-bit int in every client).
MAX_RANDOM_SEED = 2**31 - 1
MAX_SEED = 2**63 - 1  # torch seeds are 64-bit
SOLVERS: tuple[str, ...] = ("unipc", "dpm++", "euler")


@dataclass(frozen=True)
class GenerationRequest:
    """One generation. `None` means "the variant's default" (configs/<variant>.json `sampling`)."""

    prompt: str
    image: str | None = (
        None  # i2v first frame: an http(s) URL or a data: URI (the CLI turns paths into data URIs)
    )
    size: tuple[int, int] | None = None  # requested (width, height); snapped to the variant's area
    steps: int | None = None
    seed: int | None = None  # None: a random seed, reported back in the Clip
    solver: str | None = None  # "unipc" | "dpm++" | "euler"
    shift: float | None = None
    video_guidance_scale: float | None = None
    audio_guidance_scale: float | None = None
    slg_layer: int | None = None
    video_negative_prompt: str | None = None
    audio_negative_prompt: str | None = None


def check_request(cfg: OviConfig, request: GenerationRequest) -> None:
    """Everything about a request that can be checked without a model: prompt markup, steps, solver,
    skip layer, seed, size. Raises InvalidInput; the CLI calls it before loading anything."""
    validate_prompt(request.prompt)
    if request.steps is not None and not 1 <= request.steps <= 1000:
        raise InvalidInput("steps", f"must be between 1 and 1000, got {request.steps}")
    if request.solver is not None and request.solver not in SOLVERS:
        raise InvalidInput("solver", f"unknown solver {request.solver!r}; use one of {', '.join(SOLVERS)}")
    if request.slg_layer is not None and not 0 <= request.slg_layer < cfg.video.num_layers:
        raise InvalidInput("slg_layer", f"must be 0 (off) or a block index below {cfg.video.num_layers}")
    if request.seed is not None and not 0 <= request.seed <= MAX_SEED:
        raise InvalidInput("seed", f"must be between 0 and {MAX_SEED}, got {request.seed}")
    if request.size is not None and min(request.size) < 1:
        raise InvalidInput("size", f"width and height must be positive, got {request.size}")


@dataclass(frozen=True)
class Progress:
    """One progress event: `stage` is "encode_text", "encode_image", "denoise", "decode", "mux"."""

    stage: str
    done: int
    total: int
    # denoise steps only: renders this step's video latents as a small PNG (engine/preview.py); called
    # by whoever wants a live preview, so a step nobody previews costs nothing.
    preview: Callable[[], bytes] | None = field(default=None, compare=False, repr=False)


# Called by the pipeline after every step / stage; may raise errors.Cancelled to stop between steps.
ProgressCallback = Callable[[Progress], None]


def ignore_progress(_: Progress) -> None:
    return None


@dataclass(frozen=True)
class Clip:
    """A finished generation: an MP4 on disk and what it holds."""

    path: Path
    seed: int
    width: int
    height: int
    num_frames: int
    fps: int
    duration_s: float
    timings: dict[str, float] = field(default_factory=dict)  # seconds per stage
