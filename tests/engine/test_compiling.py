"""--compile: new resolutions reuse the compiled graphs instead of exhausting torch's recompile limit."""

from __future__ import annotations

import base64
import io

import pytest
import torch
from PIL import Image

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


def _eager_and_compiled():
    """The first fusion golden case twice, the second compiled (aot_eager traces what inductor would
    compile, without a C build); torch's compile state and counters start empty."""
    from torch._dynamo.utils import counters

    case = golden_cases("fusion")[0]
    video, audio = dit_config(case.config["video"]), dit_config(case.config["audio"])
    eager = load_fusion(case.weight_path(), video, audio, CPU_FP32)
    model = load_fusion(case.weight_path(), video, audio, CPU_FP32)
    torch._dynamo.reset()
    counters.clear()
    compile_blocks(model, backend="aot_eager")
    return eager, model


def test_a_third_resolution_compiles_nothing_new():
    """Four graphs per token count (towers x phases); the second shape makes the token count dynamic,
    the third reuses those graphs. aot_eager traces what inductor would compile, without a C build."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    eager, model = _eager_and_compiled()
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
        OviPipeline.from_config(EngineConfig(variant="tiny", device="cpu", fp8=True, compile="on"))


@pytest.mark.parametrize(
    ("setting", "device", "fp8", "offload", "parallel", "expected"),
    [
        ("auto", "cuda", False, "none", False, True),  # measured 1.21-1.22x per step on an H200
        ("auto", "cpu", False, "none", False, False),  # inductor's C++ build takes minutes on a CPU
        ("auto", "cuda", True, "none", False, False),  # fp8 breaks the graph at every Linear
        ("auto", "cuda", False, "block", False, False),
        ("auto", "cuda", False, "none", True, False),
        ("on", "cpu", False, "none", False, True),
        ("off", "cuda", False, "none", False, False),
    ],
)
def test_compile_auto_is_on_only_where_it_was_measured_faster(
    setting, device, fp8, offload, parallel, expected
):
    from ovi_server.engine.compiling import wants_compile

    assert wants_compile(setting, torch.device(device), fp8, offload, parallel) is expected


def test_compile_setting_reads_switch_spellings():
    from ovi_server.config import on_off_auto

    assert [on_off_auto(v) for v in ("1", "true", "ON", "no", "auto")] == ["on", "on", "on", "off", "auto"]
    with pytest.raises(ValueError, match="auto, on or off"):
        on_off_auto("fast")


def test_a_compiled_pipeline_is_warm_before_its_first_request(monkeypatch, tmp_path):
    """Start-up compiles the graphs at two token counts (so the token dimension is dynamic): a request
    at a third size compiles nothing. aot_eager stands in for inductor (no C++ build on a 2-core CPU)."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    import ovi_server.engine.pipeline as pipeline_module
    from ovi_server.request import GenerationRequest

    monkeypatch.setattr(pipeline_module, "compile_blocks", lambda m: compile_blocks(m, backend="aot_eager"))
    torch._dynamo.reset()
    counters.clear()
    pipe = OviPipeline.from_config(EngineConfig(variant="tiny", device="cpu", compile="on"))
    warm = counters["stats"]["unique_graphs"]
    assert warm >= 4  # tower x phase
    clip = pipe.generate(
        GenerationRequest("A dog barks.", size=(80, 48), steps=2, seed=1), tmp_path / "a.mp4"
    )
    assert clip.num_frames > 0
    assert counters["stats"]["unique_graphs"] == warm
    # image-to-video (per-token timesteps) from a portrait image: warm too
    buf = io.BytesIO()
    Image.new("RGB", (60, 120), (200, 30, 30)).save(buf, format="PNG")
    image = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
    clip = pipe.generate(GenerationRequest("A dog barks.", image=image, steps=2, seed=1), tmp_path / "b.mp4")
    assert clip.height > clip.width
    assert counters["stats"]["unique_graphs"] == warm
    torch._dynamo.reset()


def test_batched_guidance_compiles_and_a_third_resolution_compiles_nothing_new():
    """Batched guidance runs the blocks on a batch of 2, and block slg_layer on a batch of 1 (the positive
    item): both batch sizes compile, the outputs equal eager two-pass guidance, and new resolutions
    reuse the graphs of the second one, as with one item."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    eager, model = _eager_and_compiled()
    guidance = Guidance(slg_layer=1)
    graphs = []
    with torch.inference_mode():
        for height, width in ((4, 6), (6, 8), (8, 4)):
            videos, audios, _, (positive,), _ = _inputs(model, height, width)
            g = torch.Generator().manual_seed(height)
            cond = Conditioning(
                positive, *(torch.randn(n, model.video_model.cfg.text_dim, generator=g) for n in (5, 3))
            )
            x = Latents(videos[0], audios[0])
            out = batched_predict(model, x, torch.tensor(700), cond, guidance)
            ref = guided_predict(eager, x, torch.tensor(700), cond, guidance)
            torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
            graphs.append(counters["stats"]["unique_graphs"])
    assert graphs[2] == graphs[1], graphs
    torch._dynamo.reset()


def _failing_backend(gm, example_inputs):
    raise RuntimeError("no C compiler for Triton's launchers")


@pytest.mark.parametrize("setting", ["auto", "on"])
def test_a_failed_compile_falls_back_to_eager_only_under_auto(monkeypatch, tmp_path, caplog, setting):
    """--compile auto must not stop a server from starting where compiling fails (a CUDA host without
    gcc): it warns and runs eager. --compile on makes the failure an error at start-up."""
    import torch._dynamo

    import ovi_server.engine.pipeline as pipeline_module
    from ovi_server.request import GenerationRequest

    monkeypatch.setattr(pipeline_module, "wants_compile", lambda *args: True)  # auto as on a GPU
    monkeypatch.setattr(
        pipeline_module, "compile_blocks", lambda m: compile_blocks(m, backend=_failing_backend)
    )
    torch._dynamo.reset()
    engine = EngineConfig(variant="tiny", device="cpu", compile=setting)
    if setting == "on":
        with pytest.raises(Exception, match="no C compiler"):
            OviPipeline.from_config(engine)
        torch._dynamo.reset()
        return
    with caplog.at_level("WARNING", logger="ovi_server.engine.pipeline"):
        pipe = OviPipeline.from_config(engine)
    assert not pipe.compiled
    assert "compiling the fusion blocks failed" in caplog.text and "running eager" in caplog.text
    blocks = [*pipe.fusion.video_model.blocks, *pipe.fusion.audio_model.blocks]
    assert all(getattr(b, "_compiled_call_impl", None) is None for b in blocks)
    clip = pipe.generate(GenerationRequest("A dog barks.", steps=2, seed=1), tmp_path / "a.mp4")
    assert clip.num_frames > 0
