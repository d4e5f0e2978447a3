"""Live previews: the 48→RGB latent map, the PNG's size, and previews from a real tiny generation."""

from __future__ import annotations

import io

import pytest
import torch
from PIL import Image

from ovi_server.config import EngineConfig
from ovi_server.engine.pipeline import OviPipeline
from ovi_server.engine.preview import WAN22_LATENT_RGB, WAN22_LATENT_RGB_BIAS, latents_to_rgb, preview_png
from ovi_server.request import GenerationRequest


def _image(png: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(png))
    assert image.format == "PNG"
    return image.convert("RGB")


def test_the_map_is_the_published_wan22_factors():
    assert len(WAN22_LATENT_RGB) == 48 and all(len(row) == 3 for row in WAN22_LATENT_RGB)
    # zero latents show the bias; one unit on channel 39 (the strongest, dark) adds its row
    zero = latents_to_rgb(torch.zeros(48, 2, 3))
    expected = (torch.tensor(WAN22_LATENT_RGB_BIAS) + 1) / 2
    torch.testing.assert_close(zero[:, 1, 2], expected)
    unit = torch.zeros(48, 2, 3)
    unit[39] = 1.0
    torch.testing.assert_close(
        latents_to_rgb(unit)[:, 0, 0], (torch.tensor(WAN22_LATENT_RGB[39]) + expected * 2 - 1 + 1) / 2
    )
    assert latents_to_rgb(torch.full((48, 1, 1), 100.0)).max() <= 1.0  # clamped


@pytest.mark.parametrize(
    ("latent_hw", "png_wh"),
    [((4, 6), (256, 171)), ((45, 45), (256, 256)), ((32, 62), (256, 132)), ((60, 60), (256, 256))],
)
def test_png_is_at_most_256_px_and_keeps_the_aspect(latent_hw, png_wh):
    latents = torch.randn(48, 3, *latent_hw, dtype=torch.bfloat16)
    assert _image(preview_png(latents)).size == png_wh


def test_middle_frame_is_shown():
    latents = torch.zeros(48, 3, 4, 4)
    latents[39, 1] = 2.0  # middle frame much darker than the others
    dark = _image(preview_png(latents)).getpixel((128, 128))
    latents[39, 1] = 0.0
    plain = _image(preview_png(latents)).getpixel((128, 128))
    assert sum(dark) < sum(plain) - 100


def test_tiny_generation_offers_a_preview_every_denoise_step(tmp_path):
    pipeline = OviPipeline.from_config(EngineConfig(variant="tiny"))
    events = []
    pipeline.generate(
        GenerationRequest("a cat", size=(992, 512), steps=3, seed=2), tmp_path / "a.mp4", events.append
    )
    denoise = [e for e in events if e.stage == "denoise"]
    assert [e.preview is not None for e in denoise] == [False, True, True, True]  # none before step 1
    images = [_image(e.preview()) for e in denoise[1:]]
    # 992x512 on tiny is a 96x64 video: latent 6x4, previews 256x171; the latents change every step
    assert {image.size for image in images} == {(256, 171)}
    assert images[0].tobytes() != images[-1].tobytes()
