"""Live previews through the API: announced in the logs, served at .../preview with a key, 404 before."""

from __future__ import annotations

import io
import time

from fastapi.testclient import TestClient
from PIL import Image

from tests.api.conftest import FakePipeline

T2V = "/fal-ai/ovi"


def _submit(client: TestClient, body: dict) -> str:
    response = client.post(T2V, json=body)
    assert response.status_code == 200, response.text
    return response.json()["request_id"]


def _wait(client: TestClient, rid: str, what, timeout: float = 20) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        status = client.get(f"{T2V}/requests/{rid}/status", params={"logs": "1"}).json()
        if what(status):
            return status
        assert time.monotonic() < deadline, status
        time.sleep(0.02)


def _red(png: bytes) -> int:
    return Image.open(io.BytesIO(png)).convert("RGB").getpixel((0, 0))[0]


def test_preview_every_five_steps_and_the_last(client: TestClient):
    rid = _submit(client, {"prompt": "a cat", "num_inference_steps": 12})
    status = _wait(client, rid, lambda s: s["status"] == "COMPLETED")
    messages = [line["message"] for line in status["logs"]]
    assert [m for m in messages if m.startswith("preview")] == [
        "preview 5/12",
        "preview 10/12",
        "preview 12/12",
    ]
    response = client.get(f"{T2V}/requests/{rid}/preview")
    assert response.status_code == 200 and response.headers["content-type"] == "image/png"
    assert response.headers["x-fal-request-id"] == rid
    assert response.headers["cache-control"] == "no-store"
    assert _red(response.content) == 12  # the latest one
    # also under the image-to-video root, as the other request routes
    assert client.get(f"/fal-ai/ovi/image-to-video/requests/{rid}/preview").content == response.content


def test_no_preview_before_the_first_is_a_404_and_a_key_is_needed(client: TestClient, pipeline: FakePipeline):
    pipeline.gate.clear()
    rid = _submit(client, {"prompt": "slow", "num_inference_steps": 6})
    _wait(client, rid, lambda s: s["status"] == "IN_PROGRESS")
    early = client.get(f"{T2V}/requests/{rid}/preview")
    assert early.status_code == 404 and "no preview yet" in early.json()["detail"]
    assert early.headers["x-fal-request-id"] == rid
    unauthorised = client.get(f"{T2V}/requests/{rid}/preview", headers={"Authorization": ""})
    assert unauthorised.status_code == 401 and "detail" in unauthorised.json()
    pipeline.gate.set()
    _wait(client, rid, lambda s: s["status"] == "COMPLETED")
    assert _red(client.get(f"{T2V}/requests/{rid}/preview").content) == 6
    unknown = client.get(f"{T2V}/requests/00000000-0000-0000-0000-000000000000/preview")
    assert unknown.status_code == 404 and "00000000" in unknown.json()["detail"]
