"""Differential cases for `mmaudio`: MMAudio's audio VAE, its mel front-ends and BigVGAN.

    python -m benchmarks.differential.mmaudio --reference DIR --out DIR [--seed S] [--cases N]

Per draw, one case of each kind of call in tests/golden/mmaudio, each with its own config:
* decode: latent -> VAE decoder -> un-normalise -> log-mel -> BigVGAN -> waveform (Ovi's audio output);
* vocoder: log10-mel -> BigVGAN -> waveform;
* encode: waveform -> mel front-end -> normalise -> VAE encoder -> posterior mean and clamped logvar.

What varies. VAE: hidden_dim, ch_mult (1-4 levels), num_res_blocks, down_layers (any subset of the
levels, the last one included: the encoder then downsamples once more than the decoder upsamples),
attn_layers (none, as v1-16; the reference VAE's own [3], which acts only with four levels; or a random
set of levels), kernel_size, clip_act (sometimes small enough to bite), embed_dim, data_dim (80 or 128,
the two the reference has statistics for). Mel front-end: n_fft, hop, window, fmin, fmax, and the log:
log10 at 16 kHz (the reference's '16k' converter) or, with 128 bands, mostly its '44k' converter's
natural log at 44.1 kHz (fmax sr / 2). Vocoder: upsample rates
(product 256, 2-6 stages) and kernel sizes, upsample_initial_channel (not always a power of two),
resblock "1" / "2" with 1-3 odd kernels and their dilations (sometimes more than the block uses:
three for type "1", two for type "2"), snake / snakebeta, log-scale or not. Lengths and batch (1-2).

Weights are random, written under the official key names: the VAE's raw magnitude-preserving conv
weights (v1-16.pth, normalised at load), BigVGAN's `generator.`-prefixed weight_g / weight_v. The
reference modules are imported from the checkout with their package `__init__`s skipped
(benchmarks/reference.py) and run in float32 on the CPU as `AutoEncoderModule` runs them: `VAE` after
`remove_weight_norm()`, its `decode` / `encode`, and `BigVGANVocoder` after `load_state_dict` of the
old weight-norm spelling and `remove_weight_norm()`. The VAE's encoder and decoder are the reference's
`Encoder1D` / `Decoder1D`, built with the drawn config in place of the ones `VAE` hard-codes.
"""

from __future__ import annotations

import contextlib
import importlib
import io
import math
import random
import sys
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from benchmarks.differential import ComponentWriter, generator_main, seeded, shapes
from benchmarks.reference import namespace_packages

_PACKAGES = (
    "ovi",
    "ovi.modules",
    "ovi.modules.mmaudio",
    "ovi.modules.mmaudio.ext",
    "ovi.modules.mmaudio.ext.autoencoder",  # its __init__ imports both BigVGANs (omegaconf, ...)
    "ovi.modules.mmaudio.ext.bigvgan",
)
_EXT = "ovi.modules.mmaudio.ext"

MEL_TOLERANCE = {"atol": 2e-5, "rtol": 1e-5}
WAVEFORM_TOLERANCE = {"atol": 2e-5, "rtol": 1e-4}
LATENT_TOLERANCE = {"atol": 1e-5, "rtol": 1e-4}
ATTN_LAYERS = "none inside levels (only the mid attention block)"  # v1-16, as the public cases say it
MEL_LOGS = {"log10(clamp(mel, min=1e-5))": torch.log10, "log(clamp(mel, min=1e-5))": torch.log}
VAE_WEIGHT_FORMAT = (
    "state dict with the key names of MMAudio ext_weights/v1-16.pth "
    "(raw magnitude-preserving weights, normalised at load time)"
)
VOCODER_WEIGHT_FORMAT = (
    "keys of best_netG.pt flattened: the .pt file is a dict {'generator': state_dict}; here each key is "
    "'generator.' + key. Weight-normed convs are stored as weight_g / weight_v (old torch weight_norm layout)"
)
POST_STD = 0.25  # conv_post's output std the vocoder's weights are scaled to: tanh mostly unsaturated


class Reference:
    """The reference's VAE, mel converter and BigVGAN generator modules."""

    def __init__(self, root: Path):
        namespace_packages(root, _PACKAGES)
        self.vae = importlib.import_module(f"{_EXT}.autoencoder.vae")
        self.bigvgan = importlib.import_module(f"{_EXT}.bigvgan.models")
        self.env = importlib.import_module(f"{_EXT}.bigvgan.env")
        self.mel = importlib.import_module(f"{_EXT}.mel_converter")

    def build_vae(self, cfg: dict[str, Any], state_dict: dict[str, Tensor] | None = None) -> Any:
        """`VAE` with the drawn encoder and decoder; with `state_dict`: loaded strictly, weight norm removed."""
        vae = self.vae.VAE(data_dim=cfg["data_dim"], embed_dim=cfg["embed_dim"], hidden_dim=cfg["hidden_dim"])
        common = dict(
            dim=cfg["hidden_dim"],
            ch_mult=tuple(cfg["ch_mult"]),
            num_res_blocks=cfg["num_res_blocks"],
            attn_layers=attn_levels(cfg),
            down_layers=list(cfg["down_layers"]),
            in_dim=cfg["data_dim"],
            embed_dim=cfg["embed_dim"],
            kernel_size=cfg["kernel_size"],
            clip_act=cfg["clip_act"],
        )
        vae.encoder = self.vae.Encoder1D(**common)
        vae.decoder = self.vae.Decoder1D(out_dim=cfg["data_dim"], **common)
        if state_dict is not None:
            vae.load_state_dict(state_dict, strict=True)
            vae.remove_weight_norm()
        return vae.eval()

    def build_vocoder(self, cfg: dict[str, Any], state_dict: dict[str, Tensor] | None = None) -> Any:
        """`BigVGANVocoder`; with `state_dict` (checkpoint keys, no prefix) loaded and weight norm removed."""
        vocoder = self.bigvgan.BigVGANVocoder(self.env.AttrDict(cfg))
        if state_dict is not None:
            vocoder.load_state_dict(state_dict, strict=True)
            with contextlib.redirect_stdout(io.StringIO()):  # it prints "Removing weight norm..."
                vocoder.remove_weight_norm()
        return vocoder.eval()

    def mel_converter(self, cfg: dict[str, Any]) -> Any:
        return self.mel.MelConverter(
            sampling_rate=cfg["sampling_rate"],
            n_fft=cfg["n_fft"],
            num_mels=cfg["num_mels"],
            hop_size=cfg["hop_size"],
            win_size=cfg["win_size"],
            fmin=cfg["fmin"],
            fmax=cfg["fmax"],
            norm_fn=MEL_LOGS[cfg["norm"]],
        )


# ---------------------------------------------------------------------------------------------------
# Configs


def draw_vae(rng: random.Random) -> dict[str, Any]:
    levels = rng.choice([1, 2, 3, 3, 4])
    attn_layers: str | list[int] = ATTN_LAYERS
    if rng.random() < 0.25:
        attn_layers = [3]  # the reference VAE's own setting: attention only in a fourth level
        levels = 4 if rng.random() < 0.6 else levels
    elif rng.random() < 0.4:
        attn_layers = sorted(rng.sample(range(levels), rng.randint(1, levels)))
    ch_mult = [rng.choice([1, 2, 3, 4]) for _ in range(levels)]
    down_layers = [level for level in range(levels) if rng.random() < 0.45]
    if not down_layers and rng.random() < 0.7:
        down_layers = [rng.randrange(levels)]
    return {
        "data_dim": 80 if rng.random() < 0.65 else 128,
        "embed_dim": 20 if rng.random() < 0.6 else rng.randint(2, 24),
        "hidden_dim": rng.choice([4, 6, 8, 12, 16]),
        "ch_mult": ch_mult,
        "num_res_blocks": rng.randint(1, 3),
        "attn_layers": attn_layers,
        "down_layers": down_layers,
        "kernel_size": rng.choice([3, 3, 3, 1, 5]),
        "clip_act": 256.0 if rng.random() < 0.7 else round(rng.uniform(0.5, 3.0), 3),
        "mp_sum_t": 0.3,
        "mp_silu_div": 0.596,
        "weight_norm_eps": 0.0001,
        # what the decoder does: one x2 per level whose predecessor the encoder downsamples after
        "temporal_upsampling": 2 ** sum(level - 1 in down_layers for level in range(1, levels)),
    }


def attn_levels(vae: dict[str, Any]) -> list[int]:
    """The levels with attention blocks (`attn_layers` is a list, or the words for v1-16's none)."""
    return list(vae["attn_layers"]) if isinstance(vae["attn_layers"], list) else []


def encoder_downsampling(vae: dict[str, Any]) -> int:
    return 2 ** len(vae["down_layers"])


def draw_vocoder(rng: random.Random, num_mels: int) -> dict[str, Any]:
    stages = rng.randint(2, 6)
    rates = [2] * 8  # 256 = 2**8, merged at random into `stages` factors
    while len(rates) > stages:
        i = rng.randrange(len(rates) - 1)
        rates[i : i + 2] = [rates[i] * rates[i + 1]]
    kernels = []
    for rate in rates:
        # kernel - rate odd: each stage yields one extra sample (padding (k - u) // 2); the reference allows it
        kernels.append(
            rng.choice([2 * rate, 2 * rate, rate, rate + 2, rate + 1 if rng.random() < 0.2 else rate])
        )
    resblock = rng.choice(["1", "2"])
    used = 3 if resblock == "1" else 2  # dilations AMPBlock1 / AMPBlock2 read; extra ones are ignored
    resblock_kernel_sizes = [rng.choice([1, 3, 5, 7, 11]) for _ in range(rng.randint(1, 3))]
    dilation_count = used + (rng.random() < 0.3)
    return {
        "resblock": resblock,
        "num_mels": num_mels,
        "upsample_rates": rates,
        "upsample_kernel_sizes": kernels,
        "upsample_initial_channel": rng.randint(2**stages, 3 * 2**stages),
        "resblock_kernel_sizes": resblock_kernel_sizes,
        "resblock_dilation_sizes": [
            [rng.choice([1, 2, 3, 5]) for _ in range(dilation_count)] for _ in resblock_kernel_sizes
        ],
        "activation": rng.choice(["snake", "snakebeta"]),
        "snake_logscale": rng.random() < 0.6,
    }


def draw_mel(rng: random.Random, num_mels: int) -> dict[str, Any]:
    """The reference's '16k' converter (log10), or with 128 bands mostly its '44k' one (natural log)."""
    if num_mels == 128 and rng.random() < 0.75:
        sr, n_fft, hop, win, fmin, fmax, norm = 44100, 2048, 512, 2048, 0, 44100 / 2, "log"
        if rng.random() < 0.4:
            n_fft = rng.choice([1024, 2048])
            hop = rng.choice([256, 441, 512])
            win = rng.choice([n_fft, 3 * n_fft // 4])
            fmin, fmax = rng.choice([0, 20]), rng.choice([44100 / 2, 16000, None])
    else:
        sr, n_fft, hop, win, fmin, fmax, norm = 16000, 1024, 256, 1024, 0, 8000, "log10"
        if rng.random() < 0.4:
            n_fft = rng.choice([512, 1024])
            hop = rng.choice([128, 160, 256])
            win = rng.choice([n_fft, 3 * n_fft // 4])
            fmin, fmax = rng.choice([0, 20]), rng.choice([8000, 7000, None])  # None: librosa's sr / 2
    return {
        "sampling_rate": sr,
        "n_fft": n_fft,
        "num_mels": num_mels,
        "hop_size": hop,
        "win_size": win,
        "fmin": fmin,
        "fmax": fmax,
        "norm": f"{norm}(clamp(mel, min=1e-5))",
        "center": False,
        "reflect_pad_each_side": (n_fft - hop) // 2,
        "mel_basis": f"librosa.filters.mel(sr={sr}, n_fft={n_fft}, n_mels={num_mels}, fmin={fmin}, "
        f"fmax={fmax}) (slaney, norm='slaney')",
    }


# ---------------------------------------------------------------------------------------------------
# Weights and inputs


def vae_weights(reference: Reference, cfg: dict[str, Any], gen: torch.Generator) -> dict[str, Tensor]:
    """Raw conv weights N(0, s²) with s per tensor, non-zero gains, the real mel statistics perturbed."""
    template = reference.build_vae(cfg).state_dict()
    state_dict = {}
    for key, tensor in template.items():
        if key.endswith(".weight"):
            scale = math.exp(0.5 * torch.randn((), generator=gen).item())
            state_dict[key] = scale * torch.randn(tensor.shape, generator=gen)
        elif key.endswith("learnable_gain"):
            state_dict[key] = 0.3 * torch.randn((), generator=gen)
        elif key == "data_mean":
            state_dict[key] = tensor + 0.05 * torch.randn(tensor.shape, generator=gen)
        elif key == "data_std":
            state_dict[key] = tensor * (1 + 0.05 * torch.randn(tensor.shape, generator=gen))
        else:
            raise KeyError(f"unexpected VAE key {key}")
    return state_dict


def vocoder_weights(reference: Reference, cfg: dict[str, Any], gen: torch.Generator) -> dict[str, Tensor]:
    """Checkpoint keys (weight_g / weight_v, no prefix): v ~ N(0, 1), g ~ 0.9 ± 0.2, small biases,
    snake parameters around their init, the module's own anti-aliasing filters (sometimes perturbed);
    conv_post's g then set so that its output has std POST_STD on a random mel."""
    template = reference.build_vocoder(cfg).state_dict()
    perturb_filters = torch.rand((), generator=gen).item() < 0.3
    state_dict = {}
    for key, tensor in template.items():
        if key.endswith(".original0"):
            key = key.removesuffix(".parametrizations.weight.original0") + ".weight_g"
            state_dict[key] = (0.9 + 0.2 * torch.randn(tensor.shape, generator=gen)).abs()
        elif key.endswith(".original1"):
            key = key.removesuffix(".parametrizations.weight.original1") + ".weight_v"
            state_dict[key] = torch.randn(tensor.shape, generator=gen)
        elif key.endswith(".bias"):
            state_dict[key] = 0.05 * torch.randn(tensor.shape, generator=gen)
        elif key.endswith((".alpha", ".beta")):
            if cfg["snake_logscale"]:
                state_dict[key] = 0.25 * torch.randn(tensor.shape, generator=gen)
            else:
                state_dict[key] = 0.5 + torch.rand(tensor.shape, generator=gen)
        elif key.endswith(".filter"):
            noise = 0.05 * torch.randn(tensor.shape, generator=gen) if perturb_filters else 0.0
            state_dict[key] = tensor * (1 + noise)
        else:
            raise KeyError(f"unexpected BigVGAN key {key}")
    # calibrate conv_post: its output with g = 1 and no bias, on a mel of plausible level
    state_dict["conv_post.weight_g"] = torch.ones_like(state_dict["conv_post.weight_g"])
    state_dict["conv_post.bias"] = torch.zeros_like(state_dict["conv_post.bias"])
    vocoder = reference.build_vocoder(cfg, state_dict)
    seen: list[Tensor] = []
    vocoder.conv_post.register_forward_hook(lambda module, args, output: seen.append(output))
    with torch.inference_mode():
        vocoder(log_mel(cfg["num_mels"], 1, 8, gen))
    state_dict["conv_post.weight_g"] *= POST_STD / max(seen[0].std().item(), 1e-6)
    state_dict["conv_post.bias"] = 0.03 * torch.randn(state_dict["conv_post.bias"].shape, generator=gen)
    return state_dict


def log_mel(num_mels: int, batch: int, frames: int, gen: torch.Generator) -> Tensor:
    """A log10-mel of speech-like level: from about -1.6 (low bands) to -3 (high), spread about 1."""
    level = torch.linspace(-1.6, -3.0, num_mels).view(1, -1, 1)
    return level + 0.9 * torch.randn(batch, num_mels, frames, generator=gen)


def waveform(batch: int, length: int, sample_rate: int, gen: torch.Generator) -> Tensor:
    """Noise plus a few tones; sometimes loud enough to be clamped, sometimes with a silent stretch."""
    t = torch.arange(length) / float(sample_rate)
    out = 0.2 * torch.randn(batch, length, generator=gen)
    for _ in range(3):
        freq = 50 + 0.44 * sample_rate * torch.rand((), generator=gen)
        out += 0.3 * torch.rand((batch, 1), generator=gen) * torch.sin(2 * math.pi * freq * t)
    if torch.rand((), generator=gen) < 0.3:
        out *= 3.0
    if torch.rand((), generator=gen) < 0.3:
        start = int(torch.randint(0, length // 2, (), generator=gen))
        out[:, start : start + length // 3] = 0.0
    return out


# ---------------------------------------------------------------------------------------------------
# Cases


def decode_case(writer: ComponentWriter, reference: Reference, rng: random.Random, index: int) -> None:
    vae_cfg = draw_vae(rng)
    voc_cfg = draw_vocoder(rng, vae_cfg["data_dim"])
    gen = seeded(rng)
    vae_sd, voc_sd = vae_weights(reference, vae_cfg, gen), vocoder_weights(reference, voc_cfg, gen)
    batch, steps = rng.choice([1, 1, 2]), rng.randint(1, 24)
    latent = torch.randn(batch, vae_cfg["embed_dim"], steps, generator=gen)
    vae, vocoder = reference.build_vae(vae_cfg, vae_sd), reference.build_vocoder(voc_cfg, voc_sd)
    with torch.inference_mode():
        mel = vae.decode(latent)
        wave = vocoder(mel)
    name = f"mmaudio_decode_{index}_T{steps}"
    tensors = {"latent": latent, "mel": mel, "waveform": wave}
    up, hop, d = vae_cfg["temporal_upsampling"], math.prod(voc_cfg["upsample_rates"]), vae_cfg["data_dim"]
    mel_cfg = draw_mel(rng, d)
    log, rate = mel_cfg["norm"].split("(")[0], mel_cfg["sampling_rate"]
    writer.case(
        name=name,
        call=(
            f"audio decode: latent [B,{vae_cfg['embed_dim']},T] -> VAE decoder -> un-normalise "
            f"(x*std{d}+mean{d}) -> mel [B,{d},{up}T] ({log}) -> BigVGAN -> waveform [B,1,{up * hop}T] "
            f"at {rate} Hz"
        ),
        config={"vae": vae_cfg, "vocoder": voc_cfg, "mel": mel_cfg},
        weight_files={
            "vae": writer.tensors(f"{name}_vae.safetensors", vae_sd),
            "vocoder": writer.tensors(f"{name}_bigvgan.safetensors", prefixed(voc_sd)),
        },
        weight_format={"vae": VAE_WEIGHT_FORMAT, "vocoder": VOCODER_WEIGHT_FORMAT},
        input_file=writer.tensors(f"{name}.safetensors", tensors),
        inputs=shapes({"latent": latent}),
        outputs=shapes({"mel": mel, "waveform": wave}),
        dtype="float32",
        tolerance={"mel": MEL_TOLERANCE, "waveform": WAVEFORM_TOLERANCE},
        stats={"wave_std": wave.std().item(), "mel_mean": mel.mean().item()},
    )


def vocoder_case(writer: ComponentWriter, reference: Reference, rng: random.Random, index: int) -> None:
    cfg = draw_vocoder(rng, 80 if rng.random() < 0.8 else rng.choice([64, 128]))
    gen = seeded(rng)
    state_dict = vocoder_weights(reference, cfg, gen)
    batch, frames = rng.choice([1, 1, 2]), rng.randint(1, 20)
    mel = log_mel(cfg["num_mels"], batch, frames, gen)
    with torch.inference_mode():
        wave = reference.build_vocoder(cfg, state_dict)(mel)
    name = f"mmaudio_vocoder_{index}_M{frames}"
    writer.case(
        name=name,
        call=f"vocoder only: log10-mel [B,{cfg['num_mels']},M] -> waveform "
        f"[B,1,{math.prod(cfg['upsample_rates'])}M]",
        config={"vocoder": cfg},
        weight_files={"vocoder": writer.tensors(f"{name}_bigvgan.safetensors", prefixed(state_dict))},
        weight_format={"vocoder": VOCODER_WEIGHT_FORMAT},
        input_file=writer.tensors(f"{name}.safetensors", {"mel": mel, "waveform": wave}),
        inputs=shapes({"mel": mel}),
        outputs=shapes({"waveform": wave}),
        dtype="float32",
        tolerance=WAVEFORM_TOLERANCE,
    )


def encode_case(writer: ComponentWriter, reference: Reference, rng: random.Random, index: int) -> None:
    vae_cfg = draw_vae(rng)
    mel_cfg = draw_mel(rng, vae_cfg["data_dim"])
    gen = seeded(rng)
    state_dict = vae_weights(reference, vae_cfg, gen)
    # at least one latent step: M >= 2**downsamples frames
    hop, pad = mel_cfg["hop_size"], mel_cfg["reflect_pad_each_side"]
    shortest = max((encoder_downsampling(vae_cfg) - 1) * hop + mel_cfg["n_fft"] - 2 * pad, pad + 1)
    batch, length = rng.choice([1, 1, 2]), rng.randint(shortest, shortest + 6000)
    wave = waveform(batch, length, mel_cfg["sampling_rate"], gen)
    vae = reference.build_vae(vae_cfg, state_dict)
    with torch.inference_mode():
        mel = reference.mel_converter(mel_cfg)(wave)
        posterior = vae.encode(mel)
    name = f"mmaudio_encode_{index}_L{length}"
    tensors = {"waveform": wave, "mel": mel, "latent_mean": posterior.mean, "latent_logvar": posterior.logvar}
    d, e = vae_cfg["data_dim"], vae_cfg["embed_dim"]
    writer.case(
        name=name,
        call=(
            f"audio encode (NOT used by Ovi inference, provided for completeness): waveform [B,L] -> mel "
            f"[B,{d},M] -> normalise ((x-mean{d})/std{d}) -> VAE encoder -> (mean, logvar) each "
            f"[B,{e},floor(M/{encoder_downsampling(vae_cfg)})], logvar clamped to [-30,20]"
        ),
        config={"vae": vae_cfg, "mel": mel_cfg},
        weight_files={"vae": writer.tensors(f"{name}_vae.safetensors", state_dict)},
        weight_format={"vae": VAE_WEIGHT_FORMAT},
        input_file=writer.tensors(f"{name}.safetensors", tensors),
        inputs=shapes({"waveform": wave}),
        outputs=shapes({k: v for k, v in tensors.items() if k != "waveform"}),
        dtype="float32",
        tolerance={"mel": MEL_TOLERANCE, "latent": LATENT_TOLERANCE},
    )


def prefixed(state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
    """best_netG.pt's {"generator": state_dict}, flattened as the golden files store it."""
    return {f"generator.{key}": tensor for key, tensor in state_dict.items()}


def generate(reference: Path, out: Path, rng: random.Random, cases: int) -> None:
    ref = Reference(reference)
    writer = ComponentWriter(out, "mmaudio", format="safetensors + manifest.json")
    for index in range(cases):
        for make in (decode_case, vocoder_case, encode_case):
            make(writer, ref, rng, index)
    writer.close()


if __name__ == "__main__":
    sys.exit(generator_main(generate))
