"""The unmodified npm `@fal-ai/client` 1.10.1 against a live server, through proxyUrl → BASE/api/fal/proxy.

The client is installed by `npm install` into tests/clients/js/node_modules on first use (needs node
and the npm registry); the tests are skipped when node is missing.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from .live import KEY, KEY_ID, LiveServer, Receiver, check_mp4, start_server, verify_signature, write_png

JS_DIR = Path(__file__).resolve().parent / "js"
pytestmark = pytest.mark.skipif(shutil.which("node") is None, reason="node is not installed")


def install_js_client() -> None:
    if (JS_DIR / "node_modules" / "@fal-ai" / "client" / "package.json").is_file():
        return
    npm = shutil.which("npm")
    if npm is None:
        pytest.skip("npm is not installed")
    subprocess.run([npm, "install", "--no-audit", "--no-fund"], cwd=JS_DIR, check=True, timeout=300)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    install_js_client()
    live = start_server(tmp_path_factory.mktemp("js"))
    yield live
    live.stop()


@pytest.fixture(scope="module")
def png(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_png(tmp_path_factory.mktemp("img") / "frame.png")


def run_flow(server: LiveServer, flow: str, arg: str = "", key: str = KEY) -> dict:
    done = subprocess.run(
        ["node", "flows.mjs", flow, server.base, key, arg],
        cwd=JS_DIR,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert done.returncode == 0, f"node {flow} failed:\n{done.stderr}\n--- server log ---\n{server.log()}"
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_subscribe_with_logs_and_queue_updates(server: LiveServer):
    out = run_flow(server, "subscribe")
    assert out["requestId"] == out["enqueued"]
    assert out["data"]["seed"] == 42
    check_mp4(out["data"]["video"]["url"])
    states = [u["status"] for u in out["updates"]]
    assert "IN_PROGRESS" in states or "IN_QUEUE" in states
    logged = [line["message"] for u in out["updates"] for line in u.get("logs") or []]
    assert any(m.startswith("denoise") for m in logged), logged


def test_subscribe_streaming_mode(server: LiveServer):
    out = run_flow(server, "stream")
    assert out["updates"][-1]["status"] == "COMPLETED"
    assert isinstance(out["data"]["seed"], int)
    check_mp4(out["data"]["video"]["url"])


def test_submit_status_result_and_webhook(server: LiveServer):
    receiver = Receiver()
    try:
        out = run_flow(server, "queue", receiver.url)
        receiver.wait(1)
    finally:
        receiver.close()
    sub = out["submitted"]
    assert {"request_id", "response_url", "status_url", "cancel_url", "queue_position"} <= set(sub)
    final = out["statuses"][-1]
    assert final["status"] == "COMPLETED" and final["metrics"]["inference_time"] > 0
    assert any(line["message"].startswith("denoise") for line in final["logs"])
    assert out["requestId"] == sub["request_id"] and out["data"]["seed"] == 7
    check_mp4(out["data"]["video"]["url"])
    headers, body = receiver.calls[0]
    payload = json.loads(body)
    assert payload["request_id"] == sub["request_id"] and payload["status"] == "OK"
    assert payload["payload"]["seed"] == 7
    assert headers["x-fal-webhook-user-id"] == KEY_ID
    jwks = server.client().get("/.well-known/jwks.json").json()
    assert verify_signature(jwks, headers, body)


def test_cancel_a_queued_request(server: LiveServer):
    out = run_flow(server, "cancel")
    assert out["before"]["status"] == "IN_QUEUE" and out["before"]["queue_position"] >= 0
    assert out["after"]["status"] == "COMPLETED" and out["after"]["error_type"] == "request_cancelled"
    assert out["cancelledResult"]["error"]["status"] == 400
    check_mp4(out["firstData"]["video"]["url"])
    assert out["cancelAgain"]["error"]["status"] == 400  # ALREADY_COMPLETED


def test_storage_upload_then_image_to_video(server: LiveServer, png: Path):
    out = run_flow(server, "upload", str(png))
    assert out["url"].startswith(server.base + "/files/uploads/") and out["sameBytes"]
    check_mp4(out["withUrl"]["video"]["url"])
    check_mp4(out["withBlob"]["video"]["url"])


def test_image_to_video_with_a_data_uri(server: LiveServer, png: Path):
    out = run_flow(server, "datauri", str(png))
    assert out["data"]["seed"] == 5
    check_mp4(out["data"]["video"]["url"])


def test_validation_errors(server: LiveServer):
    out = run_flow(server, "validation")
    for case, field in (
        ("zeroSteps", "num_inference_steps"),
        ("badResolution", "resolution"),
        ("noImage", "image_url"),
        ("syncZeroSteps", "num_inference_steps"),
    ):
        error = out[case]["error"]
        assert error["kind"] == "ValidationError" and error["status"] == 422, (case, error)
        assert error["fieldErrors"][0]["loc"] == ["body", field], (case, error)
    assert out["zeroSteps"]["error"]["stepsErrors"][0]["type"] == "greater_than_equal"


def test_sync_run(server: LiveServer):
    out = run_flow(server, "run")
    assert out["data"]["seed"] == 11 and out["requestId"]
    check_mp4(out["data"]["video"]["url"])


def test_wrong_key_is_401(server: LiveServer):
    out = run_flow(server, "badkey")
    assert out["submit"]["error"]["kind"] == "ApiError" and out["submit"]["error"]["status"] == 401
