"""CUDA-only checks (skipped without a GPU). Their CPU twins: tests/models/test_fusion.py,
tests/engine/test_sampler.py and tests/engine/test_pipeline.py run the same code on the CPU."""

from __future__ import annotations

import pytest
import torch

from ovi_server.config import EngineConfig
from ovi_server.engine.device import Placement
from ovi_server.golden import run_fusion, run_loop
from tests.conftest import golden_cases

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

CUDA_FP32 = Placement(torch.device("cuda"), torch.float32)


@pytest.mark.parametrize("case", golden_cases("fusion"), ids=lambda c: c.name)
def test_fusion_golden_on_cuda_fp32(case):
    result = run_fusion.run_case(case, CUDA_FP32)
    assert result.passed, result.line()


@pytest.mark.parametrize("case", golden_cases("loop"), ids=lambda c: c.name)
def test_loop_golden_on_cuda_fp32(case):
    result = run_loop.run_case(case, CUDA_FP32)
    assert result.passed, result.line()


def test_tiny_pipeline_in_bf16_on_cuda(tmp_path):
    from ovi_server.engine.pipeline import OviPipeline
    from ovi_server.engine.request import GenerationRequest
    from ovi_server.media.mux import probe

    pipeline = OviPipeline.from_config(EngineConfig(variant="tiny", device="cuda", dtype="bf16"))
    clip = pipeline.generate(
        GenerationRequest("A cat says <S>hi<E> Audio: purring", seed=3), tmp_path / "a.mp4"
    )
    info = probe(clip.path)
    assert info["video_codec"] == "h264" and info["audio_codec"] == "aac" and info["num_frames"] == 9
