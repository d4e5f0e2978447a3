"""The weights directory: which official files a variant needs, checking them, downloading them.

The layout is the one the reference's `download_weights.py` creates, so a directory prepared for the
reference works here unchanged (see weights/README.md):

    <weights>/Wan2.2-TI2V-5B/models_t5_umt5-xxl-enc-bf16.pth
    <weights>/Wan2.2-TI2V-5B/Wan2.2_VAE.pth
    <weights>/Wan2.2-TI2V-5B/google/umt5-xxl/...        (tokenizer files)
    <weights>/MMAudio/ext_weights/v1-16.pth
    <weights>/MMAudio/ext_weights/best_netG.pt
    <weights>/Ovi/model.safetensors | model_960x960.safetensors | model_960x960_10s.safetensors
    <weights>/Ovi/model_fp8_e4m3fn.safetensors           (optional, community fp8 file, 720x720_5s)
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ovi_server.config import OviConfig
from ovi_server.errors import WeightsError

logger = logging.getLogger(__name__)

WAN_REPO = "Wan-AI/Wan2.2-TI2V-5B"
MMAUDIO_REPO = "hkchengrex/MMAudio"
OVI_REPO = "chetwinlow1/Ovi"
FP8_REPO = "rkfg/Ovi-fp8_quantized"


@dataclass(frozen=True)
class WeightFile:
    """One file (or folder) of the layout and where it comes from."""

    local_dir: str  # folder under the weights directory that mirrors the repo (snapshot_download local_dir)
    repo_id: str
    repo_path: str  # file (or folder) inside the repo
    what: str
    component: str  # which loader checks its keys: fusion, t5, tokenizer, video_vae, audio_vae, vocoder
    is_dir: bool = False

    @property
    def path(self) -> str:
        return f"{self.local_dir}/{self.repo_path}"

    @property
    def pattern(self) -> str:
        return f"{self.repo_path}/*" if self.is_dir else self.repo_path


def required_files(cfg: OviConfig, fp8: bool = False) -> list[WeightFile]:
    """Every file the variant needs, in the reference's layout."""
    if fp8 and not cfg.fp8_checkpoint:
        raise WeightsError(f"variant {cfg.name} has no fp8 checkpoint; fp8 exists for 720x720_5s only")
    fusion = Path(cfg.fp8_checkpoint if fp8 else cfg.checkpoint)
    return [
        WeightFile(
            str(fusion.parent),
            FP8_REPO if fp8 else OVI_REPO,
            fusion.name,
            f"Ovi fusion model ({cfg.name})",
            "fusion",
        ),
        WeightFile(
            "Wan2.2-TI2V-5B", WAN_REPO, "models_t5_umt5-xxl-enc-bf16.pth", "umt5-xxl text encoder", "t5"
        ),
        WeightFile(
            "Wan2.2-TI2V-5B", WAN_REPO, "google/umt5-xxl", "umt5-xxl tokenizer", "tokenizer", is_dir=True
        ),
        WeightFile("Wan2.2-TI2V-5B", WAN_REPO, "Wan2.2_VAE.pth", "Wan2.2 video VAE", "video_vae"),
        WeightFile("MMAudio", MMAUDIO_REPO, "ext_weights/v1-16.pth", "MMAudio 16 kHz VAE", "audio_vae"),
        WeightFile("MMAudio", MMAUDIO_REPO, "ext_weights/best_netG.pt", "BigVGAN vocoder", "vocoder"),
    ]


def paths(weights_dir: Path, cfg: OviConfig, fp8: bool = False) -> dict[str, Path]:
    """component -> absolute path, for the loaders."""
    return {wf.component: weights_dir / wf.path for wf in required_files(cfg, fp8)}


@dataclass(frozen=True)
class FileReport:
    file: WeightFile
    present: bool
    size_bytes: int
    keys_ok: bool | None  # None: not checked (absent, or a folder)
    problem: str = ""

    def line(self) -> str:
        if not self.present:
            return f"MISSING  {self.file.path}  ({self.file.what}; from {self.file.repo_id})"
        size = (
            f"{self.size_bytes / 1e9:.2f} GB" if self.size_bytes >= 1e8 else f"{self.size_bytes / 1e6:.1f} MB"
        )
        state = {True: "OK", False: "BAD", None: "OK"}[self.keys_ok]
        tail = f"  {self.problem}" if self.problem else ("" if self.keys_ok is None else "  keys match")
        return f"{state:<8} {self.file.path}  {size}{tail}"


# component -> function(path, cfg) raising WeightsError when the file's keys do not fit the model
KeyChecker = Callable[[Path, OviConfig], None]


def key_checkers() -> dict[str, KeyChecker]:
    """Does a checkpoint's key set fit the model we build? One check per component.

    Only the file's index is read (safetensors header / mmap'd pickle), never the tensor data, and the
    models are built on the meta device, so checking a 23 GB file takes seconds. Each check compares
    against the key set the component's own loader demands, in the checkpoint's naming. The model
    modules (torch) are imported here, not when this module is.
    """
    from ovi_server.media import audio_vae, video_vae, vocoder
    from ovi_server.models import t5
    from ovi_server.models.fusion import build_fusion
    from ovi_server.models.loading import check_keys, meta_device, read_state_dict

    def check_fusion(path: Path, cfg: OviConfig) -> None:
        expected = set(build_fusion(cfg.video, cfg.audio).state_dict())
        check_keys(path, expected, set(read_state_dict(path)), "fusion model")

    def check_t5(path: Path, cfg: OviConfig) -> None:
        found = set(read_state_dict(path))
        check_keys(path, t5.official_keys(cfg.text_encoder), found, "text encoder (umt5)")

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
        found = set(
            vocoder.unify_weight_norm_spelling(dict.fromkeys(read_state_dict(path, subkey="generator")))
        )
        check_keys(path, expected, found, "BigVGAN vocoder")

    return {
        "fusion": check_fusion,
        "t5": check_t5,
        "video_vae": check_video_vae,
        "audio_vae": check_audio_vae,
        "vocoder": check_vocoder,
    }


def check(weights_dir: Path, cfg: OviConfig, fp8: bool = False, verify_keys: bool = True) -> list[FileReport]:
    """Presence, size and (for checkpoints) whether the keys match the model the variant builds."""
    checkers = key_checkers() if verify_keys else {}
    reports = []
    for wf in required_files(cfg, fp8):
        path = weights_dir / wf.path
        if not path.exists():
            reports.append(FileReport(wf, False, 0, None))
            continue
        if path.is_dir():
            size = sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
            empty = size == 0
            reports.append(
                FileReport(wf, True, size, False if empty else None, "empty folder" if empty else "")
            )
            continue
        checker = checkers.get(wf.component)
        if checker is None:
            reports.append(FileReport(wf, True, path.stat().st_size, None))
            continue
        try:
            checker(path, cfg)
            reports.append(FileReport(wf, True, path.stat().st_size, True))
        except WeightsError as exc:
            reports.append(FileReport(wf, True, path.stat().st_size, False, str(exc)))
    return reports


def download(
    weights_dir: Path,
    cfg: OviConfig,
    fp8: bool = False,
    snapshot_download: Callable[..., str] | None = None,
) -> list[Path]:
    """Fetches the variant's official files with huggingface_hub into the reference's layout.

    Files already present are skipped by huggingface_hub itself. Returns the local paths.
    """
    if snapshot_download is None:
        from huggingface_hub import snapshot_download
    files = required_files(cfg, fp8)
    by_repo: dict[tuple[str, str], list[str]] = {}
    for wf in files:
        by_repo.setdefault((wf.repo_id, wf.local_dir), []).append(wf.pattern)
    for (repo_id, local_dir), patterns in by_repo.items():
        target = weights_dir / local_dir
        target.mkdir(parents=True, exist_ok=True)
        logger.info("downloading %s (%s) into %s", repo_id, ", ".join(patterns), target)
        started = time.monotonic()
        snapshot_download(repo_id=repo_id, local_dir=str(target), allow_patterns=patterns)
        logger.info("downloaded %s in %.1fs", repo_id, time.monotonic() - started)
    missing = [wf.path for wf in files if not (weights_dir / wf.path).exists()]
    if missing:
        raise WeightsError(f"download finished but these files are still missing: {', '.join(missing)}")
    return [weights_dir / wf.path for wf in files]
