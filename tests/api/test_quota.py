"""Per-key quota: a key over OVI_MAX_QUEUED_PER_KEY gets fal's 429; other keys are unaffected."""

from __future__ import annotations

from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from ovi_server.config import ServerConfig

from .conftest import KEY, FakePipeline
from .test_queue import T2V, submit, wait_completed

OTHER = {"Authorization": "Key barekey123"}


@pytest.fixture
def server_config(tmp_path: Path) -> ServerConfig:
    return ServerConfig(data_dir=tmp_path, api_keys=(KEY, "barekey123"), max_queued_per_key=2)


def test_a_key_over_its_quota_gets_429_others_do_not(client: TestClient, pipeline: FakePipeline):
    pipeline.gate.clear()  # the worker holds the first job running: the queue cannot drain
    body = {"prompt": "p", "num_inference_steps": 2}
    held = [submit(client, body), submit(client, body)]  # one running, one queued: the quota of 2
    for path in (T2V, "/run/fal-ai/ovi"):
        refused = client.post(path, json=body)
        assert refused.status_code == 429, refused.text
        assert refused.json()["error_type"] == "rate_limited" and "limit" in refused.json()["detail"]
        assert (
            refused.headers["x-fal-error-type"] == "rate_limited" and int(refused.headers["retry-after"]) > 0
        )
    assert client.post(T2V, json=body, headers=OTHER).status_code == 200  # another key still submits
    pipeline.gate.set()
    for rid in held:
        wait_completed(client, rid)
    assert client.post(T2V, json=body).status_code == 200  # room again once they finished
