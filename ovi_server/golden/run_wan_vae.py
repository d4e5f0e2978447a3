"""Golden cases of the Wan2.2 video VAE: the case's weight file goes through `load_video_vae`, as the real one does."""

from __future__ import annotations

from typing import Any

from ovi_server.config import VideoVAEConfig
from ovi_server.engine.device import CPU_FP32
from ovi_server.golden.cases import CaseResult, Comparison, GoldenCase
from ovi_server.media.video_vae import VideoVAE, load_video_vae

# reference `WanVAE_` argument (as written in the manifests) -> our VideoVAEConfig field
_CONFIG_NAMES = {
    "dim": "dim",
    "dec_dim": "dec_dim",
    "z_dim": "z_dim",
    "dim_mult": "dim_mult",
    "num_res_blocks": "num_res_blocks",
    "temperal_downsample": "temperal_downsample",
    "patch_size": "patch_size",
}


def video_vae_config(reference: dict[str, Any]) -> VideoVAEConfig:
    """A manifest's reference config as our VideoVAEConfig.

    `attn_scales` (and `dropout`, inactive in eval) are not carried over: the reference's Wan2.2 VAE
    (`ovi/modules/vae2_2.py`) stores `attn_scales` but builds no layer from it, since its residual
    levels have no attention (nor does diffusers' `is_residual=True` variant), so any value gives the
    same network.
    """
    values = {ours: reference[theirs] for theirs, ours in _CONFIG_NAMES.items() if theirs in reference}
    return VideoVAEConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})


def run_case(case: GoldenCase) -> CaseResult:
    vae: VideoVAE = load_video_vae(case.weight_path(), video_vae_config(case.config), CPU_FP32)
    expected = case.tensors
    check = Comparison(case.tolerance)
    if "video" in expected and "latent_unnormalized" in expected:  # an encode case
        latent = vae.encode(expected["video"])
        check.tensor("latent", latent, expected["latent"])
        check.tensor(
            "latent_unnormalized", vae.posterior_mean(expected["video"]), expected["latent_unnormalized"]
        )
    else:  # a decode case
        video = vae.decode(expected["latent"])
        check.tensor("video", video, expected["video"])
        if "video_unclamped" in expected:
            # decode() returns the clamped video (what the pipeline uses); where the reference's
            # unclamped values lie inside [-1, 1] the two must agree.
            inside = expected["video_unclamped"].abs() <= 1.0
            check.tensor("video_unclamped[inside]", video[inside], expected["video_unclamped"][inside])
    return check.result(case)
