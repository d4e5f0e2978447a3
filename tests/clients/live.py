"""A live `ovi-server serve --variant tiny` subprocess on loopback, with an HTTPS listener for fal-client.

Used by the official-client tests: the real CLI, the real OviPipeline (tiny, random weights, CPU).
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import io
import ipaddress
import os
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import av
import httpx
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from cryptography.x509.oid import NameOID

REPO = Path(__file__).resolve().parents[2]
KEY_ID, KEY_SECRET = "client-test", "s3cret"
KEY = f"{KEY_ID}:{KEY_SECRET}"


def wait_for(predicate, timeout: float, what: str) -> None:
    """Poll `predicate` until it holds; fail with `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, what
        time.sleep(0.1)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_self_signed_cert(directory: Path, with_ip: bool = True) -> tuple[Path, Path]:
    """A certificate for localhost and, `with_ip`, 127.0.0.1 (trusted by the tests through SSL_CERT_FILE)."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost")]
                + ([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))] if with_ip else [])
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = directory / "cert.pem", directory / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    return cert_path, key_path


@dataclass
class LiveServer:
    data_dir: Path
    cert: Path
    key: Path
    port: int
    tls_port: int
    log_path: Path
    proc: subprocess.Popen | None = None
    extra_args: tuple[str, ...] = ()  # more `serve` flags, e.g. ("--previews", "1")
    # The clients' webhook receivers listen on loopback, which the outbound URL policy opens only on request.
    server_env: dict[str, str] = field(default_factory=lambda: {"OVI_ALLOWED_NETWORKS": "127.0.0.0/8"})
    api_keys: str = KEY

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def tls_host(self) -> str:
        return f"localhost:{self.tls_port}"

    def start(self, timeout: float = 120) -> None:
        cmd = [
            sys.executable, "-m", "ovi_server.cli", "serve",
            "--variant", "tiny", "--device", "cpu",
            "--host", "127.0.0.1", "--port", str(self.port),
            "--tls-cert", str(self.cert), "--tls-key", str(self.key), "--tls-port", str(self.tls_port),
            "--api-keys", self.api_keys, "--data-dir", str(self.data_dir),
            "--webhook-retry-base", "0.5", *self.extra_args,
        ]  # fmt: skip
        log = open(self.log_path, "ab")  # noqa: SIM115 -- the server's lifetime, closed by the OS
        env = {**os.environ, **self.server_env}
        self.proc = subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log()}")
            try:
                if httpx.get(f"{self.base}/health", timeout=1).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"server not up in {timeout}s:\n{self.log()}")

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def workers(self) -> list[dict]:
        """The worker processes the server lists in /health (with a key)."""
        with self.client() as http:
            return http.get("/health").json()["workers"]

    def wait_for_workers(self, n: int, timeout: float = 120) -> list[dict]:
        """Until `n` workers have loaded the model (state idle or busy)."""
        deadline = time.monotonic() + timeout
        while True:
            ready = [w for w in self.workers() if w["state"] != "loading"]
            if len(ready) >= n:
                return ready
            if time.monotonic() > deadline:
                raise RuntimeError(f"{len(ready)} of {n} workers ready after {timeout}s:\n{self.log()}")
            time.sleep(0.2)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-5000:]

    def client(self) -> httpx.Client:
        return httpx.Client(base_url=self.base, headers={"Authorization": f"Key {KEY}"}, timeout=30)

    def env(self) -> dict[str, str]:
        """Environment for fal-client (https only) to reach this server (spec §11)."""
        return {
            **os.environ,
            "FAL_KEY": KEY,
            "FAL_QUEUE_RUN_HOST": self.tls_host,
            "FAL_RUN_HOST": f"{self.tls_host}/run",
            "SSL_CERT_FILE": str(self.cert),
        }


def start_server(tmp: Path, *extra_args: str, **options) -> LiveServer:
    """`extra_args`: more `serve` flags; `options`: other LiveServer fields (server_env, api_keys)."""
    cert, key = make_self_signed_cert(tmp)
    server = LiveServer(
        tmp / "data", cert, key, free_port(), free_port(), tmp / "server.log", None, extra_args, **options
    )
    server.start()
    return server


def check_mp4(url: str, cafile: Path | None = None) -> dict:
    """Download `url` without credentials; it must be an MP4 with an H.264 and an AAC stream."""
    verify = ssl.create_default_context(cafile=str(cafile)) if cafile else True
    response = httpx.get(url, timeout=30, verify=verify)
    assert response.status_code == 200, (url, response.status_code, response.text[:200])
    assert response.headers["content-type"] == "video/mp4"
    with av.open(io.BytesIO(response.content)) as container:
        codecs = sorted(s.codec_context.name for s in container.streams)
    assert codecs == ["aac", "h264"], codecs
    return {"size": len(response.content)}


def write_png(path: Path, width: int = 64, height: int = 48) -> Path:
    from PIL import Image

    Image.new("RGB", (width, height), (200, 80, 20)).save(path)
    return path


class Receiver:
    """A webhook endpoint on 127.0.0.1; records (lower-cased headers, raw body) per call."""

    def __init__(self) -> None:
        self.calls: list[tuple[dict[str, str], bytes]] = []
        calls = self.calls

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                calls.append(({k.lower(): v for k, v in self.headers.items()}, body))
                self.send_response(200)
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/webhook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def wait(self, n: int, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while len(self.calls) < n:
            assert time.monotonic() < deadline, f"{len(self.calls)} webhook calls, expected {n}"
            time.sleep(0.05)

    def close(self) -> None:
        self.server.shutdown()


def verify_signature(jwks: dict, headers: dict[str, str], body: bytes) -> bool:
    """fal's webhook check: Ed25519 over request_id, user_id, timestamp and sha256(body), any JWKS key."""
    message = "\n".join(
        [
            headers["x-fal-webhook-request-id"],
            headers["x-fal-webhook-user-id"],
            headers["x-fal-webhook-timestamp"],
            hashlib.sha256(body).hexdigest(),
        ]
    ).encode()
    signature = bytes.fromhex(headers["x-fal-webhook-signature"])
    for jwk in jwks["keys"]:
        public = Ed25519PublicKey.from_public_bytes(
            base64.urlsafe_b64decode(jwk["x"] + "=" * (-len(jwk["x"]) % 4))
        )
        try:
            public.verify(signature, message)
            return True
        except InvalidSignature:
            continue
    return False
