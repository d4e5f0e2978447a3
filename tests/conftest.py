"""Shared fixtures: the golden directory and its cases, tiny presets."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from ovi_server.golden.cases import GoldenCase, load_cases

REPO = Path(__file__).resolve().parents[1]
# the reference's test vectors, copied from the project's shared/golden (tests/golden/README.md)
GOLDEN_DIR = REPO / "tests" / "golden"


def golden_cases(component: str) -> list[GoldenCase]:
    """The public golden cases of one component (tests/golden/<component>/manifest.json)."""
    if not (GOLDEN_DIR / component / "manifest.json").is_file():
        pytest.fail(
            f"golden vectors missing: {GOLDEN_DIR / component}; it ships with the repository (tests/golden)"
        )
    return load_cases(GOLDEN_DIR, component)


def run_module(module: str, *args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    """`python -m module args...` from the repository root, its output captured as text."""
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
