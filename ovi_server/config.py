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
    # Levels whose residual blocks are each followed by an attention block (the middle one is always
    # there). v1-16 has none: the reference's VAE passes [3] with three levels.
    attn_layers: tuple[int, ...] = ()
    kernel_size: int = 3
    clip_act: float = 256.0
    mp_sum_t: float = 0.3
    mp_silu_div: float = 0.596
    weight_norm_eps: float = 1e-4  # the eps of the reference's normalize(): weights and pixel norm
    # Mel front-end (encode only; Ovi decodes): STFT without centering after a reflect pad of
    # (n_fft - hop_size) / 2 samples per side, slaney mel filters, then `mel_log` of the clamped mel:
    # "log10" (the reference's 16k converter) or the natural "log" (its 44k converter).
    sampling_rate: int = 16000
    n_fft: int = 1024
    hop_size: int = 256
    win_size: int = 1024
    fmin: float = 0.0
    fmax: float | None = 8000.0  # None: sampling_rate / 2 (librosa's default)
    mel_log: Literal["log10", "log"] = "log10"

    @property
    def temporal_upsampling(self) -> int:
        """Mel frames per latent step: the decoder's x2 upsamples, one per level whose predecessor
        the encoder downsamples after. A downsample after the last level has no decoder counterpart."""
        return 2 ** sum(level - 1 in self.down_layers for level in range(1, len(self.ch_mult)))


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


# ---------------------------------------------------------------------------------------- settings
# The run-time settings below are the one settings object of every command (serve, worker, generate,
# weights, benchmarks.run). A field made with `setting(...)` is also a command-line flag and an
# environment variable; ovi_server/settings.py turns these fields into argparse options (help, env
# name, default) and resolves defaults → config file → environment → flags. Adding a flag: add a field
# here, with its flag, env var, help and the commands that take it. Nothing else.

SERVE = ("serve",)
QUEUE = ("serve", "worker")  # where jobs and files live
ENGINE = ("serve", "worker", "generate", "bench")  # how the model runs (benchmarks.run: "bench")
CHECKPOINT = ("serve", "worker", "generate", "weights")  # which files (the benchmark draws random weights)


def setting(
    default: Any = None,
    *,
    flag: str,
    env: str,
    help: str,
    commands: tuple[str, ...],
    group: str,
    parse: Any = None,
    default_factory: Any = None,
) -> Any:
    """A dataclass field that is also a CLI flag and an env var (see ovi_server/settings.py).

    parse: str → value for flags and env vars (and config-file strings) where the field's type alone
    does not say how (comma lists, "off"); otherwise pydantic coerces to the field's annotation.
    """
    meta = {"flag": flag, "env": env, "help": help, "commands": commands, "group": group, "parse": parse}
    if default_factory is not None:
        return field(default_factory=default_factory, metadata=meta)
    return field(default=default, metadata=meta)


def comma_list(text: str | list | tuple) -> tuple[str, ...]:
    """ "a, b" (a flag, env var or config string) or a config-file list → ("a", "b")."""
    items = text.split(",") if isinstance(text, str) else list(text)
    return tuple(str(i).strip() for i in items if str(i).strip())


def cidr_list(text: str | list | tuple) -> tuple[str, ...]:
    from ovi_server.outbound import parse_networks  # raises ValueError naming the bad entry

    return tuple(str(n) for n in parse_networks(comma_list(text)))


def previews_every(text: str | int) -> int:
    """--previews: "off" → 0, else a positive number of denoising steps."""
    word = str(text).strip().lower()
    if word in ("off", "0", "no", "false"):
        return 0
    if not word.isdigit():
        raise ValueError(f"expected a number of steps or 'off', got {text!r}")
    return int(word)


def gibibytes(text: str | float | None) -> float | None:
    """--gpu-memory: a positive number of GiB; "off", "none" or empty: no limit (None)."""
    if text is None or str(text).strip().lower() in ("", "off", "none"):
        return None
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"expected a number of GiB (e.g. 32) or 'off', got {text!r}") from None
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"expected a positive number of GiB, got {text!r}")
    return value


def on_off_auto(text: str | bool) -> str:
    """auto, on or off; the yes/no spellings of a switch (OVI_COMPILE=1, true) read as on/off."""
    word = str(text).strip().lower()
    word = {"1": "on", "true": "on", "yes": "on", "0": "off", "false": "off", "no": "off"}.get(word, word)
    if word not in ("auto", "on", "off"):
        raise ValueError(f"expected auto, on or off, got {text!r}")
    return word


def origin(text: str) -> str:
    return str(text).rstrip("/")


@dataclass(frozen=True)
class EngineConfig:
    """How the server or the CLI runs the model; built once by cli.py and passed down."""

    variant: str = setting(
        "tiny",
        flag="--variant",
        env="OVI_VARIANT",
        help="720x720_5s, 960x960_5s, 960x960_10s, tiny (random weights, CPU demo) or a config path",
        commands=(*ENGINE, "weights"),
        group="model",
    )
    # None: random weights (only allowed for variants with random_weights_seed)
    weights_dir: Path | None = setting(
        flag="--weights",
        env="OVI_WEIGHTS_DIR",
        help="weights directory in the reference's layout, weights/README.md (none: random weights, tiny only)",
        commands=CHECKPOINT,
        group="model",
    )
    # load the fp8 checkpoint and keep Linear weights in fp8 (low-VRAM mode)
    fp8: bool = setting(
        False,
        flag="--fp8",
        env="OVI_FP8",
        help="the fp8 checkpoint (720x720_5s), kept fp8 in memory",
        commands=CHECKPOINT,
        group="model",
    )
    device: str = setting(
        "auto",
        flag="--device",
        env="OVI_DEVICE",
        help="auto, cpu, cuda or cuda:N",
        commands=ENGINE,
        group="model",
    )
    dtype: str = setting(
        "auto",
        flag="--dtype",
        env="OVI_DTYPE",
        help="auto (bf16 on GPU, fp32 on CPU), bf16 or fp32",
        commands=ENGINE,
        group="model",
    )
    attention: str = setting(
        "native",
        flag="--attention",
        env="OVI_ATTENTION",
        help="a diffusers attention backend: native (PyTorch SDPA), _native_cudnn, flash, _flash_3, sage",
        commands=ENGINE,
        group="model",
    )
    # "auto": none where the fusion model, the decoders and a denoising reserve fit in the GPU's memory,
    # else block (measured 1.02x the resident step at a 4.0 GiB peak on an H200, benchmarks/RESULTS.md)
    offload: Literal["auto", "none", "model", "block"] = setting(
        "auto",
        flag="--offload",
        env="OVI_OFFLOAD",
        help="keep models in host memory, on the GPU per stage (model) or per block (block); auto: block "
        "only when the models would not fit in the GPU's memory, else none",
        commands=("serve", "worker", "generate"),
        group="model",
    )
    # torch.compile of the fusion blocks (engine/compiling.py); "auto": on where it was measured faster
    # (one CUDA device, resident weights: 1.22x per step on an H200, benchmarks/RESULTS.md), compiled
    # and warmed up at start-up so that no request pays for it
    compile: Literal["auto", "on", "off"] = setting(
        "auto",
        flag="--compile",
        env="OVI_COMPILE",
        help="torch.compile the fusion blocks: auto (serve/worker: on for one CUDA device without --fp8, "
        "--offload or --sp/--cfg-parallel, compiled at start-up; generate: off), on, off",
        commands=ENGINE,
        group="model",
        parse=on_off_auto,
    )
    # The most device memory this process may use. The automatic choices (--offload auto, whether the
    # text encoder stays on the device, --vae-tiling auto) plan for it, and PyTorch's caching allocator
    # is held to it (torch.cuda.set_per_process_memory_fraction): several workers on one card, a card
    # shared with other programs, or a smaller card's configuration tried on a larger one.
    gpu_memory: float | None = setting(
        flag="--gpu-memory",
        env="OVI_GPU_MEMORY",
        help="the most GPU memory this process may use, in GiB (default: the whole card); the automatic "
        "offload, text-encoder and tiling choices plan for it",
        commands=ENGINE,
        group="model",
        parse=gibibytes,
    )
    # Spatially tiled VAE decode: bounded memory, not bit-exact at tile seams. "auto": only when an
    # estimate of the untiled decode exceeds the device's free memory (never on the CPU).
    vae_tiling: Literal["auto", "on", "off"] = setting(
        "auto",
        flag="--vae-tiling",
        env="OVI_VAE_TILING",
        help="tiled video VAE decode: auto (only when an untiled decode would not fit in free GPU memory), on, off",
        commands=("serve", "worker", "generate"),
        group="model",
    )
    # Live previews (serve): a PNG of the video latents every this many denoising steps and at the last
    # one, stored for GET .../requests/{id}/preview; 0: off.
    preview_every: int = setting(
        5,
        flag="--previews",
        env="OVI_PREVIEWS",
        help="live previews of the video while it denoises: every N steps (and the last), or off",
        commands=QUEUE,
        group="model",
        parse=previews_every,
    )
    # One request on several processes (engine/parallel.py): the sequence-parallel degree, and whether
    # the positive and negative passes run on two groups of `sp` processes each.
    sp: int = setting(
        1,
        flag="--sp",
        env="OVI_SP",
        help="sequence-parallel degree: one request runs on this many GPUs (processes on the CPU), "
        "the token streams split between them (Ulysses)",
        commands=ENGINE,
        group="model",
    )
    cfg_parallel: bool = setting(
        False,
        flag="--cfg-parallel",
        env="OVI_CFG_PARALLEL",
        help="run the positive and negative guidance passes on two groups of --sp GPUs each (2 x --sp in all)",
        commands=ENGINE,
        group="model",
    )
    # Batched guidance: the positive and negative passes of each step as one batch-2 forward instead of
    # two forwards (engine/sampler.py batched_predict). Same result up to float round-off; twice the
    # activation memory. "auto" is off until a GPU A/B measurement says where it pays.
    batch_guidance: Literal["auto", "on", "off"] = setting(
        "auto",
        flag="--batch-guidance",
        env="OVI_BATCH_GUIDANCE",
        help="both guidance passes as one batch-2 forward: auto (off for now), on, off; "
        "ignored with --sp/--cfg-parallel",
        commands=ENGINE,
        group="model",
    )


@dataclass(frozen=True)
class LogConfig:
    """How a server or worker process logs (log.py); a worker gets its server's."""

    level: str = setting(
        "info",
        flag="--log-level",
        env="OVI_LOG_LEVEL",
        help="debug, info, warning",
        commands=QUEUE,
        group="logging",
    )
    format: Literal["text", "json"] = setting(
        "text",
        flag="--log-format",
        env="OVI_LOG_FORMAT",
        help="text or json (one object per line)",
        commands=QUEUE,
        group="logging",
    )


def default_data_dir() -> Path:
    """The user data dir (`~/.local/share/ovi-server` on Linux): where a server keeps its state by default."""
    import platformdirs

    return Path(platformdirs.user_data_dir("ovi-server"))


@dataclass(frozen=True)
class ServerConfig:
    """The settings of every command (defaults → config file → environment → flags; settings.py builds
    it once) handed to build_app/Worker/OviPipeline; `generate` and `weights` use `engine` alone."""

    engine: EngineConfig = field(default_factory=EngineConfig)
    log: LogConfig = field(default_factory=LogConfig)
    host: str = setting("127.0.0.1", flag="--host", env="OVI_HOST", help="listen address", commands=SERVE, group="network")  # fmt: skip
    port: int = setting(8000, flag="--port", env="OVI_PORT", help="listen port", commands=SERVE, group="network")  # fmt: skip
    # None: absolute URLs (status_url, video.url, ...) follow each request's Host / X-Forwarded-* headers.
    public_url: str | None = setting(
        flag="--public-url",
        env="OVI_PUBLIC_URL",
        help="origin used in returned URLs (status_url, video.url, ...); default: the address each client "
        "used (Host / X-Forwarded-Proto / X-Forwarded-Host), i.e. the listen address for direct clients",
        commands=SERVE,
        group="network",
        parse=origin,
    )
    tls_cert: Path | None = setting(
        flag="--tls-cert",
        env="OVI_TLS_CERT",
        help="PEM certificate: serve HTTPS (fal-client only speaks https)",
        commands=SERVE,
        group="network",
    )
    tls_key: Path | None = setting(
        flag="--tls-key",
        env="OVI_TLS_KEY",
        help="PEM private key for --tls-cert",
        commands=SERVE,
        group="network",
    )
    # with a cert: extra HTTPS listener; None: `port` itself serves HTTPS
    tls_port: int | None = setting(
        flag="--tls-port",
        env="OVI_TLS_PORT",
        help="with --tls-cert: HTTPS on this port, plain HTTP stays on --port",
        commands=SERVE,
        group="network",
    )
    # "id:secret" pairs (or bare keys). Empty: open, which cli.py only allows on loopback or with no_auth.
    # Secrets: kept out of repr (the start-up log prints the config).
    api_keys: tuple[str, ...] = field(
        default=(),
        repr=False,
        metadata={
            "flag": "--api-keys",
            "env": "OVI_API_KEYS",
            "help": "comma-separated keys, 'id:secret' or bare; clients send 'Key <key>'",
            "commands": SERVE,
            "group": "auth",
            "parse": comma_list,
        },
    )
    no_auth: bool = setting(
        False,
        flag="--no-auth",
        env="OVI_NO_AUTH",
        help="allow running without keys on a non-loopback address",
        commands=SERVE,
        group="auth",
    )
    # Security limits (README "Security"). CIDR ranges outbound fetches and webhooks may reach besides
    # public addresses (on-prem receivers, tests on loopback).
    allowed_networks: tuple[str, ...] = setting(
        (),
        flag="--allowed-networks",
        env="OVI_ALLOWED_NETWORKS",
        help="comma-separated CIDR ranges that image_url fetches and webhooks may reach besides public "
        "addresses (e.g. 10.0.0.0/8 for on-prem receivers); default: public addresses only",
        commands=SERVE,
        group="security limits (README: Security)",
        parse=cidr_list,
    )
    max_body_bytes: int = setting(32 << 20, flag="--max-body-bytes", env="OVI_MAX_BODY_BYTES", help="largest POST body (413 above); a data-URI image fits", commands=SERVE, group="security limits (README: Security)")  # fmt: skip
    max_queued_per_key: int = setting(100, flag="--max-queued-per-key", env="OVI_MAX_QUEUED_PER_KEY", help="queued + running requests per API key (429 above)", commands=SERVE, group="security limits (README: Security)")  # fmt: skip
    fetch_timeout_s: float = setting(10.0, flag="--fetch-timeout", env="OVI_FETCH_TIMEOUT", help="seconds to download an image_url at submit, in all", commands=SERVE, group="security limits (README: Security)")  # fmt: skip
    # jobs.sqlite3, files/, webhook signing key
    data_dir: Path = setting(
        flag="--data-dir",
        env="OVI_DATA_DIR",
        help="jobs database, files, webhook key (default: the user data dir)",
        commands=QUEUE,
        group="queue and files",
        default_factory=default_data_dir,
    )
    # The queue: "sqlite:///PATH" (None: sqlite under data_dir; one host) or "redis://HOST:PORT/DB" (many hosts).
    queue: str | None = setting(
        flag="--queue",
        env="OVI_QUEUE",
        help="sqlite:///PATH (one host; default: jobs.sqlite3 in the data dir) or redis://HOST:PORT/DB (many hosts)",
        commands=QUEUE,
        group="queue and files",
    )
    # a claimed job's lease, renewed by its worker's heartbeat every lease_s / 3
    lease_s: float = setting(
        30.0,
        flag="--lease-seconds",
        env="OVI_LEASE_SECONDS",
        help="a running job whose worker has not renewed its lease for this long is queued again",
        commands=QUEUE,
        group="queue and files",
    )
    # A job whose worker stopped renewing its lease is re-queued; it runs this many times at most.
    max_attempts: int = setting(
        2,
        flag="--max-attempts",
        env="OVI_MAX_ATTEMPTS",
        help="runs of a job whose worker died or froze before it fails (runner_disconnected)",
        commands=QUEUE,
        group="queue and files",
    )
    storage: Literal["local", "s3"] = setting(
        "local",
        flag="--storage",
        env="OVI_STORAGE",
        help="where files live",
        commands=QUEUE,
        group="queue and files",
    )
    s3_bucket: str | None = setting(
        flag="--s3-bucket",
        env="OVI_S3_BUCKET",
        help="bucket for --storage s3 (credentials: the usual AWS_* env)",
        commands=QUEUE,
        group="queue and files",
    )
    s3_endpoint_url: str | None = setting(
        flag="--s3-endpoint-url",
        env="OVI_S3_ENDPOINT_URL",
        help="S3-compatible endpoint (MinIO, R2, ...)",
        commands=QUEUE,
        group="queue and files",
    )
    s3_prefix: str = "ovi/"
    # Worker processes `serve` starts: None = one per visible CUDA device (one without CUDA), 0 = API only.
    workers: int | None = setting(
        flag="--workers",
        env="OVI_WORKERS",
        help="worker processes to start beside the API: default one per visible CUDA device (one without "
        "CUDA); 0 serves the API alone (start `ovi-server worker` processes yourself)",
        commands=SERVE,
        group="workers",
    )
    # generated MP4s and uploads are deleted after this
    output_retention_hours: float = setting(
        24.0,
        flag="--retention-hours",
        env="OVI_RETENTION_HOURS",
        help="delete outputs and uploads after",
        commands=SERVE,
        group="retention and webhooks",
    )
    # delays base·2^n: 10 retries span ~2 h, as on fal
    webhook_retry_base_s: float = setting(
        7.0,
        flag="--webhook-retry-base",
        env="OVI_WEBHOOK_RETRY_BASE",
        help="seconds before the first webhook retry (doubles)",
        commands=SERVE,
        group="retention and webhooks",
    )
    webhook_max_retries: int = 10
