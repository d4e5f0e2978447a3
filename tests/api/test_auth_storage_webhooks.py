"""API keys, the storage upload handshakes, and signed webhooks delivered to a receiver on 127.0.0.1."""

from __future__ import annotations

import base64
import hashlib
import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from fastapi.testclient import TestClient

from .conftest import KEY
from .test_queue import submit, wait_completed

NO_AUTH = {"Authorization": ""}


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("POST", "/fal-ai/ovi"),
        ("POST", "/fal-ai/ovi/image-to-video"),
        ("POST", "/run/fal-ai/ovi"),
        ("GET", "/fal-ai/ovi/requests/x/status"),
        ("GET", "/fal-ai/ovi/requests/x/status/stream"),
        ("GET", "/fal-ai/ovi/requests/x"),
        ("PUT", "/fal-ai/ovi/requests/x/cancel"),
        ("POST", "/storage/upload/initiate"),
        ("POST", "/storage/auth/token"),
        ("POST", "/files/upload"),
        ("GET", "/metrics"),
    ],
)
def test_routes_need_a_key(client: TestClient, method: str, path: str):
    for headers in (NO_AUTH, {"Authorization": "Key test-id:wrong"}, {"Authorization": "Key nope"}):
        response = client.request(method, path, json={"prompt": "p"}, headers=headers)
        assert response.status_code == 401, (path, headers)
        assert "API key" in response.json()["detail"]


def test_key_forms_the_clients_send(client: TestClient):
    for header in (f"Key {KEY}", "Key barekey123", f"key  {KEY} "):
        response = client.post(
            "/fal-ai/ovi", json={"prompt": "p", "num_inference_steps": 1}, headers={"Authorization": header}
        )
        assert response.status_code == 200, header


def test_open_routes(client: TestClient):
    assert client.get("/health", headers=NO_AUTH).status_code == 200
    jwks = client.get("/.well-known/jwks.json", headers=NO_AUTH).json()
    assert jwks["keys"][0]["kty"] == "OKP" and jwks["keys"][0]["crv"] == "Ed25519"


def test_js_upload_handshake(client: TestClient):
    initiate = client.post(
        "/storage/upload/initiate",
        params={"storage_type": "fal-cdn-v3"},
        json={"content_type": "image/png", "file_name": "../../cat photo.png"},
    )
    assert initiate.status_code == 200
    urls = initiate.json()
    put = client.put(
        urls["upload_url"], content=b"\x89PNG fake", headers={**NO_AUTH, "Content-Type": "image/png"}
    )
    assert put.status_code == 200
    again = client.put(urls["upload_url"], content=b"other", headers=NO_AUTH)
    assert again.status_code == 404  # upload URLs are one-time
    download = client.get(urls["file_url"], headers=NO_AUTH)
    assert download.status_code == 200 and download.content == b"\x89PNG fake"
    assert download.headers["content-type"] == "image/png"
    assert urls["file_url"].endswith("/cat_photo.png")


def test_python_cdn_upload_with_a_token(client: TestClient):
    token = client.post("/storage/auth/token", params={"storage_type": "fal-cdn-v3"}, json={}).json()
    assert token["token_type"] == "Bearer" and token["expires_at"].endswith("Z")
    headers = {
        "Authorization": f"{token['token_type']} {token['token']}",
        "Content-Type": "image/jpeg",
        "X-Fal-File-Name": "frame.jpg",
    }
    upload = client.post("/files/upload", content=b"jpeg bytes", headers=headers)
    assert upload.status_code == 200
    assert client.get(upload.json()["access_url"], headers=NO_AUTH).content == b"jpeg bytes"


def test_unknown_files_are_404(client: TestClient):
    for key in ("outputs/nope/output.mp4", "../jobs.sqlite3", "uploads/x/y.meta.json"):
        assert client.get(f"/files/{key}", headers=NO_AUTH).status_code == 404


class Receiver:
    """A webhook endpoint on 127.0.0.1 that fails the first `failures` deliveries."""

    def __init__(self, failures: int = 0):
        self.calls: list[tuple[dict[str, str], bytes]] = []
        self.failures = failures
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                receiver.calls.append((dict(self.headers), body))
                code = 500 if len(receiver.calls) <= receiver.failures else 200
                self.send_response(code)
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def wait(self, n: int, timeout: float = 15) -> None:
        deadline = time.monotonic() + timeout
        while len(self.calls) < n:
            assert time.monotonic() < deadline, f"{len(self.calls)} webhook calls, expected {n}"
            time.sleep(0.05)


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver(failures=1)
    yield r
    r.server.shutdown()


def verify(jwks: dict, headers: dict[str, str], body: bytes) -> bool:
    message = "\n".join(
        [
            headers["X-Fal-Webhook-Request-Id"],
            headers["X-Fal-Webhook-User-Id"],
            headers["X-Fal-Webhook-Timestamp"],
            hashlib.sha256(body).hexdigest(),
        ]
    ).encode()
    for key in jwks["keys"]:
        raw = base64.urlsafe_b64decode(key["x"] + "=" * (-len(key["x"]) % 4))
        try:
            Ed25519PublicKey.from_public_bytes(raw).verify(
                bytes.fromhex(headers["X-Fal-Webhook-Signature"]), message
            )
            return True
        except Exception:
            continue
    return False


def test_webhook_is_signed_retried_and_logged(client: TestClient, receiver: Receiver):
    rid = submit(
        client, {"prompt": "p", "num_inference_steps": 1, "seed": 3}, params={"fal_webhook": receiver.url}
    )
    wait_completed(client, rid)
    receiver.wait(2)  # the first delivery gets a 500, the retry succeeds
    headers, body = receiver.calls[-1]
    payload = json.loads(body)
    assert payload["request_id"] == rid and payload["gateway_request_id"] == rid
    assert payload["status"] == "OK" and payload["payload"]["seed"] == 3
    assert payload["payload"]["video"]["url"].endswith(f"/files/outputs/{rid}/1/output.mp4")
    assert headers["X-Fal-Webhook-User-Id"] == "test-id"
    assert abs(int(headers["X-Fal-Webhook-Timestamp"]) - time.time()) < 300
    assert verify(client.get("/.well-known/jwks.json").json(), headers, body)
    tampered = body.replace(b'"seed":3', b'"seed":4')
    assert not verify(client.get("/.well-known/jwks.json").json(), headers, tampered)
    deadline = time.monotonic() + 5
    while True:
        logs = [
            line["message"] for line in client.get(f"/fal-ai/ovi/requests/{rid}/status?logs=1").json()["logs"]
        ]
        if any("webhook delivered" in m for m in logs):
            break
        assert time.monotonic() < deadline, logs
        time.sleep(0.05)
    assert any("webhook to" in m and "retrying" in m for m in logs)


def test_webhook_for_an_invalid_request_reports_the_422(client: TestClient, receiver: Receiver):
    receiver.failures = 0
    rid = submit(client, {"prompt": "p", "num_inference_steps": 0}, params={"fal_webhook": receiver.url})
    receiver.wait(1)
    payload = json.loads(receiver.calls[0][1])
    assert payload["request_id"] == rid and payload["status"] == "ERROR"
    assert payload["error"] == "Invalid status code: 422"
    assert payload["payload"]["detail"][0]["loc"] == ["body", "num_inference_steps"]


def test_oversized_upload_is_413(client: TestClient, monkeypatch: pytest.MonkeyPatch):
    from ovi_server.api import routes

    monkeypatch.setattr(routes, "MAX_UPLOAD_BYTES", 10)
    urls = client.post(
        "/storage/upload/initiate", json={"content_type": "image/png", "file_name": "a.png"}
    ).json()
    response = client.put(urls["upload_url"], content=b"x" * 11, headers=NO_AUTH)
    assert response.status_code == 413 and "limit" in response.json()["detail"]
