"""Sequence parallel and CFG parallel on the CPU (gloo): the same numbers as one process.

Spawned process groups take seconds to start on a 2-core CI machine, so one spawn of 4 processes
(`--sp 2 --cfg-parallel`) runs every check that needs ranks and hands rank 0's findings back.
"""

from __future__ import annotations

import dataclasses
import subprocess
import sys

import av
import numpy as np
import pytest
import torch

from ovi_server.config import dit_config
from ovi_server.engine.device import CPU_FP32
from ovi_server.engine.parallel import ParallelGroup, ParallelSpec, check_spec, run_spmd
from ovi_server.engine.sampler import Conditioning, Guidance, denoise, initial_noise, make_plan
from ovi_server.errors import ConfigError
from ovi_server.golden import run_fusion, run_loop
from ovi_server.models.fusion import load_fusion
from tests.conftest import REPO, golden_cases

pytestmark = pytest.mark.slow


def _golden_model():
    case = golden_cases("fusion")[0]  # 2 heads per tower, 3 blocks
    return load_fusion(
        case.weight_path(), dit_config(case.config["video"]), dit_config(case.config["audio"]), CPU_FP32
    )


def _relative_error(ours: torch.Tensor, reference: torch.Tensor) -> float:
    """max |ours - reference| over max |reference|: float32 rounding of differently shaped GEMMs."""
    return float((ours - reference).abs().max() / reference.abs().max())


def _inputs(model):
    g = torch.Generator().manual_seed(0)
    video = torch.randn(model.video_model.cfg.in_dim, 3, 2, 6, generator=g)  # 9 tokens: odd
    audio = torch.randn(13, model.audio_model.cfg.in_dim, generator=g)  # 13 tokens: odd
    context = torch.randn(7, model.video_model.cfg.text_dim, generator=g)
    return video, audio, context


def _rank_checks(group: ParallelGroup) -> dict:
    """Runs on each of the 4 ranks; rank 0's dict is what the tests look at."""
    torch.set_grad_enabled(False)
    # one thread, as init_group gives each of 4 ranks on a 2-core host: the one-process reference below
    # then runs the same GEMM kernels (a multi-threaded GEMM rounds differently for other row counts)
    assert torch.get_num_threads() == 1
    found: dict = {}
    single, parallel = _golden_model(), _golden_model()
    group.apply(parallel)
    video, audio, context = _inputs(single)
    args = ([video], [audio], torch.tensor([700]), [context], [context])
    for name, kwargs in (("t2v", {}), ("slg", {"slg_layer": 1}), ("i2v", {"first_frame_is_clean": True})):
        (v1,), (a1,) = single(*args, **kwargs)
        (v2,), (a2,) = parallel(*args, **kwargs)
        found[f"forward_{name}"] = (_relative_error(v2, v1), _relative_error(a2, a1), v2.shape, a2.shape)

    # the denoising loop: sequence parallel alone (the two "cfg" slices as replicas), then with CFG parallel
    noise = initial_noise((48, 3, 2, 6), (13, 20), 5, torch.device("cpu"), torch.float32)
    cond = Conditioning(context, context.flip(0), context * 0.5)
    guidance = Guidance(4.0, 3.0, 1)

    def run(predict=None):
        plan = make_plan("unipc", 3, 5.0, guidance, torch.device("cpu"))
        model = single if predict is None else parallel
        return denoise(model, noise, cond, plan, **({} if predict is None else {"predict": predict}))

    reference = run()
    sp_only = dataclasses.replace(group, spec=ParallelSpec(2, cfg_parallel=False))
    for name, predict in (("sp", sp_only.guided_predict), ("sp_cfg", group.guided_predict)):
        out = run(predict)
        found[f"denoise_{name}"] = (
            _relative_error(out.video, reference.video),
            _relative_error(out.audio, reference.audio),
        )

    # golden parity through the same runners `python -m ovi_server.golden check --sp 2` uses
    found["golden"] = [run_fusion.run_case(c, parallel=group).line() for c in golden_cases("fusion")[:2]]
    found["golden"] += [run_loop.run_case(c, parallel=group).line() for c in golden_cases("loop")]
    found["golden"] += [run_loop.run_case(c, parallel=sp_only).line() for c in golden_cases("loop")[:1]]

    # an attention backend without context-parallel support is refused with a clear error
    model = _golden_model()
    model.set_attention_backend("_native_math")
    try:
        group.apply(model)
        found["backend_error"] = None
    except ConfigError as exc:
        found["backend_error"] = str(exc)
    return found


@pytest.fixture(scope="module")
def findings() -> dict:
    return run_spmd(ParallelSpec(sp=2, cfg_parallel=True), "cpu", _rank_checks)


@pytest.mark.parametrize("name", ["t2v", "slg", "i2v"])
def test_sequence_parallel_forward_equals_one_process(findings, name):
    video_err, audio_err, video_shape, audio_shape = findings[f"forward_{name}"]
    assert tuple(video_shape) == (48, 3, 2, 6) and tuple(audio_shape) == (13, 20)  # padding cut off
    assert video_err <= 1e-6 and audio_err <= 1e-6, (video_err, audio_err)


@pytest.mark.parametrize("name", ["sp", "sp_cfg"])
def test_parallel_denoising_equals_one_process(findings, name):
    video_err, audio_err = findings[f"denoise_{name}"]
    assert video_err <= 1e-6 and audio_err <= 1e-6, (video_err, audio_err)


def test_golden_cases_pass_sequence_parallel(findings):
    assert len(findings["golden"]) == 5
    for line in findings["golden"]:
        assert line.startswith("PASS"), line


def test_backend_without_context_parallel_is_refused(findings):
    assert findings["backend_error"] is not None
    assert "--sp 2" in findings["backend_error"] and "_native_math" in findings["backend_error"]


def test_layouts_the_host_or_model_cannot_run_say_what_to_change():
    if torch.cuda.device_count() < 4:
        with pytest.raises(ConfigError, match=r"needs 4 GPUs .* lower --sp or drop --cfg-parallel"):
            check_spec(ParallelSpec(2, cfg_parallel=True), "cuda")
    with pytest.raises(ConfigError, match="does not divide the model's 2 attention heads"):
        check_spec(ParallelSpec(4), "cpu", (2, 2))
    with pytest.raises(ConfigError, match="--sp must be at least 1"):
        check_spec(ParallelSpec(0), "cpu")


def test_a_cancelled_request_stops_every_rank_and_the_next_one_runs(tmp_path):
    from ovi_server.config import EngineConfig
    from ovi_server.engine.pipeline import OviPipeline
    from ovi_server.errors import Cancelled
    from ovi_server.request import GenerationRequest

    pipeline = OviPipeline.from_config(EngineConfig(variant="tiny", device="cpu", sp=2))
    request = GenerationRequest(prompt="A cat says <S>hi<E> Audio: purr", seed=1)
    steps_seen = []

    def cancel_at_step_2(event):
        if event.stage == "denoise":
            steps_seen.append(event.done)
            if event.done == 2:
                raise Cancelled("user")

    try:
        with pytest.raises(Cancelled):
            pipeline.generate(request, tmp_path / "cancelled.mp4", cancel_at_step_2)
        assert steps_seen == [0, 1, 2] and not (tmp_path / "cancelled.mp4").exists()
        clip = pipeline.generate(request, tmp_path / "next.mp4")  # the other rank is waiting for it
        assert clip.path.stat().st_size > 0
    finally:
        pipeline.close()


def _decode(path):
    with av.open(str(path)) as container:
        video = np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)]).astype(int)
    with av.open(str(path)) as container:
        audio = np.concatenate([f.to_ndarray().ravel() for f in container.decode(audio=0)])
    return video, audio


def test_generate_sp2_makes_the_video_sp1_makes(tmp_path):
    def generate(name: str, *flags: str):
        out = tmp_path / f"{name}.mp4"
        command = [sys.executable, "-m", "ovi_server.cli", "generate", "A cat says <S>hi<E> Audio: purr"]
        command += ["--device", "cpu", "-o", str(out), *flags]
        done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
        return _decode(out)

    video1, audio1 = generate("sp1", "--seed", "3", "--sp", "1")
    video2, audio2 = generate("sp2", "--seed", "3", "--sp", "2")
    other, _ = generate("seed4", "--seed", "4", "--sp", "1")
    assert video2.shape == video1.shape and audio2.shape == audio1.shape
    np.testing.assert_array_equal(audio2, audio1)
    # latents agree to float32 rounding; H.264 turns that into at most a few levels on a few pixels,
    # far below what another seed changes
    assert np.abs(video2 - video1).mean() < 1.0 < np.abs(other - video1).mean()


def test_generate_refuses_a_degree_the_heads_cannot_take():
    command = [sys.executable, "-m", "ovi_server.cli", "generate", "A cat says <S>hi<E> Audio: purr"]
    done = subprocess.run(
        [*command, "--device", "cpu", "--sp", "3"], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 2
    assert "--sp 3 does not divide the model's 2 attention heads" in done.stderr
    assert "Traceback" not in done.stderr
