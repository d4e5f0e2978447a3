"""OviPipeline: loads a variant once and turns a GenerationRequest into an MP4.

prompt/image -> text encoder (+ video VAE encode for i2v) -> seeded noise -> denoise() ->
video VAE decode + audio VAE/vocoder decode -> mux. The server's worker and the CLI call exactly this.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import secrets
import time
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import closing, contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from ovi_server import weights
from ovi_server.config import EngineConfig, OviConfig, load_variant
from ovi_server.engine.attention_check import check_attention_backend
from ovi_server.engine.compiling import check_compile, compile_blocks, uncompile_blocks, wants_compile
from ovi_server.engine.device import (
    Placement,
    free_memory,
    resolve_placement,
    synchronize,
    total_memory,
)
from ovi_server.engine.offload import BlockStreamer, HostWeights, LayerStreamer
from ovi_server.engine.parallel import (
    DenoiseJob,
    ParallelGroup,
    ParallelSpec,
    check_spec,
    close_group,
    start_followers,
)
from ovi_server.engine.preview import preview_png
from ovi_server.engine.sampler import (
    Conditioning,
    Guidance,
    Latents,
    Predict,
    StepCallback,
    batched_predict,
    denoise,
    guided_predict,
    initial_noise,
    make_plan,
)
from ovi_server.errors import ConfigError, RankFailed, WeightsError
from ovi_server.media.audio_vae import AudioDecoder, AudioVAE, load_audio_decoder, random_audio_decoder
from ovi_server.media.images import load_first_frame
from ovi_server.media.mux import Mp4Writer, video_to_uint8
from ovi_server.media.video_vae import (
    VideoVAE,
    build_autoencoder,
    compression,
    decode_memory_estimate,
    load_video_vae,
    plan_tiling,
    random_video_vae,
)
from ovi_server.media.vocoder import BigVGAN
from ovi_server.models.fusion import OviFusion, build_fusion, layerwise_cast_params, load_fusion
from ovi_server.models.loading import init_random_, meta_device
from ovi_server.models.t5 import TextEncoder, build_umt5, load_text_encoder, random_text_encoder
from ovi_server.prompt import format_prompt, validate_prompt
from ovi_server.request import (
    MAX_RANDOM_SEED,
    Clip,
    GenerationRequest,
    Progress,
    ProgressCallback,
    check_request,
    ignore_progress,
)
from ovi_server.shapes import GenerationShape, area_warning, generation_shape, size_note, t2v_shape

logger = logging.getLogger(__name__)

TEXT_CACHE_SIZE = 64  # prompts whose text contexts are kept ([L, 4096] each, at most 4 MB in bf16)


@dataclass(frozen=True)
class ResolvedRequest:
    """A request with every default filled in from the variant's config."""

    prompt: str  # rewritten into the variant's caption form
    image: str | None
    size: tuple[int, int]  # requested (width, height) for t2v
    steps: int
    seed: int
    solver: str
    shift: float
    guidance: Guidance
    video_negative_prompt: str
    audio_negative_prompt: str


class OviPipeline:
    def __init__(
        self,
        cfg: OviConfig,
        placement: Placement,
        fusion: OviFusion,
        text_encoder: TextEncoder,
        video_vae: VideoVAE,
        audio_decoder: AudioDecoder,
        visitors: frozenset[str] = frozenset(),
        parallel: ParallelGroup | None = None,
        vae_tiling: str = "auto",
        predict: Predict = guided_predict,
    ):
        self.predict = predict  # each denoising step's guidance: guided_predict or batched_predict
        self.parallel = parallel  # the ranks this request runs on (rank 0 here); None: this process alone
        self.cfg, self.placement = cfg, placement
        self.vae_tiling = vae_tiling  # "auto": tiled only when an untiled decode would not fit (plan_tiling)
        self.compiled = False  # the fusion blocks run through torch.compile (--compile)
        self.warm_up_s = 0.0  # seconds the start-up compile took (warm_up)
        self._text_cache: OrderedDict[str, Tensor] = OrderedDict()
        self._sizes_warned: set[tuple[int, int]] = set()  # the area warning is given once per size
        self.fusion, self.text_encoder = fusion, text_encoder
        self.video_vae, self.audio_decoder = video_vae, audio_decoder
        self.visitors = visitors  # names of the models that live in host memory between their stages
        # their weights, mastered in (pinned) host memory: a visit copies them in, leaving drops the copy
        pin = placement.device.type == "cuda"
        self._host_weights: dict[str, HostWeights] = {}
        self._streamers: dict[str, LayerStreamer] = {}
        for name in sorted(visitors):
            module = getattr(self, name)
            if module is None:  # the ranks of a parallel group other than 0 only denoise
                continue
            if name == "text_encoder":
                # layer by layer (same bytes, copies overlap compute): a visit never needs all 10.6 GiB of
                # umt5-xxl beside the resident fusion model (21.7 GiB), which a 32 GB card does not hold
                self._streamers[name] = LayerStreamer(module, module.layers(), placement.device, pin)
            else:
                self._host_weights[name] = HostWeights([module], pin)

    # ------------------------------------------------------------------------------------------ load
    @classmethod
    def from_config(cls, engine: EngineConfig, parallel: ParallelGroup | None = None) -> OviPipeline:
        """Builds every model of the variant: from `engine.weights_dir`, or random for the tiny variant.

        With `engine.sp > 1` or `engine.cfg_parallel` this process becomes rank 0 and starts the other
        ranks, which load only the fusion model (`parallel` is their group) and follow its requests.
        """
        cfg = load_variant(engine.variant)
        if engine.compile == "on":
            check_compile(engine.fp8)  # before minutes of loading
        placement = resolve_placement(
            engine.device, engine.dtype, engine.offload, engine.attention, engine.fp8, engine.gpu_memory
        )
        total = total_memory(placement.device, placement.memory_limit)  # None off CUDA
        batched = engine.batch_guidance == "on"
        if placement.offload == "auto":
            offload = choose_offload(cfg, placement, total, batched)
            placement = dataclasses.replace(placement, offload=offload)
        # one real call in the dtype and head sizes the model uses, before minutes of loading
        check_attention_backend(
            placement.attention,
            placement.device,
            placement.dtype,
            {(c.num_heads, c.head_dim) for c in (cfg.video, cfg.audio)},
        )
        spec = ParallelSpec(engine.sp, engine.cfg_parallel)
        if parallel is None and spec.enabled:
            if placement.device.index is not None:
                raise ConfigError(
                    f"--sp/--cfg-parallel place rank r on cuda:r; pass --device cuda (not {engine.device}) "
                    "and choose the GPUs with CUDA_VISIBLE_DEVICES"
                )
            check_spec(spec, placement.device.type, (cfg.video.num_heads, cfg.audio.num_heads))
            parallel = start_followers(spec, placement.device.type, _follow, engine)
        if parallel is not None:
            placement = dataclasses.replace(placement, device=parallel.device)
        leader = parallel is None or parallel.is_leader
        visitors = visiting_modules(placement)
        host = Placement(torch.device("cpu"), placement.dtype)
        # models that visit the device for their stage (and the block-offloaded fusion) rest in host memory
        home = {
            name: host
            if name in visitors or (name == "fusion" and placement.offload == "block")
            else placement
            for name in ("fusion", "text_encoder", "video_vae", "audio_decoder")
        }
        started = time.monotonic()
        random = engine.weights_dir is None
        if random and cfg.random_weights_seed is None:
            raise WeightsError(
                f"variant {cfg.name} needs its checkpoints: pass --weights DIR "
                f"(`ovi-server weights download --variant {cfg.name}` fetches them)"
            )
        if random:
            seed = cfg.random_weights_seed
            logger.warning(
                "variant %s runs with RANDOM weights (seed %d): output is noise, for tests/demos",
                cfg.name,
                seed,
            )
            # models homed in host memory draw their numbers on the GPU (engine start-up in seconds)
            fill = placement.device if placement.device.type == "cuda" else None
            fusion = init_random_(build_fusion(cfg.video, cfg.audio), home["fusion"], seed, fill)
        else:
            files = weights.paths(Path(engine.weights_dir), cfg, engine.fp8)
            fusion = load_fusion(files["fusion"], cfg.video, cfg.audio, home["fusion"], keep_fp8=engine.fp8)
        text_encoder = video_vae = audio_decoder = None
        if leader:  # the other ranks only denoise
            if random:
                video_vae = random_video_vae(cfg.video_vae, home["video_vae"], seed + 2)
                audio_decoder = random_audio_decoder(
                    cfg.audio_vae, cfg.vocoder, home["audio_decoder"], seed + 3
                )
            else:
                video_vae = load_video_vae(files["video_vae"], cfg.video_vae, home["video_vae"])
                audio_decoder = load_audio_decoder(
                    files["audio_vae"], files["vocoder"], cfg.audio_vae, cfg.vocoder, home["audio_decoder"]
                )
            # decided before the text encoder exists, so that it loads straight into its home
            if "text_encoder" in visitors and placement.offload == "none":
                models = sum(map(module_bytes, (fusion, video_vae, audio_decoder)))
                text_bytes = meta_bytes(build_umt5(cfg.text_encoder), placement.dtype)
                if text_encoder_fits(cfg, models + text_bytes, total, batched):
                    home["text_encoder"] = placement
                    visitors = visitors - {"text_encoder"}
            if random:
                text_encoder = random_text_encoder(
                    cfg.text_encoder, None, home["text_encoder"], seed + 1, fill
                )
            else:
                text_encoder = load_text_encoder(
                    files["t5"], files["tokenizer"], cfg.text_encoder, home["text_encoder"]
                )
        try:  # the backend is checked here, at start-up, never inside a block
            fusion.set_attention_backend(placement.attention)
        except (ValueError, RuntimeError, ImportError) as exc:
            raise ConfigError(
                f"attention backend {placement.attention!r} cannot be used here: {exc}"
            ) from exc
        if parallel is not None:
            parallel.apply(fusion)  # sequence parallelism: after the backend is set, before compile
        if placement.offload == "block":
            BlockStreamer(fusion, placement.device)
        compiled = wants_compile(
            engine.compile, placement.device, engine.fp8, placement.offload, parallel is not None
        )
        if compiled:
            compile_blocks(fusion)
        logger.info("%s", size_note(cfg.name, cfg.video_area))
        logger.info(
            "pipeline %s ready on %s (%s, attention %s, offload %s) in %.1fs",
            cfg.name,
            placement.device,
            str(placement.dtype).removeprefix("torch."),
            placement.attention,
            placement.offload,
            time.monotonic() - started,
        )
        pipe = cls(
            cfg,
            placement,
            fusion,
            text_encoder,
            video_vae,
            audio_decoder,
            visitors,
            parallel,
            engine.vae_tiling,
            choose_predict(engine.batch_guidance, parallel),
        )
        pipe.compiled = compiled
        if compiled and leader:
            try:
                pipe.warm_up()
            except Exception as exc:  # inductor/Triton failures come as many exception types
                if engine.compile == "on":
                    raise
                # "auto" must not keep a server from starting (no C compiler for Triton, say)
                logger.warning(
                    "compiling the fusion blocks failed (%s: %s); running eager. Pass --compile off to skip "
                    "the attempt, or --compile on to make it an error",
                    type(exc).__name__,
                    str(exc).splitlines()[0][:300] if str(exc) else "",
                )
                uncompile_blocks(fusion)
                pipe.compiled = False
        return pipe

    def warm_up(self) -> None:
        """Compiles the fusion blocks before the first request: one denoising step at the variant's
        square size and one at fal's default 992x512 (scaled to the variant's area), then one
        image-to-video step (its clean first frame gets per-token timesteps: other graphs). The second
        token count makes every graph's token dimension dynamic, so other resolutions and images of
        other aspects reuse them (engine/compiling.py; tests/engine/test_compiling.py)."""
        started = time.monotonic()
        cfg, device, dtype = self.cfg, self.placement.device, self.placement.dtype
        side = round(math.sqrt(cfg.video_area))
        for (width, height), i2v in (((side, side), False), (WARM_UP_SIZE, False), ((side, side), True)):
            req = self.resolve(GenerationRequest(WARM_UP_PROMPT, size=(width, height), steps=1, seed=0))
            shape = t2v_shape(height, width, cfg.video_area, cfg.video_latent_length, cfg.audio_latent_length)
            noise = initial_noise(shape.video_latent_shape, shape.audio_latent_shape, 0, device, dtype)
            contexts = self.encode_prompts([req.prompt, req.video_negative_prompt, req.audio_negative_prompt])
            # any clean first frame compiles the i2v graphs: zeros, shaped like an encoded image
            image = torch.zeros_like(noise.video[:, :1]) if i2v else None
            plan = make_plan(req.solver, 1, req.shift, req.guidance, device)
            with torch.inference_mode(), self._on_device("fusion") as fusion:
                denoise(fusion, noise, Conditioning(*contexts, image), plan, predict=self.predict)
        synchronize(device)
        self.warm_up_s = time.monotonic() - started
        logger.info("fusion blocks compiled and warmed up in %.1fs", self.warm_up_s)

    @property
    def broken(self) -> RankFailed | None:
        """Set when a rank of this pipeline's parallel group failed: it takes no more requests."""
        followers = None if self.parallel is None else self.parallel.followers
        return None if followers is None else followers.failure

    def close(self) -> None:
        """Lets the other ranks of a parallel pipeline exit; nothing to do for a single process."""
        if self.parallel is not None and self.parallel.is_leader:
            self.parallel.stop_followers()
            close_group()
            self.parallel = None

    # -------------------------------------------------------------------------------------- requests
    def resolve(self, request: GenerationRequest) -> ResolvedRequest:
        """Validates the request and fills in the variant's defaults; raises InvalidInput."""
        defaults = self.cfg.sampling
        check_request(self.cfg, request)
        for warning in validate_prompt(request.prompt).warnings:
            logger.warning("prompt: %s", warning)
        steps = defaults.steps if request.steps is None else request.steps
        solver = request.solver or defaults.solver
        slg_layer = defaults.slg_layer if request.slg_layer is None else request.slg_layer
        seed = secrets.randbelow(MAX_RANDOM_SEED + 1) if request.seed is None else request.seed
        side = round(math.sqrt(self.cfg.video_area))
        size = request.size or (side, side)
        return ResolvedRequest(
            prompt=format_prompt(request.prompt, self.cfg.prompt_style),
            image=request.image,
            size=size,
            steps=steps,
            seed=seed,
            solver=solver,
            shift=defaults.shift if request.shift is None else request.shift,
            guidance=Guidance(
                defaults.video_guidance_scale
                if request.video_guidance_scale is None
                else request.video_guidance_scale,
                defaults.audio_guidance_scale
                if request.audio_guidance_scale is None
                else request.audio_guidance_scale,
                slg_layer,
            ),
            video_negative_prompt=(
                defaults.video_negative_prompt
                if request.video_negative_prompt is None
                else request.video_negative_prompt
            ),
            audio_negative_prompt=(
                defaults.audio_negative_prompt
                if request.audio_negative_prompt is None
                else request.audio_negative_prompt
            ),
        )

    @torch.inference_mode()
    def generate(
        self,
        request: GenerationRequest,
        out_path: str | Path,
        on_progress: ProgressCallback = ignore_progress,
    ) -> Clip:
        """Runs one generation and writes the MP4 to `out_path`.

        Raises InvalidInput (bad prompt or image), errors.Cancelled (raised by `on_progress`), and
        whatever the device raises (e.g. torch.OutOfMemoryError) for the caller to report.
        """
        req = self.resolve(request)
        cfg, device, dtype = self.cfg, self.placement.device, self.placement.dtype
        timings: dict[str, float] = {}

        image_latent = None
        if req.image is not None:
            with _timed(device, timings, "encode_image"):
                on_progress(Progress("encode_image", 0, 1))
                # request input: URLs and data URIs only (the CLI turns a path into a data URI)
                first_frame = load_first_frame(
                    req.image, cfg.video_area, allow_paths=False, device=device, dtype=dtype
                )  # [1, 3, 1, H, W]
                with self._on_device("video_vae") as video_vae:
                    image_latent = video_vae.encode(first_frame)[0].to(device, dtype)  # [48, 1, h, w]
                on_progress(Progress("encode_image", 1, 1))
            # the first frame was resized to the variant's area: its size is the video's
            shape = generation_shape(
                *first_frame.shape[-2:], cfg.video_latent_length, cfg.audio_latent_length
            )
        else:
            width, height = req.size
            if area_warning(height, width, cfg.video_area) and req.size not in self._sizes_warned:
                self._sizes_warned.add(req.size)
                logger.warning(
                    "requested %dx%d is more than 10%% off the %s model's area of %d pixels; it is scaled "
                    "to that area keeping its aspect (said once per size)",
                    width,
                    height,
                    cfg.name,
                    cfg.video_area,
                )
            shape = t2v_shape(height, width, cfg.video_area, cfg.video_latent_length, cfg.audio_latent_length)

        with _timed(device, timings, "encode_text"):
            on_progress(Progress("encode_text", 0, 1))
            positive, video_negative, audio_negative = self.encode_prompts(
                [req.prompt, req.video_negative_prompt, req.audio_negative_prompt]
            )
            on_progress(Progress("encode_text", 1, 1))

        noise = initial_noise(shape.video_latent_shape, shape.audio_latent_shape, req.seed, device, dtype)
        plan = make_plan(req.solver, req.steps, req.shift, req.guidance, device)
        cond = Conditioning(positive, video_negative, audio_negative, image_latent)
        with _timed(device, timings, "denoise"), self._on_device("fusion") as fusion:
            on_progress(Progress("denoise", 0, req.steps))
            on_step = _denoise_progress(on_progress)
            if self.parallel is None:
                latents = denoise(fusion, noise, cond, plan, on_step, self.predict)
            else:  # every rank denoises; the text contexts travel with the job, encoded once here
                job = DenoiseJob(
                    Latents(noise.video.cpu(), noise.audio.cpu()),
                    Conditioning(
                        *(
                            None if u is None else u.cpu()
                            for u in (positive, video_negative, audio_negative, image_latent)
                        )
                    ),
                    req.solver,
                    req.steps,
                    req.shift,
                    req.guidance,
                )
                latents = self.parallel.denoise(fusion, job, on_step)

        # decode and encode overlap: each latent frame's pixels go to the H.264 encoder thread while the
        # next one decodes; "mux" is what is left after the last chunk (the encoder's tail, the audio)
        temporal, _ = compression(cfg.video_vae)
        latent_frames = latents.video.shape[1]
        with Mp4Writer(out_path, fps=cfg.fps, sample_rate=self.audio_decoder.sample_rate) as writer:
            with _timed(device, timings, "decode"):
                on_progress(Progress("decode", 0, 1 + latent_frames))
                with self._on_device("audio_decoder") as audio_decoder:
                    waveform = audio_decoder.decode(latents.audio.T[None])[0]  # [N] at 16 kHz
                on_progress(Progress("decode", 1, 1 + latent_frames))
                with self._on_device("video_vae") as video_vae:
                    self._plan_tiling(video_vae, tuple(latents.video[None].shape))
                    # closed here on an error or a cancel, not whenever the garbage collector gets to it
                    with closing(video_vae.decode_chunks(latents.video[None])) as chunks:
                        for chunk in chunks:  # [1, 3, t, H, W] float32
                            # uint8 [t, H, W, 3] on the device: 4x less to copy, in the encoder's layout
                            writer.add(video_to_uint8(chunk[0]).permute(1, 2, 3, 0).contiguous().cpu())
                            # latent frames decoded so far (a tiled decode comes as one chunk)
                            done = 1 + (writer.num_frames - 1) // temporal
                            on_progress(Progress("decode", 1 + done, 1 + latent_frames))
            with _timed(device, timings, "mux"):
                on_progress(Progress("mux", 0, 1))
                path = writer.close(waveform.float().cpu())
                on_progress(Progress("mux", 1, 1))

        num_frames = writer.num_frames
        return Clip(
            path=Path(path),
            seed=req.seed,
            width=shape.width + shape.width % 2,
            height=shape.height + shape.height % 2,
            num_frames=num_frames,
            fps=cfg.fps,
            duration_s=num_frames / cfg.fps,
            timings=timings,
        )

    def encode_prompts(self, prompts: list[str]) -> list[Tensor]:
        """Text contexts [L_i, dim] on the device; prompts seen recently (the default negative prompts
        above all) come from a cache and the text encoder runs only for the others. Exact: an
        encoding does not depend on the batch it was computed in (padded keys are masked)."""
        missing = list(dict.fromkeys(p for p in prompts if p not in self._text_cache))
        if missing:
            with self._on_device("text_encoder") as text_encoder:
                encoded = text_encoder.encode(missing)
            for prompt, context in zip(missing, encoded, strict=True):
                # a copy: the encoder's output is a view of the whole padded batch, which it would keep alive
                self._text_cache[prompt] = context.to(self.placement.device, self.placement.dtype, copy=True)
        for prompt in prompts:
            self._text_cache.move_to_end(prompt)
        while len(self._text_cache) > TEXT_CACHE_SIZE:
            self._text_cache.popitem(last=False)
        return [self._text_cache[p] for p in prompts]

    def _plan_tiling(self, video_vae: VideoVAE, latent_shape: tuple[int, ...]) -> None:
        """Tiles the decode only when told to, or (auto) when an untiled one would not fit; logs why."""
        if self.vae_tiling != "auto":
            video_vae.set_tiling(self.vae_tiling == "on")
            logger.info(
                "video decode %s (--vae-tiling %s)",
                "tiled" if self.vae_tiling == "on" else "untiled",
                self.vae_tiling,
            )
            return
        plan = plan_tiling(
            latent_shape, self.cfg.video_vae, free_memory(self.placement.device, self.placement.memory_limit)
        )
        video_vae.set_tiling(plan.tiled)
        logger.info("video decode %s", plan.describe())

    @contextmanager
    def _on_device(self, name: str) -> Iterator[nn.Module]:
        """The model `name`, on the device for the duration of its stage (see `visiting_modules`)."""
        module = getattr(self, name)
        if name not in self.visitors:
            yield module
            return
        if name in self._streamers:  # its layers visit one by one as they run
            try:
                yield module
            finally:
                self._streamers[name].release_all()  # only left onloaded by a forward that raised
            return
        weights = self._host_weights[name]
        weights.onload(self.placement.device)
        try:
            yield module
        finally:
            weights.offload()


def _follow(group: ParallelGroup, engine: EngineConfig) -> None:
    """Rank > 0 of a parallel pipeline: load the fusion model, then denoise rank 0's jobs."""
    pipeline = OviPipeline.from_config(engine, group)
    group.follow(pipeline.fusion)


WARM_UP_PROMPT = "A warm-up."  # any prompt compiles the same graphs
WARM_UP_SIZE = (992, 512)  # fal's default request, a second token count beside the variant's square


def visiting_modules(placement: Placement) -> frozenset[str]:
    """Models loaded into host memory that visit the device only for their stage.

    "model" offload: all four. "block": all but the fusion model, which `BlockStreamer` streams block
    by block. On a GPU without offloading, the text encoder (umt5-xxl, 10.6 GiB in bf16) starts in
    host memory too; `from_config` moves it to the GPU for good when `text_encoder_fits`.
    """
    if placement.device.type == "cpu":
        return frozenset()
    if placement.offload == "model":
        return frozenset({"fusion", "text_encoder", "video_vae", "audio_decoder"})
    if placement.offload == "block":
        return frozenset({"text_encoder", "video_vae", "audio_decoder"})
    return frozenset({"text_encoder"})


def choose_predict(batch_guidance: str, parallel: ParallelGroup | None) -> Predict:
    """--batch-guidance: "on" runs both guidance passes as one batch-2 forward; "auto" is off until a GPU
    A/B measurement says where it pays. A parallel group has its own guidance (engine/parallel.py)."""
    if batch_guidance != "on":
        return guided_predict
    if parallel is not None:
        logger.warning(
            "--batch-guidance on is ignored with --sp/--cfg-parallel: the parallel ranks run the two "
            "guidance passes themselves"
        )
        return guided_predict
    logger.info("batched guidance: the positive and negative passes run as one batch-2 forward")
    return batched_predict


def _denoise_progress(on_progress: ProgressCallback) -> StepCallback:
    """The sampler's step callback as "denoise" Progress events that can render a live preview."""

    def on_step(done: int, total: int, x: Latents) -> None:
        on_progress(Progress("denoise", done, total, preview=lambda: preview_png(x.video)))

    return on_step


# Device memory denoising needs beyond the weights (latents, text contexts, solver state, one block's
# activations), per video token of the variant's default frame. Measured on an H200 (benchmarks/RESULTS.md,
# second GPU run, batch guidance item): 704x704, 15,004 video tokens, peaked 1.3 GiB above the weights
# eager (0.9 compiled): 93 KB a token; twice that with both guidance passes in one batch. Taken with a
# 1.5x margin, plus 1 GiB for what does not scale with tokens (cuBLAS and cuDNN workspaces, the
# allocator's fragmentation): 3.0 GiB for 720x720_5s, 8.1 GiB for 960x960_10s.
DENOISE_BYTES_PER_TOKEN = int(93_000 * 1.5)
DENOISE_FIXED_BYTES = 2**30


def denoise_reserve_bytes(cfg: OviConfig, batched: bool = False) -> int:
    """Device memory to keep free for denoising the variant's default frame (see above)."""
    tokens = _square_shape(cfg).video_tokens
    return DENOISE_FIXED_BYTES + tokens * DENOISE_BYTES_PER_TOKEN * (2 if batched else 1)


def _square_shape(cfg: OviConfig) -> GenerationShape:
    """The variant's default frame (square, its pixel area): what the memory reserves are sized for."""
    side = round(math.sqrt(cfg.video_area))
    return t2v_shape(side, side, cfg.video_area, cfg.video_latent_length, cfg.audio_latent_length)


def text_encoder_fits(
    cfg: OviConfig, model_bytes: int, total_bytes: int | None, batched: bool = False
) -> bool:
    """Whether every model (the text encoder included) and the working reserve (an untiled decode and
    denoising) fit on the device at once; then the text encoder stays there instead of visiting for
    every new prompt."""
    if total_bytes is None:
        return False
    decode = decode_memory_estimate(_square_shape(cfg).video_latent_shape, cfg.video_vae)
    reserve = decode + denoise_reserve_bytes(cfg, batched)
    fits = model_bytes + reserve <= total_bytes
    logger.info(
        "text encoder %s: models %.1f GiB + reserve %.1f GiB %s %.1f GiB of device memory",
        "stays on the device"
        if fits
        else "visits the device per new prompt, layer by layer from pinned host memory",
        model_bytes / 2**30,
        reserve / 2**30,
        "<=" if fits else ">",
        total_bytes / 2**30,
    )
    return fits


def choose_offload(
    cfg: OviConfig, placement: Placement, total_bytes: int | None, batched: bool = False
) -> str:
    """--offload auto: "none" when the fusion model, both decoders and the denoising reserve fit in the
    device's memory (the text encoder visits if it does not fit beside them, and the decode tiles when
    free memory is short), else "block", which streams the fusion model from host memory."""
    if total_bytes is None:
        return "none"
    reserve = denoise_reserve_bytes(cfg, batched)
    needed = resident_model_bytes(cfg, placement) + reserve
    choice = "none" if needed <= total_bytes else "block"
    logger.info(
        "--offload auto: %s (fusion model and decoders %.1f GiB + denoising reserve %.1f GiB %s %.1f GiB "
        "of device memory)",
        choice,
        (needed - reserve) / 2**30,
        reserve / 2**30,
        "<=" if choice == "none" else ">",
        total_bytes / 2**30,
    )
    return choice


def resident_model_bytes(cfg: OviConfig, placement: Placement) -> int:
    """The device memory of the fusion model and both decoders, known from meta builds before any
    weight is read: the fusion in the placement dtype (its Linear weights in one byte under --fp8), the
    video VAE in float32 (media/video_vae.py), the audio decoder and vocoder at most float32."""
    fusion = build_fusion(cfg.video, cfg.audio)
    size = meta_bytes(fusion, placement.dtype)
    if placement.fp8_storage:
        params = dict(fusion.named_parameters())
        size -= sum(
            params[n].numel() * (placement.dtype.itemsize - 1)
            for n in layerwise_cast_params(fusion)
            if n.endswith(".weight")
        )
    with meta_device():
        decoders = (
            build_autoencoder(cfg.video_vae),
            AudioVAE(cfg.audio_vae, with_encoder=False),
            BigVGAN(cfg.vocoder),
        )
    return size + sum(meta_bytes(m, torch.float32) for m in decoders)


def module_bytes(module: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in (*module.parameters(), *module.buffers()))


def meta_bytes(module: nn.Module, dtype: torch.dtype) -> int:
    """What a meta-built module will take once its floating tensors are materialised in `dtype`."""
    return sum(
        t.numel() * (dtype.itemsize if t.is_floating_point() else t.element_size())
        for t in (*module.parameters(), *module.buffers())
    )


@contextmanager
def _timed(device: torch.device, timings: dict[str, float], stage: str) -> Iterator[None]:
    """Seconds spent in a stage, with the device synchronised so queued kernels are counted. Not when
    the stage raised: after a parallel rank died, queued NCCL kernels would keep that wait from ending."""
    synchronize(device)
    started = time.perf_counter()
    yield
    synchronize(device)
    timings[stage] = time.perf_counter() - started
