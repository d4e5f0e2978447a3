"""MMAudio's 16 kHz audio VAE ("v1-16"), its mel front-end, and Ovi's audio output path.

Ovi's audio tower denoises a latent [B, 20, L]; `AudioDecoder.decode` turns it into 16 kHz samples:
VAE decoder -> log10-mel [B, 80, 2L] -> BigVGAN (vocoder.py) -> waveform [B, 512*L] (32 ms per step).
The encoder and `MelSpectrogram` are not used by Ovi's inference; they complete the model and are
checked by the golden encode case.

The VAE is built from EDM2's magnitude-preserving layers: bias-free convs whose weights are
normalised per output channel, pixel norm, a scaled SiLU and a weighted sum that keeps unit variance.
The checkpoint stores the raw (un-normalised) conv weights; `remap_official` normalises them once at
load, in float32, so the forward pass is a plain conv.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ovi_server.config import AudioVAEConfig, VocoderConfig
from ovi_server.errors import ConfigError
from ovi_server.media.vocoder import BigVGAN, load_vocoder, random_vocoder
from ovi_server.models.loading import check_keys, load_module, meta_device, read_state_dict
from ovi_server.placement import Placement

logger = logging.getLogger(__name__)

LOGVAR_RANGE = (-30.0, 20.0)  # the encoder's posterior log-variance is clamped to this
MEL_FLOOR = 1e-5  # the log of the mel energy is taken after clamping to this
MEL_LOGS = {"log10": torch.log10, "log": torch.log}  # AudioVAEConfig.mel_log -> the function
STFT_EPS = 1e-9  # inside the magnitude's square root


# ---------------------------------------------------------------------------------------------------
# Magnitude-preserving building blocks


def pixel_norm(x: Tensor, eps: float, dim: int | tuple[int, ...] = 1) -> Tensor:
    """`x / (eps + ‖x‖₂ / sqrt(n))` over `dim` (n values): unit mean square (norm in float32)."""
    norm = torch.linalg.vector_norm(x, dim=dim, keepdim=True, dtype=torch.float32)
    norm = torch.add(eps, norm, alpha=(norm.numel() / x.numel()) ** 0.5)
    return x / norm.to(x.dtype)


def mp_silu(x: Tensor, cfg: AudioVAEConfig) -> Tensor:
    """SiLU divided by its output RMS for unit-Gaussian input (0.596)."""
    return F.silu(x) / cfg.mp_silu_div


def mp_sum(a: Tensor, b: Tensor, cfg: AudioVAEConfig) -> Tensor:
    """`lerp(a, b, t)` rescaled to unit variance for independent unit-variance inputs."""
    t = cfg.mp_sum_t
    return a.lerp(b, t) / ((1 - t) ** 2 + t**2) ** 0.5


class MPConv1d(nn.Module):
    """Bias-free conv with 'same' padding; `weight` is already normalised (see `remap_official`)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels, kernel_size))

    def forward(self, x: Tensor, gain: Tensor | None = None) -> Tensor:
        weight = self.weight if gain is None else self.weight * gain
        return F.conv1d(x, weight, padding=weight.shape[-1] // 2)


def normalize_mp_weight(weight: Tensor, eps: float) -> Tensor:
    """Raw checkpoint weight [out, in, k] -> `W / (‖W_o‖₂ + eps·sqrt(in·k))`, computed in float32.

    This is EDM2's forced weight normalisation (unit norm per output channel, eps-guarded like
    `pixel_norm`) followed by the 1/sqrt(fan_in) of a magnitude-preserving layer.
    """
    weight = weight.float()
    fan_in = weight[0].numel()
    # Two divisions rather than one, in this order: it rounds exactly like the reference.
    weight = pixel_norm(weight, eps, dim=tuple(range(1, weight.ndim)))
    return weight / fan_in**0.5


class ResBlock(nn.Module):
    """Pixel norm, then `mp_sum(x, conv2(mp_silu(conv1(mp_silu(x)))))`; 1x1 `nin_shortcut` on width change."""

    def __init__(self, in_dim: int, out_dim: int, kernel_size: int, cfg: AudioVAEConfig):
        super().__init__()
        self.cfg = cfg
        self.conv1 = MPConv1d(in_dim, out_dim, kernel_size)
        self.conv2 = MPConv1d(out_dim, out_dim, kernel_size)
        self.nin_shortcut = MPConv1d(in_dim, out_dim, 1) if in_dim != out_dim else None

    def forward(self, x: Tensor) -> Tensor:
        x = pixel_norm(x, self.cfg.weight_norm_eps)
        h = self.conv2(mp_silu(self.conv1(mp_silu(x, self.cfg)), self.cfg))
        if self.nin_shortcut is not None:
            x = self.nin_shortcut(x)
        return mp_sum(x, h, self.cfg)


class AttnBlock(nn.Module):
    """Single-head self-attention over time with pixel-normed q, k, v and no norm before `qkv`."""

    def __init__(self, channels: int, cfg: AudioVAEConfig):
        super().__init__()
        self.cfg = cfg
        self.qkv = MPConv1d(channels, 3 * channels, 1)
        self.proj_out = MPConv1d(channels, channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        batch, channels, length = x.shape
        # qkv's output channels are interleaved: channel 3c + s holds q (s=0), k (1), v (2) of channel c.
        qkv = self.qkv(x).view(batch, channels, 3, length)
        qkv = pixel_norm(qkv, self.cfg.weight_norm_eps, dim=1)
        q, k, v = (t.transpose(1, 2)[:, None] for t in qkv.unbind(2))  # each [B, 1, L, C]
        # Plain SDPA, not models/attention.py: one head of width 4*hidden_dim (1536) at latent rate
        # is beyond flash-attention's head sizes, and the DiT's backend choice should not apply here.
        h = F.scaled_dot_product_attention(q, k, v)[:, 0].transpose(1, 2)  # [B, C, L]
        return mp_sum(x, self.proj_out(h), self.cfg)


class Downsample(nn.Module):
    """1x1 conv, average-pool by 2 (odd lengths are floored), 1x1 conv."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv1 = MPConv1d(channels, channels, 1)
        self.conv2 = MPConv1d(channels, channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv2(F.avg_pool1d(self.conv1(x), kernel_size=2, stride=2))


class Upsample(nn.Module):
    """Nearest-exact x2 in time, then a k3 conv."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = MPConv1d(channels, channels, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest-exact"))


class Level(nn.Module):
    """One resolution level: residual blocks `block`, each followed by its attention block `attn.{j}`
    on a level listed in `attn_layers` and then clamped, then an optional resample.

    The resample module is registered under the checkpoint's name, `downsample` or `upsample`.
    """

    def __init__(
        self,
        blocks: list[ResBlock],
        attn: list[AttnBlock],
        resample: nn.Module | None,
        name: str,
        clip: float,
    ):
        super().__init__()
        self.block = nn.ModuleList(blocks)
        self.attn = nn.ModuleList(attn)  # empty (no keys) on levels without attention
        self.clip = clip
        self.resample_name = name if resample is not None else None
        if resample is not None:
            self.add_module(name, resample)

    def forward(self, x: Tensor) -> Tensor:
        for j, block in enumerate(self.block):
            x = block(x)
            if self.attn:
                x = self.attn[j](x)
            x = x.clamp(-self.clip, self.clip)
        if self.resample_name is not None:
            x = self.get_submodule(self.resample_name)(x)
        return x


class Middle(nn.Module):
    def __init__(self, channels: int, kernel_size: int, cfg: AudioVAEConfig):
        super().__init__()
        self.block_1 = ResBlock(channels, channels, kernel_size, cfg)
        self.attn_1 = AttnBlock(channels, cfg)
        self.block_2 = ResBlock(channels, channels, kernel_size, cfg)

    def forward(self, x: Tensor) -> Tensor:
        return self.block_2(self.attn_1(self.block_1(x)))


class Encoder(nn.Module):
    """Normalised mel [B, data_dim, M] -> moments [B, 2*embed_dim, M / 2**(levels in down_layers)]."""

    def __init__(self, cfg: AudioVAEConfig):
        super().__init__()
        self.cfg = cfg
        k = cfg.kernel_size
        self.conv_in = MPConv1d(cfg.data_dim, cfg.hidden_dim, k)
        self.down = nn.ModuleList()
        width = cfg.hidden_dim
        for level, mult in enumerate(cfg.ch_mult):
            out = cfg.hidden_dim * mult
            blocks = [ResBlock(width if j == 0 else out, out, k, cfg) for j in range(cfg.num_res_blocks)]
            attn = [AttnBlock(out, cfg) for _ in blocks] if level in cfg.attn_layers else []
            width = out
            resample = Downsample(width) if level in cfg.down_layers else None
            self.down.append(Level(blocks, attn, resample, "downsample", cfg.clip_act))
        self.mid = Middle(width, k, cfg)
        self.conv_out = MPConv1d(width, 2 * cfg.embed_dim, k)
        self.learnable_gain = nn.Parameter(torch.empty(()))

    def forward(self, x: Tensor) -> Tensor:
        clip = self.cfg.clip_act
        x = self.conv_in(x)
        for level in self.down:
            x = level(x)
        x = self.mid(x).clamp(-clip, clip)
        return self.conv_out(mp_silu(x, self.cfg), gain=self.learnable_gain + 1)


class Decoder(nn.Module):
    """Latent [B, embed_dim, L] -> normalised mel [B, data_dim, L * temporal_upsampling].

    `up` is indexed by level like the encoder's `down` but runs from the last level to level 0;
    level i upsamples when the encoder downsampled after level i-1. Its residual blocks (and the
    middle's) use kernel 3 whatever `kernel_size` says, as the reference's decoder does.
    """

    def __init__(self, cfg: AudioVAEConfig):
        super().__init__()
        self.cfg = cfg
        k = cfg.kernel_size
        width = cfg.hidden_dim * cfg.ch_mult[-1]
        self.conv_in = MPConv1d(cfg.embed_dim, width, k)
        self.mid = Middle(width, 3, cfg)
        levels = []
        for level in reversed(range(len(cfg.ch_mult))):
            out = cfg.hidden_dim * cfg.ch_mult[level]
            blocks = [ResBlock(width if j == 0 else out, out, 3, cfg) for j in range(cfg.num_res_blocks + 1)]
            attn = [AttnBlock(out, cfg) for _ in blocks] if level in cfg.attn_layers else []
            width = out
            resample = Upsample(width) if level - 1 in cfg.down_layers else None
            levels.insert(0, Level(blocks, attn, resample, "upsample", cfg.clip_act))
        self.up = nn.ModuleList(levels)
        self.conv_out = MPConv1d(width, cfg.data_dim, k)
        self.learnable_gain = nn.Parameter(torch.empty(()))

    def forward(self, z: Tensor) -> Tensor:
        clip = self.cfg.clip_act
        x = self.mid(self.conv_in(z)).clamp(-clip, clip)
        for level in reversed(self.up):
            x = level(x)
        return self.conv_out(mp_silu(x, self.cfg), gain=self.learnable_gain + 1)


class AudioVAE(nn.Module):
    """The VAE with the checkpoint's mel statistics `data_mean` / `data_std` [1, data_dim, 1]."""

    def __init__(self, cfg: AudioVAEConfig, with_encoder: bool = True):
        super().__init__()
        self.cfg = cfg
        self.register_buffer("data_mean", torch.empty(1, cfg.data_dim, 1))
        self.register_buffer("data_std", torch.empty(1, cfg.data_dim, 1))
        self.encoder = Encoder(cfg) if with_encoder else None
        self.decoder = Decoder(cfg)

    @torch.inference_mode()
    def decode(self, latent: Tensor) -> Tensor:
        """latent [B, embed_dim, L] -> log-mel [B, data_dim, temporal_upsampling*L] (log10 for v1-16)."""
        latent = latent.to(device=self.data_mean.device, dtype=self.data_mean.dtype)
        return self.decoder(latent) * self.data_std + self.data_mean

    @torch.inference_mode()
    def encode(self, mel: Tensor) -> tuple[Tensor, Tensor]:
        """log-mel [B, data_dim, M] -> posterior (mean, logvar), each [B, embed_dim, M // 2**levels]."""
        if self.encoder is None:
            raise RuntimeError("this AudioVAE was loaded without its encoder (decode-only)")
        mel = mel.to(device=self.data_mean.device, dtype=self.data_mean.dtype)
        moments = self.encoder((mel - self.data_mean) / self.data_std)
        mean, logvar = moments.chunk(2, dim=1)
        return mean, logvar.clamp(*LOGVAR_RANGE)


# ---------------------------------------------------------------------------------------------------
# Mel front-end (encode side; also what the vocoder was trained to invert)


def slaney_mel_filters(
    sample_rate: int, n_fft: int, num_mels: int, fmin: float, fmax: float | None
) -> np.ndarray:
    """Triangular mel filters [num_mels, n_fft//2 + 1] on the Slaney mel scale, area-normalised.

    The same matrix as `librosa.filters.mel(..., htk=False, norm="slaney")`, computed here in float64
    so the server does not depend on librosa (and through it numba/llvmlite) for 20 lines of numpy.
    `fmax` None is Nyquist, as in librosa.
    """
    if fmax is None:
        fmax = sample_rate / 2

    # Slaney's Auditory Toolbox scale: linear (200/3 Hz per mel) below 1 kHz, logarithmic above.
    f_sp, min_log_hz, logstep = 200.0 / 3, 1000.0, np.log(6.4) / 27.0
    min_log_mel = min_log_hz / f_sp

    def hz_to_mel(hz: np.ndarray) -> np.ndarray:
        hz = np.asanyarray(hz, dtype=np.float64)
        log_part = min_log_mel + np.log(np.maximum(hz, min_log_hz) / min_log_hz) / logstep
        return np.where(hz >= min_log_hz, log_part, hz / f_sp)

    def mel_to_hz(mel: np.ndarray) -> np.ndarray:
        log_part = min_log_hz * np.exp(logstep * (np.maximum(mel, min_log_mel) - min_log_mel))
        return np.where(mel >= min_log_mel, log_part, f_sp * mel)

    fft_hz = np.fft.rfftfreq(n_fft, d=1.0 / sample_rate)  # [F]
    edges_hz = mel_to_hz(np.linspace(hz_to_mel(fmin), hz_to_mel(fmax), num_mels + 2))  # [num_mels + 2]
    lower, centre, upper = edges_hz[:-2, None], edges_hz[1:-1, None], edges_hz[2:, None]
    rising = (fft_hz[None, :] - lower) / (centre - lower)
    falling = (upper - fft_hz[None, :]) / (upper - centre)
    weights = np.maximum(0.0, np.minimum(rising, falling))
    return (weights * (2.0 / (upper - lower))).astype(np.float32)


class MelSpectrogram(nn.Module):
    """Waveform [B, N] in [-1, 1] -> log-mel [B, data_dim, (N + 2*pad - n_fft)//hop + 1], float32.

    The log is `cfg.mel_log`: log10 (16 kHz, Ovi's) or natural (the reference's 44.1 kHz converter).

    pad = (n_fft - hop) / 2 reflect padding per side and no centring, so M = N / hop for N a multiple
    of hop (4096 samples -> 16 frames).
    """

    def __init__(self, cfg: AudioVAEConfig):
        super().__init__()
        if cfg.mel_log not in MEL_LOGS:
            raise ConfigError(f"audio_vae.mel_log {cfg.mel_log!r}: expected one of {sorted(MEL_LOGS)}")
        self.cfg = cfg
        self.log = MEL_LOGS[cfg.mel_log]
        basis = slaney_mel_filters(cfg.sampling_rate, cfg.n_fft, cfg.data_dim, cfg.fmin, cfg.fmax)
        self.register_buffer("mel_basis", torch.from_numpy(basis), persistent=False)
        self.register_buffer("window", torch.hann_window(cfg.win_size), persistent=False)

    def forward(self, waveform: Tensor) -> Tensor:
        cfg = self.cfg
        pad = (cfg.n_fft - cfg.hop_size) // 2
        x = waveform.to(device=self.window.device, dtype=torch.float32).clamp(-1.0, 1.0)
        x = F.pad(x[:, None], (pad, pad), mode="reflect")[:, 0]
        spec = torch.stft(
            x,
            cfg.n_fft,
            hop_length=cfg.hop_size,
            win_length=cfg.win_size,
            window=self.window,
            center=False,
            onesided=True,
            return_complex=True,
        )  # [B, n_fft//2 + 1, M]
        magnitude = torch.sqrt(spec.real.pow(2) + spec.imag.pow(2) + STFT_EPS)
        return self.log(torch.clamp(self.mel_basis @ magnitude, min=MEL_FLOOR))


# ---------------------------------------------------------------------------------------------------
# Ovi's audio output path


class AudioDecoder(nn.Module):
    """Audio latent [B, embed_dim, L] -> 16 kHz waveform [B, samples_per_latent * L] (512 per step)."""

    def __init__(self, vae: AudioVAE, vocoder: BigVGAN):
        super().__init__()
        self.vae, self.vocoder = vae, vocoder

    @property
    def sample_rate(self) -> int:
        return self.vae.cfg.sampling_rate

    @property
    def samples_per_latent(self) -> int:
        return self.vae.cfg.temporal_upsampling * self.vocoder.cfg.hop_size

    @torch.inference_mode()
    def decode(self, latent: Tensor) -> Tensor:
        """latent [B, embed_dim, L] -> waveform [B, 512*L], float32 in [-1, 1], on the model's device."""
        mel = self.vae.decode(latent)  # [B, 80, 2L]
        return self.vocoder.vocode(mel)[:, 0].float()


def load_audio_vae(
    path: str | Path, cfg: AudioVAEConfig, placement: Placement, *, with_encoder: bool = True
) -> AudioVAE:
    """AudioVAE from MMAudio's `ext_weights/v1-16.pth` (or a safetensors file with its keys), strictly.

    Args:
        with_encoder: False keeps only the decoder in memory (Ovi never encodes audio); the file
            must still hold the encoder's keys.
    """
    model = _load_vae(read_state_dict(path), cfg, placement, path, with_encoder)
    logger.info(
        "loaded audio VAE from %s on %s as %s",
        path,
        placement.device,
        str(placement.dtype).removeprefix("torch."),
    )
    return model


def random_audio_vae(
    cfg: AudioVAEConfig, placement: Placement, seed: int, *, with_encoder: bool = True
) -> AudioVAE:
    """Random AudioVAE (tiny demo, benchmarks) through the same normalise-and-load path as a checkpoint.

    Raw conv weights are N(0, 1) (normalised at load like real ones), gains 0, and the mel statistics
    a plausible log10-mel level (mean falling from -1.6 to -3.0 over the bands, std 1), not real ones.
    """
    generator = torch.Generator().manual_seed(seed)
    with meta_device():
        template = AudioVAE(cfg)
    state_dict = {}
    for key, tensor in template.state_dict().items():
        if key.endswith(".weight"):
            state_dict[key] = torch.randn(tensor.shape, generator=generator)
        else:
            state_dict[key] = torch.zeros(tensor.shape)
    state_dict["data_mean"] = torch.linspace(-1.6, -3.0, cfg.data_dim).view(1, -1, 1)
    state_dict["data_std"] = torch.ones(1, cfg.data_dim, 1)
    return _load_vae(state_dict, cfg, placement, f"<random audio VAE, seed {seed}>", with_encoder)


def load_audio_decoder(
    vae_path: str | Path,
    vocoder_path: str | Path,
    vae_cfg: AudioVAEConfig,
    voc_cfg: VocoderConfig,
    placement: Placement,
) -> AudioDecoder:
    """Ovi's audio output path from `v1-16.pth` and `best_netG.pt`; the VAE encoder is not kept."""
    vae = load_audio_vae(vae_path, vae_cfg, placement, with_encoder=False)
    return AudioDecoder(vae, load_vocoder(vocoder_path, voc_cfg, placement))


def random_audio_decoder(
    vae_cfg: AudioVAEConfig, voc_cfg: VocoderConfig, placement: Placement, seed: int
) -> AudioDecoder:
    """Random-weight AudioDecoder for the tiny variant: finite waveform within [-1, 1]."""
    vae = random_audio_vae(vae_cfg, placement, seed, with_encoder=False)
    return AudioDecoder(vae, random_vocoder(voc_cfg, placement, seed + 1))


def _load_vae(
    state_dict: Mapping[str, Tensor], cfg: AudioVAEConfig, placement: Placement, path, with_encoder: bool
) -> AudioVAE:
    with meta_device():
        full = AudioVAE(cfg)
    check_keys(path, set(full.state_dict()), set(state_dict), "MMAudio audio VAE (v1-16 layout)")
    if with_encoder:
        model, wanted = full, dict(state_dict)
    else:
        with meta_device():
            model = AudioVAE(cfg, with_encoder=False)
        wanted = {k: state_dict[k] for k in model.state_dict()}
    return load_module(model, remap_official(wanted, cfg), placement, path=path, what="audio VAE")


def remap_official(state_dict: dict[str, Tensor], cfg: AudioVAEConfig) -> dict[str, Tensor]:
    """Official keys are ours; only the raw conv weights are normalised (float32) for inference."""
    return {
        key: normalize_mp_weight(t, cfg.weight_norm_eps) if key.endswith(".weight") else t
        for key, t in state_dict.items()
    }
