"""Wan2.2 video VAE: golden parity through the real loader, latent statistics, strict keys, shapes."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import GOLDEN_DIR, golden_cases
from safetensors.torch import load_file, save_file
from torch import nn

from ovi_server.config import VideoVAEConfig, load_variant
from ovi_server.engine.device import CPU_FP32, Placement
from ovi_server.errors import WeightsError
from ovi_server.golden.cases import GoldenCase
from ovi_server.golden.run_wan_vae import run_case, video_vae_config
from ovi_server.media.video_vae import (
    LATENTS_MEAN,
    LATENTS_STD,
    build_autoencoder,
    decode_memory_estimate,
    load_video_vae,
    official_keys,
    official_name,
    plan_tiling,
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


def test_attn_scales_in_a_manifest_config_change_nothing() -> None:
    """The Wan2.2 VAE builds no layer from `attn_scales` (its levels are residual blocks without
    attention): a config that names scales is the same network, so the golden values still hold."""
    case = golden_cases("wan_vae")[0]
    config = {**case.config, "attn_scales": [1.0, 0.5]}
    assert video_vae_config(config) == video_vae_config(case.config)
    named = GoldenCase(case.component, case.folder, {**case.spec, "config": config}, case.manifest)
    result = run_case(named)
    assert result.passed, result.line()


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


def test_chunked_decode_is_diffusers_decode_a_latent_frame_at_a_time(tiny_vae) -> None:
    """The pipeline streams the decode to the encoder chunk by chunk: the chunks, joined, are diffusers'
    whole untiled decode bit for bit (this watches the diffusers internals decode_chunks relies on)."""
    latent = torch.randn(1, 48, 4, 2, 3, generator=torch.Generator().manual_seed(3))
    chunks = list(tiny_vae.decode_chunks(latent))
    assert [c.shape[2] for c in chunks] == [1, 4, 4, 4]
    z = latent / tiny_vae.latents_inv_std + tiny_vae.latents_mean
    whole = tiny_vae.autoencoder.decode(z).sample
    assert torch.equal(torch.cat(chunks, dim=2), whole)
    # a second decode starts from a clean causal cache: same chunks again
    assert all(torch.equal(a, b) for a, b in zip(chunks, tiny_vae.decode_chunks(latent), strict=True))


def test_an_abandoned_decode_closed_late_leaves_a_newer_one_alone(tiny_vae) -> None:
    latent = torch.randn(1, 48, 3, 2, 3, generator=torch.Generator().manual_seed(4))
    expected = list(tiny_vae.decode_chunks(latent))
    abandoned = tiny_vae.decode_chunks(latent)
    next(abandoned)  # a request cancelled after its first chunk
    newer = tiny_vae.decode_chunks(latent)
    got = [next(newer)]
    abandoned.close()  # what the garbage collector does, whenever it gets to it
    got += list(newer)
    assert all(torch.equal(a, b) for a, b in zip(got, expected, strict=True))


def test_tiled_decode_comes_as_one_chunk() -> None:
    vae = random_video_vae(VideoVAEConfig(dim=4, dec_dim=8), CPU_FP32, seed=1, tiling=True)
    vae.set_tiling(True, tile_px=32, stride_px=16)
    latent = torch.randn(1, 48, 2, 3, 3, generator=torch.Generator().manual_seed(0))
    chunks = list(vae.decode_chunks(latent))
    assert len(chunks) == 1 and chunks[0].shape == (1, 3, 5, 48, 48)
    assert torch.equal(chunks[0], vae.decode(latent))


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


def test_bf16_placement_computes_in_float32_on_bf16_rounded_weights() -> None:
    """The reference's bf16 VAE under a float32 autocast: float32 arithmetic on bf16-rounded weights,
    float32 video out. A bf16 decode would differ from that by far more than float32 rounding."""
    config = VideoVAEConfig(dim=4, dec_dim=8)
    bf16 = Placement(torch.device("cpu"), torch.bfloat16)
    vae = random_video_vae(config, bf16, seed=1)
    weights = list(vae.autoencoder.parameters())
    assert all(p.dtype == torch.float32 for p in weights)
    assert all(torch.equal(p, p.bfloat16().float()) for p in weights)  # the bf16 rounding is kept
    latent = torch.randn(1, 48, 2, 2, 2, generator=torch.Generator().manual_seed(0)).bfloat16()
    video = vae.decode(latent)
    assert video.dtype == torch.float32
    # the same computation by hand in float32 ...
    z = latent.float() / vae.latents_inv_std + vae.latents_mean
    torch.testing.assert_close(video, vae.autoencoder.decode(z).sample, atol=0, rtol=0)
    assert vae.encode(video).dtype == torch.bfloat16  # latents enter the DiT in the compute dtype
    # ... and what a bf16 decode would give: visibly different
    in_bf16 = nn.Module.to(copy.deepcopy(vae.autoencoder), dtype=torch.bfloat16)
    assert (in_bf16.decode(z.bfloat16()).sample.float() - video).abs().max() > 1e-3


def test_tiling_plan_decodes_untiled_when_the_estimate_fits() -> None:
    config = VideoVAEConfig()
    latent_704x1280 = (1, 48, 31, 44, 80)  # 720x720_5s at 704x1280, 121 frames
    estimate = decode_memory_estimate(latent_704x1280, config)
    # 23 KB x 1.5 per pixel (31.1 GB) plus one 4-frame chunk of output (0.15 GB), not the 1.3 GB video
    assert 31.2e9 < estimate < 31.3e9
    assert not plan_tiling(latent_704x1280, config, free_bytes=50 * 2**30).tiled  # an 80 GB card
    tight = plan_tiling(latent_704x1280, config, free_bytes=20 * 2**30)  # a 24 GB card
    assert tight.tiled and tight.estimate_bytes == estimate
    assert "tiled (untiled estimate" in tight.describe()
    assert not plan_tiling(latent_704x1280, config, free_bytes=None).tiled  # CPU: never tiles
    # twice the pixels needs twice the memory; a longer clip, streamed out chunk by chunk, no more
    assert decode_memory_estimate((1, 48, 31, 88, 80), config) == pytest.approx(2 * estimate, rel=1e-6)
    assert decode_memory_estimate((1, 48, 61, 44, 80), config) == estimate
