"""GPU tests compare float32 results with float32 references: TF32 stays off for all of them."""

from __future__ import annotations

import pytest

from ovi_server.engine.device import ieee_float32


@pytest.fixture(autouse=True)
def _no_tf32():
    with ieee_float32():
        yield
