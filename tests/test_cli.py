"""`ovi-server generate` as a user runs it: a real MP4 from the tiny variant, text and image inputs."""

from __future__ import annotations

import base64
import subprocess
import sys

import pytest
from PIL import Image

from ovi_server.cli import main
from ovi_server.media.mux import probe
from tests.conftest import REPO

PROMPT = "A cat says <S>hello<E> Audio: purring"


def _check_tiny_mp4(path, width=96, height=64):
    info = probe(path)
    assert info["video_codec"] == "h264" and info["pix_fmt"] == "yuv420p" and info["fps"] == 24.0
    assert info["audio_codec"] == "aac" and info["sample_rate"] == 16000
    assert (info["width"], info["height"]) == (width, height)
    assert info["num_frames"] == 9  # tiny: 3 latent frames -> 1 + 4*2
    assert abs(info["video_duration"] - 9 / 24) < 1e-6
    assert abs(info["audio_duration"] - info["video_duration"]) <= 1 / 24
    return info


def test_generate_command_writes_the_mp4(tmp_path):
    out = tmp_path / "out.mp4"
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "ovi_server.cli",
            "generate",
            PROMPT,
            "--variant",
            "tiny",
            "--seed",
            "7",
            "-o",
            str(out),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr
    _check_tiny_mp4(out)
    assert "seed=7" in run.stdout and "96x64" in run.stdout and "9 frames" in run.stdout
    assert "denoise" in run.stderr and "4/4" in run.stderr  # the progress bar


@pytest.fixture
def png(tmp_path):
    path = tmp_path / "first.png"
    Image.new("RGB", (140, 100), (20, 120, 200)).save(path)
    return path


def test_generate_with_a_png_file(tmp_path, png, capsys):
    out = tmp_path / "i2v.mp4"
    assert main(["generate", PROMPT, "--image", str(png), "--steps", "2", "-o", str(out)]) == 0
    _check_tiny_mp4(out)  # 140x100 on the 64*96 area -> 96x64


def test_generate_with_a_data_uri(tmp_path, png):
    out = tmp_path / "i2v.mp4"
    uri = "data:image/png;base64," + base64.b64encode(png.read_bytes()).decode()
    assert main(["generate", PROMPT, "--image", uri, "--steps", "2", "-o", str(out)]) == 0
    _check_tiny_mp4(out)


def test_generate_reports_bad_input_without_a_traceback(tmp_path, capsys):
    assert main(["generate", "A man says <S>hi", "-o", str(tmp_path / "x.mp4")]) == 2
    err = capsys.readouterr().err
    assert "error: prompt: <S> at character offset 11 is never closed" in err
    assert "Traceback" not in err
    assert not (tmp_path / "x.mp4").exists()
    assert main(["generate", PROMPT, "--image", str(tmp_path / "missing.png")]) == 2
    assert "missing.png: no such file" in capsys.readouterr().err


@pytest.mark.parametrize(("flag", "expected"), [([], "off"), (["--compile", "on"], "on")])
def test_generate_compiles_only_when_asked(monkeypatch, tmp_path, flag, expected):
    """One clip does not pay a start-up compile that only a server earns back: --compile auto is off
    for `generate`; --compile on is honoured."""
    from ovi_server.engine import pipeline as pipeline_module

    seen = []

    def from_config(engine, parallel=None):
        seen.append(engine.compile)
        raise SystemExit(0)  # the choice is all this test needs; nothing is loaded

    monkeypatch.setattr(pipeline_module.OviPipeline, "from_config", staticmethod(from_config))
    with pytest.raises(SystemExit):
        main(["generate", PROMPT, *flag, "-o", str(tmp_path / "x.mp4")])
    assert seen == [expected]
