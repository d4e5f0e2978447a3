"""Resolution arithmetic: fal's resolution enum, the reference's size snapping, latent and token sizes.

All sizes are (height, width) in pixels unless a name says otherwise; fal's enum strings are
WIDTHxHEIGHT. The snapping functions reproduce `ovi/utils/processing_utils.py` exactly, including
Python's round-half-to-even, because a one-step difference changes the latent grid.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from ovi_server.errors import InvalidInput

# fal-ai/ovi `resolution` values (WIDTHxHEIGHT), in the order of fal's schema; the default is fal's.
FAL_RESOLUTIONS: tuple[str, ...] = (
    "512x992",
    "992x512",
    "960x512",
    "512x960",
    "720x720",
    "448x1120",
    "1120x448",
)
DEFAULT_RESOLUTION = "992x512"

VIDEO_LATENT_CHANNELS = 48  # Wan2.2 VAE z_dim
VAE_SPATIAL_STRIDE = 16  # Wan2.2 VAE: 16x spatial compression (patchify 2 x 3 downsamples)
VAE_TEMPORAL_STRIDE = 4
TOKEN_STRIDE = 32  # VAE stride times the DiT patch (1, 2, 2)
AUDIO_LATENT_CHANNELS = 20  # MMAudio VAE embed_dim
AUDIO_SAMPLES_PER_LATENT = 512  # MMAudio 16 kHz: hop 256, latent downsampled 2x
# The reference warns (and otherwise ignores it) when the requested area is off by more than this.
AREA_WARNING_TOLERANCE = 0.10


def parse_resolution(value: str) -> tuple[int, int]:
    """fal `resolution` ("WIDTHxHEIGHT", one of FAL_RESOLUTIONS) -> (height, width)."""
    if value not in FAL_RESOLUTIONS:
        raise InvalidInput(
            "resolution",
            f"{value!r} is not a supported resolution; use one of {', '.join(FAL_RESOLUTIONS)} (WIDTHxHEIGHT)",
            kind="literal_error",
        )
    width, height = (int(part) for part in value.split("x"))
    return height, width


def parse_size(text: str, name: str = "resolution") -> tuple[int, int]:
    """The CLI's and the benchmark's --resolution: "WIDTHxHEIGHT" (any size) -> (width, height)."""
    match = re.fullmatch(r"\s*(\d+)\s*[xX]\s*(\d+)\s*", text)
    if not match:
        raise InvalidInput(name, f"{text!r}: expected WIDTHxHEIGHT, e.g. {DEFAULT_RESOLUTION}")
    return int(match.group(1)), int(match.group(2))


def snap_hw_to_multiple_of_32(h: int, w: int, area: int | None = 720 * 720) -> tuple[int, int]:
    """Scale (h, w) to `area` keeping the aspect, then round each side to a multiple of 32 (min 32).

    As the reference: both roundings are Python's `round` (half to even), the first to whole pixels.
    """
    if h <= 0 or w <= 0:
        raise ValueError(f"h and w must be positive, got {(h, w)}")
    if area is not None and area > 0:
        scale = math.sqrt(area / float(h * w))
        h, w = int(round(h * scale)), int(round(w * scale))
    return max(32, int(round(h / 32)) * 32), max(32, int(round(w / 32)) * 32)


def scale_hw_to_area_divisible(h: int, w: int, area: int = 1024 * 1024, n: int = 16) -> tuple[int, int]:
    """Scale (h, w) to about `area` keeping the aspect; each side rounded to a multiple of n (min n).

    The reference uses it for the text-to-image first frame (t2i2v mode), at 1024² and n = 16.
    """
    if h * w == 0:
        raise ValueError("Height and width must be positive")
    scale = math.sqrt(area / (h * w))
    new_h = int(round(h * scale / n) * n)
    new_w = int(round(w * scale / n) * n)
    return max(new_h, n), max(new_w, n)


def best_hw_for_area(h: int, w: int, area: int, multiple: int = 32) -> tuple[int, int]:
    """The i2v resize target for an (h, w) image: multiples of `multiple` closest to `area`.

    Reference `preprocess_image_tensor`: candidates are the heights p·multiple for p within ±3 of
    sqrt(units / aspect) with the width rounded to the aspect, plus the plain scale-and-snap size;
    the winner has the smallest |area error|, then the smallest aspect error, then comes first.
    There is no cap on the aspect, so a 1000x37 image becomes 3840x128 on the 720² model. An area
    <= 0 keeps the size, but (as the reference's final clamp) each side is at least `multiple`.
    """
    if area <= 0:  # the reference keeps the size, then still raises each side to at least `multiple`
        return max(multiple, h), max(multiple, w)
    ratio_wh = w / float(h)
    target_units = max(1, area // (multiple * multiple))
    p0 = max(1, int(round(math.sqrt(target_units / max(ratio_wh, 1e-8)))))
    candidates = []
    for dp in range(-3, 4):
        p = max(1, p0 + dp)
        q = max(1, int(round(p * ratio_wh)))
        candidates.append((p * multiple, q * multiple))
    scale = math.sqrt(area / (h * float(w)))
    candidates.append(
        (
            max(multiple, int(round(h * scale / multiple)) * multiple),
            max(multiple, int(round(w * scale / multiple)) * multiple),
        )
    )

    def score(hw: tuple[int, int]) -> tuple[float, float]:
        return abs(hw[0] * hw[1] - area), abs(hw[1] / max(hw[0], 1e-8) - ratio_wh)

    best_h, best_w = min(candidates, key=score)  # min keeps the first of equal scores, as the reference
    return max(multiple, best_h), max(multiple, best_w)


def area_warning(h: int, w: int, area: int) -> bool:
    """True when the requested size is more than 10 % off the model area (the reference logs a warning)."""
    requested = h * w
    return requested < (1 - AREA_WARNING_TOLERANCE) * area or requested > (1 + AREA_WARNING_TOLERANCE) * area


def size_note(variant: str, video_area: int) -> str:
    """One sentence on what a variant does with a requested size (logged once at start-up)."""
    height, width = snap_hw_to_multiple_of_32(512, 992, area=video_area)
    side = round(math.sqrt(video_area))
    return (
        f"variant {variant} makes videos of about {video_area} pixels ({side}x{side}): a requested size is "
        f"scaled to that area keeping its aspect, each side a multiple of 32 (fal's default 992x512 becomes "
        f"{width}x{height}); image-to-video takes the image's aspect"
    )


def num_video_frames(video_latent_length: int) -> int:
    """Pixel frames decoded from F latent frames: the first latent frame is one image, the rest 4 each."""
    return 1 + VAE_TEMPORAL_STRIDE * (video_latent_length - 1)


@dataclass(frozen=True)
class GenerationShape:
    """Every size a generation needs, derived from the final pixel size and the variant's lengths."""

    height: int
    width: int
    num_frames: int
    video_latent_shape: tuple[int, int, int, int]  # [C, F, H/16, W/16]
    video_tokens: int  # F·(H/32)·(W/32): DiT sequence length
    audio_latent_shape: tuple[int, int]  # [L, 20]
    audio_samples: int  # waveform length at 16 kHz

    @property
    def latent_hw_odd(self) -> bool:
        """Odd latent sides cannot be patchified by (2, 2); never true for multiples of 32."""
        return self.video_latent_shape[2] % 2 == 1 or self.video_latent_shape[3] % 2 == 1


def generation_shape(
    height: int, width: int, video_latent_length: int, audio_latent_length: int
) -> GenerationShape:
    """Shapes for a video of exactly (height, width) pixels; sides must be multiples of 16."""
    if height % VAE_SPATIAL_STRIDE or width % VAE_SPATIAL_STRIDE:
        raise ValueError(f"height and width must be multiples of {VAE_SPATIAL_STRIDE}, got {(height, width)}")
    latent_h, latent_w = height // VAE_SPATIAL_STRIDE, width // VAE_SPATIAL_STRIDE
    return GenerationShape(
        height=height,
        width=width,
        num_frames=num_video_frames(video_latent_length),
        video_latent_shape=(VIDEO_LATENT_CHANNELS, video_latent_length, latent_h, latent_w),
        video_tokens=video_latent_length * (height // TOKEN_STRIDE) * (width // TOKEN_STRIDE),
        audio_latent_shape=(audio_latent_length, AUDIO_LATENT_CHANNELS),
        audio_samples=audio_latent_length * AUDIO_SAMPLES_PER_LATENT,
    )


def t2v_shape(
    height: int, width: int, video_area: int, video_latent_length: int, audio_latent_length: int
) -> GenerationShape:
    """Text-to-video: the requested (height, width) snapped to the model area, then all shapes."""
    snapped_h, snapped_w = snap_hw_to_multiple_of_32(height, width, area=video_area)
    return generation_shape(snapped_h, snapped_w, video_latent_length, audio_latent_length)


def i2v_shape(
    image_height: int, image_width: int, video_area: int, video_latent_length: int, audio_latent_length: int
) -> GenerationShape:
    """Image-to-video: the size the first frame is resized to decides the video size."""
    target_h, target_w = best_hw_for_area(image_height, image_width, video_area)
    return generation_shape(target_h, target_w, video_latent_length, audio_latent_length)
