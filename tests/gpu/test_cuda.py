"""CUDA-only checks (skipped without a GPU). Their CPU twins: tests/models/test_fusion.py,
tests/engine/test_sampler.py and tests/engine/test_pipeline.py run the same code on the CPU."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

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
    from ovi_server.media.mux import probe
    from ovi_server.request import GenerationRequest

    pipeline = OviPipeline.from_config(EngineConfig(variant="tiny", device="cuda", dtype="bf16"))
    clip = pipeline.generate(
        GenerationRequest("A cat says <S>hi<E> Audio: purring", seed=3), tmp_path / "a.mp4"
    )
    info = probe(clip.path)
    assert info["video_codec"] == "h264" and info["audio_codec"] == "aac" and info["num_frames"] == 9


def test_block_offload_on_cuda_matches_the_resident_model_with_less_memory():
    """BlockStreamer on a real device: pinned masters, side-stream prefetch, the same output in float32."""
    from ovi_server.config import dit_config
    from ovi_server.engine.offload import BlockStreamer
    from ovi_server.models.fusion import load_fusion

    case = golden_cases("fusion")[0]
    video, audio = dit_config(case.config["video"]), dit_config(case.config["audio"])
    resident = load_fusion(case.weight_path(), video, audio, CUDA_FP32)
    streamed = load_fusion(case.weight_path(), video, audio, Placement(torch.device("cpu"), torch.float32))
    streamer = BlockStreamer(streamed, torch.device("cuda"))
    assert all(host.is_pinned() for group in streamer.groups for *_, host in group.entries)
    assert streamed.video_model.head.head.weight.is_cuda  # resident: embeddings and heads
    g = torch.Generator().manual_seed(0)
    ctx = torch.randn(7, video.text_dim, generator=g).cuda()
    args = (
        [torch.randn(video.in_dim, 3, 4, 6, generator=g).cuda()],
        [torch.randn(13, audio.in_dim, generator=g).cuda()],
        torch.tensor([700], device="cuda"),
        [ctx],
        [ctx],
    )
    with torch.inference_mode():
        out, ref = streamed(*args), resident(*args)
    torch.testing.assert_close(out, ref, atol=0, rtol=0)
    assert not any(group.is_onloaded() for group in streamer.groups)


def test_tiny_pipeline_with_block_offload_on_cuda(tmp_path):
    from ovi_server.engine.pipeline import OviPipeline
    from ovi_server.media.mux import probe
    from ovi_server.request import GenerationRequest

    pipeline = OviPipeline.from_config(
        EngineConfig(variant="tiny", device="cuda", dtype="bf16", offload="block")
    )
    assert {"text_encoder", "video_vae", "audio_decoder"} == pipeline.visitors
    clip = pipeline.generate(
        GenerationRequest("A cat says <S>hi<E> Audio: purring", seed=3), tmp_path / "b.mp4"
    )
    assert probe(clip.path)["num_frames"] == 9


GPU_MEMORY_CHILD = textwrap.dedent(
    """
    import sys

    import torch

    from ovi_server.config import EngineConfig
    from ovi_server.engine.device import resolve_placement, total_memory
    from ovi_server.engine.pipeline import OviPipeline
    from ovi_server.errors import ConfigError
    from ovi_server.media.mux import probe
    from ovi_server.request import GenerationRequest

    try:
        resolve_placement("cuda", gpu_memory_gib=100_000.0)
        sys.exit("a limit above the card was accepted")
    except ConfigError as exc:
        assert "more than" in str(exc), exc
    engine = EngineConfig(variant="tiny", device="cuda", dtype="bf16", gpu_memory=0.5)
    pipe = OviPipeline.from_config(engine)
    assert pipe.placement.memory_limit == 2**29
    assert total_memory(pipe.placement.device, pipe.placement.memory_limit) == 2**29
    # 0.5 GiB is less than the denoising reserve's fixed 1 GiB: the fusion blocks stream, umt5 visits
    assert pipe.placement.offload == "block", pipe.placement.offload
    assert "text_encoder" in pipe.visitors
    clip = pipe.generate(GenerationRequest("A cat says <S>hi<E> Audio: purring", seed=3), sys.argv[1])
    assert probe(clip.path)["num_frames"] == 9
    try:
        torch.empty(2**30, dtype=torch.uint8, device="cuda")
        sys.exit("1 GiB allocated under a 0.5 GiB limit")
    except torch.OutOfMemoryError:
        pass
    print("ok")
    """
)


def test_gpu_memory_limit_holds_the_choices_and_the_allocator(tmp_path):
    """--gpu-memory, in a process of its own (the limit is process-wide): the automatic choices plan
    for it, the clip is made, and the allocator refuses more. CPU twin: tests/test_settings.py
    (parsing; no effect on the CPU) and tests/engine/test_offload.py (the layer-by-layer visit)."""
    done = subprocess.run(
        [sys.executable, "-c", GPU_MEMORY_CHILD, str(tmp_path / "c.mp4")],
        cwd=Path(__file__).resolve().parents[2],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-3000:]


def test_host_weights_are_page_locked_in_one_exact_block():
    """cudaHostRegister on one block of exactly the weights' size (CPU twin: tests/engine/test_offload.py)."""
    from ovi_server.engine.offload import HostWeights

    layer = torch.nn.Linear(3000, 1001)
    expected = layer(torch.ones(1, 3000))
    weights = HostWeights([layer], pin=True)
    assert weights.block.numel() == -(-3000 * 1001 * 4 // 512) * 512 + 4096
    assert all(host.is_pinned() for *_, host in weights.entries)
    weights.onload(torch.device("cuda"))
    assert layer.weight.is_cuda
    torch.testing.assert_close(layer(torch.ones(1, 3000, device="cuda")).cpu(), expected, atol=1e-4, rtol=0)
    weights.offload()
