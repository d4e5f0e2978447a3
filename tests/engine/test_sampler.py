"""Schedules, solvers and the denoising loop against the reference; seeds, guidance and cancellation."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ovi_server.config import dit_config
from ovi_server.engine.device import CPU_FP32
from ovi_server.engine.sampler import (
    Conditioning,
    Guidance,
    Latents,
    batched_predict,
    cfg,
    denoise,
    guided_predict,
    initial_noise,
    make_plan,
    with_first_frame,
)
from ovi_server.engine.schedule import model_timesteps, ovi_sigmas
from ovi_server.engine.solvers import make_solver
from ovi_server.errors import Cancelled
from ovi_server.golden import run_loop, run_sampler
from ovi_server.models.fusion import load_fusion
from tests.conftest import golden_cases


@pytest.mark.parametrize("case", golden_cases("sampler"), ids=lambda c: c.name)
def test_sampler_matches_reference(case):
    result = run_sampler.run_case(case)
    assert result.passed, result.line()


@pytest.mark.parametrize("case", golden_cases("loop"), ids=lambda c: c.name)
def test_denoising_loop_matches_reference(case):
    result = run_loop.run_case(case)
    assert result.passed, result.line()


def test_default_schedule_starts_at_999_and_ends_at_zero():
    sigmas = ovi_sigmas("unipc", 50, 5.0)
    assert model_timesteps(sigmas)[0] == 999
    solver = make_solver("unipc", 50, 5.0)
    assert solver.timesteps.dtype == torch.int64 and len(solver.timesteps) == 50
    assert float(solver.sigmas[-1]) == 0.0
    assert np.all(np.diff(sigmas) < 0)


def test_unknown_solver_is_rejected():
    with pytest.raises(ValueError, match="unknown solver 'ddim'"):
        make_solver("ddim", 4, 5.0)


def test_cfg_formula():
    neg, pos = torch.tensor([1.0, 2.0]), torch.tensor([3.0, 2.0])
    torch.testing.assert_close(cfg(neg, pos, 4.0), torch.tensor([9.0, 2.0]))
    torch.testing.assert_close(cfg(neg, pos, 1.0), pos)


def test_seed_gives_the_same_noise_and_another_seed_does_not():
    a = initial_noise((48, 2, 3, 4), (5, 20), 7, torch.device("cpu"), torch.float32)
    b = initial_noise((48, 2, 3, 4), (5, 20), 7, torch.device("cpu"), torch.float32)
    c = initial_noise((48, 2, 3, 4), (5, 20), 8, torch.device("cpu"), torch.float32)
    assert torch.equal(a.video, b.video) and torch.equal(a.audio, b.audio)
    assert not torch.equal(a.video, c.video)
    # audio comes from its own freshly seeded generator: it is the start of the same random stream
    assert torch.equal(a.audio.flatten(), torch.randn(100, generator=torch.Generator().manual_seed(7)))


@pytest.fixture(scope="module")
def tiny_model():
    case = golden_cases("loop")[0]
    return load_fusion(
        case.weight_path(),
        dit_config(case.config["fusion_video"]),
        dit_config(case.config["fusion_audio"]),
        CPU_FP32,
    )


def _setup(model, image: bool):
    g = torch.Generator().manual_seed(3)
    ctx = lambda n: torch.randn(n, model.video_model.cfg.text_dim, generator=g)  # noqa: E731
    noise = initial_noise((48, 3, 4, 6), (13, 20), 11, torch.device("cpu"), torch.float32)
    image_latent = torch.randn(48, 1, 4, 6, generator=g) if image else None
    return noise, Conditioning(ctx(6), ctx(5), ctx(4), image_latent)


def test_cancellation_stops_between_steps(tiny_model):
    noise, cond = _setup(tiny_model, image=False)
    plan = make_plan("unipc", 6, 5.0, Guidance(slg_layer=1), torch.device("cpu"))
    seen = []

    def on_step(done, total, x):
        assert x.video.shape == noise.video.shape
        seen.append((done, total))
        if done == 2:
            raise Cancelled("cancelled by the user")

    with pytest.raises(Cancelled):
        denoise(tiny_model, noise, cond, plan, on_step)
    assert seen == [(1, 6), (2, 6)]


def test_i2v_keeps_the_image_latent_as_first_frame(tiny_model):
    noise, cond = _setup(tiny_model, image=True)
    plan = make_plan("unipc", 3, 5.0, Guidance(slg_layer=1), torch.device("cpu"))
    out = denoise(tiny_model, noise, cond, plan)
    assert torch.equal(out.video[:, :1], cond.image_latent)
    assert not torch.equal(out.video[:, 1:], noise.video[:, 1:])


@pytest.mark.parametrize("solver", ["unipc", "dpm++", "euler"])
def test_every_solver_runs_the_loop(tiny_model, solver):
    noise, cond = _setup(tiny_model, image=False)
    out = denoise(
        tiny_model, noise, cond, make_plan(solver, 3, 5.0, Guidance(slg_layer=1), torch.device("cpu"))
    )
    assert isinstance(out, Latents)
    assert out.video.shape == noise.video.shape and out.audio.shape == noise.audio.shape
    assert torch.isfinite(out.video).all() and torch.isfinite(out.audio).all()


# (i2v, slg_layer): the tiny model has 3 blocks; slg_layer 2 is the last one
GUIDED_CASES = [(False, 0), (False, 1), (True, 0), (True, 1), (False, 2), (True, 2)]


@pytest.mark.parametrize(("image", "slg_layer"), GUIDED_CASES, ids=lambda v: str(v))
def test_batched_guidance_equals_two_passes(tiny_model, image, slg_layer):
    """One batch-2 forward [positive, negative] gives guided_predict's two passes up to float32 round-off,
    also when the three text contexts have different lengths (6, 5 and 4 tokens here)."""
    noise, cond = _setup(tiny_model, image=image)
    guidance = Guidance(slg_layer=slg_layer)
    x = Latents(with_first_frame(noise.video, cond.image_latent), noise.audio)
    with torch.inference_mode():
        for t in (torch.tensor(999), torch.tensor(400)):
            expected = guided_predict(tiny_model, x, t, cond, guidance)
            got = batched_predict(tiny_model, x, t, cond, guidance)
            for out, ref in zip(got, expected, strict=True):
                torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)  # seen: <= 7e-6 on |x| ~ 5


@pytest.mark.parametrize("image", [False, True], ids=["t2v", "i2v"])
def test_denoise_with_batched_guidance_matches_the_two_pass_loop(tiny_model, image):
    noise, cond = _setup(tiny_model, image=image)
    plans = [make_plan("unipc", 4, 5.0, Guidance(slg_layer=1), torch.device("cpu")) for _ in range(2)]
    expected = denoise(tiny_model, noise, cond, plans[0])
    got = denoise(tiny_model, noise, cond, plans[1], predict=batched_predict)
    torch.testing.assert_close(got.video, expected.video, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got.audio, expected.audio, atol=1e-5, rtol=1e-5)
