"""fal's queue API over the ASGI app: submit, status, stream, result, cancel, sync run, proxy mode."""

from __future__ import annotations

import io
import json
import os
import socket
import subprocess
import sys
import time

import av
import pytest
from fastapi.testclient import TestClient

from .conftest import FakePipeline

T2V = "/fal-ai/ovi"
I2V = "/fal-ai/ovi/image-to-video"


def wait_completed(client: TestClient, request_id: str, timeout: float = 20) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        body = client.get(f"/fal-ai/ovi/requests/{request_id}/status", params={"logs": "1"}).json()
        if body["status"] == "COMPLETED":
            return body
        time.sleep(0.05)
    raise AssertionError(f"{request_id} not completed in {timeout}s")


def submit(client: TestClient, body: dict, path: str = T2V, **kw) -> str:
    response = client.post(path, json=body, **kw)
    assert response.status_code == 200, response.text
    return response.json()["request_id"]


def test_api_does_not_import_torch():
    code = (
        "import sys, ovi_server.api, ovi_server.api.app, ovi_server.api.routes; print('torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_submit_returns_fal_handle(client: TestClient):
    response = client.post(T2V, json={"prompt": "a cat", "num_inference_steps": 2})
    body = response.json()
    assert response.status_code == 200
    assert response.headers["x-fal-request-id"] == body["request_id"]
    rid = body["request_id"]
    assert body["status"] == "IN_QUEUE" and body["queue_position"] == 0
    assert body["gateway_request_id"] == rid
    assert body["response_url"] == f"http://testserver/fal-ai/ovi/requests/{rid}"
    assert body["status_url"] == body["response_url"] + "/status"
    assert body["cancel_url"] == body["response_url"] + "/cancel"


def test_text_to_video_result_downloads_an_mp4(client: TestClient, pipeline: FakePipeline):
    rid = submit(client, {"prompt": "a cat", "num_inference_steps": 2, "seed": 1234})
    status = wait_completed(client, rid)
    assert status["metrics"]["inference_time"] > 0
    assert "error" not in status
    messages = [line["message"] for line in status["logs"]]
    assert "denoise 2/2" in messages
    assert {"message", "level", "source", "timestamp"} <= set(status["logs"][0])
    result = client.get(f"/fal-ai/ovi/requests/{rid}")
    assert result.status_code == 200 and result.headers["x-fal-request-id"] == rid
    body = result.json()
    assert body["seed"] == 1234
    video = body["video"]
    assert video["content_type"] == "video/mp4" and video["file_name"] == "output.mp4"
    download = client.get(video["url"], headers={"Authorization": ""})
    assert download.status_code == 200 and download.headers["content-type"] == "video/mp4"
    assert len(download.content) == video["file_size"]
    with av.open(io.BytesIO(download.content)) as container:
        assert {s.codec_context.name for s in container.streams} == {"h264", "aac"}


def test_defaults_reach_the_engine_and_a_random_seed_is_echoed(client: TestClient, pipeline: FakePipeline):
    rid = submit(client, {"prompt": "a dog"})
    wait_completed(client, rid)
    request = pipeline.requests[-1]
    assert request.steps == 30 and request.size == (992, 512)
    assert request.video_negative_prompt == "jitter, bad hands, blur, distortion"
    assert request.audio_negative_prompt == "robotic, muffled, echo, distorted"
    seed = client.get(f"/fal-ai/ovi/requests/{rid}").json()["seed"]
    assert isinstance(seed, int) and seed == request.seed


def test_resolution_is_passed_as_width_height(client: TestClient, pipeline: FakePipeline):
    wait_completed(client, submit(client, {"prompt": "p", "resolution": "512x960", "num_inference_steps": 1}))
    assert pipeline.requests[-1].size == (512, 960)


@pytest.mark.parametrize(
    ("body", "field", "kind"),
    [
        ({"prompt": "p", "num_inference_steps": 0}, "num_inference_steps", "greater_than_equal"),
        ({"prompt": "p", "num_inference_steps": 51}, "num_inference_steps", "less_than_equal"),
        ({"prompt": "p", "resolution": "640x480"}, "resolution", "literal_error"),
        ({"num_inference_steps": 2}, "prompt", "missing"),
        ({"prompt": "p", "seed": "abc"}, "seed", "int_parsing"),
    ],
)
def test_invalid_input_completes_with_a_422_result(client: TestClient, body: dict, field: str, kind: str):
    rid = submit(client, body)
    status = client.get(f"/fal-ai/ovi/requests/{rid}/status").json()
    assert status["status"] == "COMPLETED" and status["error_type"] == "validation_error"
    result = client.get(f"/fal-ai/ovi/requests/{rid}")
    assert result.status_code == 422
    [error] = result.json()["detail"]
    assert error["loc"] == ["body", field] and error["type"] == kind and error["msg"]


def test_image_to_video_requires_a_url_or_data_uri(client: TestClient):
    missing = submit(client, {"prompt": "p"}, I2V)
    assert client.get(f"/fal-ai/ovi/requests/{missing}").json()["detail"][0]["loc"] == ["body", "image_url"]
    local = submit(client, {"prompt": "p", "image_url": "/etc/passwd"}, I2V)
    result = client.get(f"/fal-ai/ovi/requests/{local}")
    assert result.status_code == 422 and result.json()["detail"][0]["loc"] == ["body", "image_url"]


def test_unloadable_image_is_a_422_on_image_url(client: TestClient):
    rid = submit(client, {"prompt": "p", "image_url": "data:image/png;name=broken;base64,AAAA"}, I2V)
    wait_completed(client, rid)
    result = client.get(f"/fal-ai/ovi/requests/{rid}")
    assert result.status_code == 422
    [error] = result.json()["detail"]
    assert error["loc"] == ["body", "image_url"] and "PNG" in error["msg"]


def test_status_and_result_answer_under_both_roots(client: TestClient):
    rid = submit(
        client, {"prompt": "p", "image_url": "data:image/png;base64,AAAA", "num_inference_steps": 1}, I2V
    )
    wait_completed(client, rid)
    assert client.get(f"{I2V}/requests/{rid}/status").json()["status"] == "COMPLETED"
    assert client.get(f"/fal-ai/ovi/requests/{rid}").status_code == 200


def test_logs_flag(client: TestClient):
    rid = submit(client, {"prompt": "p", "num_inference_steps": 1})
    wait_completed(client, rid)
    for value in ("1", "true", "True"):
        assert isinstance(
            client.get(f"{T2V}/requests/{rid}/status", params={"logs": value}).json()["logs"], list
        )
    for query in ({"logs": "0"}, {"logs": "false"}, {}):
        body = client.get(f"{T2V}/requests/{rid}/status", params=query).json()
        assert "logs" in body and body["logs"] is None


def test_queue_position_and_cancel_of_a_queued_request(client: TestClient, pipeline: FakePipeline):
    pipeline.gate.clear()
    running = submit(client, {"prompt": "first", "num_inference_steps": 2})
    waiting = submit(client, {"prompt": "second", "num_inference_steps": 2})
    low = submit(client, {"prompt": "third"}, headers={"x-fal-queue-priority": "low"})
    normal = submit(client, {"prompt": "fourth"})
    deadline = time.monotonic() + 10
    while client.get(f"{T2V}/requests/{running}/status").json()["status"] != "IN_PROGRESS":
        assert time.monotonic() < deadline
        time.sleep(0.02)
    status = client.get(f"{T2V}/requests/{waiting}/status")
    assert status.status_code == 202 and status.json()["queue_position"] == 0
    assert client.get(f"{T2V}/requests/{normal}/status").json()["queue_position"] == 1
    assert client.get(f"{T2V}/requests/{low}/status").json()["queue_position"] == 2  # normal goes first
    assert client.get(f"{T2V}/requests/{waiting}").status_code == 400  # still in progress

    cancel = client.put(f"{T2V}/requests/{waiting}/cancel")
    assert cancel.status_code == 202 and cancel.json() == {"status": "CANCELLATION_REQUESTED"}
    status = client.get(f"{T2V}/requests/{waiting}/status").json()
    assert status["status"] == "COMPLETED" and status["error_type"] == "request_cancelled"
    result = client.get(f"{T2V}/requests/{waiting}")
    assert result.status_code == 400 and result.json()["error_type"] == "request_cancelled"
    for rid in (low, normal):
        client.put(f"{T2V}/requests/{rid}/cancel")
    pipeline.gate.set()
    wait_completed(client, running)
    assert [r.prompt for r in pipeline.requests] == ["first"]  # cancelled requests never ran
    again = client.put(f"{T2V}/requests/{running}/cancel")
    assert again.status_code == 400 and again.json() == {"status": "ALREADY_COMPLETED"}
    unknown = client.put(f"{T2V}/requests/00000000-0000-0000-0000-000000000000/cancel")
    assert unknown.status_code == 404 and unknown.json() == {"status": "NOT_FOUND"}


def test_cancel_of_a_running_request_stops_between_steps(client: TestClient, pipeline: FakePipeline):
    pipeline.gate.clear()
    rid = submit(client, {"prompt": "long", "num_inference_steps": 50})
    deadline = time.monotonic() + 10
    while client.get(f"{T2V}/requests/{rid}/status").json()["status"] != "IN_PROGRESS":
        assert time.monotonic() < deadline
        time.sleep(0.02)
    assert client.put(f"{T2V}/requests/{rid}/cancel").status_code == 202
    pipeline.gate.set()
    status = wait_completed(client, rid)
    assert status["error_type"] == "request_cancelled"
    assert "denoise 50/50" not in [line["message"] for line in status["logs"]]
    assert client.get(f"{T2V}/requests/{rid}").status_code == 400


def test_generation_crash_fails_the_job_and_the_worker_goes_on(client: TestClient, pipeline: FakePipeline):
    pipeline.fail_with = RuntimeError("boom")
    rid = submit(client, {"prompt": "p", "num_inference_steps": 1})
    status = wait_completed(client, rid)
    assert status["error_type"] == "internal_error" and "boom" in status["error"]
    result = client.get(f"{T2V}/requests/{rid}")
    assert result.status_code == 500 and result.headers["x-fal-error-type"] == "internal_error"
    assert result.headers["x-fal-request-id"] == rid
    pipeline.fail_with = None
    rid = submit(client, {"prompt": "p", "num_inference_steps": 1})
    wait_completed(client, rid)
    assert client.get(f"{T2V}/requests/{rid}").status_code == 200


def test_out_of_memory_says_what_to_do(client: TestClient, pipeline: FakePipeline):
    pipeline.fail_with = type("OutOfMemoryError", (RuntimeError,), {})("CUDA out of memory")
    status = wait_completed(client, submit(client, {"prompt": "p", "num_inference_steps": 1}))
    assert status["error_type"] == "out_of_memory" and "--offload" in status["error"]


def test_status_stream_sends_events_and_closes_after_completed(client: TestClient):
    rid = submit(client, {"prompt": "p", "num_inference_steps": 3})
    events = []
    with client.stream("GET", f"{T2V}/requests/{rid}/status/stream", params={"logs": "1"}) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        assert response.headers["x-fal-request-id"] == rid
        for line in response.iter_lines():
            if line.startswith("data: "):
                events.append(json.loads(line[len("data: ") :]))
    assert events[-1]["status"] == "COMPLETED" and "metrics" in events[-1]
    logged = [line["message"] for event in events for line in event["logs"] or []]
    assert "denoise 3/3" in logged and len(logged) == len(set(logged))  # each line sent once


def test_unknown_request_is_a_json_404(client: TestClient):
    for path in ("/status", "", "/status/stream"):
        response = client.get(f"{T2V}/requests/nope{path}")
        assert response.status_code == 404 and "nope" in response.json()["detail"]


def test_sync_run_blocks_until_the_result(client: TestClient):
    response = client.post(f"/run{T2V}", json={"prompt": "p", "num_inference_steps": 1, "seed": 7})
    assert response.status_code == 200 and response.json()["seed"] == 7
    assert response.headers["x-fal-request-id"]
    invalid = client.post(f"/run{I2V}", json={"prompt": "p"})
    assert invalid.status_code == 422 and invalid.json()["detail"][0]["loc"] == ["body", "image_url"]


def test_public_url_follows_forwarded_headers(client: TestClient):
    headers = {"X-Forwarded-Proto": "https", "X-Forwarded-Host": "ovi.example.com"}
    body = client.post(T2V, json={"prompt": "p", "num_inference_steps": 1}, headers=headers).json()
    assert body["status_url"].startswith("https://ovi.example.com/fal-ai/ovi/requests/")


@pytest.mark.parametrize(
    ("target", "expect"),
    [
        ("https://queue.fal.run/fal-ai/ovi", "IN_QUEUE"),
        ("https://fal.run/fal-ai/ovi", "seed"),
    ],
)
def test_proxy_mode_routes_by_target_url(client: TestClient, target: str, expect: str):
    body = {"prompt": "p", "num_inference_steps": 1}
    response = client.post("/api/fal/proxy", json=body, headers={"x-fal-target-url": target})
    assert response.status_code == 200 and expect in response.text


def test_proxy_mode_keeps_the_target_query(client: TestClient):
    rid = submit(client, {"prompt": "p", "num_inference_steps": 1})
    wait_completed(client, rid)
    target = f"https://queue.fal.run/fal-ai/ovi/requests/{rid}/status?logs=1"
    body = client.get("/api/fal/proxy", headers={"x-fal-target-url": target}).json()
    assert body["status"] == "COMPLETED" and isinstance(body["logs"], list)


def test_proxy_mode_rejects_other_targets(client: TestClient):
    for headers in ({"x-fal-target-url": "https://evil.example.com/x"}, {}):
        response = client.post("/api/fal/proxy", json={}, headers=headers)
        assert response.status_code == 400 and "Invalid request" in response.json()["detail"]


def test_openapi_documents_the_fal_models(client: TestClient):
    doc = client.get("/openapi.json").json()
    props = doc["components"]["schemas"]["OviInput"]["properties"]
    assert props["num_inference_steps"]["default"] == 30
    assert props["num_inference_steps"]["minimum"] == 1 and props["num_inference_steps"]["maximum"] == 50
    assert "992x512" in props["resolution"]["enum"] and props["resolution"]["default"] == "992x512"
    assert "image_url" in doc["components"]["schemas"]["OviImageToVideoInput"]["required"]
    assert "/fal-ai/ovi/image-to-video" in doc["paths"]


def test_metrics_and_health(client: TestClient):
    wait_completed(client, submit(client, {"prompt": "p", "num_inference_steps": 2}))
    text = client.get("/metrics").text
    assert "ovi_queue_depth 0.0" in text and 'ovi_jobs{state="succeeded"} 1.0' in text
    worker = client.worker.id  # type: ignore[attr-defined]
    assert (
        f'ovi_worker_jobs_total{{device="auto",host="{socket.gethostname()}",outcome="succeeded",worker="{worker}"}} 1.0'
        in text
    )
    assert (
        f'ovi_worker_denoise_steps_total{{device="auto",host="{socket.gethostname()}",worker="{worker}"}} 2.0'
        in text
    )
    assert 'ovi_workers{state="idle"} 1.0' in text
    health = client.get("/health", headers={"Authorization": ""})
    assert health.status_code == 200 and health.json() == {"status": "ok"}  # liveness only, no counts
    detail = client.get("/health").json()
    assert detail["queue_depth"] == 0 and detail["jobs"]["succeeded"] == 1
    (listed,) = detail["workers"]
    assert listed["id"] == worker and listed["state"] == "idle" and listed["job"] is None
    assert listed["pid"] == os.getpid() and listed["last_heartbeat"] > time.time() - 60


@pytest.mark.parametrize(("raw", "kind"), [(b"not json", "json_invalid"), (b"[1, 2]", "model_type")])
def test_a_body_that_is_not_a_json_object_is_a_422(client: TestClient, raw: bytes, kind: str):
    response = client.post(T2V, content=raw, headers={"Content-Type": "application/json"})
    assert response.status_code == 200
    result = client.get(f"{T2V}/requests/{response.json()['request_id']}")
    assert result.status_code == 422 and result.json()["detail"][0]["type"] == kind


def test_fal_request_headers_are_accepted(client: TestClient):
    headers = {
        "x-fal-queue-priority": "normal",
        "x-fal-runner-hint": "anything",
        "x-fal-request-timeout": "30",
        "x-fal-object-lifecycle-preference": '{"expiration_duration_seconds": 600}',
        "X-Fal-Store-IO": "0",
        "x-fal-no-retry": "1",
    }
    rid = submit(client, {"prompt": "p", "num_inference_steps": 1}, headers=headers)
    wait_completed(client, rid)
    assert client.get(f"{T2V}/requests/{rid}").status_code == 200
