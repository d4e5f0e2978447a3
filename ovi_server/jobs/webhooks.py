"""fal-style webhooks: Ed25519-signed POSTs when a job with `fal_webhook` finishes, retried with backoff.

Signature (fal's scheme, verifiable with the keys at /.well-known/jwks.json):
    message = request_id + "\\n" + user_id + "\\n" + timestamp + "\\n" + hex(sha256(body))
    X-Fal-Webhook-Signature = hex(ed25519_sign(message))
Delivery state lives in the job store, so pending deliveries survive a restart; every attempt is
written to the job's logs.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from ovi_server.jobs.store import Job, JobStore, WebhookState
from ovi_server.outbound import URLPolicy

logger = logging.getLogger(__name__)


class WebhookSigner:
    """The server's Ed25519 key, created once and kept in the data dir (receivers cache the JWKS)."""

    def __init__(self, key: Ed25519PrivateKey):
        self.key = key
        raw = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        self.public_raw = raw
        self.kid = hashlib.sha256(raw).hexdigest()[:16]

    @classmethod
    def load_or_create(cls, path: Path) -> WebhookSigner:
        path = Path(path)
        if path.is_file():
            key = serialization.load_pem_private_key(path.read_bytes(), password=None)
            if not isinstance(key, Ed25519PrivateKey):
                raise ValueError(f"{path}: not an Ed25519 private key; delete it to generate a new one")
            return cls(key)
        key = Ed25519PrivateKey.generate()
        path.parent.mkdir(parents=True, exist_ok=True)
        pem = key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        path.touch(mode=0o600)
        path.write_bytes(pem)
        logger.info("created webhook signing key %s", path)
        return cls(key)

    def jwks(self) -> dict[str, Any]:
        x = base64.urlsafe_b64encode(self.public_raw).rstrip(b"=").decode()
        return {
            "keys": [{"kty": "OKP", "crv": "Ed25519", "x": x, "kid": self.kid, "use": "sig", "alg": "EdDSA"}]
        }

    def headers(
        self, request_id: str, user_id: str, body: bytes, timestamp: int | None = None
    ) -> dict[str, str]:
        ts = str(int(time.time()) if timestamp is None else timestamp)
        message = "\n".join([request_id, user_id, ts, hashlib.sha256(body).hexdigest()]).encode()
        return {
            "X-Fal-Webhook-Request-Id": request_id,
            "X-Fal-Webhook-User-Id": user_id,
            "X-Fal-Webhook-Timestamp": ts,
            "X-Fal-Webhook-Signature": self.key.sign(message).hex(),
        }


# Turns a finished job into the webhook's JSON body; api/schemas.py provides it (fal's field names).
RenderPayload = Callable[[Job], dict[str, Any]]


class WebhookSender:
    """Delivers due webhooks from a small thread pool: attempt n+1 waits retry_base_s·2^n after attempt n.

    At most `per_host` deliveries run at once to one receiver (host:port), so a slow receiver delays
    only its own webhooks; the rest of the pool serves everyone else. Every POST goes through the
    outbound URL policy (checked address, no redirects), and a failed attempt is logged as "HTTP <code>"
    or one generic "could not connect", never the network error (the job's logs are the caller's).
    """

    def __init__(
        self,
        store: JobStore,
        signer: WebhookSigner,
        render: RenderPayload,
        retry_base_s: float = 7.0,
        max_retries: int = 10,
        timeout_s: float = 15.0,
        policy: URLPolicy | None = None,
        workers: int = 8,
        per_host: int = 2,
    ):
        self.store, self.signer, self.render = store, signer, render
        self.retry_base_s, self.max_retries, self.timeout_s = retry_base_s, max_retries, timeout_s
        self.policy = policy if policy is not None else URLPolicy()
        self.workers, self.per_host = workers, per_host
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._in_flight: dict[str, str] = {}  # job id → receiver (host:port)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="webhooks", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def _run(self) -> None:
        pool = ThreadPoolExecutor(self.workers, thread_name_prefix="webhook")
        with self.policy.client(self.timeout_s) as client:
            try:
                while not self._stop.is_set():
                    for job in self.store.due_webhooks(time.time()):
                        if self._claim(job):
                            pool.submit(self._deliver_and_release, client, job)
                    self._stop.wait(0.2)
            finally:
                # An attempt cut short by the client closing is recorded as failed and retried later.
                pool.shutdown(wait=False, cancel_futures=True)

    def _claim(self, job: Job) -> bool:
        """Reserve a slot for `job`: not already in flight, its receiver under `per_host`, a free thread."""
        receiver = _receiver(job.webhook_url or "")
        with self._lock:
            if job.id in self._in_flight or len(self._in_flight) >= self.workers:
                return False
            if sum(r == receiver for r in self._in_flight.values()) >= self.per_host:
                return False
            self._in_flight[job.id] = receiver
            return True

    def _deliver_and_release(self, client: httpx.Client, job: Job) -> None:
        try:
            self.deliver(client, job)
        except Exception:  # noqa: BLE001 -- e.g. the store is briefly locked: the next round retries
            logger.exception("job %s webhook delivery failed unexpectedly", job.id)
        finally:
            with self._lock:
                self._in_flight.pop(job.id, None)

    def deliver(self, client: httpx.Client, job: Job) -> bool:
        assert job.webhook_url is not None
        attempt = job.webhook_attempts + 1
        body = json.dumps(self.render(job), separators=(",", ":")).encode()
        headers = {"Content-Type": "application/json", **self.signer.headers(job.id, job.owner, body)}
        try:
            response = client.post(job.webhook_url, content=body, headers=headers)
            outcome = f"HTTP {response.status_code}"
            ok = response.is_success
        except httpx.HTTPError as exc:
            logger.info("job %s webhook: %s: %s", job.id, type(exc).__name__, exc)  # operator's log only
            outcome, ok = "could not connect", False
        if ok:
            self.store.record_webhook(job.id, WebhookState.DELIVERED, None)
            self.store.append_log(
                job.id, f"webhook delivered to {job.webhook_url} ({outcome}, attempt {attempt})"
            )
            logger.info("job %s webhook delivered (%s, attempt %d)", job.id, outcome, attempt)
            return True
        if attempt > self.max_retries:
            self.store.record_webhook(job.id, WebhookState.GAVE_UP, None)
            msg = f"webhook to {job.webhook_url} failed ({outcome}); gave up after {attempt} attempts"
            self.store.append_log(job.id, msg, "ERROR")
            logger.warning("job %s %s", job.id, msg)
            return False
        delay = self.retry_base_s * 2 ** (attempt - 1)
        self.store.record_webhook(job.id, WebhookState.PENDING, time.time() + delay)
        msg = f"webhook to {job.webhook_url} failed ({outcome}, attempt {attempt}); retrying in {delay:.0f}s"
        self.store.append_log(job.id, msg, "WARN")
        logger.warning("job %s %s", job.id, msg)
        return False


def _receiver(url: str) -> str:
    try:
        parsed = httpx.URL(url)
    except (httpx.InvalidURL, TypeError):
        return url
    return f"{parsed.host}:{parsed.port or (443 if parsed.scheme == 'https' else 80)}"
