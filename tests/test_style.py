"""`ruff check` and `ruff format --check` settle style (STYLE.md §12); CI runs them through pytest."""

from __future__ import annotations

import shutil
import subprocess
import sys

import pytest

from tests.conftest import REPO


@pytest.mark.parametrize("command", [["check"], ["format", "--check"]], ids=["check", "format"])
def test_ruff(command):
    ruff = shutil.which("ruff") or shutil.which("ruff", path=str(REPO / ".venv" / "bin"))
    args = [ruff] if ruff else [sys.executable, "-m", "ruff"]
    run = subprocess.run([*args, *command, "."], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stdout + run.stderr
