"""What the tiny variant does with a requested size is said once, and truthfully."""

from __future__ import annotations

import logging

from ovi_server.config import EngineConfig
from ovi_server.engine.pipeline import OviPipeline
from ovi_server.request import GenerationRequest


def test_size_is_explained_at_start_up_and_warned_once_per_size(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="ovi_server.engine.pipeline")
    pipeline = OviPipeline.from_config(EngineConfig(variant="tiny"))
    notes = [r.getMessage() for r in caplog.records if "makes videos of about" in r.getMessage()]
    assert notes == [
        "variant tiny makes videos of about 6144 pixels (78x78): a requested size is scaled to that area "
        "keeping its aspect, each side a multiple of 32 (fal's default 992x512 becomes 96x64); "
        "image-to-video takes the image's aspect"
    ]
    clips = [
        pipeline.generate(GenerationRequest("a cat", size=size, steps=1, seed=1), tmp_path / f"{i}.mp4")
        for i, size in enumerate([(992, 512), (992, 512), (512, 992)])
    ]
    assert [(c.width, c.height) for c in clips] == [(96, 64), (96, 64), (64, 96)]  # as the note says
    warnings = [
        r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and "off the" in r.getMessage()
    ]
    assert len(warnings) == 2 and "992x512" in warnings[0] and "512x992" in warnings[1]
