"""What a caller asks the engine for, and what it gets back. No torch here."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

# Largest seed we pick when a request has none (fits a signed 32-bit int in every client).
MAX_RANDOM_SEED = 2**31 - 1


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
