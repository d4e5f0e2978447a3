"""--compile: new resolutions reuse the compiled graphs instead of exhausting torch's recompile limit."""

from __future__ import annotations

import pytest
import torch

from ovi_server.config import EngineConfig, dit_config
from ovi_server.engine.compiling import compile_blocks
from ovi_server.engine.device import CPU_FP32
from ovi_server.engine.pipeline import OviPipeline
from ovi_server.engine.sampler import Conditioning, Guidance, Latents, batched_predict, guided_predict
from ovi_server.errors import ConfigError
from ovi_server.models.fusion import load_fusion
from tests.conftest import golden_cases


def _inputs(model, height: int, width: int):
    g = torch.Generator().manual_seed(height * width)
    vcfg, acfg = model.video_model.cfg, model.audio_model.cfg
    ctx = torch.randn(7, vcfg.text_dim, generator=g)
    video = torch.randn(vcfg.in_dim, 2, height, width, generator=g)
    return [video], [torch.randn(13, acfg.in_dim, generator=g)], torch.tensor([700]), [ctx], [ctx]


def test_a_third_resolution_compiles_nothing_new():
    """Four graphs per token count (towers x phases); the second shape makes the token count dynamic,
    the third reuses those graphs. aot_eager traces what inductor would compile, without a C build."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    case = golden_cases("fusion")[0]
    video, audio = dit_config(case.config["video"]), dit_config(case.config["audio"])
    eager = load_fusion(case.weight_path(), video, audio, CPU_FP32)
    model = load_fusion(case.weight_path(), video, audio, CPU_FP32)
    torch._dynamo.reset()
    counters.clear()
    compile_blocks(model, backend="aot_eager")
    graphs = []
    for height, width in ((4, 6), (6, 8), (8, 4)):
        args = _inputs(model, height, width)
        out, ref = model(*args), eager(*args)
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
        graphs.append(counters["stats"]["unique_graphs"])
    assert graphs[0] == 4 and graphs[2] == graphs[1], graphs
    torch._dynamo.reset()


def test_fp8_with_compile_is_refused_at_start_up():
    with pytest.raises(ConfigError, match="--fp8 with --compile"):
        OviPipeline.from_config(EngineConfig(variant="tiny", device="cpu", fp8=True, compile=True))


def test_batched_guidance_compiles_and_a_third_resolution_compiles_nothing_new():
    """Batched guidance runs the blocks on a batch of 2, and block slg_layer on a batch of 1 (the positive
    item): both batch sizes compile, the outputs equal eager two-pass guidance, and new resolutions
    reuse the graphs of the second one, as with one item."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    case = golden_cases("fusion")[0]
    video, audio = dit_config(case.config["video"]), dit_config(case.config["audio"])
    eager = load_fusion(case.weight_path(), video, audio, CPU_FP32)
    model = load_fusion(case.weight_path(), video, audio, CPU_FP32)
    torch._dynamo.reset()
    counters.clear()
    compile_blocks(model, backend="aot_eager")
    guidance = Guidance(slg_layer=1)
    graphs = []
    with torch.inference_mode():
        for height, width in ((4, 6), (6, 8), (8, 4)):
            videos, audios, _, (positive,), _ = _inputs(model, height, width)
            g = torch.Generator().manual_seed(height)
            cond = Conditioning(positive, *(torch.randn(n, video.text_dim, generator=g) for n in (5, 3)))
            x = Latents(videos[0], audios[0])
            out = batched_predict(model, x, torch.tensor(700), cond, guidance)
            ref = guided_predict(eager, x, torch.tensor(700), cond, guidance)
            torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
            graphs.append(counters["stats"]["unique_graphs"])
    assert graphs[2] == graphs[1], graphs
    torch._dynamo.reset()
