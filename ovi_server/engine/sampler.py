"""The joint denoising loop: guidance, solver steps, i2v conditioning, seeded noise."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from ovi_server.engine.solvers import Solver, make_solver
from ovi_server.models.fusion import OviFusion


@dataclass(frozen=True)
class Latents:
    video: Tensor  # [48, F, H/16, W/16]
    audio: Tensor  # [L, 20]


# on_step(done, total, x): after each step, with the latents so far (live previews read them); may raise
# errors.Cancelled to stop between steps.
StepCallback = Callable[[int, int, Latents], None]


def ignore_step(done: int, total: int, x: Latents) -> None:
    return None


@dataclass(frozen=True)
class Conditioning:
    """Text contexts [L_i, text_dim] (the positive one feeds both towers) and the i2v first frame."""

    positive: Tensor
    video_negative: Tensor
    audio_negative: Tensor
    image_latent: Tensor | None = None  # [48, 1, H/16, W/16], normalised; None for t2v


@dataclass(frozen=True)
class Guidance:
    video_scale: float = 4.0
    audio_scale: float = 3.0
    slg_layer: int = 11  # block skipped in the negative pass; 0 disables skip-layer guidance


@dataclass
class SamplingPlan:
    video_solver: Solver
    audio_solver: Solver
    guidance: Guidance

    @property
    def timesteps(self) -> Tensor:
        return self.video_solver.timesteps


def make_plan(
    solver: str, steps: int, shift: float, guidance: Guidance, device: torch.device
) -> SamplingPlan:
    """Each modality gets its own solver instance (multistep solvers keep history)."""
    return SamplingPlan(
        make_solver(solver, steps, shift, device), make_solver(solver, steps, shift, device), guidance
    )


def initial_noise(
    video_shape: tuple[int, ...],
    audio_shape: tuple[int, ...],
    seed: int,
    device: torch.device,
    dtype: torch.dtype,
) -> Latents:
    """Noise as the reference draws it: video from a generator seeded with `seed` on `device`, then audio
    from a second, freshly seeded generator with the same seed, so a seed reproduces the reference's
    latents on the same device type."""
    video = torch.randn(
        video_shape, generator=torch.Generator(device).manual_seed(seed), dtype=dtype, device=device
    )
    audio = torch.randn(
        audio_shape, generator=torch.Generator(device).manual_seed(seed), dtype=dtype, device=device
    )
    return Latents(video, audio)


def cfg(negative: Tensor, positive: Tensor, scale: float) -> Tensor:
    """Classifier-free guidance: neg + scale * (pos - neg)."""
    return negative + scale * (positive - negative)


def positive_pass(model: OviFusion, x: Latents, t: Tensor, cond: Conditioning) -> tuple[Tensor, Tensor]:
    """The full model on the positive prompt; (video, audio) velocity predictions."""
    video, audio = model(
        [x.video], [x.audio], t.reshape(1), [cond.positive], [cond.positive],
        first_frame_is_clean=cond.image_latent is not None,
    )  # fmt: skip
    return video[0], audio[0]


def negative_pass(
    model: OviFusion, x: Latents, t: Tensor, cond: Conditioning, guidance: Guidance
) -> tuple[Tensor, Tensor]:
    """Negative prompts with skip-layer guidance (block `slg_layer` skipped)."""
    video, audio = model(
        [x.video], [x.audio], t.reshape(1), [cond.video_negative], [cond.audio_negative],
        first_frame_is_clean=cond.image_latent is not None, slg_layer=guidance.slg_layer,
    )  # fmt: skip
    return video[0], audio[0]


def guided_predict(
    model: OviFusion, x: Latents, t: Tensor, cond: Conditioning, guidance: Guidance
) -> tuple[Tensor, Tensor]:
    """Positive pass (full model) and negative pass (negative prompts, skip-layer guidance), then CFG."""
    video_pos, audio_pos = positive_pass(model, x, t, cond)
    video_neg, audio_neg = negative_pass(model, x, t, cond, guidance)
    return cfg(video_neg, video_pos, guidance.video_scale), cfg(audio_neg, audio_pos, guidance.audio_scale)


def batched_predict(
    model: OviFusion, x: Latents, t: Tensor, cond: Conditioning, guidance: Guidance
) -> tuple[Tensor, Tensor]:
    """guided_predict with both passes as one batch-2 forward, [positive, negative] at the same t; block
    `slg_layer` runs on the positive item only. Equal to guided_predict up to float round-off."""
    video, audio = model(
        [x.video, x.video], [x.audio, x.audio], t.reshape(1).expand(2),
        [cond.positive, cond.video_negative], [cond.positive, cond.audio_negative],
        first_frame_is_clean=cond.image_latent is not None,
        slg_layer=guidance.slg_layer, slg_items=(False, True),
    )  # fmt: skip
    (video_pos, video_neg), (audio_pos, audio_neg) = video, audio
    return cfg(video_neg, video_pos, guidance.video_scale), cfg(audio_neg, audio_pos, guidance.audio_scale)


# guided_predict's signature: engine/parallel.py has one that runs the two passes on two process groups
Predict = Callable[[OviFusion, Latents, Tensor, Conditioning, Guidance], tuple[Tensor, Tensor]]


def with_first_frame(video: Tensor, image_latent: Tensor | None) -> Tensor:
    """i2v: the first latent frame is the encoded image, clean, before every step and at the end."""
    if image_latent is None:
        return video
    return torch.cat([image_latent.to(video.dtype), video[:, 1:]], dim=1)


@torch.inference_mode()
def denoise(
    model: OviFusion,
    x: Latents,
    cond: Conditioning,
    plan: SamplingPlan,
    on_step: StepCallback = ignore_step,
    predict: Predict = guided_predict,
) -> Latents:
    total = len(plan.timesteps)
    for i, t in enumerate(plan.timesteps):
        x = Latents(with_first_frame(x.video, cond.image_latent), x.audio)
        video_pred, audio_pred = predict(model, x, t, cond, plan.guidance)
        x = Latents(
            video=plan.video_solver.step(video_pred, t, x.video),
            audio=plan.audio_solver.step(audio_pred, t, x.audio),
        )
        on_step(i + 1, total, x)
    return Latents(with_first_frame(x.video, cond.image_latent), x.audio)
