"""The unmodified PyPI `fal-client` 1.0.3 (installed with `pip install -e '.[test]'`) against a live server.

fal-client is https-only and reads its hosts from the environment at import (spec §11): the server gets
a self-signed certificate made here, an HTTPS listener (--tls-port), and the flows run in a subprocess
with FAL_QUEUE_RUN_HOST=localhost:<tls>, FAL_RUN_HOST=localhost:<tls>/run and SSL_CERT_FILE=<cert>.
Python uploads (`fal_client.upload`) go to hard-coded fal hosts and cannot be redirected; Python users
send data URIs (`fal_client.encode_file`), which is tested here.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from .live import KEY_ID, LiveServer, Receiver, check_mp4, start_server, verify_signature, write_png

pytest.importorskip("fal_client", reason="fal-client is installed by the [test] extra")
FLOWS = Path(__file__).resolve().parent / "fal_client_flows.py"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    live = start_server(tmp_path_factory.mktemp("py"))
    yield live
    live.stop()


def run_flow(server: LiveServer, flow: str, arg: str = "") -> dict:
    done = subprocess.run(
        [sys.executable, str(FLOWS), flow, arg], env=server.env(), capture_output=True, text=True, timeout=180
    )
    assert done.returncode == 0, f"{flow} failed:\n{done.stderr[-4000:]}\n--- server log ---\n{server.log()}"
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_subscribe_with_logs_and_queue_updates(server: LiveServer):
    out = run_flow(server, "subscribe")
    assert out["result"]["seed"] == 123
    check_mp4(out["result"]["video"]["url"], cafile=server.cert)
    types = {u["type"] for u in out["updates"]}
    assert types & {"Queued", "InProgress"} and out["updates"][-1]["type"] == "Completed"
    logged = [line["message"] for u in out["updates"] for line in u.get("logs") or []]
    assert any(m.startswith("denoise") for m in logged), logged


def test_submit_status_result_and_webhook(server: LiveServer):
    receiver = Receiver()
    try:
        out = run_flow(server, "queue", receiver.url)
        receiver.wait(1)
    finally:
        receiver.close()
    final = out["statuses"][-1]
    assert final["type"] == "Completed" and final["metrics"]["inference_time"] > 0 and final["error"] is None
    assert any(line["message"].startswith("denoise") for line in final["logs"])
    assert out["handle_status"]["type"] == "Completed"
    assert out["result"] == out["handle_result"] and out["result"]["seed"] == 9
    assert out["result"]["video"]["url"].startswith(f"https://{server.tls_host}/files/")
    check_mp4(out["result"]["video"]["url"], cafile=server.cert)
    headers, body = receiver.calls[0]
    payload = json.loads(body)
    assert payload["request_id"] == out["request_id"] and payload["status"] == "OK"
    assert payload["payload"] == out["result"] and headers["x-fal-webhook-user-id"] == KEY_ID
    assert verify_signature(server.client().get("/.well-known/jwks.json").json(), headers, body)


def test_cancel_a_queued_request(server: LiveServer):
    out = run_flow(server, "cancel")
    assert out["before"]["type"] == "Queued" and out["before"]["position"] >= 0
    assert out["after"]["type"] == "Completed" and out["after"]["error_type"] == "request_cancelled"
    assert out["cancelled_result"]["status_code"] == 400
    assert out["cancelled_result"]["error_type"] == "request_cancelled"
    check_mp4(out["first_result"]["video"]["url"], cafile=server.cert)
    assert out["cancel_again"]["status_code"] == 400
    assert out["unknown"]["status_code"] == 404


def test_sync_run(server: LiveServer):
    out = run_flow(server, "run")
    assert out["result"]["seed"] == 77
    check_mp4(out["result"]["video"]["url"], cafile=server.cert)


def test_image_to_video_with_a_data_uri(server: LiveServer, tmp_path: Path):
    out = run_flow(server, "datauri", str(write_png(tmp_path / "frame.png")))
    assert out["result"]["seed"] == 8
    check_mp4(out["result"]["video"]["url"], cafile=server.cert)


def test_validation_errors(server: LiveServer):
    out = run_flow(server, "validation")
    assert out["zero_steps"]["status_code"] == 422
    assert out["zero_steps"]["message"][0]["loc"] == ["body", "num_inference_steps"]
    assert out["zero_steps"]["message"][0]["type"] == "greater_than_equal"
    assert out["too_many_steps"]["status_code"] == 422
    assert out["too_many_steps"]["message"][0]["type"] == "less_than_equal"
    assert out["bad_image"]["status_code"] == 422  # undecodable image: found by the worker
    assert out["bad_image"]["message"][0]["loc"] == ["body", "image_url"]


def test_wrong_key_is_401(server: LiveServer):
    assert run_flow(server, "badkey")["submit"]["status_code"] == 401
