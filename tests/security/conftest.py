"""A live `ovi-server serve --variant tiny` on 127.0.0.1 with two keys, and an "outside" host on 127.0.0.2.

The server opens only 127.0.0.2/32 to outbound requests (`--allowed-networks`): the helper host there
stands for the public internet (images, redirects, webhook receivers), while the server's own address
127.0.0.1 stands for the internal network it must never be made to reach.
"""

from __future__ import annotations

import io
import socket
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest
from PIL import Image

from tests.clients.live import LiveServer, start_server

ALICE, BOB = "alice:alice-secret-1", "bob:bob-secret-2"
OUTSIDE_IP = "127.0.0.2"
FETCH_TIMEOUT_S = 5


def png_bytes() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (64, 48), (200, 80, 20)).save(buffer, "PNG")
    return buffer.getvalue()


class Outside:
    """HTTP on 127.0.0.2: a PNG, a redirect to the server itself, a slow drip, and webhook receivers."""

    def __init__(self, server_base: str) -> None:
        self.hooks: list[tuple[str, bytes]] = []
        self.stop_drip = threading.Event()
        self.drips_open = 0  # slow-drip downloads in progress
        lock = threading.Lock()
        outside, png = self, png_bytes()

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802
                if self.path == "/frame.png":
                    self._send(200, png, "image/png")
                elif self.path == "/to-internal":
                    self.send_response(302)
                    self.send_header("Location", f"{server_base}/health")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                elif self.path == "/drip.png":
                    # A slow drip: a byte at a time, never done (until the test ends).
                    self.send_response(200)
                    self.send_header("Content-Type", "image/png")
                    self.end_headers()
                    with lock:
                        outside.drips_open += 1
                    try:
                        while not outside.stop_drip.wait(0.2):
                            self.wfile.write(b"\0")
                            self.wfile.flush()
                    except (BrokenPipeError, ConnectionResetError):
                        pass
                    finally:
                        with lock:
                            outside.drips_open -= 1
                else:
                    self._send(404, b"missing", "text/plain")

            def do_POST(self) -> None:  # noqa: N802
                body = self.rfile.read(int(self.headers["Content-Length"]))
                outside.hooks.append((self.path, body))
                self._send(200, b"ok", "text/plain")

            def _send(self, status: int, body: bytes, content_type: str) -> None:
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        self.httpd = ThreadingHTTPServer((OUTSIDE_IP, 0), Handler)
        self.httpd.daemon_threads = True
        self.base = f"http://{OUTSIDE_IP}:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.stop_drip.set()
        self.httpd.shutdown()


@pytest.fixture(scope="session")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    server = start_server(
        tmp_path_factory.mktemp("security"),
        server_env={"OVI_ALLOWED_NETWORKS": f"{OUTSIDE_IP}/32", "OVI_FETCH_TIMEOUT": str(FETCH_TIMEOUT_S)},
        api_keys=f"{ALICE},{BOB}",
    )
    yield server
    server.stop()


@pytest.fixture(scope="session")
def outside(live: LiveServer) -> Iterator[Outside]:
    host = Outside(live.base)
    yield host
    host.close()


def client(live: LiveServer, key: str) -> httpx.Client:
    return httpx.Client(base_url=live.base, headers={"Authorization": f"Key {key}"}, timeout=60)


def wait_finished(http: httpx.Client, request_id: str, timeout: float = 120) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        status = http.get(f"/fal-ai/ovi/requests/{request_id}/status", params={"logs": 1}).json()
        if status["status"] == "COMPLETED":
            return status
        assert time.monotonic() < deadline, status
        time.sleep(0.1)


def raw_request(port: int, head: str, body: bytes = b"", timeout: float = 30) -> bytes:
    """Send a request head (and maybe part of a body) on a plain socket; return what the server answers
    before `timeout`. Lets a test declare a body it never sends."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(head.replace("\n", "\r\n").encode() + b"\r\n" + body)
        answer = b""
        while b"\r\n\r\n" not in answer:
            chunk = sock.recv(65536)
            if not chunk:
                break
            answer += chunk
        return answer
