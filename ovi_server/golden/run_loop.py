"""Golden `loop`: the whole denoising loop (noise, guidance, solvers, i2v conditioning) on a tiny model."""

from __future__ import annotations

from collections import defaultdict

import torch
from torch import Tensor

from ovi_server.config import dit_config
from ovi_server.engine.device import CPU_FP32, Placement
from ovi_server.engine.parallel import ParallelGroup
from ovi_server.engine.sampler import Conditioning, Guidance, Latents, denoise, initial_noise, make_plan
from ovi_server.engine.solvers import Solver
from ovi_server.golden.cases import CaseResult, Comparison, GoldenCase
from ovi_server.media.images import image_to_first_frame
from ovi_server.models.fusion import OviFusion, load_fusion
from ovi_server.prompt import format_prompt
from ovi_server.shapes import snap_hw_to_multiple_of_32


class _RecordingModel:
    """Calls the real model and keeps what went in and came out, per pass."""

    def __init__(self, model: OviFusion, record: dict[str, list[Tensor]]):
        self.model, self.record = model, record

    def __call__(self, video, audio, t, video_context, audio_context, **kwargs):
        video_pred, audio_pred = self.model(video, audio, t, video_context, audio_context, **kwargs)
        negative = "slg_layer" in kwargs
        if not negative:
            self.record["model_in_video"].append(video[0])
            self.record["model_in_audio"].append(audio[0])
            self.record["model_t"].append(t.reshape(()).double())
        kind = "neg" if negative else "pos"
        self.record[f"pred_video_{kind}"].append(video_pred[0])
        self.record[f"pred_audio_{kind}"].append(audio_pred[0])
        return video_pred, audio_pred


class _RecordingSolver(Solver):
    def __init__(self, solver: Solver, record: list[Tensor]):
        super().__init__(solver.scheduler)
        self.record = record

    def step(self, velocity: Tensor, t: Tensor, x: Tensor) -> Tensor:
        out = super().step(velocity, t, x)
        self.record.append(out)
        return out


def run_case(
    case: GoldenCase, placement: Placement = CPU_FP32, parallel: ParallelGroup | None = None
) -> CaseResult:
    """The case through our loader and model on `placement` (CPU float32 by default, as the reference ran).

    With `parallel` (every rank runs this), the model runs sequence parallel and, with CFG parallel,
    each pass on its own ranks; the passes' records are pooled from the ranks before comparing."""
    cfg, tensors = case.config, case.tensors
    cmp = Comparison(case.tolerance)
    sent = cfg.get("texts_sent_to_text_encoder")
    if sent is not None:
        formatted = {format_prompt(cfg["text_prompt"], style) for style in ("audcap", "audio_colon")}
        if sent[0] not in formatted:
            cmp.failures.append(
                f"prompt sent to the text encoder {sent[0]!r} is none of ours {sorted(formatted)}"
            )
        # [prompt, video negative, audio negative]: the negatives are the case's own, not necessarily ours
        cmp.exact("texts sent to the text encoder", len(sent), 3)

    model = load_fusion(
        case.weight_path(),
        dit_config(cfg["fusion_video"], f"{case.name}:video"),
        dit_config(cfg["fusion_audio"], f"{case.name}:audio"),
        placement,
    )
    if parallel is not None:
        parallel.apply(model)
    image_latent = None
    if cfg["mode"] == "i2v":
        image_latent = tensors["image_latent"][0]  # [48, 1, h, w]: what the VAE encoder returned
        latent_h, latent_w = image_latent.shape[-2:]
    else:
        height, width = snap_hw_to_multiple_of_32(*cfg["video_frame_height_width"], area=cfg["target_area"])
        latent_h, latent_w = height // 16, width // 16
    video_channels = model.video_model.cfg.in_dim
    audio_channels = model.audio_model.cfg.in_dim
    noise = initial_noise(
        (video_channels, cfg["video_latent_length"], latent_h, latent_w),
        (cfg["audio_latent_length"], audio_channels),
        int(cfg["seed"]),
        torch.device("cpu"),
        torch.float32,
    )
    cmp.tensor("video_noise_init", noise.video, tensors["video_noise_init"])
    cmp.tensor("audio_noise_init", noise.audio, tensors["audio_noise_init"])
    # the reference drew the noise on the CPU; other devices start from the same numbers
    device = placement.device
    noise = Latents(noise.video.to(device, placement.dtype), noise.audio.to(device, placement.dtype))

    record: dict[str, list[Tensor]] = defaultdict(list)
    guidance = Guidance(cfg["video_guidance_scale"], cfg["audio_guidance_scale"], int(cfg["slg_layer"]))
    plan = make_plan(cfg["solver"], int(cfg["steps"]), float(cfg["shift"]), guidance, device)
    plan.video_solver = _RecordingSolver(plan.video_solver, record["latent_video_after_step"])
    plan.audio_solver = _RecordingSolver(plan.audio_solver, record["latent_audio_after_step"])
    cond = Conditioning(
        positive=tensors["video_context_pos"].to(device),
        video_negative=tensors["video_context_neg"].to(device),
        audio_negative=tensors["audio_context_neg"].to(device),
        image_latent=None if image_latent is None else image_latent.to(device),
    )
    recording = _RecordingModel(model, record)
    if parallel is None:
        final = denoise(recording, noise, cond, plan)  # type: ignore[arg-type]
    else:
        final = denoise(recording, noise, cond, plan, predict=parallel.guided_predict)  # type: ignore[arg-type]
        # under CFG parallel the negative pass ran on other ranks: take its records from them
        pooled: list[dict[str, list[Tensor]]] = [{} for _ in range(torch.distributed.get_world_size())]
        torch.distributed.all_gather_object(pooled, dict(record))
        for other in pooled:
            for name, values in other.items():
                record.setdefault(name, values)

    produced = {name: torch.stack(values) for name, values in record.items()}
    produced["timesteps"] = plan.timesteps.double()
    produced["final_video_latent"], produced["final_audio_latent"] = final.video, final.audio
    for name in case.spec.get("outputs", {}):
        if name in ("video_noise_init", "audio_noise_init"):
            continue
        if name == "first_frame":  # the i2v image preprocessing the pipeline runs before the VAE
            first_frame = image_to_first_frame(tensors["image_uint8_hwc"].numpy(), int(cfg["target_area"]))
            cmp.tensor(name, first_frame, tensors[name])
            continue
        if name not in produced:
            cmp.failures.append(f"{name}: not produced")
            continue
        cmp.tensor(name, produced[name], tensors[name])
    return cmp.result(case)
