"""Live previews: the video latents of a denoising step as a small PNG, without the VAE.

A fixed linear map from the 48 latent channels to RGB (plus a bias), applied to the normalised latents
the sampler works on, then upscaled to at most `MAX_SIDE` pixels. The factors are the published
Wan2.2 latent-to-RGB preview factors (ComfyUI, `comfy/latent_formats.py`, class `Wan22`,
`latent_rgb_factors` and `latent_rgb_factors_bias`); Ovi's video tower denoises Wan2.2 VAE latents, so
they apply unchanged. Written out here as data, one row per latent channel: (R, G, B).
"""

from __future__ import annotations

import io

import torch
from PIL import Image
from torch import Tensor

MAX_SIDE = 256  # pixels, the longer side of a preview

# fmt: off
WAN22_LATENT_RGB: tuple[tuple[float, float, float], ...] = (
    (0.0119, 0.0103, 0.0046), (-0.1062, -0.0504, 0.0165), (0.0140, 0.0409, 0.0491),
    (-0.0813, -0.0677, 0.0607), (0.0656, 0.0851, 0.0808), (0.0264, 0.0463, 0.0912),
    (0.0295, 0.0326, 0.0590), (-0.0244, -0.0270, 0.0025), (0.0443, -0.0102, 0.0288),
    (-0.0465, -0.0090, -0.0205), (0.0359, 0.0236, 0.0082), (-0.0776, 0.0854, 0.1048),
    (0.0564, 0.0264, 0.0561), (0.0006, 0.0594, 0.0418), (-0.0319, -0.0542, -0.0637),
    (-0.0268, 0.0024, 0.0260), (0.0539, 0.0265, 0.0358), (-0.0359, -0.0312, -0.0287),
    (-0.0285, -0.1032, -0.1237), (0.1041, 0.0537, 0.0622), (-0.0086, -0.0374, -0.0051),
    (0.0390, 0.0670, 0.2863), (0.0069, 0.0144, 0.0082), (0.0006, -0.0167, 0.0079),
    (0.0313, -0.0574, -0.0232), (-0.1454, -0.0902, -0.0481), (0.0714, 0.0827, 0.0447),
    (-0.0304, -0.0574, -0.0196), (0.0401, 0.0384, 0.0204), (-0.0758, -0.0297, -0.0014),
    (0.0568, 0.1307, 0.1372), (-0.0055, -0.0310, -0.0380), (0.0239, -0.0305, 0.0325),
    (-0.0663, -0.0673, -0.0140), (-0.0416, -0.0047, -0.0023), (0.0166, 0.0112, -0.0093),
    (-0.0211, 0.0011, 0.0331), (0.1833, 0.1466, 0.2250), (-0.0368, 0.0370, 0.0295),
    (-0.3441, -0.3543, -0.2008), (-0.0479, -0.0489, -0.0420), (-0.0660, -0.0153, 0.0800),
    (-0.0101, 0.0068, 0.0156), (-0.0690, -0.0452, -0.0927), (-0.0145, 0.0041, 0.0015),
    (0.0421, 0.0451, 0.0373), (0.0504, -0.0483, -0.0356), (-0.0837, 0.0168, 0.0055),
)
WAN22_LATENT_RGB_BIAS: tuple[float, float, float] = (0.0317, -0.0878, -0.1388)
# fmt: on


def latents_to_rgb(video_latents: Tensor) -> Tensor:
    """One latent frame [48, h, w] → RGB in [0, 1], [3, h, w] float32 on the CPU."""
    frame = video_latents.detach().to("cpu", torch.float32)
    factors = torch.tensor(WAN22_LATENT_RGB)  # [48, 3]
    bias = torch.tensor(WAN22_LATENT_RGB_BIAS)
    rgb = torch.einsum("chw,cr->rhw", frame, factors) + bias[:, None, None]
    return ((rgb + 1) / 2).clamp(0, 1)  # the map's output is in [-1, 1], like the VAE's pixels


def preview_png(video_latents: Tensor, max_side: int = MAX_SIDE) -> bytes:
    """The middle latent frame of `video_latents` [48, F, h, w] as a PNG whose longer side is `max_side`
    (the latent grid is 16x smaller than the video, so previews are upscaled, bilinearly)."""
    frame = video_latents[:, video_latents.shape[1] // 2]  # [48, h, w]; frame 0 is the i2v image
    rgb = latents_to_rgb(frame)
    pixels = (rgb * 255).round().to(torch.uint8).permute(1, 2, 0).contiguous().numpy()  # [h, w, 3]
    image = Image.fromarray(pixels, "RGB")
    h, w = pixels.shape[:2]
    scale = max_side / max(h, w)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    out = io.BytesIO()
    # zlib level 1: half the time of the default level for ~10 % more bytes (benchmarks/preview.py)
    image.resize(size, Image.Resampling.BILINEAR).save(out, "PNG", compress_level=1)
    return out.getvalue()
