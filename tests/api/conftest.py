"""API tests: the real app, store, files and Worker, over a test double of the pipeline (no torch).

The double writes a real 3-frame H.264 + AAC MP4 and reports progress like the engine, so every
route, the worker's bookkeeping and the downloads are exercised; the live-server tests in
tests/clients/ run the real OviPipeline.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest
from fastapi.testclient import TestClient

from ovi_server.api.app import build_app
from ovi_server.config import ServerConfig
from ovi_server.errors import InvalidInput
from ovi_server.jobs.files import LocalFiles
from ovi_server.jobs.metrics import Metrics
from ovi_server.jobs.sqlite import SqliteJobStore
from ovi_server.jobs.worker import Worker
from ovi_server.request import Clip, GenerationRequest, Progress, ProgressCallback

KEY = "test-id:test-secret"
AUTH = {"Authorization": f"Key {KEY}"}


def write_tiny_mp4(path: Path, width: int = 32, height: int = 32, frames: int = 3) -> None:
    with av.open(str(path), "w") as container:
        video = container.add_stream("libx264", rate=24)
        video.width, video.height, video.pix_fmt = width, height, "yuv420p"
        audio = container.add_stream("aac", rate=16000)
        audio.layout = "mono"
        for i in range(frames):
            image = np.full((height, width, 3), 40 * i, dtype=np.uint8)
            for packet in video.encode(av.VideoFrame.from_ndarray(image, format="rgb24")):
                container.mux(packet)
        samples = np.zeros((1, 16000 * frames // 24), dtype=np.float32)
        frame = av.AudioFrame.from_ndarray(samples, format="fltp", layout="mono")
        frame.sample_rate, frame.time_base, frame.pts = 16000, Fraction(1, 16000), 0
        for packet in audio.encode(frame):
            container.mux(packet)
        for stream in (video, audio):
            for packet in stream.encode(None):
                container.mux(packet)


def fake_preview(step: int) -> bytes:
    """A real PNG whose red channel is the step number (the engine's previews: engine/preview.py)."""
    import io

    from PIL import Image

    out = io.BytesIO()
    Image.new("RGB", (8, 4), (step, 0, 0)).save(out, "PNG")
    return out.getvalue()


class FakePipeline:
    """Behaves like OviPipeline.generate: progress per step, InvalidInput for bad images, Cancelled via callback."""

    def __init__(self) -> None:
        self.requests: list[GenerationRequest] = []
        self.gate = threading.Event()  # cleared: each step waits for it (lets a test hold a job running)
        self.gate.set()
        self.fail_with: Exception | None = None

    def generate(self, request: GenerationRequest, out_path: Path, on_progress: ProgressCallback) -> Clip:
        self.requests.append(request)
        if self.fail_with is not None:
            raise self.fail_with
        if request.image is not None and "broken" in request.image:
            raise InvalidInput(
                "image", f"could not load the image at {request.image!r}; send PNG, JPEG or WebP"
            )
        on_progress(Progress("encode_text", 1, 1))
        steps = request.steps or 4
        for i in range(steps):
            self.gate.wait(10)
            on_progress(Progress("denoise", i + 1, steps, preview=lambda step=i + 1: fake_preview(step)))
        write_tiny_mp4(out_path)
        w, h = request.size or (32, 32)
        assert request.seed is not None
        return Clip(out_path, request.seed, w, h, 3, 24, 0.125, {"denoise": 0.01})


@pytest.fixture
def pipeline() -> FakePipeline:
    return FakePipeline()


@pytest.fixture
def server_config(tmp_path: Path) -> ServerConfig:
    # The webhook receivers of these tests listen on loopback, which the URL policy opens only on request.
    return ServerConfig(
        data_dir=tmp_path,
        api_keys=(KEY, "barekey123"),
        webhook_retry_base_s=0.2,
        allowed_networks=("127.0.0.0/8",),
    )


@pytest.fixture
def client(server_config: ServerConfig, pipeline: FakePipeline) -> Iterator[TestClient]:
    store = SqliteJobStore(server_config.data_dir / "jobs.sqlite3")
    files = LocalFiles(server_config.data_dir / "files")
    metrics = Metrics(store)
    worker = Worker(server_config.engine, store, files, pipeline=pipeline, poll_s=0.02)
    worker.start()
    app = build_app(server_config, store, files, metrics)
    with TestClient(app, headers=AUTH) as test_client:
        test_client.worker = worker  # type: ignore[attr-defined]
        yield test_client
    pipeline.gate.set()
    worker.stop()
