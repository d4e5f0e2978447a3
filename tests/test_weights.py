"""The weights directory: layout, `check` reports, `download` through huggingface_hub (faked locally)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

from ovi_server import weights
from ovi_server.config import load_variant
from ovi_server.errors import WeightsError
from tests.conftest import golden_cases

TINY = load_variant("tiny")


def test_layout_matches_the_reference_download_script():
    paths = {wf.component: wf.path for wf in weights.required_files(load_variant("960x960_10s"))}
    assert paths == {
        "fusion": "Ovi/model_960x960_10s.safetensors",
        "t5": "Wan2.2-TI2V-5B/models_t5_umt5-xxl-enc-bf16.pth",
        "tokenizer": "Wan2.2-TI2V-5B/google/umt5-xxl",
        "video_vae": "Wan2.2-TI2V-5B/Wan2.2_VAE.pth",
        "audio_vae": "MMAudio/ext_weights/v1-16.pth",
        "vocoder": "MMAudio/ext_weights/best_netG.pt",
    }
    fp8 = weights.required_files(load_variant("720x720_5s"), fp8=True)[0]
    assert fp8.path == "Ovi/model_fp8_e4m3fn.safetensors" and fp8.repo_id == weights.FP8_REPO
    with pytest.raises(WeightsError, match="no fp8 checkpoint"):
        weights.required_files(load_variant("960x960_5s"), fp8=True)


def _tiny_fusion_file(root: Path, drop: str | None = None) -> Path:
    state = load_file(str(golden_cases("fusion")[0].weight_path()))
    if drop:
        del state[drop]
    path = root / TINY.checkpoint
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(path))
    return path


def test_check_reports_missing_files_and_key_mismatches(tmp_path):
    reports = {r.file.component: r for r in weights.check(tmp_path, TINY)}
    assert not any(r.present for r in reports.values())
    assert reports["fusion"].line().startswith("MISSING  Ovi/model.safetensors")

    _tiny_fusion_file(tmp_path)
    assert {r.file.component: r for r in weights.check(tmp_path, TINY)}["fusion"].keys_ok is True

    _tiny_fusion_file(tmp_path, drop="video_model.head.modulation")
    bad = {r.file.component: r for r in weights.check(tmp_path, TINY)}["fusion"]
    assert bad.keys_ok is False and "video_model.head.modulation" in bad.problem
    assert bad.line().startswith("BAD")


def test_download_asks_huggingface_hub_for_the_official_repos(tmp_path):
    """A local directory stands in for the Hub: the fake copies what the real call would fetch."""
    hub = tmp_path / "hub"
    for repo, files in {
        weights.OVI_REPO: ["model.safetensors", "model_960x960.safetensors"],
        weights.WAN_REPO: [
            "models_t5_umt5-xxl-enc-bf16.pth",
            "Wan2.2_VAE.pth",
            "google/umt5-xxl/spiece.model",
            "unrelated.bin",
        ],
        weights.MMAUDIO_REPO: ["ext_weights/v1-16.pth", "ext_weights/best_netG.pt", "weights/large.pth"],
    }.items():
        for name in files:
            (hub / repo / name).parent.mkdir(parents=True, exist_ok=True)
            (hub / repo / name).write_bytes(name.encode())
    calls = []

    def fake_snapshot_download(repo_id, local_dir, allow_patterns):
        calls.append(
            (repo_id, Path(local_dir).relative_to(tmp_path / "w").as_posix(), sorted(allow_patterns))
        )
        for src in (hub / repo_id).rglob("*"):
            rel = src.relative_to(hub / repo_id).as_posix()
            if src.is_file() and any(
                Path(rel).match(p) or rel.startswith(p.removesuffix("*")) for p in allow_patterns
            ):
                (Path(local_dir) / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy(src, Path(local_dir) / rel)
        return local_dir

    out = weights.download(
        tmp_path / "w", load_variant("720x720_5s"), snapshot_download=fake_snapshot_download
    )
    assert sorted(calls) == sorted(
        [
            (weights.MMAUDIO_REPO, "MMAudio", ["ext_weights/best_netG.pt", "ext_weights/v1-16.pth"]),
            (
                weights.WAN_REPO,
                "Wan2.2-TI2V-5B",
                ["Wan2.2_VAE.pth", "google/umt5-xxl/*", "models_t5_umt5-xxl-enc-bf16.pth"],
            ),
            (weights.OVI_REPO, "Ovi", ["model.safetensors"]),
        ]
    )
    assert all(p.exists() for p in out)
    assert not (tmp_path / "w" / "Ovi" / "model_960x960.safetensors").exists()
    assert not (tmp_path / "w" / "MMAudio" / "weights").exists()


def test_download_that_leaves_a_file_missing_is_an_error(tmp_path):
    with pytest.raises(WeightsError, match="still missing: Ovi/model.safetensors"):
        weights.download(tmp_path, TINY, snapshot_download=lambda **kw: kw["local_dir"])


def test_check_reads_every_official_file_of_a_complete_directory(tmp_path):
    """The golden tiny files, saved in the official formats and layout, pass every key check."""
    import torch

    _tiny_fusion_file(tmp_path)
    files = {wf.component: tmp_path / wf.path for wf in weights.required_files(TINY)}
    t5_case, vae_case, audio_case = (
        golden_cases("t5")[0],
        golden_cases("wan_vae")[0],
        golden_cases("mmaudio")[0],
    )
    for component, source in (("t5", t5_case.weight_path()), ("video_vae", vae_case.weight_path())):
        files[component].parent.mkdir(parents=True, exist_ok=True)
        torch.save(load_file(str(source)), files[component])
    audio_dir = audio_case.folder
    files["audio_vae"].parent.mkdir(parents=True, exist_ok=True)
    torch.save(load_file(str(audio_dir / "mmaudio_vae_tiny.safetensors")), files["audio_vae"])
    flat = load_file(str(audio_dir / "bigvgan_tiny.safetensors"))
    torch.save({"generator": {k.removeprefix("generator."): v for k, v in flat.items()}}, files["vocoder"])
    files["tokenizer"].mkdir(parents=True)
    shutil.copy(t5_case.folder / "tiny_spiece.model", files["tokenizer"] / "spiece.model")

    reports = weights.check(tmp_path, TINY)
    assert all(r.present for r in reports), [r.line() for r in reports]
    assert [r.file.component for r in reports if r.keys_ok is not True] == [
        "tokenizer"
    ]  # a folder: presence only

    state = torch.load(files["video_vae"], weights_only=True)
    state.pop(next(iter(state)))
    torch.save(state, files["video_vae"])
    bad = {r.file.component: r for r in weights.check(tmp_path, TINY)}["video_vae"]
    assert bad.keys_ok is False and "1 keys missing" in bad.problem and "Wan2.2_VAE.pth" in bad.problem
