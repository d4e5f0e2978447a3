"""Resolution arithmetic: fal's enum, the reference's snapping (banker's rounding), latent sizes."""

from __future__ import annotations

import json

import pytest
from conftest import GOLDEN_DIR

from ovi_server.config import load_variant
from ovi_server.errors import InvalidInput
from ovi_server.shapes import (
    DEFAULT_RESOLUTION,
    FAL_RESOLUTIONS,
    area_warning,
    best_hw_for_area,
    generation_shape,
    i2v_shape,
    num_video_frames,
    parse_resolution,
    scale_hw_to_area_divisible,
    snap_hw_to_multiple_of_32,
    t2v_shape,
)

GOLDEN = json.loads((GOLDEN_DIR / "prompt" / "prompt_and_shapes.json").read_text())


def test_fal_resolutions_are_width_by_height():
    assert parse_resolution("992x512") == (512, 992)
    assert parse_resolution("448x1120") == (1120, 448)
    assert DEFAULT_RESOLUTION in FAL_RESOLUTIONS
    assert [parse_resolution(r) for r in FAL_RESOLUTIONS] == [
        (992, 512),
        (512, 992),
        (512, 960),
        (960, 512),
        (720, 720),
        (1120, 448),
        (448, 1120),
    ]


@pytest.mark.parametrize("value", ["1024x1024", "992X512", "992x512 ", "", "512*992"])
def test_unknown_resolution_is_rejected(value):
    with pytest.raises(InvalidInput) as info:
        parse_resolution(value)
    assert info.value.field == "resolution"
    assert info.value.kind == "literal_error"
    assert info.value.msg == (
        f"{value!r} is not a supported resolution; use one of "
        "512x992, 992x512, 960x512, 512x960, 720x720, 448x1120, 1120x448 (WIDTHxHEIGHT)"
    )


@pytest.mark.parametrize("sub", GOLDEN["t2v_shape_cases"], ids=lambda s: f"{s['requested_hw']}-{s['model']}")
def test_t2v_shapes_match_reference(sub):
    variant = load_variant(sub["model"])
    h, w = sub["requested_hw"]
    shape = t2v_shape(h, w, variant.video_area, variant.video_latent_length, variant.audio_latent_length)
    assert [shape.height, shape.width] == sub["snapped_hw"]
    assert list(shape.video_latent_shape) == sub["video_latent_shape"]
    assert shape.video_tokens == sub["video_tokens"]
    assert list(shape.audio_latent_shape) == sub["audio_latent_shape"]
    assert shape.num_frames == sub["num_frames"] == variant.video_frames
    assert shape.audio_samples == sub["audio_samples_16k"]
    assert shape.latent_hw_odd is sub["video_latent_hw_odd"]
    assert area_warning(h, w, variant.video_area) is sub["area_warning"]


@pytest.mark.parametrize(
    "sub", GOLDEN["i2v_resize_cases"], ids=lambda s: f"{s['image_hw']}-{s['target_area']}"
)
def test_i2v_target_size_matches_reference(sub):
    h, w = sub["image_hw"]
    assert list(best_hw_for_area(h, w, sub["target_area"])) == sub["resized_hw"]
    shape = i2v_shape(h, w, sub["target_area"], 31, 157)
    assert list(shape.video_latent_shape[2:]) == sub["video_latent_hw"]


@pytest.mark.parametrize("sub", GOLDEN["t2i2v_flux_size_cases"], ids=lambda s: str(s["hw"]))
def test_flux_first_frame_size_matches_reference(sub):
    assert (
        list(scale_hw_to_area_divisible(*sub["hw"], area=1024 * 1024, n=16))
        == sub["scale_hw_to_area_divisible_1024sq_n16"]
    )


def test_snap_uses_bankers_rounding():
    # 720x720 at 720² area: 720/32 = 22.5 rounds to 22 (half to even), not 23.
    assert snap_hw_to_multiple_of_32(720, 720, area=720 * 720) == (704, 704)
    # 16/32 = 0.5 rounds to 0, then the minimum of 32 applies.
    assert snap_hw_to_multiple_of_32(16, 16, area=None) == (32, 32)
    assert snap_hw_to_multiple_of_32(48, 80, area=None) == (64, 64)  # 1.5 -> 2, 2.5 -> 2
    with pytest.raises(ValueError):
        snap_hw_to_multiple_of_32(0, 10)


def test_i2v_target_size_edge_cases():
    assert best_hw_for_area(100, 140, 6144) == (64, 96)  # the loop_i2v golden case
    assert best_hw_for_area(1000, 37, 720 * 720) == (3840, 128)  # no aspect cap, as the reference
    # area <= 0: the size is kept, but the reference still raises each side to at least 32
    assert best_hw_for_area(100, 140, 0) == (100, 140)
    assert best_hw_for_area(10, 10, 0) == (32, 32)
    assert best_hw_for_area(1314, 20, -5) == (1314, 32)


def test_generation_shape_counts():
    shape = generation_shape(704, 1280, 61, 314)
    assert shape.num_frames == 241 == num_video_frames(61)
    assert shape.video_latent_shape == (48, 61, 44, 80)
    assert shape.video_tokens == 61 * 22 * 40
    assert shape.audio_samples == 314 * 512
    with pytest.raises(ValueError, match="multiples of 16"):
        generation_shape(700, 1280, 61, 314)
