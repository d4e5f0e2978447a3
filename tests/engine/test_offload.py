"""--offload block: fusion block i (video + audio) is streamed in while it runs, block i + 1 prefetched,
embeddings and heads resident; a visiting text encoder comes layer by layer the same way; the output is
the resident model's. On the CPU the "device" copies are
real copies, so which tensors are onloaded when is observable."""

from __future__ import annotations

import torch

from ovi_server.config import dit_config, load_variant
from ovi_server.engine.device import CPU_FP32
from ovi_server.engine.offload import BlockStreamer, HostWeights, LayerStreamer
from ovi_server.models.fusion import load_fusion
from ovi_server.models.t5 import random_text_encoder
from tests.conftest import golden_cases

CASE = golden_cases("fusion")[0]


def _model():
    return load_fusion(
        CASE.weight_path(), dit_config(CASE.config["video"]), dit_config(CASE.config["audio"]), CPU_FP32
    )


def _inputs(model):
    g = torch.Generator().manual_seed(0)
    ctx = torch.randn(7, model.video_model.cfg.text_dim, generator=g)
    video = torch.randn(model.video_model.cfg.in_dim, 3, 4, 6, generator=g)
    audio = torch.randn(13, model.audio_model.cfg.in_dim, generator=g)
    return [video], [audio], torch.tensor([700]), [ctx], [ctx]


def test_groups_are_fusion_blocks_and_only_the_running_and_next_are_onloaded():
    resident = _model()
    model = _model()
    streamer = BlockStreamer(model, torch.device("cpu"))
    n = model.num_blocks
    assert n >= 2 and len(streamer.groups) == n
    for i, group in enumerate(streamer.groups):
        owners = {id(owner) for owner, *_ in group.entries}
        expected = {
            id(m) for b in (model.video_model.blocks[i], model.audio_model.blocks[i]) for m in b.modules()
        }
        assert owners <= expected and len(group.entries) == len(
            list(model.video_model.blocks[i].parameters()) + list(model.audio_model.blocks[i].parameters())
        )
    # the wrapper sits on the model's per-block call; the forward itself is untouched
    assert model.fusion_block == streamer.fusion_block

    seen: list[tuple[int, str, list[bool]]] = []
    for i in range(n):
        for tower in ("video_model", "audio_model"):
            block = getattr(model, tower).blocks[i]
            block.register_forward_pre_hook(
                lambda _m, args, i=i, tower=tower: seen.append(
                    (i, tower, [g.is_onloaded() for g in streamer.groups])
                )
            )
    args = _inputs(model)
    video, audio = model(*args)
    ref_video, ref_audio = resident(*args)
    assert torch.equal(video[0], ref_video[0]) and torch.equal(audio[0], ref_audio[0])
    # every block call (audio self, video self, audio cross, video cross) saw block i and i + 1 only
    assert len(seen) == 4 * n
    for i, _tower, onloaded in seen:
        assert onloaded == [j in (i, i + 1) for j in range(n)], (i, onloaded)
    assert not any(g.is_onloaded() for g in streamer.groups)  # nothing left on the device after

    # skip-layer guidance skips a block: the output still equals the resident model's
    video, _ = model(*args, slg_layer=1)
    assert torch.equal(video[0], resident(*args, slg_layer=1)[0][0])
    assert not any(g.is_onloaded() for g in streamer.groups)


def test_host_weights_swap_without_copying_back():
    layer = torch.nn.Linear(3, 2)
    before = layer.weight.detach().clone()
    weights = HostWeights([layer], pin=False)
    copies = weights.onload(torch.device("cpu"))
    assert weights.is_onloaded() and len(copies) == 2
    copies[0].mul_(0)  # a device-side change is not written back to the master
    weights.offload()
    assert not weights.is_onloaded() and torch.equal(layer.weight, before)


def test_text_encoder_visits_layer_by_layer_with_only_the_running_and_next_onloaded():
    """A visiting umt5 never needs all its layers on the device at once (a 32 GB card holds the fusion
    model and one umt5 layer beside it, not the whole encoder)."""
    config = load_variant("tiny").text_encoder
    resident = random_text_encoder(config, None, CPU_FP32, seed=0)
    encoder = random_text_encoder(config, None, CPU_FP32, seed=0)
    layers = encoder.layers()
    streamer = LayerStreamer(encoder, layers, torch.device("cpu"))
    n = len(layers)
    assert n == 1 + config.num_layers and [len(g.entries) for g in streamer.groups] == [
        len(list(layer.parameters())) for layer in layers
    ]
    seen: list[tuple[int, list[bool]]] = []
    for i, layer in enumerate(layers):  # after the streamer's own hook: what the layer runs with
        layer.register_forward_pre_hook(
            lambda *_, i=i: seen.append((i, [g.is_onloaded() for g in streamer.groups]))
        )
    prompts = ["A cat says <S>hello<E>", "blurry, low quality"]
    for got, expected in zip(encoder.encode(prompts), resident.encode(prompts), strict=True):
        assert torch.equal(got, expected)
    assert [i for i, _ in seen] == list(range(n))
    for i, onloaded in seen:
        assert onloaded == [j in (i, i + 1) for j in range(n)], (i, onloaded)
    assert not any(g.is_onloaded() for g in streamer.groups)  # nothing left on the device after


def test_host_masters_are_views_of_one_block_of_exactly_their_size():
    """The masters share one host block sized to the weights (512-byte aligned), not one rounded-up block
    per tensor (what per-tensor pinning costs), and a tensor two modules share is mastered once."""
    shared = torch.nn.Linear(300, 7)
    tied = torch.nn.Linear(300, 7)
    tied.weight = shared.weight  # one Parameter in two modules (as a tied embedding is)
    model = torch.nn.Sequential(shared, torch.nn.LayerNorm(7), tied)
    x = torch.randn(2, 300, generator=torch.Generator().manual_seed(0))
    expected = model[:2](x)
    weights = HostWeights([model], pin=False)
    sizes = [p.numel() * p.element_size() for p in model.parameters()]  # deduplicated by nn.Module
    assert weights.block.numel() == sum(-(-n // 512) * 512 for n in sizes) == 8704 + 4 * 512
    base = weights.block.data_ptr()
    for _, _, _, host in weights.entries:
        assert base <= host.data_ptr() < base + weights.block.numel() and host.data_ptr() % 512 == 0
    assert torch.equal(model[:2](x), expected)  # the same values, now in the block
    assert model[0].weight.data_ptr() == model[2].weight.data_ptr()
    assert len(weights.onload(torch.device("cpu"))) == 5  # the tied weight copied once
    assert not base <= model[0].weight.data_ptr() < base + weights.block.numel()  # a device copy
    assert model[0].weight.data_ptr() == model[2].weight.data_ptr()  # still tied on the device
    assert torch.equal(model[:2](x), expected)
    weights.offload()
    assert base <= model[0].weight.data_ptr() < base + weights.block.numel()
