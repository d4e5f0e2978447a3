"""Shared fixtures: the golden directory and its cases, tiny presets."""

from __future__ import annotations

from pathlib import Path

import pytest

from ovi_server.golden.cases import GoldenCase, load_cases

REPO = Path(__file__).resolve().parents[1]
GOLDEN_DIR = REPO.parent / "shared" / "golden"


def golden_cases(component: str) -> list[GoldenCase]:
    """The public golden cases of one component (shared/golden/<component>/manifest.json)."""
    if not (GOLDEN_DIR / component / "manifest.json").is_file():
        pytest.fail(
            f"golden vectors missing: {GOLDEN_DIR / component}; the tests need shared/golden beside the repo"
        )
    return load_cases(GOLDEN_DIR, component)
