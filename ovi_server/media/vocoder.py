"""BigVGAN v1 vocoder (MMAudio's 16 kHz `best_netG.pt`): log10-mel [B, 80, M] -> waveform [B, 1, 256*M].

Layout: `conv_pre` -> per stage a transposed conv (upsample by `upsample_rates[i]`) followed by the
mean of len(resblock_kernel_sizes) AMP blocks on the same input -> anti-aliased snake -> `conv_post`
-> tanh. Every snake activation runs at twice the sample rate between two 12-tap Kaiser-sinc
filters (the filters are buffers of the checkpoint, so we load rather than recompute them).

The checkpoint trains every conv under weight norm (`w = g * v / ||v||`). We serve inference only, so
`remap_official` folds g and v into one plain `weight` at load: the modules here are ordinary
`nn.Conv1d` / `nn.ConvTranspose1d` and the forward pass pays nothing for the reparametrisation.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ovi_server.config import VocoderConfig
from ovi_server.errors import ConfigError
from ovi_server.models.loading import check_keys, load_module, meta_device, read_state_dict
from ovi_server.placement import Placement

logger = logging.getLogger(__name__)

FILTER_TAPS = 12  # anti-aliasing filter length, both directions
SNAKE_EPS = 1e-9  # added to β (after exp) before dividing, as the reference does
POST_GAIN = 0.01  # random_vocoder: conv_post scale giving quiet noise (std ~0.1), far from tanh's clip


# ---------------------------------------------------------------------------------------------------
# Anti-aliased snake activation


def kaiser_sinc_filter(cutoff: float, half_width: float, taps: int = FILTER_TAPS) -> Tensor:
    """Kaiser-windowed sinc low-pass [1, 1, taps], normalised to sum 1.

    Only needed for random weights: real checkpoints store the filters. Kaiser's design rule gives the
    window's beta from the attenuation A reached with `taps // 2 - 1` half-taps over a transition
    band of `2 * half_width` (in cycles/sample, as in the alias-free GAN resamplers).

    Args:
        cutoff: cut-off frequency in cycles per sample (0.25 = half the band for 2x resampling).
        half_width: half the transition band, in the same unit.
    """
    half = taps // 2
    attenuation = 2.285 * (half - 1) * math.pi * 4 * half_width + 7.95
    if attenuation > 50.0:
        beta = 0.1102 * (attenuation - 8.7)
    elif attenuation >= 21.0:
        beta = 0.5842 * (attenuation - 21.0) ** 0.4 + 0.07886 * (attenuation - 21.0)
    else:
        beta = 0.0
    window = torch.kaiser_window(taps, periodic=False, beta=beta)
    # Tap centres sit between samples for an even length: -5.5 ... 5.5 for 12 taps.
    t = torch.arange(taps) - (taps - 1) / 2
    taps_ = 2 * cutoff * window * torch.sinc(2 * cutoff * t)
    return (taps_ / taps_.sum()).view(1, 1, taps)


class Snake(nn.Module):
    """`x + sin²(αx) / β` per channel; α, β stored as logs when `logscale` (snakebeta) or β = α (snake)."""

    def __init__(self, channels: int, logscale: bool, with_beta: bool):
        super().__init__()
        self.logscale = logscale
        self.alpha = nn.Parameter(torch.zeros(channels))
        self.beta = nn.Parameter(torch.zeros(channels)) if with_beta else None

    def forward(self, x: Tensor) -> Tensor:
        alpha = self.alpha[None, :, None]
        beta = alpha if self.beta is None else self.beta[None, :, None]
        if self.logscale:
            alpha, beta = alpha.exp(), beta.exp()
        # Multiply by the reciprocal (not divide) to round exactly as the reference does.
        return x + (1.0 / (beta + SNAKE_EPS)) * torch.sin(x * alpha).pow(2)


class Upsample2x(nn.Module):
    """Zero-stuffing x2 upsample through the low-pass `filter` (transposed depthwise conv)."""

    def __init__(self):
        super().__init__()
        self.register_buffer("filter", torch.empty(1, 1, FILTER_TAPS))  # from the checkpoint

    def forward(self, x: Tensor) -> Tensor:
        taps = self.filter.shape[-1]
        pad = taps // 2 - 1  # 5 input samples of replicate padding each side
        crop_left = 2 * pad + (taps - 2) // 2  # 15: drops the padding's (and the filter's) spill
        crop_right = 2 * pad + (taps - 1) // 2
        channels = x.shape[1]
        x = F.pad(x, (pad, pad), mode="replicate")
        x = 2 * F.conv_transpose1d(x, self.filter.expand(channels, -1, -1), stride=2, groups=channels)
        return x[..., crop_left:-crop_right]


class LowPass(nn.Module):
    """Depthwise `filter` with stride 2 after replicate padding (taps/2 - 1 left, taps/2 right)."""

    def __init__(self):
        super().__init__()
        self.register_buffer("filter", torch.empty(1, 1, FILTER_TAPS))  # from the checkpoint

    def forward(self, x: Tensor) -> Tensor:
        taps = self.filter.shape[-1]
        channels = x.shape[1]
        x = F.pad(x, (taps // 2 - 1, taps // 2), mode="replicate")
        return F.conv1d(x, self.filter.expand(channels, -1, -1), stride=2, groups=channels)


class Downsample2x(nn.Module):
    """x2 downsample; the extra `lowpass` level only reproduces the checkpoint's key names."""

    def __init__(self):
        super().__init__()
        self.lowpass = LowPass()

    def forward(self, x: Tensor) -> Tensor:
        return self.lowpass(x)


class AntiAliasedSnake(nn.Module):
    """Snake evaluated at twice the sample rate, so its harmonics above Nyquist are filtered out."""

    def __init__(self, channels: int, cfg: VocoderConfig):
        super().__init__()
        self.act = Snake(channels, cfg.snake_logscale, with_beta=cfg.activation == "snakebeta")
        self.upsample = Upsample2x()
        self.downsample = Downsample2x()

    def forward(self, x: Tensor) -> Tensor:
        return self.downsample(self.act(self.upsample(x)))


# ---------------------------------------------------------------------------------------------------
# Generator


def _conv(channels: int, kernel_size: int, dilation: int) -> nn.Conv1d:
    return nn.Conv1d(
        channels, channels, kernel_size, dilation=dilation, padding=dilation * (kernel_size - 1) // 2
    )


class AMPBlock1(nn.Module):
    """Resblock type "1": per dilation d, `x += conv(act(conv_d(act(x))))`.

    `activations` is stored interleaved: index 2m precedes `convs1[m]`, 2m+1 precedes `convs2[m]`.
    """

    num_dilations = 3  # BigVGAN's block reads the first three dilations of its config entry

    def __init__(self, channels: int, kernel_size: int, dilations: tuple[int, ...], cfg: VocoderConfig):
        super().__init__()
        self.convs1 = nn.ModuleList(_conv(channels, kernel_size, d) for d in dilations)
        self.convs2 = nn.ModuleList(_conv(channels, kernel_size, 1) for _ in dilations)
        self.activations = nn.ModuleList(AntiAliasedSnake(channels, cfg) for _ in range(2 * len(dilations)))

    def forward(self, x: Tensor) -> Tensor:
        for m, (conv1, conv2) in enumerate(zip(self.convs1, self.convs2, strict=True)):
            t = conv1(self.activations[2 * m](x))
            t = conv2(self.activations[2 * m + 1](t))
            x = x + t
        return x


class AMPBlock2(nn.Module):
    """Resblock type "2" (lighter variant): per dilation d, `x += conv_d(act(x))`."""

    num_dilations = 2  # the first two (the config's default entries have three)

    def __init__(self, channels: int, kernel_size: int, dilations: tuple[int, ...], cfg: VocoderConfig):
        super().__init__()
        self.convs = nn.ModuleList(_conv(channels, kernel_size, d) for d in dilations)
        self.activations = nn.ModuleList(AntiAliasedSnake(channels, cfg) for _ in dilations)

    def forward(self, x: Tensor) -> Tensor:
        for conv, act in zip(self.convs, self.activations, strict=True):
            x = x + conv(act(x))
        return x


class BigVGAN(nn.Module):
    """The generator; parameter names are those of `best_netG.pt["generator"]` with weight norm folded."""

    def __init__(self, cfg: VocoderConfig):
        super().__init__()
        if cfg.resblock not in ("1", "2") or cfg.activation not in ("snake", "snakebeta"):
            raise ConfigError(
                f"vocoder: resblock {cfg.resblock!r} / activation {cfg.activation!r} unsupported; "
                "expected resblock '1' or '2' and activation 'snake' or 'snakebeta'"
            )
        self.cfg = cfg
        width = cfg.upsample_initial_channel
        self.conv_pre = nn.Conv1d(cfg.num_mels, width, 7, padding=3)
        self.ups = nn.ModuleList()
        self.resblocks = nn.ModuleList()
        block = AMPBlock1 if cfg.resblock == "1" else AMPBlock2
        # BigVGAN pairs kernels with dilation entries and ignores entries beyond the kernels
        dilation_sizes = cfg.resblock_dilation_sizes[: len(cfg.resblock_kernel_sizes)]
        if len(dilation_sizes) < len(cfg.resblock_kernel_sizes) or any(
            len(dilations) < block.num_dilations for dilations in dilation_sizes
        ):
            raise ConfigError(
                f"vocoder: resblock {cfg.resblock!r} needs {block.num_dilations} dilations for each of the "
                f"{len(cfg.resblock_kernel_sizes)} kernels, got {cfg.resblock_dilation_sizes}"
            )
        for i, (rate, kernel) in enumerate(zip(cfg.upsample_rates, cfg.upsample_kernel_sizes, strict=True)):
            c_in, c_out = width >> i, width >> (i + 1)
            # A one-element list per stage: the checkpoint's keys are `ups.{i}.0.*`.
            self.ups.append(
                nn.ModuleList([nn.ConvTranspose1d(c_in, c_out, kernel, rate, padding=(kernel - rate) // 2)])
            )
            for k, dilations in zip(cfg.resblock_kernel_sizes, dilation_sizes, strict=True):
                self.resblocks.append(block(c_out, k, tuple(dilations[: block.num_dilations]), cfg))
        channels = width >> len(cfg.upsample_rates)
        self.activation_post = AntiAliasedSnake(channels, cfg)
        self.conv_post = nn.Conv1d(channels, 1, 7, padding=3)

    def forward(self, mel: Tensor) -> Tensor:
        """log10-mel [B, num_mels, M] -> waveform [B, 1, hop*M] in [-1, 1]."""
        x = self.conv_pre(mel)
        per_stage = len(self.cfg.resblock_kernel_sizes)
        for i, (up,) in enumerate(self.ups):
            x = up(x)
            blocks = self.resblocks[i * per_stage : (i + 1) * per_stage]
            x = sum(block(x) for block in blocks) / per_stage
        x = self.conv_post(self.activation_post(x))
        return torch.tanh(x)

    @torch.inference_mode()
    def vocode(self, mel: Tensor) -> Tensor:
        """log10-mel [B, num_mels, M] (any float dtype/device) -> waveform [B, 1, hop*M] in our dtype."""
        weight = self.conv_pre.weight
        return self(mel.to(device=weight.device, dtype=weight.dtype))


# ---------------------------------------------------------------------------------------------------
# Loading


def load_vocoder(path: str | Path, cfg: VocoderConfig, placement: Placement) -> BigVGAN:
    """BigVGAN from `best_netG.pt` ({"generator": state_dict}) or a safetensors file with the same keys.

    The state dict may be nested under "generator" (a `generator.` prefix in safetensors) or not, and
    may spell weight norm `weight_g`/`weight_v` (torch.nn.utils.weight_norm) or
    `parametrizations.weight.original0/1` (torch.nn.utils.parametrizations.weight_norm).
    """
    model = _load(read_state_dict(path, subkey="generator"), cfg, placement, path)
    logger.info(
        "loaded vocoder from %s on %s as %s",
        path,
        placement.device,
        str(placement.dtype).removeprefix("torch."),
    )
    return model


def random_vocoder(cfg: VocoderConfig, placement: Placement, seed: int) -> BigVGAN:
    """Random BigVGAN (tiny demo, benchmarks) through the same fold-and-load path as a checkpoint.

    Every conv filter gets unit norm per output channel (so the signal neither dies out nor blows up
    through the stages; `conv_post` is scaled by POST_GAIN to keep the final tanh unsaturated), zero
    biases, α = β = 1 and the real anti-aliasing filters: audible noise, finite and within [-1, 1].
    """
    generator = torch.Generator().manual_seed(seed)
    with meta_device():
        template = BigVGAN(cfg)
    state_dict: dict[str, Tensor] = {}
    for key, tensor in template.state_dict().items():
        if key.endswith(".filter"):
            state_dict[key] = kaiser_sinc_filter(cutoff=0.25, half_width=0.3)
        elif key.endswith(".weight"):
            v = torch.randn(tensor.shape, generator=generator)
            g = torch.full_like(_norm_except_dim0(v), POST_GAIN if key == "conv_post.weight" else 1.0)
            state_dict[key.removesuffix("weight") + "weight_v"] = v
            state_dict[key.removesuffix("weight") + "weight_g"] = g
        else:  # biases, log-scale snake parameters
            state_dict[key] = torch.zeros(tensor.shape)
    return _load(state_dict, cfg, placement, f"<random vocoder, seed {seed}>")


def _load(state_dict: Mapping[str, Tensor], cfg: VocoderConfig, placement: Placement, path) -> BigVGAN:
    with meta_device():
        model = BigVGAN(cfg)
    official = dict(unify_weight_norm_spelling(state_dict))
    what = "BigVGAN vocoder (weight norm as weight_g/weight_v or parametrizations.weight.original0/1)"
    check_keys(path, official_keys(model), set(official), what)
    load_module(model, remap_official(official), placement, path=path, what="BigVGAN vocoder")
    return model


def official_keys(model: BigVGAN) -> set[str]:
    """The checkpoint's key set: every conv's `weight` stored as `weight_g` + `weight_v`."""
    keys = set(model.state_dict())
    for name, module in model.named_modules():
        if isinstance(module, nn.Conv1d | nn.ConvTranspose1d):
            keys.remove(f"{name}.weight")
            keys |= {f"{name}.weight_g", f"{name}.weight_v"}
    return keys


def unify_weight_norm_spelling(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """New parametrisation names -> old `weight_g` / `weight_v` names; other keys unchanged."""
    renames = {
        ".parametrizations.weight.original0": ".weight_g",
        ".parametrizations.weight.original1": ".weight_v",
    }
    out = {}
    for key in state_dict:
        new = key
        for old_suffix, new_suffix in renames.items():
            if key.endswith(old_suffix):
                new = key.removesuffix(old_suffix) + new_suffix
        out[new] = state_dict[key]
    return out


def _norm_except_dim0(v: Tensor) -> Tensor:
    """‖v‖ over every dim but 0, keepdim: per output channel for Conv1d [out, in, k] and per
    input channel for ConvTranspose1d [in, out, k], as torch's weight_norm(dim=0) does."""
    return torch.linalg.vector_norm(v, dim=tuple(range(1, v.ndim)), keepdim=True)


def remap_official(state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
    """Official keys (old weight-norm spelling) -> ours: `weight = g * v / ‖v‖`, folded in float32."""
    out = {}
    for key, tensor in state_dict.items():
        if key.endswith(".weight_v"):
            continue
        if key.endswith(".weight_g"):
            base = key.removesuffix("_g")
            g = tensor.float()
            v = state_dict[base + "_v"].float()
            # torch's own kernel (what weight_norm evaluates) rounds exactly like the reference.
            out[base] = torch._weight_norm(v, g, 0)
        else:
            out[key] = tensor
    return out
