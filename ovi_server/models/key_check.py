"""Key checks for `ovi-server weights check`: does a checkpoint's key set fit the model we build?

Only the file's index is read (safetensors header / mmap'd pickle), never the tensor data, and the
models are built on the meta device, so checking a 23 GB file takes a second.
"""

from __future__ import annotations

from pathlib import Path

from ovi_server.config import OviConfig
from ovi_server.models.fusion import build_fusion
from ovi_server.models.loading import check_keys, read_state_dict


def check_fusion(path: Path, cfg: OviConfig) -> None:
    expected = set(build_fusion(cfg.video, cfg.audio).state_dict())
    check_keys(path, expected, set(read_state_dict(path)), "fusion model")


KEY_CHECKERS = {"fusion": check_fusion}
