"""Golden cases for `fusion`, `loop` and `sampler`, drawn at random and computed by the reference.

    python -m benchmarks.differential.fusion --reference DIR --out OUT [--seed S] [--cases N]

writes OUT/fusion, OUT/loop and OUT/sampler in the format of tests/golden (same case keys, tensor
names and tolerances as the public manifests). The reference (character-ai/Ovi) is imported from DIR
by benchmarks/reference.py, with its two deviations (SDPA for flash-attn, bf16 casts rewritten to
float32), on the CPU.

* fusion: per kind of call (t2v, negative context with skip-layer guidance, i2v, batch of 2 padded
  past its longest item) N cases, each with its own random tower config (width, heads with any even
  head_dim, 1-4 blocks, FFN and time-embedding widths per tower, text length and width, in/out
  channels, qk_norm, cross_attn_norm, eps, audio RoPE scaling, sometimes another video patch size or
  model_type t2v), latents, contexts, timesteps (float or int64, per item) and weights. Every
  parameter is random, norms and modulation tables included. Intermediates come from wrapping the
  reference model's own `prepare_transformer_block_kwargs` and `single_fusion_block_forward` on the
  instance, so its forward runs as written.
* loop: per mode (t2v, i2v) N cases through the reference's own `OviFusionEngine.generate`. Its
  `__init__` loads the real checkpoints, so the engine is made with `__new__` and given what
  `__init__` would set: the reference FusionModel on random weights (wrapped to record what goes in
  and comes out of each pass), a text encoder that returns given contexts (and records the texts it
  was sent), a video VAE whose encode returns a random latent of the right size for the first frame
  and whose decode is the identity, an identity audio VAE decode. `get_scheduler_time_steps` is the
  engine's own, wrapped to record each scheduler's outputs. i2v images go in as PIL images through the
  reference's `preprocess_image_tensor`. Solver, steps (1-6), shift, seed, guidance scales, slg_layer,
  prompt style (720x720 or 960x960 formatter), latent lengths, target area and requested size vary.
* sampler: one schedule case (N random (steps 1-50, shift 1-10) per solver) and N trajectories per
  solver (unipc, dpm++, euler), the schedulers built by the engine's `get_scheduler_time_steps`.
"""

from __future__ import annotations

import math
import random
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from benchmarks.differential import ComponentWriter, generator_main, seeded, shapes
from benchmarks.reference import load_engine, load_reference

NOTES = (
    "float32 on CPU; flash attention replaced by SDPA; hard-coded bf16 casts mapped to float32 (see README)"
)
FUSION_TOLERANCE = {"atol": 5e-05, "rtol": 0.0001}
LOOP_TOLERANCE = {"atol": 0.0001, "rtol": 0.0001}
WEIGHT_FORMAT = "FusionModel state dict, key names of Ovi/model.safetensors (float32 here, bf16 there)"
PROMPTS = (
    "A man speaks. <S>Hello there.<E> Audio: soft room tone",
    "A cat. <AUDCAP>purring<ENDAUDCAP>",
    "Two people talk. <S>Where is it?<E> <S>Over there.<E> <AUDCAP>street noise, birds<ENDAUDCAP>",
    "A drummer plays. Audio: drums\nand cymbals",
    "A quiet lake at dawn.",
)
NEGATIVES = ("jitter, bad hands, blur, distortion", "robotic, muffled, echo, distorted", "", "low quality")
SOLVERS = ("unipc", "dpm++", "euler")


# ------------------------------------------------------------------------------------------ configs


def tower_configs(rng: random.Random, loop: bool = False) -> tuple[dict[str, Any], dict[str, Any]]:
    """Random tiny video and audio configs the reference accepts together: both towers share width,
    heads and depth (its cross-modal projections map one tower's width onto the other's heads)."""
    num_heads = rng.choice((1, 2, 2, 3, 4))
    head_dim = rng.choice((2, 4, 6, 8, 10, 12, 16, 16, 18, 24))
    num_layers = rng.randint(1, 4)
    text_dim = rng.choice((8, 16, 32))

    def tower(audio: bool) -> dict[str, Any]:
        if audio:
            in_dim = 20 if rng.random() < 0.7 else rng.randint(3, 24)
            out_dim = in_dim if loop or rng.random() < 0.8 else rng.randint(3, 24)
            patch, model_type = [1], "t2a"
        else:
            in_dim = 48 if rng.random() < 0.7 else rng.randint(3, 48)
            out_dim = in_dim if loop or rng.random() < 0.8 else rng.randint(3, 48)
            patch = (
                [1, 2, 2] if loop or rng.random() < 0.75 else rng.choice(([1, 1, 1], [2, 2, 2], [1, 2, 1]))
            )
            model_type = "ti2v" if loop or rng.random() < 0.85 else "t2v"
        cfg = {
            "patch_size": patch,
            "model_type": model_type,
            "dim": num_heads * head_dim,
            "ffn_dim": rng.randint(8, 160),
            "freq_dim": rng.choice((16, 32, 64, 256)),
            "num_heads": num_heads,
            "num_layers": num_layers,
            "in_dim": in_dim,
            "out_dim": out_dim,
            "text_len": rng.randint(8, 24),
            "text_dim": text_dim if loop or rng.random() < 0.8 else rng.choice((8, 16, 32)),
            "window_size": [-1, -1],
            "qk_norm": rng.random() < 0.8,
            "cross_attn_norm": rng.random() < 0.8,
            "eps": rng.choice((1e-6, 1e-6, 1e-5, 1e-2)),
        }
        if audio:
            cfg["temporal_rope_scaling_factor"] = rng.choice((0.19676, 1.0, round(rng.uniform(0.05, 2.0), 5)))
        return cfg

    return tower(audio=False), tower(audio=True)


def random_weights(fusion_module: Any, video: dict, audio: dict, rng: random.Random) -> dict[str, Tensor]:
    """Every parameter of the reference FusionModel at random (norm gains near 1, modulation tables,
    biases, the zero-initialised head), key names as in Ovi/model.safetensors."""
    with torch.device("meta"):
        model = fusion_module.FusionModel(video, audio)
    gen = seeded(rng)
    fusion_scale = rng.choice((0.1, 1.0))  # the reference initialises video's fusion projections /10
    weights = {}
    for name, p in model.state_dict().items():
        shape = tuple(p.shape)
        noise = torch.randn(shape, generator=gen)
        leaf = name.rsplit(".", 1)[-1]
        if "modulation" in name:
            w = 0.3 * noise
        elif "norm" in name and leaf == "weight":
            w = 1.0 + 0.2 * noise
        elif leaf == "bias":
            w = (0.1 if "norm" in name else 0.05) * noise
        elif "text_embedding" in name or "time_embedding" in name:
            w = 0.02 * noise
        else:  # Linear / Conv weights: Xavier-sized
            fan_in = math.prod(shape[1:])
            fan_out = shape[0] * math.prod(shape[2:])
            w = noise * math.sqrt(2.0 / (fan_in + fan_out))
            if name.startswith("video_model") and "_fusion" in name:
                w = w * fusion_scale
        weights[name] = w.contiguous()
    return weights


def build_model(fusion_module: Any, video: dict, audio: dict, weights: dict[str, Tensor]) -> Any:
    with torch.device("meta"):
        model = fusion_module.FusionModel(video, audio)
    model.load_state_dict(weights, strict=True, assign=True)
    model.set_rope_params()  # RoPE tables are plain attributes, built on the meta device above
    return model.eval().requires_grad_(False)


def video_shape(rng: random.Random, cfg: dict, max_tokens: int = 24) -> list[int]:
    """[in_dim, F, H, W] divisible by the patch, at most `max_tokens` tokens."""
    pf, ph, pw = cfg["patch_size"]
    while True:
        f, h, w = rng.randint(1, 3), rng.randint(1, 4), rng.randint(1, 4)
        if f * h * w <= max_tokens:
            return [cfg["in_dim"], f * pf, h * ph, w * pw]


def tokens_of(cfg: dict, shape: list[int]) -> int:
    return math.prod(s // p for s, p in zip(shape[1:], cfg["patch_size"], strict=True))


# ------------------------------------------------------------------------------------------- fusion


def fusion_cases(ref: Any, writer: ComponentWriter, rng: random.Random, cases: int) -> None:
    kinds = ("t2v", "t2v_slg", "i2v", "batch2_padded")
    for number in range(cases):
        for kind in kinds:
            video, audio = tower_configs(rng)
            name = f"fusion_{kind}_{number}"
            batch = 2 if kind == "batch2_padded" else rng.choice((1, 1, 2))
            num_layers = video["num_layers"]
            slg_layer = rng.randint(1, num_layers - 1) if kind == "t2v_slg" and num_layers > 1 else 0
            if kind != "t2v_slg" and rng.random() < 0.2:
                slg_layer = rng.randint(0, num_layers + 1)  # past the last block: nothing skipped
            clean = kind == "i2v" or rng.random() < 0.15
            gen = seeded(rng)
            inputs: dict[str, Tensor] = {}
            video_tokens, audio_tokens = [], []
            for b in range(batch):
                v_shape = video_shape(rng, video, max_tokens=rng.choice((24, 48)))
                a_len = rng.randint(1, rng.choice((20, 40)))
                inputs[f"vid_in_{b}"] = torch.randn(v_shape, generator=gen)
                inputs[f"audio_in_{b}"] = torch.randn(a_len, audio["in_dim"], generator=gen)
                video_tokens.append(tokens_of(video, v_shape))
                audio_tokens.append(a_len)
                v_len = rng.randint(1, video["text_len"])
                shared = (
                    kind == "t2v" and video["text_dim"] == audio["text_dim"] and v_len <= audio["text_len"]
                )
                a_len_text = v_len if shared else rng.randint(1, audio["text_len"])
                inputs[f"vid_context_{b}"] = torch.randn(v_len, video["text_dim"], generator=gen)
                inputs[f"audio_context_{b}"] = (
                    inputs[f"vid_context_{b}"].clone()
                    if shared
                    else torch.randn(a_len_text, audio["text_dim"], generator=gen)
                )
            pad = kind == "batch2_padded" or rng.random() < 0.3
            vid_seq_len = max(video_tokens) + (rng.randint(1, 4) if pad else 0)
            audio_seq_len = max(audio_tokens) + (rng.randint(1, 4) if pad else 0)
            if rng.random() < 0.3:
                t = torch.tensor([rng.choice((0, 999, rng.randint(0, 999))) for _ in range(batch)])
            else:
                t = torch.tensor(
                    [rng.choice((0.0, 1000.0, round(rng.uniform(0, 1000), 3))) for _ in range(batch)]
                )
            inputs = {"t": t, **inputs}

            weights = random_weights(ref.fusion_module, video, audio, rng)
            model = build_model(ref.fusion_module, video, audio, weights)
            outputs = run_reference_fusion(model, inputs, batch, vid_seq_len, audio_seq_len, clean, slg_layer)
            inputs["vid_context_emb"] = outputs.pop("vid_context_emb")
            inputs["audio_context_emb"] = outputs.pop("audio_context_emb")
            config = {
                "video": video,
                "audio": audio,
                "vid_seq_len": vid_seq_len,
                "audio_seq_len": audio_seq_len,
                "first_frame_is_clean": clean,
                "slg_layer": slg_layer,
                "batch": batch,
            }
            weight_file = writer.tensors(f"{name}_weights.safetensors", weights)
            input_file = writer.tensors(f"{name}.safetensors", {**inputs, **outputs})
            writer.case(
                name=name,
                call=(
                    "FusionModel.forward(vid=[x_v, ...], audio=[x_a, ...], t, vid_context, audio_context, "
                    "vid_seq_len, audio_seq_len, first_frame_is_clean, slg_layer) -> ([v_pred], [a_pred])"
                ),
                config=config,
                weight_file=weight_file,
                weight_format=WEIGHT_FORMAT,
                input_file=input_file,
                inputs=shapes(inputs),
                outputs=shapes(outputs),
                dtype="float32 (grid_sizes / seq_lens int64; t float32 or int64)",
                tolerance=dict(FUSION_TOLERANCE),
            )


def run_reference_fusion(
    model: Any,
    inputs: dict[str, Tensor],
    batch: int,
    vid_seq_len: int,
    audio_seq_len: int,
    clean: bool,
    slg_layer: int,
) -> dict[str, Tensor]:
    """The reference forward as written, with its token layout and each block's outputs recorded."""
    seen: dict[str, Tensor] = {}
    for prefix, tower in (("vid", model.video_model), ("audio", model.audio_model)):
        prepare = tower.prepare_transformer_block_kwargs

        def recording_prepare(prefix: str = prefix, prepare: Any = prepare, **kwargs: Any) -> Any:
            x, e, block_kwargs = prepare(**kwargs)
            seen[f"{prefix}_embedded"] = x.clone()
            seen[f"{prefix}_time_emb"] = e.clone()
            seen[f"{prefix}_time_proj"] = block_kwargs["e"].clone()
            seen[f"{prefix}_context_emb"] = block_kwargs["context"].clone()
            seen[f"{prefix}_grid_sizes"] = block_kwargs["grid_sizes"].clone()
            seen[f"{prefix}_seq_lens"] = block_kwargs["seq_lens"].clone()
            return x, e, block_kwargs

        tower.prepare_transformer_block_kwargs = recording_prepare
    block_forward = model.single_fusion_block_forward
    video_blocks = list(model.video_model.blocks)

    def recording_block(**kwargs: Any) -> Any:
        vid, audio = block_forward(**kwargs)
        i = video_blocks.index(kwargs["vid_block"])
        seen[f"vid_block{i}_out"], seen[f"audio_block{i}_out"] = vid.clone(), audio.clone()
        return vid, audio

    model.single_fusion_block_forward = recording_block
    pick = lambda prefix: [inputs[f"{prefix}_{b}"] for b in range(batch)]  # noqa: E731
    with torch.inference_mode():
        video_out, audio_out = model(
            vid=pick("vid_in"),
            audio=pick("audio_in"),
            t=inputs["t"],
            vid_context=pick("vid_context"),
            audio_context=pick("audio_context"),
            vid_seq_len=vid_seq_len,
            audio_seq_len=audio_seq_len,
            first_frame_is_clean=clean,
            slg_layer=slg_layer,
        )
    order = ["embedded", "time_emb", "time_proj", "context_emb", "grid_sizes", "seq_lens"]
    outputs = {f"{p}_{k}": seen[f"{p}_{k}"] for k in order for p in ("vid", "audio")}
    for i in range(len(video_blocks)):
        if f"vid_block{i}_out" in seen:
            outputs[f"vid_block{i}_out"] = seen[f"vid_block{i}_out"]
            outputs[f"audio_block{i}_out"] = seen[f"audio_block{i}_out"]
    for b in range(batch):
        outputs[f"vid_out_{b}"] = video_out[b].clone()
    for b in range(batch):
        outputs[f"audio_out_{b}"] = audio_out[b].clone()
    return outputs


# --------------------------------------------------------------------------------------------- loop


class _RecordingModel:
    """The reference FusionModel, keeping what each pass got and returned (the engine reads
    `video_model` for the patch size)."""

    def __init__(self, model: Any, record: dict[str, list[Tensor]]):
        self.model, self.record = model, record
        self.video_model = model.video_model

    def __call__(self, vid: list[Tensor], audio: list[Tensor], t: Tensor, **kwargs: Any) -> Any:
        video_pred, audio_pred = self.model(vid=vid, audio=audio, t=t, **kwargs)
        kind = "neg" if "slg_layer" in kwargs else "pos"
        if kind == "pos":
            self.record["model_in_video"].append(vid[0].clone())
            self.record["model_in_audio"].append(audio[0].clone())
            self.record["model_t"].append(t.reshape(()).double())
        self.record[f"pred_video_{kind}"].append(video_pred[0].clone())
        self.record[f"pred_audio_{kind}"].append(audio_pred[0].clone())
        return video_pred, audio_pred


class _TextEncoder:
    """Returns the given [positive, video negative, audio negative] contexts; keeps the texts."""

    device = "cpu"

    def __init__(self, contexts: list[Tensor]):
        self.contexts, self.texts = contexts, None

    def __call__(self, texts: list[str], device: Any) -> list[Tensor]:
        self.texts = list(texts)
        return [c.clone() for c in self.contexts]


class _VideoVAE:
    """encode: a random latent [1, C, 1, H/16, W/16] for the first frame (kept with the frame);
    decode: the identity."""

    def __init__(self, channels: int, gen: torch.Generator):
        self.channels, self.gen = channels, gen
        self.first_frame = self.latent = None

    def wrapped_encode(self, video: Tensor) -> Tensor:
        self.first_frame = video.clone()  # [1, 3, 1, H, W]
        h, w = video.shape[-2] // 16, video.shape[-1] // 16
        self.latent = torch.randn(1, self.channels, 1, h, w, generator=self.gen)
        return self.latent.clone()

    def wrapped_decode(self, latent: Tensor) -> Tensor:
        return latent


class _AudioVAE:
    def wrapped_decode(self, latent: Tensor) -> Tensor:
        return latent


def recording_schedules(Engine: Any, engine: Any, record: dict[str, list[Tensor]]) -> Any:
    """The engine's own `get_scheduler_time_steps`; the first scheduler it makes is video's, the second
    audio's (as `generate` asks), and each keeps its `step` outputs and timesteps in `record`."""

    def recording_schedule(**kwargs: Any) -> Any:
        scheduler, timesteps = Engine.get_scheduler_time_steps(engine, **kwargs)
        which = "audio" if "timesteps_video" in record else "video"
        step = scheduler.step

        def recording_step(*args: Any, **kw: Any) -> Any:
            out = step(*args, **kw)
            record[f"latent_{which}_after_step"].append(out[0].squeeze(0).clone())
            return out

        scheduler.step = recording_step
        record[f"timesteps_{which}"] = [timesteps]
        return scheduler, timesteps

    return recording_schedule


def loop_cases(ref: Any, engine_module: Any, writer: ComponentWriter, rng: random.Random, cases: int) -> None:
    Engine = engine_module.OviFusionEngine
    specs = engine_module.NAME_TO_MODEL_SPECS_MAP
    for number in range(cases):
        for mode in ("t2v", "i2v"):
            video, audio = tower_configs(rng, loop=True)
            solver = rng.choice(SOLVERS)
            steps = rng.randint(1, 6)
            shift = rng.choice((5.0, 1.0, round(rng.uniform(1.0, 10.0), 2)))
            seed = rng.randrange(2**31)
            video_scale = rng.choice((4.0, 5.0, round(rng.uniform(1.0, 8.0), 2)))
            audio_scale = rng.choice((3.0, 4.0, round(rng.uniform(1.0, 8.0), 2)))
            slg_layer = rng.randint(0, video["num_layers"] - (0 if rng.random() < 0.15 else 1))
            model_name = rng.choice(sorted(specs))
            target_area = rng.choice((1024, 2048, 4096, 6144, 9216))
            video_latent_length = rng.randint(1, 4)
            audio_latent_length = rng.randint(2, 20)
            text_prompt = rng.choice(PROMPTS)
            video_negative, audio_negative = rng.choice(NEGATIVES), rng.choice(NEGATIVES)
            max_text = min(video["text_len"], audio["text_len"])
            gen = seeded(rng)
            contexts = {
                name: torch.randn(rng.randint(1, max_text), video["text_dim"], generator=gen)
                for name in ("video_context_pos", "video_context_neg", "audio_context_neg")
            }
            image = None
            frame_hw = image_hw = None
            if mode == "i2v":
                image_hw = [rng.randint(24, 160), rng.randint(24, 160)]
                image = torch.randint(0, 256, (*image_hw, 3), dtype=torch.uint8, generator=gen)
            else:
                frame_hw = [rng.randint(24, 200), rng.randint(24, 200)]

            weights = random_weights(ref.fusion_module, video, audio, rng)
            record: dict[str, list[Tensor]] = defaultdict(list)
            engine = Engine.__new__(Engine)
            text_model = _TextEncoder(
                [contexts["video_context_pos"], contexts["video_context_neg"], contexts["audio_context_neg"]]
            )
            video_vae = _VideoVAE(video["in_dim"], seeded(rng))
            engine.__dict__.update(
                device="cpu",
                target_dtype=torch.float32,
                cpu_offload=False,
                model=_RecordingModel(build_model(ref.fusion_module, video, audio, weights), record),
                image_model=None,
                text_model=text_model,
                vae_model_video=video_vae,
                vae_model_audio=_AudioVAE(),
                video_latent_channel=video["in_dim"],
                audio_latent_channel=audio["in_dim"],
                video_latent_length=video_latent_length,
                audio_latent_length=audio_latent_length,
                text_formatter=specs[model_name]["formatter"],
                target_area=target_area,
                model_name=model_name,
            )
            engine.get_scheduler_time_steps = recording_schedules(Engine, engine, record)
            result = engine.generate(
                text_prompt,
                image_path=None if image is None else Image.fromarray(image.numpy()),
                video_frame_height_width=frame_hw,
                seed=seed,
                solver_name=solver,
                sample_steps=steps,
                shift=shift,
                video_guidance_scale=video_scale,
                audio_guidance_scale=audio_scale,
                slg_layer=slg_layer,
                video_negative_prompt=video_negative,
                audio_negative_prompt=audio_negative,
            )
            if result is None:
                raise RuntimeError("the reference's generate failed (its traceback is logged above)")
            generated_video, generated_audio, _ = result

            # the noise the engine drew, drawn again the same way and checked against what it fed the model
            latent_h, latent_w = record["model_in_video"][0].shape[-2:]
            video_noise = torch.randn(
                (video["in_dim"], video_latent_length, latent_h, latent_w),
                generator=torch.Generator("cpu").manual_seed(seed),
            )
            audio_noise = torch.randn(
                (audio_latent_length, audio["in_dim"]), generator=torch.Generator("cpu").manual_seed(seed)
            )
            first = 1 if mode == "i2v" else 0
            assert torch.equal(record["model_in_video"][0][:, first:], video_noise[:, first:])
            assert torch.equal(record["model_in_audio"][0], audio_noise)
            timesteps = record.pop("timesteps_video")[0]
            assert torch.equal(timesteps, record.pop("timesteps_audio")[0])

            name = f"loop_{mode}_{solver.replace('++', 'pp')}{steps}_{number}"
            inputs: dict[str, Tensor] = {
                **contexts,
                "video_noise_init": video_noise,
                "audio_noise_init": audio_noise,
            }
            if mode == "i2v":
                inputs["image_uint8_hwc"] = image
                inputs["image_latent"] = video_vae.latent
            outputs: dict[str, Tensor] = {"video_noise_init": video_noise, "audio_noise_init": audio_noise}
            for key in ("model_in_video", "model_in_audio", "pred_video_pos", "pred_video_neg", "pred_audio_pos",
                        "pred_audio_neg", "latent_video_after_step", "latent_audio_after_step"):  # fmt: skip
                outputs[key] = torch.stack(record[key])
            outputs["timesteps"] = timesteps.double()
            outputs["model_t"] = torch.stack(record["model_t"])
            outputs["final_video_latent"] = torch.from_numpy(np.ascontiguousarray(generated_video))
            outputs["final_audio_latent"] = torch.from_numpy(
                np.ascontiguousarray(generated_audio)
            ).T.contiguous()
            if mode == "i2v":
                outputs["first_frame"] = video_vae.first_frame
            config = {
                "fusion_video": video,
                "fusion_audio": audio,
                "solver": solver,
                "steps": steps,
                "shift": shift,
                "seed": seed,
                "video_guidance_scale": video_scale,
                "audio_guidance_scale": audio_scale,
                "slg_layer": slg_layer,
                "mode": mode,
                "video_latent_length": video_latent_length,
                "audio_latent_length": audio_latent_length,
                "target_area": target_area,
                "video_frame_height_width": frame_hw,
                "image_hw": image_hw,
                "text_prompt": text_prompt,
                "texts_sent_to_text_encoder": text_model.texts,
                "noise": (
                    "video_noise = torch.randn((C, video_latent_length, H/16, W/16), generator="
                    "torch.Generator(device).manual_seed(seed), dtype); audio_noise = torch.randn("
                    "(audio_latent_length, C), generator=<fresh generator>.manual_seed(seed)); video drawn "
                    "first, each from its own freshly seeded generator (here device cpu, float32)"
                ),
            }
            writer.case(
                name=name,
                call=(
                    "OviFusionEngine.generate(text_prompt, image, video_frame_height_width, seed, solver_name, "
                    "sample_steps, shift, video_guidance_scale, audio_guidance_scale, slg_layer) with text "
                    "encoder / VAEs replaced by the given tensors (VAE decode = identity)"
                ),
                config=config,
                weight_file=writer.tensors(f"{name}_weights.safetensors", weights),
                weight_format="FusionModel state dict, key names of Ovi/model.safetensors",
                input_file=writer.tensors(f"{name}.safetensors", {**inputs, **outputs}),
                inputs=shapes(inputs),
                outputs=shapes(outputs),
                dtype="float32 (image_uint8_hwc uint8, timesteps/model_t float64 copies of the model's t)",
                tolerance=dict(LOOP_TOLERANCE),
            )


# ------------------------------------------------------------------------------------------ sampler


def sampler_cases(engine_module: Any, writer: ComponentWriter, rng: random.Random, cases: int) -> None:
    engine = engine_module.OviFusionEngine.__new__(engine_module.OviFusionEngine)

    def scheduler(solver: str, steps: int, shift: float) -> tuple[Any, Tensor]:
        return engine.get_scheduler_time_steps(steps, solver_name=solver, device="cpu", shift=shift)

    def draw_shift() -> float:
        return rng.choice((1.0, 5.0, round(rng.uniform(1.0, 10.0), 3)))

    index, tensors = [], {}
    for solver in SOLVERS:
        for i in range(cases):
            steps, shift = rng.choice((1, 2, rng.randint(1, 50))), draw_shift()
            s, timesteps = scheduler(solver, steps, shift)
            key = f"{solver}_n{steps}_shift{shift:g}_{i}"
            tensors[f"{key}_timesteps"], tensors[f"{key}_sigmas"] = timesteps.clone(), s.sigmas.clone()
            index.append({
                "solver": solver, "steps": steps, "shift": shift, "timesteps": f"{key}_timesteps",
                "sigmas": f"{key}_sigmas", "timesteps_dtype": str(timesteps.dtype),
                "timesteps_len": len(timesteps), "sigmas_len": len(s.sigmas),
            })  # fmt: skip
    writer.case(
        name="sampler_schedules",
        call="scheduler construction + set_timesteps as in the engine; timesteps fed to the model and sigmas",
        config={"num_train_timesteps": 1000},
        index=index,
        input_file=writer.tensors("sampler_schedules.safetensors", tensors),
        dtype="timesteps int64 (unipc, dpm++) / float32 (euler); sigmas float32",
        tolerance={"atol": 1e-06, "rtol": 1e-06, "timesteps": "exact"},
    )
    for solver in SOLVERS:
        for i in range(cases):
            steps, shift = rng.choice((1, 2, 3, rng.randint(1, 50))), draw_shift()
            sample_shape = [rng.randint(1, 5) for _ in range(rng.randint(1, 3))]
            gen = seeded(rng)
            s, timesteps = scheduler(solver, steps, shift)
            sample_init = torch.randn(sample_shape, generator=gen)
            model_outputs = torch.randn(steps, *sample_shape, generator=gen)
            x, samples = sample_init, []
            for j, t in enumerate(timesteps):
                x = s.step(model_outputs[j][None], t, x[None], return_dict=False)[0][0]
                samples.append(x)
            name = f"sampler_traj_{solver.replace('++', 'pp')}_n{steps}_shift{shift:g}_{i}"
            inputs = {"sample_init": sample_init, "model_outputs": model_outputs, "timesteps": timesteps}
            outputs = {"samples": torch.stack(samples)}
            writer.case(
                name=name,
                call=(
                    "for i, t in enumerate(timesteps): x = scheduler.step(model_outputs[i][None], t, x[None])[0][0]; "
                    "samples[i] = x"
                ),
                config={
                    "solver": solver,
                    "steps": steps,
                    "shift": shift,
                    "sample_shape": sample_shape,
                    "engine_constructor": f"OviFusionEngine.get_scheduler_time_steps(steps, {solver!r}, shift)",
                },  # fmt: skip
                input_file=writer.tensors(f"{name}.safetensors", {**inputs, **outputs}),
                inputs=shapes(inputs),
                outputs=shapes(outputs),
                dtype="float32",
                tolerance={"atol": 1e-05, "rtol": 1e-05},
            )


def generate(reference: Path, out: Path, rng: random.Random, cases: int) -> None:
    ref = load_reference(reference, torch.device("cpu"))
    engine_module = load_engine(ref)
    header = {"reference": "character-ai/Ovi", "notes": NOTES}
    for component, make in (
        ("fusion", lambda w: fusion_cases(ref, w, rng, cases)),
        ("loop", lambda w: loop_cases(ref, engine_module, w, rng, cases)),
        ("sampler", lambda w: sampler_cases(engine_module, w, rng, cases)),
    ):
        writer = ComponentWriter(out, component, **header)
        make(writer)
        writer.close()


if __name__ == "__main__":
    sys.exit(generator_main(generate))
