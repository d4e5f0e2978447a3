"""OviPipeline on the tiny variant: request to MP4, defaults, seeds, progress, cancellation, bad input."""

from __future__ import annotations

import pytest
import torch

from ovi_server.config import EngineConfig
from ovi_server.engine.pipeline import OviPipeline
from ovi_server.errors import Cancelled, InvalidInput, WeightsError
from ovi_server.media.mux import probe
from ovi_server.request import GenerationRequest

PROMPT = "A cat says <S>hello<E> Audio: purring"


@pytest.fixture(scope="module")
def pipeline():
    return OviPipeline.from_config(EngineConfig(variant="tiny"))


def test_generate_writes_a_playable_mp4_and_reports_the_stages(pipeline, tmp_path):
    events = []
    clip = pipeline.generate(
        GenerationRequest(PROMPT, size=(992, 512), seed=9), tmp_path / "a.mp4", events.append
    )
    info = probe(clip.path)
    assert (info["video_codec"], info["pix_fmt"], info["fps"], info["audio_codec"]) == (
        "h264",
        "yuv420p",
        24.0,
        "aac",
    )
    # 992x512 snapped to the tiny model's 64*96 area keeps the landscape aspect
    assert (info["width"], info["height"], info["num_frames"]) == (clip.width, clip.height, 9) == (96, 64, 9)
    assert abs(info["audio_duration"] - info["video_duration"]) <= 1 / 24
    assert clip.seed == 9
    stages = [e.stage for e in events]
    assert stages[0] == "encode_text" and stages[-1] == "mux"
    assert [e.done for e in events if e.stage == "denoise"] == [0, 1, 2, 3, 4]
    # audio, then each of the 3 latent frames as its pixels go to the encoder
    assert [(e.done, e.total) for e in events if e.stage == "decode"] == [
        (0, 4),
        (1, 4),
        (2, 4),
        (3, 4),
        (4, 4),
    ]
    assert set(clip.timings) == {"encode_text", "denoise", "decode", "mux"}


def test_same_seed_same_pixels_and_samples(pipeline, tmp_path, monkeypatch):
    """Compared before encoding: x264's frame threads make the MP4 bytes vary run to run."""
    from ovi_server.media.mux import Mp4Writer

    caught: dict[str, tuple[list, list]] = {}  # file name -> (frame chunks, waveforms)
    real_add, real_close = Mp4Writer.add, Mp4Writer.close

    def add(self, frames, layout="thwc"):
        caught.setdefault(self.path.name, ([], []))[0].append(frames.clone())
        return real_add(self, frames, layout)

    def close(self, audio=None):
        caught[self.path.name][1].append(audio.clone())
        return real_close(self, audio)

    monkeypatch.setattr(Mp4Writer, "add", add)
    monkeypatch.setattr(Mp4Writer, "close", close)
    for name, seed in (("a", 5), ("b", 5), ("c", 6)):
        pipeline.generate(GenerationRequest(PROMPT, seed=seed, steps=1), tmp_path / f"{name}.mp4")
    (video_a, audio_a), (video_b, audio_b), (video_c, _) = (
        (torch.cat(caught[name][0]), caught[name][1][0]) for name in ("a.mp4", "b.mp4", "c.mp4")
    )
    assert torch.equal(video_a, video_b) and torch.equal(audio_a, audio_b)
    assert not torch.equal(video_a, video_c)
    random_seed = pipeline.generate(GenerationRequest(PROMPT, steps=1), tmp_path / "d.mp4").seed
    assert isinstance(random_seed, int) and random_seed >= 0


def test_cancel_from_progress_stops_between_steps(pipeline, tmp_path):
    seen = []

    def cancel_after_two(event):
        seen.append((event.stage, event.done))
        if event.stage == "denoise" and event.done == 2:
            raise Cancelled("cancelled")

    with pytest.raises(Cancelled):
        pipeline.generate(GenerationRequest(PROMPT, seed=1), tmp_path / "x.mp4", cancel_after_two)
    assert ("denoise", 3) not in seen
    assert not (tmp_path / "x.mp4").exists()
    assert list(tmp_path.iterdir()) == []


def test_cancel_while_decoding_leaves_no_file_and_no_encoder(pipeline, tmp_path):
    """The decode streams into the MP4 encoder: a cancel between two decoded chunks stops both."""
    import threading

    def cancel_mid_decode(event):
        if event.stage == "decode" and event.done == 2:
            raise Cancelled("cancelled")

    with pytest.raises(Cancelled):
        pipeline.generate(GenerationRequest(PROMPT, seed=1, steps=1), tmp_path / "x.mp4", cancel_mid_decode)
    assert list(tmp_path.iterdir()) == []
    assert [t for t in threading.enumerate() if t.name == "mp4-encoder"] == []
    clip = pipeline.generate(GenerationRequest(PROMPT, seed=1, steps=1), tmp_path / "y.mp4")
    assert probe(clip.path)["num_frames"] == 9


def test_malformed_prompt_is_rejected_before_any_work(pipeline, tmp_path):
    events = []
    with pytest.raises(InvalidInput) as err:
        pipeline.generate(GenerationRequest("A man says <S>hello"), tmp_path / "x.mp4", events.append)
    assert err.value.field == "prompt"
    assert err.value.msg == "<S> at character offset 11 is never closed; end the speech segment with <E>"
    assert events == []


def test_bad_image_is_an_invalid_input(pipeline, tmp_path):
    with pytest.raises(InvalidInput) as err:
        pipeline.generate(
            GenerationRequest(PROMPT, image="data:image/png;base64,bm90IGFuIGltYWdl"), tmp_path / "x.mp4"
        )
    assert err.value.field == "image_url"


def test_i2v_video_takes_the_image_aspect(pipeline, tmp_path):
    import base64
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (60, 120), (200, 30, 30)).save(buf, format="PNG")
    uri = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
    clip = pipeline.generate(GenerationRequest(PROMPT, image=uri, seed=2, steps=2), tmp_path / "i.mp4")
    assert clip.height > clip.width  # portrait image, portrait video
    assert probe(clip.path)["num_frames"] == 9


def test_real_variants_need_weights():
    with pytest.raises(WeightsError, match="needs its checkpoints: pass --weights"):
        OviPipeline.from_config(EngineConfig(variant="720x720_5s"))


def test_request_defaults_come_from_the_variant(pipeline):
    resolved = pipeline.resolve(GenerationRequest("A dog. Audio: barking"))
    assert resolved.steps == 4 and resolved.solver == "unipc" and resolved.shift == 5.0
    assert resolved.guidance.video_scale == 4.0 and resolved.guidance.audio_scale == 3.0
    assert resolved.prompt == "A dog. <AUDCAP>barking<ENDAUDCAP>"  # tiny follows the 720x720 caption form
    assert resolved.video_negative_prompt == "jitter, bad hands, blur, distortion"
    with pytest.raises(InvalidInput, match="unknown solver"):
        pipeline.resolve(GenerationRequest("A dog.", solver="ddim"))
    assert torch.get_default_dtype() == torch.float32


def test_text_contexts_are_cached_per_prompt_and_exact(pipeline, monkeypatch):
    encoded_batches = []
    real_encode = pipeline.text_encoder.encode

    def counting_encode(prompts):
        encoded_batches.append(list(prompts))
        return real_encode(prompts)

    monkeypatch.setattr(pipeline.text_encoder, "encode", counting_encode)
    pipeline._text_cache.clear()
    first = pipeline.encode_prompts(["a red fox", "jitter, blur", "muffled"])
    again = pipeline.encode_prompts(["a blue fox", "jitter, blur", "muffled"])
    assert encoded_batches == [["a red fox", "jitter, blur", "muffled"], ["a blue fox"]]
    assert again[1] is first[1] and again[2] is first[2]
    alone = real_encode(["a blue fox"])[0]
    torch.testing.assert_close(again[0], alone, atol=0, rtol=0)  # batching does not change an encoding
    # each cached context owns its memory: a view would keep the whole padded batch alive
    for context in first:
        assert context.untyped_storage().nbytes() == context.numel() * context.element_size()


def test_decode_tiling_decision_is_logged(pipeline, tmp_path, caplog):
    with caplog.at_level("INFO", logger="ovi_server.engine.pipeline"):
        pipeline.generate(GenerationRequest(PROMPT, seed=1, steps=2), tmp_path / "t.mp4")
    assert any(r.getMessage().startswith("video decode untiled (untiled estimate") for r in caplog.records), [
        r.getMessage() for r in caplog.records
    ]


def test_which_models_leave_the_gpu_between_stages():
    from ovi_server.engine.device import Placement
    from ovi_server.engine.pipeline import visiting_modules

    cuda = torch.device("cuda")
    assert visiting_modules(Placement(torch.device("cpu"), torch.float32)) == frozenset()
    # umt5-xxl leaves the GPU after encoding even without offloading (the 32 GB budget)
    assert visiting_modules(Placement(cuda, torch.bfloat16)) == {"text_encoder"}
    assert visiting_modules(Placement(cuda, torch.bfloat16, offload="block")) == {
        "text_encoder",
        "video_vae",
        "audio_decoder",
    }
    assert visiting_modules(Placement(cuda, torch.bfloat16, offload="model")) == {
        "fusion",
        "text_encoder",
        "video_vae",
        "audio_decoder",
    }


def test_unknown_attention_backend_fails_at_start_up():
    from ovi_server.errors import ConfigError

    with pytest.raises(ConfigError, match="attention backend 'flashy' cannot be used here"):
        OviPipeline.from_config(EngineConfig(variant="tiny", attention="flashy"))


def test_text_encoder_stays_on_the_device_when_everything_fits():
    from ovi_server.config import load_variant
    from ovi_server.engine.pipeline import text_encoder_fits

    cfg = load_variant("720x720_5s")
    models = int(34.3 * 2**30)  # fusion 21.7 + umt5-xxl 10.6 + both VAEs in bf16/float32
    assert text_encoder_fits(cfg, models, 80 * 2**30)  # an H100
    assert not text_encoder_fits(cfg, models, 48 * 2**30)  # models + decode + denoise reserve do not fit
    assert not text_encoder_fits(cfg, models, None)  # the CPU: nothing visits anyway


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_the_text_encoder_size_is_known_before_it_is_built(dtype):
    """from_config decides where umt5 lives from a meta build, then loads it straight there."""
    from ovi_server.config import load_variant
    from ovi_server.engine.device import Placement
    from ovi_server.engine.pipeline import meta_bytes, module_bytes
    from ovi_server.models.t5 import build_umt5, random_text_encoder

    cfg = load_variant("tiny").text_encoder
    built = random_text_encoder(cfg, None, Placement(torch.device("cpu"), dtype), 0)
    assert built.umt5.shared.weight is built.umt5.encoder.embed_tokens.weight  # one table, not two
    assert meta_bytes(build_umt5(cfg), dtype) == module_bytes(built.umt5) > 0
    # umt5-xxl in bf16: 10.6 GiB, the figure the residency decision uses on a GPU
    xxl = meta_bytes(build_umt5(load_variant("720x720_5s").text_encoder), torch.bfloat16) / 2**30
    assert 10.4 < xxl < 10.8


def test_a_backend_without_float32_kernels_is_refused_at_start_up():
    """PyTorch's flash SDPA (diffusers' `_native_flash`) imports on any host but takes only bf16/fp16:
    the server must refuse it for float32 at start-up, not fail every request."""
    from ovi_server.errors import ConfigError

    with pytest.raises(ConfigError) as err:
        OviPipeline.from_config(
            EngineConfig(variant="tiny", device="cpu", dtype="fp32", attention="_native_flash")
        )
    message = str(err.value)
    assert "'_native_flash' cannot run float32 attention with" in message
    assert "bfloat16 or float16" in message and "--attention native" in message


def test_ieee_float32_turns_tf32_off_and_restores_it():
    """tests/gpu run under it: torch 2.13 defaults cuDNN convolutions to TF32, which fails the goldens."""
    from ovi_server.engine.device import ieee_float32

    conv, matmul = torch.backends.cudnn.conv, torch.backends.cuda.matmul
    before = (conv.fp32_precision, matmul.fp32_precision)
    with ieee_float32():
        assert conv.fp32_precision == "ieee" and matmul.fp32_precision == "ieee"
    assert (conv.fp32_precision, matmul.fp32_precision) == before


def test_batch_guidance_on_makes_denoise_use_batched_predict(pipeline, tmp_path, monkeypatch):
    from ovi_server.engine import sampler

    assert pipeline.predict is sampler.guided_predict  # "auto" is off for now
    batched = OviPipeline.from_config(EngineConfig(variant="tiny", batch_guidance="on"))
    assert batched.predict is sampler.batched_predict
    calls = []

    def spy(*args):
        calls.append(args[2])  # t
        return sampler.batched_predict(*args)

    monkeypatch.setattr(batched, "predict", spy)
    batched.generate(GenerationRequest(PROMPT, seed=1, steps=2), tmp_path / "b.mp4")
    assert len(calls) == 2


def test_batch_guidance_is_ignored_under_a_parallel_group(caplog):
    from ovi_server.engine import sampler
    from ovi_server.engine.pipeline import choose_predict

    assert choose_predict("off", None) is choose_predict("auto", None) is sampler.guided_predict
    with caplog.at_level("WARNING", logger="ovi_server.engine.pipeline"):
        assert choose_predict("on", object()) is sampler.guided_predict  # a ParallelGroup stand-in
    assert "--batch-guidance on is ignored with --sp/--cfg-parallel" in caplog.text


def test_models_size_is_known_before_loading(pipeline):
    """--offload auto decides from meta builds; they match what loading materialises (the video VAE's
    two 48-value latent statistics aside)."""
    from ovi_server.engine.pipeline import module_bytes, resident_model_bytes

    built = sum(module_bytes(m) for m in (pipeline.fusion, pipeline.video_vae, pipeline.audio_decoder))
    assert 0 <= built - resident_model_bytes(pipeline.cfg, pipeline.placement) <= 1024


@pytest.mark.parametrize(
    ("gib", "fp8", "expected"),
    [
        (80, False, "none"),  # an H100: everything resident, as measured (benchmarks/RESULTS.md)
        (48, False, "none"),
        (32, False, "none"),  # 25.1 GiB of weights + a 3.0 GiB denoising reserve (the decode tiles)
        (28, False, "block"),
        (24, False, "block"),
        (24, True, "none"),  # fp8 Linear weights: 15 GiB
    ],
)
def test_offload_auto_streams_blocks_only_when_the_models_do_not_fit(gib, fp8, expected):
    from ovi_server.config import load_variant
    from ovi_server.engine.device import Placement
    from ovi_server.engine.pipeline import choose_offload

    placement = Placement(torch.device("cuda"), torch.bfloat16, "auto", "native", fp8)
    assert choose_offload(load_variant("720x720_5s"), placement, gib * 2**30) == expected
    assert choose_offload(load_variant("720x720_5s"), placement, None) == "none"  # not a GPU


def test_denoising_reserve_grows_with_the_tokens_and_with_batched_guidance():
    from ovi_server.config import load_variant
    from ovi_server.engine.pipeline import denoise_reserve_bytes

    gib = {name: denoise_reserve_bytes(load_variant(name)) / 2**30 for name in ("720x720_5s", "960x960_10s")}
    assert 2.9 < gib["720x720_5s"] < 3.1  # 15,004 tokens x 139.5 KB + 1 GiB
    assert 8.0 < gib["960x960_10s"] < 8.3  # 54,900 tokens
    batched = denoise_reserve_bytes(load_variant("720x720_5s"), batched=True) / 2**30
    assert batched - 1 == pytest.approx(2 * (gib["720x720_5s"] - 1))


def test_offload_auto_is_none_on_the_cpu(pipeline, caplog):
    from ovi_server.engine.device import resolve_placement

    with caplog.at_level("WARNING"):
        assert resolve_placement("cpu", "auto", "auto").offload == "none"
    assert "no effect" not in caplog.text  # auto is not a request to warn about
    assert pipeline.placement.offload == "none"
