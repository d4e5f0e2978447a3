"""Two API processes over one Redis queue: any of them answers for any request, SSE included, and a due
webhook is handed to only one of them."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

from clients.redis_server import RedisServer
from fastapi.testclient import TestClient

from ovi_server.api.app import build_app
from ovi_server.config import EngineConfig, ServerConfig
from ovi_server.jobs.files import LocalFiles
from ovi_server.jobs.redis import RedisJobStore
from ovi_server.jobs.store import JobResult, NewJob
from ovi_server.jobs.worker import Worker
from ovi_server.request import GenerationRequest

from .test_files_webhooks_worker import CountingPipeline

T2V = "/fal-ai/ovi"


def test_any_api_process_answers_for_any_request(tmp_path: Path, redis_server: RedisServer):
    prefix = f"api-{time.monotonic_ns()}"
    config = ServerConfig(data_dir=tmp_path)  # loopback, no keys: open
    files = LocalFiles(tmp_path / "files")  # the shared directory of both "hosts"
    stores = [RedisJobStore(redis_server.url, prefix=prefix) for _ in range(3)]
    worker = Worker(EngineConfig(), stores[2], files, pipeline=CountingPipeline(), poll_s=0.5)
    with (
        TestClient(build_app(config, stores[0], files)) as a,
        TestClient(build_app(config, stores[1], files)) as b,
    ):
        rid = a.post(T2V, json={"prompt": "p", "num_inference_steps": 3}).json()["request_id"]
        assert b.get(f"{T2V}/requests/{rid}/status").json()["status"] == "IN_QUEUE"
        assert b.get(f"{T2V}/requests/{rid}/status").json()["queue_position"] == 0
        worker.start()
        try:
            with b.stream("GET", f"{T2V}/requests/{rid}/status/stream", params={"logs": 1}) as events:
                bodies = [json.loads(line[6:]) for line in events.iter_lines() if line.startswith("data: ")]
        finally:
            worker.stop()
        assert bodies[-1]["status"] == "COMPLETED"
        assert any(line["message"] == "denoise 3/3" for body in bodies for line in body["logs"])
        result = b.get(f"{T2V}/requests/{rid}").json()
        assert a.get(f"{T2V}/requests/{rid}").json() == result
        assert b.get(result["video"]["url"].replace("http://testserver", "")).content == b"not really an mp4"
        health = a.get("/health").json()  # the worker's heartbeat, seen by the other process
        assert health["jobs"]["succeeded"] == 1 and health["queue_depth"] == 0
    for store in stores:
        store.close()


def test_a_due_webhook_goes_to_one_api_process_only(redis_server: RedisServer):
    prefix = f"hooks-{time.monotonic_ns()}"
    stores = [RedisJobStore(redis_server.url, prefix=prefix) for _ in range(4)]
    ids = set()
    for _ in range(20):
        job = stores[0].submit(
            NewJob(app="fal-ai/ovi", request=GenerationRequest(prompt="p"), webhook_url="http://h")
        )
        stores[0].succeed(stores[0].claim_next("w").id, JobResult("k", 1, 1, 0.1))
        ids.add(job.id)
    handed: list[str] = []
    lock = threading.Lock()

    def sender(store: RedisJobStore) -> None:
        for job in store.due_webhooks(time.time() + 1):
            with lock:
                handed.append(job.id)

    threads = [threading.Thread(target=sender, args=(s,)) for s in stores]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(handed) == sorted(ids)  # each exactly once across the four senders
    for store in stores:
        store.close()
