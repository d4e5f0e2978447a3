"""Sequence parallel on 2 (and CFG parallel on 4) GPUs with nccl: the golden cases still pass.
Skipped on hosts with fewer GPUs; the CPU twin (gloo) is tests/engine/test_parallel.py."""

from __future__ import annotations

import pytest
import torch

from ovi_server.engine.device import Placement
from ovi_server.engine.parallel import ParallelGroup, ParallelSpec, run_spmd
from ovi_server.golden import run_fusion, run_loop
from tests.conftest import golden_cases

pytestmark = pytest.mark.gpu


def _golden_on_rank(group: ParallelGroup) -> list[str]:
    torch.backends.cuda.matmul.allow_tf32 = False  # the golden tolerances are float32's
    torch.backends.cudnn.allow_tf32 = False
    placement = Placement(group.device, torch.float32)
    lines = [run_fusion.run_case(c, placement, parallel=group).line() for c in golden_cases("fusion")]
    return lines + [run_loop.run_case(c, placement, parallel=group).line() for c in golden_cases("loop")]


@pytest.mark.parametrize(
    "spec", [ParallelSpec(2), ParallelSpec(2, cfg_parallel=True)], ids=["sp2", "sp2_cfg"]
)
def test_golden_cases_pass_on_several_gpus(spec):
    if torch.cuda.device_count() < spec.world_size:
        pytest.skip(f"needs {spec.world_size} GPUs")
    lines = run_spmd(spec, "cuda", _golden_on_rank)
    assert lines
    for line in lines:
        assert line.startswith("PASS"), line
