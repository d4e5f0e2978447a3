"""What each rank runs under `python -m ovi_server.golden check --sp N`: a module of its own, because
spawned processes import the function they run by name, and `__main__` cannot be imported that way."""

from __future__ import annotations

from pathlib import Path

import torch

from ovi_server.engine.parallel import ParallelGroup


def check_on_rank(group: ParallelGroup, root: Path, components: list[str] | None) -> tuple[int, int]:
    from ovi_server.golden.__main__ import check

    torch.manual_seed(0)
    return check(root, components, parallel=group)
