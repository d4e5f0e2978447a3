"""OviFusion: golden parity, the real configs' size, and diffusers' model tooling on the tiny model."""

from __future__ import annotations

import pytest
import torch
from diffusers.hooks import apply_group_offloading

from ovi_server.config import load_variant
from ovi_server.engine.device import CPU_FP32
from ovi_server.golden import run_fusion
from ovi_server.models.fusion import build_fusion, layerwise_cast_params, load_fusion
from tests.conftest import golden_cases

FULL_PARAMS = 11_660_753_108  # what the reference logs for the real FusionModel


@pytest.mark.parametrize("case", golden_cases("fusion"), ids=lambda c: c.name)
def test_fusion_matches_reference(case):
    result = run_fusion.run_case(case)
    assert result.passed, result.line()


@pytest.mark.parametrize("variant", ["720x720_5s", "960x960_5s", "960x960_10s"])
def test_full_config_parameter_count(variant):
    cfg = load_variant(variant)
    model = build_fusion(cfg.video, cfg.audio)  # meta device: no memory
    assert sum(p.numel() for p in model.parameters()) == FULL_PARAMS
    assert len(model.state_dict()) == 2073
    assert sum(p.numel() for p in model.video_model.parameters()) == 5_566_479_552


def _tiny_inputs(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    vcfg, acfg = model.video_model.cfg, model.audio_model.cfg
    video = torch.randn(vcfg.in_dim, 3, 4, 6, generator=g)
    audio = torch.randn(13, acfg.in_dim, generator=g)
    ctx = torch.randn(7, vcfg.text_dim, generator=g)
    return [video], [audio], torch.tensor([700]), [ctx], [ctx]


@pytest.fixture(scope="module")
def golden_model():
    case = golden_cases("fusion")[0]
    from ovi_server.config import dit_config

    return lambda: load_fusion(
        case.weight_path(), dit_config(case.config["video"]), dit_config(case.config["audio"]), CPU_FP32
    )


def test_skip_layer_and_first_frame_change_the_prediction(golden_model):
    model = golden_model()
    args = _tiny_inputs(model)
    base_video, base_audio = model(*args)
    slg_video, slg_audio = model(*args, slg_layer=1)
    i2v_video, _ = model(*args, first_frame_is_clean=True)
    assert not torch.allclose(base_video[0], slg_video[0])
    assert not torch.allclose(base_audio[0], slg_audio[0])
    assert not torch.allclose(base_video[0], i2v_video[0])
    # slg_layer=0 means "off", as in the reference
    assert torch.equal(model(*args, slg_layer=0)[0][0], base_video[0])


def test_attention_backend_is_chosen_by_name(golden_model):
    model = golden_model()
    args = _tiny_inputs(model)
    reference, _ = model(*args)
    model.set_attention_backend("_native_math")
    try:
        math_video, _ = model(*args)
    finally:
        model.set_attention_backend("native")
    torch.testing.assert_close(math_video[0], reference[0], atol=1e-5, rtol=1e-5)


def test_group_offloading_keeps_the_output(golden_model):
    model = golden_model()
    args = _tiny_inputs(model)
    reference_video, reference_audio = model(*args)
    offloaded = golden_model()
    apply_group_offloading(
        offloaded, onload_device=torch.device("cpu"), offload_type="block_level", num_blocks_per_group=1
    )
    video, audio = offloaded(*args)
    torch.testing.assert_close(video[0], reference_video[0], atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(audio[0], reference_audio[0], atol=1e-6, rtol=1e-6)


def test_fp8_layerwise_casting_stays_close(golden_model):
    """fp8 storage of every Linear/Conv weight (low-VRAM mode); e4m3 keeps ~2 significant digits."""
    model = golden_model()
    args = _tiny_inputs(model)
    reference_video, reference_audio = model(*args)
    fp8 = golden_model()
    fp8.enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn, compute_dtype=torch.float32)
    assert fp8.video_model.blocks[0].self_attn.q.weight.dtype == torch.float8_e4m3fn
    # Our list of the parameters kept in fp8 (fusion.CASTABLE_LAYERS) is the one diffusers applied.
    stored = {n for n, p in fp8.named_parameters() if p.dtype == torch.float8_e4m3fn}
    assert stored == layerwise_cast_params(golden_model()) and len(stored) > 10
    video, audio = fp8(*args)
    for out, ref in ((video[0], reference_video[0]), (audio[0], reference_audio[0])):
        rel = (out - ref).norm() / ref.norm()
        assert rel < 0.08, f"fp8 relative error {rel:.3f}"


def test_blocks_compile_without_graph_breaks_and_keep_the_output(golden_model):
    """torch.compile of the repeated blocks (EngineConfig.compile): one graph per block call, same numbers.

    aot_eager traces the same graphs inductor compiles, without a C++ build in the test."""
    import torch._dynamo

    model = golden_model()
    args = _tiny_inputs(model)
    v = model.video_model.embed(args[0], args[2], args[3])
    a = model.audio_model.embed(args[1], args[2], args[4])
    for phase, target in (("self", None), ("cross", a)):
        explained = torch._dynamo.explain(model.video_model.blocks[0])(v, phase, target)
        assert explained.graph_break_count == 0, explained.break_reasons
    reference_video, reference_audio = model(*args)
    torch._dynamo.reset()
    model.compile_repeated_blocks(backend="aot_eager", dynamic=False)
    video, audio = model(*args)
    torch.testing.assert_close(video[0], reference_video[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(audio[0], reference_audio[0], atol=1e-5, rtol=1e-5)


def _two_items(model):
    """Two different items: the second has fewer video frames and audio tokens, so it is padded in a batch."""
    g = torch.Generator().manual_seed(5)
    vcfg, acfg = model.video_model.cfg, model.audio_model.cfg
    videos = [torch.randn(vcfg.in_dim, 3, 4, 6, generator=g), torch.randn(vcfg.in_dim, 2, 4, 6, generator=g)]
    audios = [torch.randn(13, acfg.in_dim, generator=g), torch.randn(9, acfg.in_dim, generator=g)]
    video_contexts = [torch.randn(n, vcfg.text_dim, generator=g) for n in (7, 4)]
    audio_contexts = [torch.randn(n, vcfg.text_dim, generator=g) for n in (5, 6)]
    return videos, audios, torch.tensor([700, 300]), video_contexts, audio_contexts


@pytest.mark.parametrize("slg_items", [(True, False), (False, True)], ids=["first_skips", "second_skips"])
@pytest.mark.parametrize("first_frame_is_clean", [False, True], ids=["t2v", "i2v"])
def test_slg_items_skip_the_block_for_those_items_only(golden_model, slg_items, first_frame_is_clean):
    """In a batch, block slg_layer is skipped by the items marked True and runs on the others: each item's
    prediction is the one it gets alone, with or without the skip. Fails if the block runs on both items
    or on neither (the skip changes every item's prediction)."""
    model = golden_model()
    videos, audios, t, video_contexts, audio_contexts = _two_items(model)
    kwargs = {"first_frame_is_clean": first_frame_is_clean}
    video, audio = model(
        videos, audios, t, video_contexts, audio_contexts, slg_layer=1, slg_items=slg_items, **kwargs
    )
    for b, skips in enumerate(slg_items):
        one = ([videos[b]], [audios[b]], t[b : b + 1], [video_contexts[b]], [audio_contexts[b]])
        alone_video, alone_audio = model(*one, slg_layer=1 if skips else 0, **kwargs)
        other_video, other_audio = model(*one, slg_layer=0 if skips else 1, **kwargs)
        torch.testing.assert_close(video[b], alone_video[0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(audio[b], alone_audio[0], atol=1e-5, rtol=1e-5)
        assert (video[b] - other_video[0]).abs().max() > 1e-2
        assert (audio[b] - other_audio[0]).abs().max() > 1e-2


def test_slg_items_all_or_none_equal_the_plain_forward(golden_model):
    model = golden_model()
    args = _two_items(model)
    for slg_items, like in (((True, True), {"slg_layer": 1}), ((False, False), {})):
        video, audio = model(*args, slg_layer=1, slg_items=slg_items)
        plain_video, plain_audio = model(*args, **like)
        for out, ref in zip((*video, *audio), (*plain_video, *plain_audio), strict=True):
            assert torch.equal(out, ref)


@pytest.mark.parametrize("tower", ["video_model", "audio_model"])
def test_selected_tokens_equal_the_item_laid_out_alone(golden_model, tower):
    """Tokens.select_items slices every per-item field: the second (padded) item of a batch equals that
    item embedded alone at the batch's padded length, i2v time embeddings, RoPE and key mask included."""
    model = golden_model()
    videos, audios, t, video_contexts, audio_contexts = _two_items(model)
    dit = getattr(model, tower)
    latents, contexts = (videos, video_contexts) if tower == "video_model" else (audios, audio_contexts)
    clean = tower == "video_model"
    batch = dit.embed(latents, t, contexts, first_frame_is_clean=clean)
    alone = dit.embed(latents[1:], t[1:], contexts[1:], seq_len=batch.x.shape[1], first_frame_is_clean=clean)
    picked = batch.select_items([1])
    assert picked.key_mask is not None and picked.seq_lens == alone.seq_lens and picked.grids == alone.grids
    assert torch.equal(picked.key_mask, alone.key_mask)
    for name in ("x", "e", "e0", "context"):
        torch.testing.assert_close(getattr(picked, name), getattr(alone, name), atol=1e-6, rtol=1e-6)
    for name in ("freqs", "cos", "sin"):
        torch.testing.assert_close(getattr(picked.rope, name), getattr(alone.rope, name))
