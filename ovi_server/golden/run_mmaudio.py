"""Golden runner for `mmaudio`: MMAudio's audio VAE, mel front-end and BigVGAN vocoder.

Each case's weight files go through the server's loaders (`load_audio_vae`, `load_vocoder`) with the
case's own configs. What runs depends on the inputs the case names in its manifest:
* `latent`: AudioVAE.decode -> `mel`, then (if the case has vocoder weights) BigVGAN -> `waveform`,
  the chain AudioDecoder runs in the pipeline;
* `mel`: the vocoder alone -> `waveform`;
* `waveform`: MelSpectrogram -> `mel`, AudioVAE.encode -> `latent_mean`, `latent_logvar`.
Every other tensor in the case's input file is an expected output and must be produced and match.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import Tensor

from ovi_server.config import AudioVAEConfig, VocoderConfig
from ovi_server.engine.device import CPU_FP32
from ovi_server.golden.cases import CaseResult, Comparison, GoldenCase
from ovi_server.media.audio_vae import MelSpectrogram, load_audio_vae
from ovi_server.media.vocoder import load_vocoder


def run_case(case: GoldenCase) -> CaseResult:
    tensors = case.tensors
    input_names = set(case.spec["inputs"])
    produced: dict[str, Tensor] = {}
    weight_files = case.spec.get("weight_files", {})

    if "latent" in input_names:
        vae = load_audio_vae(case.weight_path("vae"), vae_config(case.config), CPU_FP32, with_encoder=False)
        produced["mel"] = vae.decode(tensors["latent"])
        if "vocoder" in weight_files:
            produced["waveform"] = _vocoder(case).vocode(produced["mel"])
    elif "mel" in input_names:
        produced["waveform"] = _vocoder(case).vocode(tensors["mel"])
    elif "waveform" in input_names:
        cfg = vae_config(case.config)
        produced["mel"] = MelSpectrogram(cfg)(tensors["waveform"])
        vae = load_audio_vae(case.weight_path("vae"), cfg, CPU_FP32)
        produced["latent_mean"], produced["latent_logvar"] = vae.encode(produced["mel"])
    else:
        raise ValueError(f"{case.name}: no mmaudio path takes inputs {sorted(input_names)}")

    return _compare(case, {k: v for k, v in tensors.items() if k not in input_names}, produced)


def _vocoder(case: GoldenCase):
    return load_vocoder(case.weight_path("vocoder"), vocoder_config(case.config), CPU_FP32)


def _compare(case: GoldenCase, expected: Mapping[str, Tensor], produced: Mapping[str, Tensor]) -> CaseResult:
    """Every expected tensor against its own tolerance (per-output or one for the whole case)."""
    failures: list[str] = []
    worst = 0.0
    for name, reference in sorted(expected.items()):
        comparison = Comparison(_tolerance(case.spec.get("tolerance", {}), name))
        if name not in produced:
            comparison.failures.append(f"{name}: expected by the case but not produced")
            comparison.max_abs_err = float("inf")
        else:
            comparison.tensor(name, produced[name], reference)
        failures += comparison.failures
        worst = max(worst, comparison.max_abs_err)
    detail = "; ".join(failures[:3]) + (f"; and {len(failures) - 3} more" if len(failures) > 3 else "")
    return CaseResult(case.component, case.name, not failures, worst, detail)


def _tolerance(tolerance: Mapping[str, Any], name: str) -> Mapping[str, float]:
    """`{"atol", "rtol"}` for the case, or per output: `mel`, or a prefix group (`latent` for `latent_mean`)."""
    if "atol" in tolerance or "rtol" in tolerance:
        return tolerance
    if name in tolerance:
        return tolerance[name]
    for group, value in tolerance.items():
        if name.startswith(group + "_"):
            return value
    raise KeyError(f"no tolerance for output {name!r} in {dict(tolerance)}")


# ---------------------------------------------------------------------------------------------------
# Case configs -> our dataclasses. Keys that only describe fixed behaviour are checked, not dropped.


def vae_config(config: Mapping[str, Any]) -> AudioVAEConfig:
    """The case's `vae` section (and its `mel` section, if any) as an AudioVAEConfig."""
    vae = dict(config["vae"])
    attn = vae.pop("attn_layers", None)
    upsampling = vae.pop("temporal_upsampling", None)
    fields = _tuples(vae)
    # A list names the levels with attention; the public manifest describes v1-16's "none" in words.
    if isinstance(attn, list):
        fields["attn_layers"] = tuple(attn)
    elif attn is not None and not (isinstance(attn, str) and attn.startswith("none inside levels")):
        raise ValueError(f"attn_layers {attn!r}: expected a list of levels or 'none inside levels ...'")
    mel = dict(config.get("mel", {}))
    if mel:
        num_mels = mel.pop("num_mels")
        if num_mels != fields.get("data_dim", AudioVAEConfig.data_dim):
            raise ValueError(f"mel num_mels {num_mels} differs from the VAE's data_dim")
        norm, center = mel.pop("norm", "log10"), mel.pop("center", False)
        pad, basis = mel.pop("reflect_pad_each_side", None), mel.pop("mel_basis", "slaney")
        # "log10(clamp(mel, min=1e-5))" (16k) or "log(clamp(mel, min=1e-5))" (44k: natural log)
        mel_log = norm.split("(")[0]
        if mel_log not in ("log10", "log") or center or "slaney" not in basis:
            raise ValueError(f"mel front-end {norm!r}, center={center}, {basis!r} not implemented")
        fields["mel_log"] = mel_log
        if pad is not None and pad != (mel["n_fft"] - mel["hop_size"]) // 2:
            raise ValueError(f"reflect pad {pad} is not (n_fft - hop_size) / 2")
        fields |= _tuples(mel)
    cfg = AudioVAEConfig(**fields)
    if upsampling is not None and upsampling != cfg.temporal_upsampling:
        raise ValueError(f"temporal_upsampling {upsampling} but down_layers {cfg.down_layers}")
    return cfg


def vocoder_config(config: Mapping[str, Any]) -> VocoderConfig:
    return VocoderConfig(**_tuples(config["vocoder"]))


def _tuples(section: Mapping[str, Any]) -> dict[str, Any]:
    """JSON lists (and lists of lists) -> tuples, as the frozen config dataclasses hold them."""

    def convert(value: Any) -> Any:
        return tuple(convert(v) for v in value) if isinstance(value, list) else value

    return {key: convert(value) for key, value in section.items()}
