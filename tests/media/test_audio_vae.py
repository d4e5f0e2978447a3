"""MMAudio VAE + BigVGAN: golden parity, checkpoint spellings, strict loading, output length."""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from ovi_server.config import AudioVAEConfig, VocoderConfig, load_variant
from ovi_server.engine.device import CPU_FP32
from ovi_server.errors import ConfigError, WeightsError
from ovi_server.golden import run_mmaudio
from ovi_server.media.audio_vae import (
    MelSpectrogram,
    load_audio_decoder,
    load_audio_vae,
    random_audio_decoder,
    random_audio_vae,
    slaney_mel_filters,
)
from ovi_server.media.vocoder import load_vocoder, random_vocoder
from tests.conftest import GOLDEN_DIR, golden_cases

MMAUDIO = GOLDEN_DIR / "mmaudio"
TINY_VAE = AudioVAEConfig(hidden_dim=8)
TINY_VOCODER = VocoderConfig(upsample_initial_channel=64)


@pytest.mark.parametrize("case", golden_cases("mmaudio"), ids=lambda c: c.name)
def test_mmaudio_matches_reference(case):
    result = run_mmaudio.run_case(case)
    assert result.passed, result.line()


def test_vocoder_accepts_both_weight_norm_spellings_and_nesting(tmp_path):
    old = load_file(str(MMAUDIO / "bigvgan_tiny.safetensors"))  # "generator.<key>", weight_g / weight_v
    new = {}
    for key, tensor in old.items():
        key = key.removeprefix("generator.")
        key = key.replace(".weight_g", ".parametrizations.weight.original0")
        key = key.replace(".weight_v", ".parametrizations.weight.original1")
        new[key] = tensor
    save_file(new, str(tmp_path / "new_spelling.safetensors"))
    torch.save({"generator": new}, tmp_path / "best_netG.pt")
    mel = load_file(str(MMAUDIO / "mmaudio_vocoder_M16.safetensors"))["mel"][..., :4]

    reference = load_vocoder(MMAUDIO / "bigvgan_tiny.safetensors", TINY_VOCODER, CPU_FP32).vocode(mel)
    for path in (tmp_path / "new_spelling.safetensors", tmp_path / "best_netG.pt"):
        waveform = load_vocoder(path, TINY_VOCODER, CPU_FP32).vocode(mel)
        torch.testing.assert_close(waveform, reference, atol=0, rtol=0)


@pytest.mark.parametrize(
    ("file", "drop", "add"),
    [
        ("mmaudio_vae_tiny.safetensors", "decoder.up.1.upsample.conv.weight", None),
        ("mmaudio_vae_tiny.safetensors", None, "decoder.up.1.attn.0.qkv.weight"),
        ("bigvgan_tiny.safetensors", "generator.resblocks.4.activations.3.act.beta", None),
        ("bigvgan_tiny.safetensors", "generator.conv_post.weight_g", None),
        ("bigvgan_tiny.safetensors", None, "generator.conv_post.weight"),
    ],
)
def test_strict_loading_names_file_and_key(tmp_path, file, drop, add):
    state_dict = load_file(str(MMAUDIO / file))
    if drop:
        del state_dict[drop]
    if add:
        state_dict[add] = torch.zeros(1)
    path = tmp_path / file
    save_file(state_dict, str(path))
    with pytest.raises(WeightsError) as error:
        if file.startswith("mmaudio"):
            load_audio_vae(path, TINY_VAE, CPU_FP32)
        else:
            load_vocoder(path, TINY_VOCODER, CPU_FP32)
    key = (drop or add).removeprefix("generator.")
    assert str(path) in str(error.value) and key in str(error.value)


def test_decoder_length_and_decode_only_loading():
    decoder = load_audio_decoder(
        MMAUDIO / "mmaudio_vae_tiny.safetensors",
        MMAUDIO / "bigvgan_tiny.safetensors",
        TINY_VAE,
        TINY_VOCODER,
        CPU_FP32,
    )
    assert decoder.vae.encoder is None and decoder.samples_per_latent == 512
    case = next(c for c in golden_cases("mmaudio") if "latent" in c.spec["inputs"])
    latent = case.tensors["latent"]
    waveform = decoder.decode(latent)
    assert waveform.dtype == torch.float32
    assert waveform.shape == (latent.shape[0], 512 * latent.shape[-1])
    torch.testing.assert_close(waveform, case.tensors["waveform"][:, 0], **case.spec["tolerance"]["waveform"])


def test_random_tiny_decoder_gives_a_bounded_waveform():
    cfg = load_variant("tiny")
    decoder = random_audio_decoder(cfg.audio_vae, cfg.vocoder, CPU_FP32, seed=0)
    latent = torch.randn(2, cfg.audio_vae.embed_dim, 7)
    waveform = decoder.decode(latent)
    assert waveform.shape == (2, 512 * 7)
    assert torch.isfinite(waveform).all() and waveform.abs().max() <= 1.0 and waveform.std() > 0.01
    again = random_audio_decoder(cfg.audio_vae, cfg.vocoder, CPU_FP32, seed=0).decode(latent)
    torch.testing.assert_close(again, waveform, atol=0, rtol=0)


def test_downsample_after_the_last_level_has_no_decoder_upsample():
    """The decoder upsamples after level i only when the encoder downsampled after level i-1, so a
    downsample after the encoder's last level halves the latent rate without a decoder counterpart."""
    cfg = AudioVAEConfig(hidden_dim=4, ch_mult=(1, 2), num_res_blocks=1, down_layers=(0, 1))
    vae = random_audio_vae(cfg, CPU_FP32, seed=0)
    assert cfg.temporal_upsampling == 2
    assert vae.decode(torch.randn(1, cfg.embed_dim, 5)).shape == (
        1,
        cfg.data_dim,
        5 * cfg.temporal_upsampling,
    )
    mean, _ = vae.encode(torch.randn(1, cfg.data_dim, 16))
    assert mean.shape == (1, cfg.embed_dim, 4)  # the encoder halves twice
    decoder = random_audio_decoder(cfg, TINY_VOCODER, CPU_FP32, seed=0)
    assert decoder.decode(torch.randn(1, cfg.embed_dim, 3)).shape == (1, 3 * decoder.samples_per_latent)


@pytest.mark.parametrize(("resblock", "used"), [("1", 3), ("2", 2)])
def test_resblocks_read_only_the_dilations_their_type_uses(resblock, used):
    """BigVGAN's type-1 block reads three dilations per kernel and type 2 two: extra entries in the
    config (its default (1, 3, 5) with type 2) add no convs, entries beyond the kernels are ignored, and
    fewer is refused."""
    short = VocoderConfig(
        upsample_rates=(4, 4),
        upsample_kernel_sizes=(8, 8),
        upsample_initial_channel=8,
        resblock=resblock,
        resblock_kernel_sizes=(3, 5),
        resblock_dilation_sizes=((1, 3, 5)[:used], (2, 1, 3)[:used]),
    )
    long = replace(short, resblock_dilation_sizes=((1, 3, 5, 7), (2, 1, 3, 7)))
    vocoder = random_vocoder(short, CPU_FP32, seed=0)
    mel = torch.randn(1, 80, 6)
    torch.testing.assert_close(
        random_vocoder(long, CPU_FP32, seed=0).vocode(mel), vocoder.vocode(mel), atol=0, rtol=0
    )
    convs = "convs1" if resblock == "1" else "convs"
    assert {key.split(".")[3] for key in vocoder.state_dict() if f".{convs}." in key} == {
        str(m) for m in range(used)
    }
    # a dilation entry beyond the kernels is ignored, as BigVGAN's zip of the two lists does
    extra = replace(short, resblock_dilation_sizes=(*short.resblock_dilation_sizes, (9, 9, 9)))
    torch.testing.assert_close(random_vocoder(extra, CPU_FP32, seed=0).vocode(mel), vocoder.vocode(mel))
    with pytest.raises(ConfigError, match="dilations"):
        random_vocoder(replace(short, resblock_dilation_sizes=((1,) * (used - 1),) * 2), CPU_FP32, seed=0)
    with pytest.raises(ConfigError, match="dilations"):  # a kernel without its entry
        random_vocoder(
            replace(short, resblock_dilation_sizes=short.resblock_dilation_sizes[:1]), CPU_FP32, seed=0
        )


def test_mel_filters_without_fmax_reach_nyquist():
    """librosa's `fmax=None` means sampling_rate / 2; it must not turn the filters into NaN."""
    expected = slaney_mel_filters(16000, 512, 40, 0.0, 8000.0)
    np.testing.assert_array_equal(slaney_mel_filters(16000, 512, 40, 0.0, None), expected)
    mel = MelSpectrogram(AudioVAEConfig(n_fft=512, hop_size=128, win_size=512, fmax=None))(
        torch.zeros(1, 1024)
    )
    assert torch.isfinite(mel).all()


def test_natural_log_mel_is_log10_mel_times_ln10():
    """The reference's 44k converter takes the natural log of the clamped mel where the 16k one takes
    log10; everything before the log is the same."""
    cfg = AudioVAEConfig(
        data_dim=128, sampling_rate=44100, n_fft=2048, hop_size=512, win_size=2048, fmax=None
    )
    waveform = 0.3 * torch.randn(2, 8192, generator=torch.Generator().manual_seed(0))
    waveform[:, 1000:7000] = 0.0  # silence: the clamp at 1e-5 bites, the same in both bases
    log10_mel = MelSpectrogram(cfg)(waveform)
    natural_mel = MelSpectrogram(replace(cfg, mel_log="log"))(waveform)
    assert log10_mel.shape == (2, 128, 16)
    assert (log10_mel == -5.0).any()
    torch.testing.assert_close(natural_mel, log10_mel * math.log(10), atol=1e-5, rtol=1e-6)
    assert not torch.allclose(natural_mel, log10_mel)
    with pytest.raises(ConfigError, match="mel_log"):
        MelSpectrogram(replace(cfg, mel_log="log2"))


def test_attention_inside_levels_follows_each_resblock():
    """A level in `attn_layers` gets one attention block per residual block, under the reference's keys
    `encoder.down.{i}.attn.{j}` / `decoder.up.{i}.attn.{j}` (the decoder has one more block per level),
    and they take part in both directions."""
    plain = AudioVAEConfig(hidden_dim=4, ch_mult=(1, 2), num_res_blocks=2, down_layers=(0,))
    cfg = replace(plain, attn_layers=(1,))
    vae = random_audio_vae(cfg, CPU_FP32, seed=0)
    expected = {
        f"{side}.{j}.{part}.weight"
        for side, blocks in (("encoder.down.1.attn", 2), ("decoder.up.1.attn", 3))
        for j in range(blocks)
        for part in ("qkv", "proj_out")
    }
    assert {k for k in vae.state_dict() if ".attn." in k} == expected
    assert vae.state_dict()["decoder.up.1.attn.2.qkv.weight"].shape == (3 * 8, 8, 1)

    # the same weights without the level attention give different outputs
    without = {k: v for k, v in vae.state_dict().items() if ".attn." not in k}
    plain_vae = random_audio_vae(plain, CPU_FP32, seed=0)
    plain_vae.load_state_dict(without, strict=True)
    latent, mel = torch.randn(1, cfg.embed_dim, 6), torch.randn(1, cfg.data_dim, 12)
    assert not torch.allclose(vae.decode(latent), plain_vae.decode(latent), atol=1e-3)
    assert not torch.allclose(vae.encode(mel)[0], plain_vae.encode(mel)[0], atol=1e-3)


def test_attention_in_a_level_the_model_lacks_changes_nothing():
    """The reference's VAE asks for attention in level 3 of its three levels: v1-16 has none."""
    public = load_audio_vae(MMAUDIO / "mmaudio_vae_tiny.safetensors", TINY_VAE, CPU_FP32)
    level_3 = load_audio_vae(
        MMAUDIO / "mmaudio_vae_tiny.safetensors", replace(TINY_VAE, attn_layers=(3,)), CPU_FP32
    )
    latent = torch.randn(1, TINY_VAE.embed_dim, 5)
    torch.testing.assert_close(level_3.decode(latent), public.decode(latent), atol=0, rtol=0)


def test_attention_weights_load_strictly(tmp_path):
    cfg = AudioVAEConfig(hidden_dim=4, ch_mult=(1, 2, 1, 2), num_res_blocks=1, attn_layers=(3,))
    state_dict = {
        k: torch.randn(v.shape) for k, v in random_audio_vae(cfg, CPU_FP32, seed=0).state_dict().items()
    }
    assert (
        "encoder.down.3.attn.0.qkv.weight" in state_dict
        and "decoder.up.3.attn.1.proj_out.weight" in state_dict
    )
    path = tmp_path / "attn.safetensors"
    save_file(state_dict, str(path))
    latent = torch.randn(1, cfg.embed_dim, 3)
    assert torch.isfinite(load_audio_vae(path, cfg, CPU_FP32).decode(latent)).all()
    with pytest.raises(WeightsError, match=r"decoder\.up\.3\.attn\."):  # the file has keys v1-16 lacks
        load_audio_vae(path, replace(cfg, attn_layers=()), CPU_FP32)
    del state_dict["decoder.up.3.attn.1.proj_out.weight"]
    save_file(state_dict, str(path))
    with pytest.raises(WeightsError, match=r"decoder\.up\.3\.attn\.1\.proj_out\.weight"):
        load_audio_vae(path, cfg, CPU_FP32)


def test_case_configs_with_level_attention_and_natural_log_mel():
    vae = {"data_dim": 128, "hidden_dim": 4, "ch_mult": [1, 2], "down_layers": [0], "attn_layers": [0, 3]}
    mel = {"sampling_rate": 44100, "n_fft": 2048, "num_mels": 128, "hop_size": 512, "win_size": 2048,
           "fmin": 0, "fmax": 22050.0, "norm": "log(clamp(mel, min=1e-5))", "center": False}  # fmt: skip
    cfg = run_mmaudio.vae_config({"vae": vae, "mel": mel})
    assert cfg.attn_layers == (0, 3) and cfg.mel_log == "log" and cfg.sampling_rate == 44100
    words = {**vae, "attn_layers": "none inside levels (only the mid attention block)"}
    cfg = run_mmaudio.vae_config({"vae": words, "mel": {**mel, "norm": "log10(clamp(mel, min=1e-5))"}})
    assert cfg.attn_layers == () and cfg.mel_log == "log10"
    with pytest.raises(ValueError, match="log2"):
        run_mmaudio.vae_config({"vae": vae, "mel": {**mel, "norm": "log2(clamp(mel, min=1e-5))"}})
