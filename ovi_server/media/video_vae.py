"""Wan2.2 video VAE (TI2V-5B, z_dim 48): pixels [-1, 1] <-> the normalised latents the DiT works in.

The network is diffusers' `AutoencoderKLWan`, which reproduces the reference's `Wan2_2_VAE` exactly
(tests/golden/README.md, section `wan_vae`: max |diff| 0.0 on every case); weights come from the
official `Wan2.2_VAE.pth` and are renamed by `remap_official` at the end of this file. What diffusers
does not do is the per-channel latent normalisation: the reference keeps 48 means and standard
deviations in its wrapper (not in the checkpoint), so they live here as data.

Precision: the reference stores the VAE in bf16 but runs encode and decode under a float32
autocast on CUDA (`Wan2_2_VAE(dtype=torch.float)` wraps every call in `amp.autocast(dtype=self.dtype)`),
so its convolutions compute in float32 on bf16-rounded weights, from float32 latents. We do the same
without autocast: weights are materialised in the placement dtype (the reference's rounding) and
then held in float32 (exact), inputs enter in float32, and `decode` returns float32 as the
reference's `.float()` does. It costs 1.3 GB of weights instead of 0.65 GB.

Memory: both directions already run causally chunk by chunk in time (1 + 4 + 4 ... frames in,
one latent frame at a time out), so long clips cost little more than short ones. Large frames are
the problem; `tiling=True` (or `set_tiling`) turns on diffusers' spatial tiling: 256 px tiles with
a 64 px blended overlap. It changes the numbers slightly (seams are blended, not computed
jointly), and the reference never tiles, so the pipeline tiles only when `plan_tiling` says an
untiled decode of the shape would not fit in the device's free memory.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import AutoencoderKLWan
from diffusers.models.autoencoders.autoencoder_kl_wan import unpatchify
from torch import Tensor, nn

from ovi_server.config import VideoVAEConfig
from ovi_server.errors import ConfigError
from ovi_server.models.loading import (
    check_keys,
    init_random_,
    load_module,
    meta_device,
    read_state_dict,
    rename_key,
)
from ovi_server.placement import Placement

logger = logging.getLogger(__name__)

# Per-channel statistics of the Wan2.2 latent space, copied from the reference's `Wan2_2_VAE`.
# encode: latent = (mu - mean) * (1 / std); decode: z = latent / (1 / std) + mean. The reference
# multiplies and divides by 1/std computed in float32, so we do the same to stay bit-exact.
LATENTS_MEAN: tuple[float, ...] = (
    -0.2289, -0.0052, -0.1323, -0.2339, -0.2799, 0.0174, 0.1838, 0.1557,
    -0.1382, 0.0542, 0.2813, 0.0891, 0.1570, -0.0098, 0.0375, -0.1825,
    -0.2246, -0.1207, -0.0698, 0.5109, 0.2665, -0.2108, -0.2158, 0.2502,
    -0.2055, -0.0322, 0.1109, 0.1567, -0.0729, 0.0899, -0.2799, -0.1230,
    -0.0313, -0.1649, 0.0117, 0.0723, -0.2839, -0.2083, -0.0520, 0.3748,
    0.0152, 0.1957, 0.1433, -0.2944, 0.3573, -0.0548, -0.1681, -0.0667,
)  # fmt: skip
LATENTS_STD: tuple[float, ...] = (
    0.4765, 1.0364, 0.4514, 1.1677, 0.5313, 0.4990, 0.4818, 0.5013,
    0.8158, 1.0344, 0.5894, 1.0901, 0.6885, 0.6165, 0.8454, 0.4978,
    0.5759, 0.3523, 0.7135, 0.6804, 0.5833, 1.4146, 0.8986, 0.5659,
    0.7069, 0.5338, 0.4889, 0.4917, 0.4069, 0.4999, 0.6866, 0.4093,
    0.5709, 0.6065, 0.6415, 0.4944, 0.5726, 1.2042, 0.5458, 1.6887,
    0.3971, 1.0600, 0.3943, 0.5537, 0.5444, 0.4089, 0.7468, 0.7744,
)  # fmt: skip


def compression(config: VideoVAEConfig) -> tuple[int, int]:
    """(temporal, spatial) compression: 4x and 16x for Wan2.2 (patchify 2, then 2x per down level)."""
    temporal = 2 ** sum(config.temperal_downsample)
    spatial = config.patch_size * 2 ** (len(config.dim_mult) - 1)
    return temporal, spatial


def build_autoencoder(config: VideoVAEConfig) -> AutoencoderKLWan:
    """The diffusers VAE on the meta device; `load_module` or `init_random_` materialise it."""
    if config.z_dim != len(LATENTS_MEAN):
        raise ConfigError(
            f"video_vae.z_dim={config.z_dim}: the Wan2.2 latent statistics have {len(LATENTS_MEAN)} channels"
        )
    temporal, spatial = compression(config)
    pixels_per_patch = 3 * config.patch_size**2  # RGB folded with its 2x2 neighbourhood: 12 channels
    with meta_device():
        return AutoencoderKLWan(
            base_dim=config.dim,
            decoder_base_dim=config.dec_dim,
            z_dim=config.z_dim,
            dim_mult=list(config.dim_mult),
            num_res_blocks=config.num_res_blocks,
            attn_scales=[],
            temperal_downsample=list(config.temperal_downsample),
            dropout=0.0,
            latents_mean=list(LATENTS_MEAN),
            latents_std=list(LATENTS_STD),
            is_residual=True,
            in_channels=pixels_per_patch,
            out_channels=pixels_per_patch,
            patch_size=config.patch_size,
            scale_factor_spatial=spatial,
            scale_factor_temporal=temporal,
        )


class VideoVAE(nn.Module):
    """encode: video [B, 3, T, H, W] in [-1, 1] -> normalised latent [B, 48, 1 + (T-1)/4, H/16, W/16]
    in the placement dtype; decode: the reverse, clamped to [-1, 1], in float32 (see the module doc)."""

    def __init__(
        self,
        autoencoder: AutoencoderKLWan,
        config: VideoVAEConfig,
        placement: Placement,
        tiling: bool = False,
    ):
        super().__init__()
        # float32 compute on weights rounded to the placement dtype: the reference's float32 autocast
        # around a bf16 VAE (module docstring). The upcast is exact.
        # (nn.Module.to, not ModelMixin.to, which warns about float32 islands this model does not have)
        self.autoencoder = nn.Module.to(autoencoder, dtype=torch.float32)
        self.config = config
        self.placement = placement
        # float32 whatever the weights: the reference normalises in float32 too.
        mean = torch.tensor(LATENTS_MEAN, dtype=torch.float32, device=placement.device)
        inv_std = 1.0 / torch.tensor(LATENTS_STD, dtype=torch.float32, device=placement.device)
        self.register_buffer("latents_mean", mean.view(1, -1, 1, 1, 1), persistent=False)  # [1, 48, 1, 1, 1]
        self.register_buffer("latents_inv_std", inv_std.view(1, -1, 1, 1, 1), persistent=False)
        self.set_tiling(tiling)

    def set_tiling(self, enabled: bool, tile_px: int = 256, stride_px: int = 192) -> None:
        """Spatial tiling for frames larger than `tile_px` (bounded memory; not bit-exact at the seams)."""
        if enabled:
            self.autoencoder.enable_tiling(tile_px, tile_px, stride_px, stride_px)
        else:
            self.autoencoder.disable_tiling()

    @property
    def _device(self) -> torch.device:
        return self.latents_mean.device  # follows the module when offloading moves it

    @torch.no_grad()
    def encode(self, video: Tensor) -> Tensor:
        """video [B, 3, T, H, W] in [-1, 1], T = 1 + 4k, H and W multiples of 16 -> latent [B, 48, 1 + k, H/16, W/16]."""
        temporal, spatial = compression(self.config)
        _, channels, frames, height, width = video.shape
        if channels != 3 or (frames - 1) % temporal or height % spatial or width % spatial:
            raise ValueError(
                f"video of shape {tuple(video.shape)}: expected [B, 3, 1 + {temporal}k, H, W] with H and W "
                f"multiples of {spatial}"
            )
        latent = (self.posterior_mean(video).float() - self.latents_mean) * self.latents_inv_std
        return latent.to(self.placement.dtype)  # [B, 48, Tl, h, w]

    @torch.no_grad()
    def posterior_mean(self, video: Tensor) -> Tensor:
        """The encoder's raw mu [B, 48, Tl, h, w], before normalisation (the log-variance is discarded)."""
        return self.autoencoder.encode(video.to(self._device, torch.float32)).latent_dist.mean

    @torch.no_grad()
    def decode(self, latent: Tensor) -> Tensor:
        """latent [B, 48, Tl, h, w] (normalised) -> video [B, 3, 1 + 4(Tl-1), 16h, 16w] float32 in [-1, 1]."""
        return torch.cat(list(self.decode_chunks(latent)), dim=2)

    @torch.no_grad()
    def decode_chunks(self, latent: Tensor) -> Iterator[Tensor]:
        """`decode`, a latent frame at a time: yields video [B, 3, t, 16h, 16w] float32 in [-1, 1], t = 1
        for the first latent frame and 4 for each after it; untiled, the chunks are the values diffusers'
        whole decode returns, bit for bit. A tiled decode runs tile by tile over the whole clip, so it
        comes as one chunk.

        The caller can use a chunk (encode it, copy it off the device) while the next one decodes, and
        the whole float32 clip is never held on the device (0.7 GiB at 992x512, 5 s).
        """
        z = (
            latent.to(self._device, torch.float32) / self.latents_inv_std + self.latents_mean
        )  # [B, 48, Tl, h, w]
        autoencoder = self.autoencoder
        if autoencoder.use_tiling:
            yield autoencoder.decode(z).sample  # diffusers clamps to [-1, 1]
            return
        # diffusers' `AutoencoderKLWan._decode` loop, yielding where it concatenates: diffusers has no
        # public per-chunk decode. It uses the model's causal cache (`clear_cache`, `_feat_map`,
        # `_conv_idx`), so diffusers is pinned below 0.43 and tests/media/test_video_vae.py checks the
        # chunks against diffusers' own `decode` bit for bit.
        autoencoder.clear_cache()
        cache = autoencoder._feat_map  # this decode's; a newer decode starts a cache of its own
        try:
            x = autoencoder.post_quant_conv(z)
            for index in range(x.shape[2]):
                autoencoder._conv_idx = [0]
                chunk = autoencoder.decoder(
                    x[:, :, index : index + 1],
                    feat_cache=autoencoder._feat_map,
                    feat_idx=autoencoder._conv_idx,
                    first_chunk=index == 0,
                )
                if autoencoder.config.patch_size is not None:
                    chunk = unpatchify(chunk, patch_size=autoencoder.config.patch_size)
                yield chunk.clamp(-1.0, 1.0)
        finally:
            # frees the cached activations; a generator abandoned mid-clip and closed late (by the
            # garbage collector) must not wipe the cache of a decode that started since
            if autoencoder._feat_map is cache:
                autoencoder.clear_cache()


# Working memory of an untiled float32 decode per output pixel of one frame (H x W): the decoder holds a
# 4-frame chunk of 256-channel float32 activations at full resolution plus its causal caches, whatever
# the clip's length. Measured on the CPU with the real Wan2.2 decoder (random weights), as the peak of
# live tensors less the weights (torch.profiler memory timeline): 339 MiB at 128x128 and 1305 MiB at
# 256x256 with 2 latent frames (20.6 KB per pixel), about 2.2 KB per pixel more once a chunk follows
# another (3 to 8 latent frames, at both sizes).
DECODE_BYTES_PER_PIXEL = 23_000
# Headroom for what the CPU measurement cannot see: the CUDA caching allocator's fragmentation and
# cuDNN workspaces. benchmarks.acceptance checks the estimate against torch.cuda.max_memory_allocated.
DECODE_MEMORY_MARGIN = 1.5


@dataclass(frozen=True)
class TilingPlan:
    tiled: bool
    estimate_bytes: int  # an untiled chunked decode's working memory plus one chunk of output
    free_bytes: int | None  # None: not a CUDA device (host memory is not the limit we plan for)

    def describe(self) -> str:
        free = "n/a" if self.free_bytes is None else f"{self.free_bytes / 2**30:.1f} GiB"
        how = "tiled" if self.tiled else "untiled"
        return f"{how} (untiled estimate {self.estimate_bytes / 2**30:.1f} GiB, free {free})"


def decode_memory_estimate(latent_shape: tuple[int, ...], config: VideoVAEConfig) -> int:
    """Bytes an untiled `decode_chunks` of a latent [B, 48, Tl, h, w] (or [48, Tl, h, w]) needs on the
    device, its chunks taken off the device as they come (as the pipeline does)."""
    *batch, _, latent_frames, h, w = latent_shape
    temporal, spatial = compression(config)
    pixels = h * spatial * w * spatial
    frames = 1 + temporal * (latent_frames - 1)
    # the pipeline takes the clip a chunk at a time (`decode_chunks`), never the whole clip: one chunk's
    # float32 pixels and two float32 temporaries of the uint8 conversion, then two uint8 copies
    output = 3 * min(frames, temporal) * pixels * (3 * 4 + 2) * math.prod(batch)
    return int(DECODE_BYTES_PER_PIXEL * pixels * DECODE_MEMORY_MARGIN * math.prod(batch)) + output


def plan_tiling(latent_shape: tuple[int, ...], config: VideoVAEConfig, free_bytes: int | None) -> TilingPlan:
    """Untiled (as the reference decodes) unless the estimate of an untiled decode exceeds `free_bytes`."""
    estimate = decode_memory_estimate(latent_shape, config)
    return TilingPlan(free_bytes is not None and estimate > free_bytes, estimate, free_bytes)


def official_keys(config: VideoVAEConfig) -> set[str]:
    """Every key of `Wan2.2_VAE.pth` for this config (built on the meta device: no memory)."""
    return {official_name(key, config.num_res_blocks) for key in build_autoencoder(config).state_dict()}


def load_video_vae(
    weights_path: str | Path, config: VideoVAEConfig, placement: Placement, tiling: bool = False
) -> VideoVAE:
    """The VAE from an official-layout checkpoint (`Wan2.2_VAE.pth` or a `.safetensors` twin), loaded strictly."""
    autoencoder = build_autoencoder(config)
    official = read_state_dict(weights_path)
    # Checked in the official naming first, so an error names the keys as they are in the file.
    check_keys(weights_path, official_keys(config), set(official), "video VAE (Wan2.2)")
    load_module(
        autoencoder, remap_official(dict(official)), placement, path=weights_path, what="video VAE (Wan2.2)"
    )
    logger.info("loaded video VAE from %s (dim %d, decoder dim %d)", weights_path, config.dim, config.dec_dim)
    return VideoVAE(autoencoder, config, placement, tiling)


def random_video_vae(
    config: VideoVAEConfig, placement: Placement, seed: int, tiling: bool = False
) -> VideoVAE:
    """Random weights (tiny demo variant, benchmarks)."""
    return VideoVAE(init_random_(build_autoencoder(config), placement, seed), config, placement, tiling)


# --- official checkpoint -> diffusers names ---------------------------------------------------------

# (official key pattern, diffusers key), first match wins; shapes are identical. In the reference a
# level's list holds its residual blocks then its resampler, so the entry whose name is `resample`
# or `time_conv` is the resampler whatever its index (num_res_blocks, or one more in the decoder).
_RENAMES: tuple[tuple[str, str], ...] = (
    (r"conv1\.(.*)", r"quant_conv.\1"),
    (r"conv2\.(.*)", r"post_quant_conv.\1"),
    (r"(encoder|decoder)\.conv1\.(.*)", r"\1.conv_in.\2"),
    (r"(encoder|decoder)\.head\.0\.(.*)", r"\1.norm_out.\2"),
    (r"(encoder|decoder)\.head\.2\.(.*)", r"\1.conv_out.\2"),
    (r"(encoder|decoder)\.middle\.0\.(.*)", r"\1.mid_block.resnets.0.\2"),
    (r"(encoder|decoder)\.middle\.1\.(.*)", r"\1.mid_block.attentions.0.\2"),
    (r"(encoder|decoder)\.middle\.2\.(.*)", r"\1.mid_block.resnets.1.\2"),
    (
        r"encoder\.downsamples\.(\d+)\.downsamples\.\d+\.((?:resample|time_conv)\..*)",
        r"encoder.down_blocks.\1.downsampler.\2",
    ),
    (r"encoder\.downsamples\.(\d+)\.downsamples\.(\d+)\.(.*)", r"encoder.down_blocks.\1.resnets.\2.\3"),
    (
        r"decoder\.upsamples\.(\d+)\.upsamples\.\d+\.((?:resample|time_conv)\..*)",
        r"decoder.up_blocks.\1.upsampler.\2",
    ),
    (r"decoder\.upsamples\.(\d+)\.upsamples\.(\d+)\.(.*)", r"decoder.up_blocks.\1.resnets.\2.\3"),
)
# inside a residual block: the reference's nn.Sequential indices -> diffusers' names
_RESIDUAL_PARTS = {
    "residual.0": "norm1",
    "residual.2": "conv1",
    "residual.3": "norm2",
    "residual.6": "conv2",
    "shortcut": "conv_shortcut",
}


def _rename_residual_part(key: str, parts: dict[str, str]) -> str:
    """`<block>.<part>.<param>` with `part` looked up in `parts` (a residual block's layers)."""
    match = re.fullmatch(r"(.*\.resnets\.\d+)\.(.*)\.(\w+)", key)
    if match is None:
        return key
    block, part, param = match.groups()
    return f"{block}.{parts.get(part, part)}.{param}"


def remap_official(sd: dict[str, Tensor]) -> dict[str, Tensor]:
    """Official Wan2.2 VAE keys -> `AutoencoderKLWan` keys. Unknown keys pass through (and fail the strict load)."""
    return {_rename_residual_part(rename_key(key, _RENAMES), _RESIDUAL_PARTS): t for key, t in sd.items()}


# The inverse, for error messages in the checkpoint's own naming. The resampler sits after the
# residual blocks: index num_res_blocks in an encoder level, num_res_blocks + 1 in a decoder level.
_OFFICIAL_NAMES: tuple[tuple[str, str], ...] = (
    (r"quant_conv\.(.*)", r"conv1.\1"),
    (r"post_quant_conv\.(.*)", r"conv2.\1"),
    (r"(encoder|decoder)\.conv_in\.(.*)", r"\1.conv1.\2"),
    (r"(encoder|decoder)\.norm_out\.(.*)", r"\1.head.0.\2"),
    (r"(encoder|decoder)\.conv_out\.(.*)", r"\1.head.2.\2"),
    (r"(encoder|decoder)\.mid_block\.resnets\.0\.(.*)", r"\1.middle.0.\2"),
    (r"(encoder|decoder)\.mid_block\.attentions\.0\.(.*)", r"\1.middle.1.\2"),
    (r"(encoder|decoder)\.mid_block\.resnets\.1\.(.*)", r"\1.middle.2.\2"),
    (
        r"encoder\.down_blocks\.(\d+)\.downsampler\.(.*)",
        r"encoder.downsamples.\1.downsamples.{encoder_resample}.\2",
    ),
    (r"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.(.*)", r"encoder.downsamples.\1.downsamples.\2.\3"),
    (r"decoder\.up_blocks\.(\d+)\.upsampler\.(.*)", r"decoder.upsamples.\1.upsamples.{decoder_resample}.\2"),
    (r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(.*)", r"decoder.upsamples.\1.upsamples.\2.\3"),
)


def official_name(key: str, num_res_blocks: int) -> str:
    """`AutoencoderKLWan` key -> the official Wan2.2 VAE key (`remap_official` undone)."""
    key = _rename_residual_part(key, {ours: theirs for theirs, ours in _RESIDUAL_PARTS.items()})
    resample = {"encoder_resample": num_res_blocks, "decoder_resample": num_res_blocks + 1}
    return rename_key(key, tuple((pattern, target.format(**resample)) for pattern, target in _OFFICIAL_NAMES))
