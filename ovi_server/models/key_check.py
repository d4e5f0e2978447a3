"""Key checks for `ovi-server weights check`: does a checkpoint's key set fit the model we build?

Only the file's index is read (safetensors header / mmap'd pickle), never the tensor data, and the
models are built on the meta device, so checking a 23 GB file takes seconds. Each check compares
against the key set the component's own loader demands, in the checkpoint's naming.
"""

from __future__ import annotations

from pathlib import Path

from ovi_server.config import OviConfig
from ovi_server.media import audio_vae, video_vae, vocoder
from ovi_server.models import t5
from ovi_server.models.fusion import build_fusion
from ovi_server.models.loading import check_keys, meta_device, read_state_dict


def check_fusion(path: Path, cfg: OviConfig) -> None:
    expected = set(build_fusion(cfg.video, cfg.audio).state_dict())
    check_keys(path, expected, set(read_state_dict(path)), "fusion model")


def check_t5(path: Path, cfg: OviConfig) -> None:
    check_keys(path, t5.official_keys(cfg.text_encoder), set(read_state_dict(path)), "text encoder (umt5)")


def check_video_vae(path: Path, cfg: OviConfig) -> None:
    expected = video_vae.official_keys(cfg.video_vae)
    check_keys(path, expected, set(read_state_dict(path)), "video VAE (Wan2.2)")


def check_audio_vae(path: Path, cfg: OviConfig) -> None:
    with meta_device():
        expected = set(audio_vae.AudioVAE(cfg.audio_vae).state_dict())
    check_keys(path, expected, set(read_state_dict(path)), "MMAudio audio VAE (v1-16 layout)")


def check_vocoder(path: Path, cfg: OviConfig) -> None:
    with meta_device():
        expected = vocoder.official_keys(vocoder.BigVGAN(cfg.vocoder))
    found = set(vocoder.unify_weight_norm_spelling(dict.fromkeys(read_state_dict(path, subkey="generator"))))
    check_keys(path, expected, found, "BigVGAN vocoder")


KEY_CHECKERS = {
    "fusion": check_fusion,
    "t5": check_t5,
    "video_vae": check_video_vae,
    "audio_vae": check_audio_vae,
    "vocoder": check_vocoder,
}
