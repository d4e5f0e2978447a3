"""Typed, frozen configuration: one `OviConfig` per model variant, read from `configs/<name>.json`.

Field names of `DiTConfig` are the ones of the reference's `ovi/configs/model/dit/{video,audio}.json`
so a config file can be checked against the reference by eye.
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from ovi_server.errors import ConfigError

# configs/ beside the package in a checkout (editable install); a regular install puts the same files
# under <prefix>/share/ovi-server/configs (pyproject's data-files).
_CHECKOUT_CONFIGS = Path(__file__).resolve().parent.parent / "configs"
CONFIG_DIR = (
    _CHECKOUT_CONFIGS if _CHECKOUT_CONFIGS.is_dir() else Path(sys.prefix) / "share" / "ovi-server" / "configs"
)


@dataclass(frozen=True)
class DiTConfig:
    """One Wan2.2-style DiT tower (video: model_type ti2v, audio: model_type t2a)."""

    model_type: Literal["ti2v", "t2a"]
    patch_size: tuple[int, ...]
    dim: int
    ffn_dim: int
    num_heads: int
    num_layers: int
    in_dim: int
    out_dim: int
    freq_dim: int = 256
    text_len: int = 512
    text_dim: int = 4096
    window_size: tuple[int, int] = (-1, -1)
    qk_norm: bool = True
    cross_attn_norm: bool = True
    eps: float = 1e-6
    temporal_rope_scaling_factor: float = 1.0

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads

    @property
    def is_audio(self) -> bool:
        return self.model_type == "t2a"


@dataclass(frozen=True)
class T5Config:
    """umt5 encoder; names follow the reference's `T5Encoder` arguments."""

    vocab_size: int = 256384
    dim: int = 4096
    dim_attn: int = 4096
    dim_ffn: int = 10240
    num_heads: int = 64
    num_layers: int = 24
    num_buckets: int = 32
    relative_max_distance: int = 128
    eps: float = 1e-6
    text_len: int = 512


@dataclass(frozen=True)
class VideoVAEConfig:
    """Wan2.2 VAE (z_dim 48, 16x spatial, 4x temporal)."""

    dim: int = 160
    dec_dim: int = 256
    z_dim: int = 48
    dim_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    temperal_downsample: tuple[bool, ...] = (False, True, True)
    patch_size: int = 2  # pixels are folded 2x2 into channels before the encoder (3 -> 12)


@dataclass(frozen=True)
class AudioVAEConfig:
    """MMAudio 16 kHz VAE ("v1-16") and the mel front-end it was trained on.

    Names follow the reference's `Encoder1D` / `Decoder1D` arguments and its 16k mel converter.
    """

    data_dim: int = 80  # mel bands
    embed_dim: int = 20  # latent channels
    hidden_dim: int = 384
    ch_mult: tuple[int, ...] = (1, 2, 4)
    num_res_blocks: int = 2
    down_layers: tuple[int, ...] = (0,)  # encoder levels followed by a 2x time downsample
    kernel_size: int = 3
    clip_act: float = 256.0
    mp_sum_t: float = 0.3
    mp_silu_div: float = 0.596
    weight_norm_eps: float = 1e-4  # the eps of the reference's normalize(): weights and pixel norm
    # Mel front-end (encode only; Ovi decodes): STFT without centering after a reflect pad of
    # (n_fft - hop_size) / 2 samples per side, slaney mel filters, log10.
    sampling_rate: int = 16000
    n_fft: int = 1024
    hop_size: int = 256
    win_size: int = 1024
    fmin: float = 0.0
    fmax: float = 8000.0

    @property
    def temporal_upsampling(self) -> int:
        """Mel frames per latent step."""
        return 2 ** len(self.down_layers)


@dataclass(frozen=True)
class VocoderConfig:
    """BigVGAN v1 vocoder, 16 kHz, 80 mels; names follow the reference's `bigvgan_vocoder.yml`."""

    num_mels: int = 80
    upsample_rates: tuple[int, ...] = (4, 4, 2, 2, 2, 2)
    upsample_kernel_sizes: tuple[int, ...] = (8, 8, 4, 4, 4, 4)
    upsample_initial_channel: int = 1536
    resblock: Literal["1", "2"] = "1"
    resblock_kernel_sizes: tuple[int, ...] = (3, 7, 11)
    resblock_dilation_sizes: tuple[tuple[int, ...], ...] = ((1, 3, 5), (1, 3, 5), (1, 3, 5))
    activation: Literal["snake", "snakebeta"] = "snakebeta"
    snake_logscale: bool = True

    @property
    def hop_size(self) -> int:
        """Waveform samples per mel frame."""
        return math.prod(self.upsample_rates)


@dataclass(frozen=True)
class SamplingDefaults:
    """Defaults of the reference's `inference_fusion.yaml`; a request may override each."""

    solver: Literal["unipc", "dpm++", "euler"] = "unipc"
    steps: int = 50
    shift: float = 5.0
    video_guidance_scale: float = 4.0
    audio_guidance_scale: float = 3.0
    slg_layer: int = 11
    video_negative_prompt: str = "jitter, bad hands, blur, distortion"
    audio_negative_prompt: str = "robotic, muffled, echo, distorted"


@dataclass(frozen=True)
class OviConfig:
    """Everything that defines one model variant (720x720_5s, 960x960_5s, 960x960_10s, tiny)."""

    name: str
    video: DiTConfig
    audio: DiTConfig
    text_encoder: T5Config
    video_vae: VideoVAEConfig
    audio_vae: AudioVAEConfig
    vocoder: VocoderConfig
    sampling: SamplingDefaults
    # Paths relative to the weights directory; layout of the reference's download_weights.py.
    checkpoint: str
    fp8_checkpoint: str | None
    video_area: int
    video_latent_length: int
    audio_latent_length: int
    # How the variant wants the audio caption written: "<AUDCAP>..<ENDAUDCAP>" or "Audio: ..."
    prompt_style: Literal["audcap", "audio_colon"]
    fps: int = 24
    audio_sample_rate: int = 16000
    # Only for configs without checkpoints (tiny): random weights are drawn from this seed.
    random_weights_seed: int | None = None
    description: str = ""
    extra: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)

    @property
    def video_frames(self) -> int:
        return 1 + 4 * (self.video_latent_length - 1)

    @property
    def duration_s(self) -> float:
        return self.video_frames / self.fps


def _build(cls: type, data: dict[str, Any], where: str) -> Any:
    """Dataclass from a dict, turning lists into tuples and naming unknown keys."""
    names = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(names))
    if unknown:
        raise ConfigError(f"{where}: unknown keys {unknown}; expected some of {sorted(names)}")
    kwargs = {}
    for key, value in data.items():
        if isinstance(value, list):
            value = tuple(tuple(v) if isinstance(v, list) else v for v in value)
        kwargs[key] = value
    try:
        return cls(**kwargs)
    except TypeError as exc:
        raise ConfigError(f"{where}: {exc}") from exc


def dit_config(data: dict[str, Any], where: str = "dit config") -> DiTConfig:
    return _build(DiTConfig, data, where)


def ovi_config_from_dict(data: dict[str, Any], where: str) -> OviConfig:
    data = dict(data)
    sub = {
        "video": DiTConfig,
        "audio": DiTConfig,
        "text_encoder": T5Config,
        "video_vae": VideoVAEConfig,
        "audio_vae": AudioVAEConfig,
        "vocoder": VocoderConfig,
        "sampling": SamplingDefaults,
    }
    for key, cls in sub.items():
        data[key] = _build(cls, data.get(key, {}), f"{where}:{key}")
    return _build(OviConfig, data, where)


def load_variant(name_or_path: str) -> OviConfig:
    """A variant by name (`configs/<name>.json`) or by path to a JSON file."""
    path = Path(name_or_path)
    if not path.suffix:
        path = CONFIG_DIR / f"{name_or_path}.json"
    if not path.is_file():
        raise ConfigError(
            f"no config for variant {name_or_path!r}; known variants: {', '.join(variant_names())}"
        )
    return ovi_config_from_dict(json.loads(path.read_text()), str(path))


def variant_names() -> list[str]:
    return sorted(p.stem for p in CONFIG_DIR.glob("*.json"))


@dataclass(frozen=True)
class EngineConfig:
    """How the server or the CLI runs the model; built once by cli.py and passed down."""

    variant: str = "tiny"
    weights_dir: Path | None = (
        None  # None: random weights (only allowed for variants with random_weights_seed)
    )
    device: str = "auto"  # "auto" | "cpu" | "cuda" | "cuda:N"
    dtype: str = "auto"  # "auto" (bf16 on GPU, fp32 on CPU) | "bf16" | "fp32"
    attention: str = "native"  # a diffusers attention backend name
    offload: Literal["none", "model", "block"] = "none"
    fp8: bool = False  # load the fp8 checkpoint and keep Linear weights in fp8 (low-VRAM mode)
    compile: bool = False  # torch.compile the fusion blocks
    # Spatially tiled VAE decode: bounded memory, not bit-exact at tile seams. "auto": only when an
    # estimate of the untiled decode exceeds the device's free memory (never on the CPU).
    vae_tiling: Literal["auto", "on", "off"] = "auto"
    # Live previews (serve): a PNG of the video latents every this many denoising steps and at the last
    # one, stored for GET .../requests/{id}/preview; 0: off.
    preview_every: int = 5
    # One request on several processes (engine/parallel.py): the sequence-parallel degree, and whether
    # the positive and negative passes run on two groups of `sp` processes each.
    sp: int = 1
    cfg_parallel: bool = False


def default_data_dir() -> Path:
    """The user data dir (`~/.local/share/ovi-server` on Linux): where a server keeps its state by default."""
    import platformdirs

    return Path(platformdirs.user_data_dir("ovi-server"))


@dataclass(frozen=True)
class ServerConfig:
    """`ovi-server serve`: built once by cli.py (defaults → env → flags) and handed to build_app/Worker."""

    engine: EngineConfig = field(default_factory=EngineConfig)
    host: str = "127.0.0.1"
    port: int = 8000
    # None: absolute URLs (status_url, video.url, ...) follow each request's Host / X-Forwarded-* headers.
    public_url: str | None = None
    data_dir: Path = field(default_factory=default_data_dir)  # jobs.sqlite3, files/, webhook signing key
    # "id:secret" pairs (or bare keys). Empty: open, which cli.py only allows on loopback or with no_auth.
    # Secrets: kept out of repr (the start-up log prints the config).
    api_keys: tuple[str, ...] = field(default=(), repr=False)
    no_auth: bool = False
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_port: int | None = None  # with a cert: extra HTTPS listener; None: `port` itself serves HTTPS
    output_retention_hours: float = 24.0  # generated MP4s and uploads are deleted after this
    webhook_retry_base_s: float = 7.0  # delays base·2^n: 10 retries span ~2 h, as on fal
    webhook_max_retries: int = 10
    # A job whose worker stopped renewing its lease is re-queued; it runs this many times at most.
    max_attempts: int = 2
    # The queue: "sqlite:///PATH" (None: sqlite under data_dir; one host) or "redis://HOST:PORT/DB" (many hosts).
    queue: str | None = None
    lease_s: float = 30.0  # a claimed job's lease, renewed by its worker's heartbeat every lease_s / 3
    # Worker processes `serve` starts: None = one per visible CUDA device (one without CUDA), 0 = API only.
    workers: int | None = None
    storage: Literal["local", "s3"] = "local"
    s3_bucket: str | None = None
    s3_endpoint_url: str | None = None
    s3_prefix: str = "ovi/"
    # Security limits (README "Security"). CIDR ranges outbound fetches and webhooks may reach besides
    # public addresses (on-prem receivers, tests on loopback).
    allowed_networks: tuple[str, ...] = ()
    max_body_bytes: int = 32 << 20  # POST bodies; a data-URI image fits
    max_queued_per_key: int = 100  # queued + running requests per API key; more get 429
    fetch_timeout_s: float = 10.0  # total time to download an image_url at submit
