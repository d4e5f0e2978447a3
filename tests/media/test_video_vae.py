"""Wan2.2 video VAE: golden parity through the real loader, latent statistics, strict keys, shapes."""

from __future__ import annotations

import pytest
import torch
from conftest import GOLDEN_DIR, golden_cases
from safetensors.torch import load_file, save_file

from ovi_server.config import VideoVAEConfig, load_variant
from ovi_server.engine.device import CPU_FP32
from ovi_server.errors import WeightsError
from ovi_server.golden.cases import GoldenCase
from ovi_server.golden.run_wan_vae import video_vae_config
from ovi_server.media.video_vae import (
    LATENTS_MEAN,
    LATENTS_STD,
    build_autoencoder,
    load_video_vae,
    official_keys,
    official_name,
    random_video_vae,
    remap_official,
)

TINY_WEIGHTS = GOLDEN_DIR / "wan_vae" / "wan_vae_tiny_weights.safetensors"


@pytest.fixture(scope="module")
def tiny_vae():
    return random_video_vae(load_variant("tiny").video_vae, CPU_FP32, seed=0)


@pytest.mark.parametrize("case", golden_cases("wan_vae"), ids=lambda c: c.name)
def test_wan_vae_matches_reference(case: GoldenCase) -> None:
    vae = load_video_vae(case.weight_path(), video_vae_config(case.config), CPU_FP32)
    expected = case.tensors
    if "latent_unnormalized" in expected:
        torch.testing.assert_close(vae.encode(expected["video"]), expected["latent"], **case.tolerance)
        mu = vae.posterior_mean(expected["video"])
        torch.testing.assert_close(mu, expected["latent_unnormalized"], **case.tolerance)
    else:
        video = vae.decode(expected["latent"])
        torch.testing.assert_close(video, expected["video"], **case.tolerance)
        assert video.abs().max() <= 1.0


def test_latent_statistics_are_the_reference_constants() -> None:
    golden = load_file(str(GOLDEN_DIR / "wan_vae" / "wan22_latent_norm_constants.safetensors"))
    mean = torch.tensor(LATENTS_MEAN, dtype=torch.float32)
    std = torch.tensor(LATENTS_STD, dtype=torch.float32)
    assert torch.equal(mean, golden["latents_mean"])
    assert torch.equal(1.0 / std, golden["latents_inv_std"])  # what encode and decode actually use
    torch.testing.assert_close(std, golden["latents_std"], atol=1e-7, rtol=0)  # stored as 1/(1/std) there


def _write_weights(tmp_path, edit):
    state_dict = load_file(str(TINY_WEIGHTS))
    edit(state_dict)
    path = tmp_path / "Wan2.2_VAE.safetensors"
    save_file(state_dict, str(path))
    return path, video_vae_config(golden_cases("wan_vae")[0].config)


def test_missing_key_is_a_weights_error(tmp_path) -> None:
    path, config = _write_weights(
        tmp_path, lambda sd: sd.pop("decoder.upsamples.2.upsamples.0.shortcut.weight")
    )
    with pytest.raises(
        WeightsError,
        match=r"Wan2\.2_VAE\.safetensors.*missing.*decoder\.upsamples\.2\.upsamples\.0\.shortcut\.weight",
    ):
        load_video_vae(path, config, CPU_FP32)


def test_unexpected_key_is_a_weights_error(tmp_path) -> None:
    path, config = _write_weights(tmp_path, lambda sd: sd.update({"encoder.extra.weight": torch.zeros(3)}))
    with pytest.raises(WeightsError, match=r"Wan2\.2_VAE\.safetensors.*unexpected.*encoder\.extra\.weight"):
        load_video_vae(path, config, CPU_FP32)


@pytest.mark.parametrize(("latent_frames", "video_frames"), [(1, 1), (2, 5), (3, 9)])
def test_decode_shapes(tiny_vae, latent_frames: int, video_frames: int) -> None:
    latent = torch.randn(1, 48, latent_frames, 2, 3, generator=torch.Generator().manual_seed(0))
    video = tiny_vae.decode(latent)
    assert video.shape == (1, 3, video_frames, 32, 48)
    assert video.dtype == torch.float32 and video.abs().max() <= 1.0


@pytest.mark.parametrize(("video_frames", "latent_frames"), [(1, 1), (5, 2)])
def test_encode_shapes(tiny_vae, video_frames: int, latent_frames: int) -> None:
    video = torch.rand(1, 3, video_frames, 32, 48) * 2 - 1
    assert tiny_vae.encode(video).shape == (1, 48, latent_frames, 2, 3)


def test_encode_rejects_frame_counts_the_vae_cannot_chunk(tiny_vae) -> None:
    with pytest.raises(ValueError, match=r"1 \+ 4k"):
        tiny_vae.encode(torch.zeros(1, 3, 4, 32, 32))


def test_tiled_decode_covers_the_whole_frame() -> None:
    vae = random_video_vae(VideoVAEConfig(dim=4, dec_dim=8), CPU_FP32, seed=1, tiling=True)
    vae.set_tiling(True, tile_px=32, stride_px=16)  # 48x48 frames: 3x3 overlapping tiles
    latent = torch.randn(1, 48, 1, 3, 3, generator=torch.Generator().manual_seed(0))
    tiled = vae.decode(latent)
    assert tiled.shape == (1, 3, 1, 48, 48)
    assert torch.isfinite(tiled).all() and tiled.abs().max() <= 1.0


@pytest.mark.parametrize(
    "config", [VideoVAEConfig(dim=4, dec_dim=8), VideoVAEConfig(dim=4, dec_dim=8, num_res_blocks=1)]
)
def test_official_names_round_trip(config: VideoVAEConfig) -> None:
    ours = list(build_autoencoder(config).state_dict())
    official = {official_name(key, config.num_res_blocks): None for key in ours}
    assert sorted(remap_official(official)) == sorted(ours)


def test_official_names_are_the_checkpoint_keys() -> None:
    config = video_vae_config(golden_cases("wan_vae")[0].config)
    assert official_keys(config) == set(load_file(str(TINY_WEIGHTS)))
