"""The issue-11 findings, each tried against a live tiny server on loopback as an attacker would.

Every test here failed before the change it covers: cross-key access, unchecked outbound URLs, bodies
read whole before any limit, late validation, unsafe uploads, secrets in the start-up log.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest

from ovi_server.outbound import REFUSED_MESSAGE
from tests.clients.live import REPO, LiveServer, free_port, start_server

from .conftest import ALICE, BOB, FETCH_TIMEOUT_S, Outside, client, raw_request, wait_finished

T2V, I2V = "/fal-ai/ovi", "/fal-ai/ovi/image-to-video"
SMALL = {"num_inference_steps": 1, "resolution": "512x992"}


def submit(http: httpx.Client, body: dict, path: str = T2V, **kw) -> dict:
    response = http.post(path, json=body, **kw)
    assert response.status_code == 200, response.text
    return response.json()


# -- 1. tenancy ------------------------------------------------------------------------------------------


def test_another_keys_request_is_unknown(live: LiveServer):
    alice, bob = client(live, ALICE), client(live, BOB)
    rid = submit(alice, {"prompt": "a cat", "seed": 1, **SMALL})["request_id"]
    unknown = str(uuid.uuid4())
    probes = [
        ("GET", "/fal-ai/ovi/requests/{}/status?logs=1"),
        ("GET", "/fal-ai/ovi/requests/{}/status/stream"),
        ("GET", "/fal-ai/ovi/requests/{}"),
        ("GET", "/fal-ai/ovi/requests/{}/preview"),
        ("PUT", "/fal-ai/ovi/requests/{}/cancel"),
        ("GET", "/fal-ai/ovi/image-to-video/requests/{}/status"),
    ]
    for method, path in probes:
        theirs = bob.request(method, path.format(rid))
        missing = bob.request(method, path.format(unknown))
        assert theirs.status_code == missing.status_code == 404, (path, theirs.text)
        # Exactly as for an id that does not exist: the answer does not tell that it does.
        assert theirs.json() == json.loads(missing.text.replace(unknown, rid)), path
    # The owner still sees and finishes it; bob's cancel did nothing.
    final = wait_finished(alice, rid)
    assert alice.get(f"/fal-ai/ovi/requests/{rid}").status_code == 200, final


def test_two_keys_with_one_id_are_refused_at_start(tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "ovi_server.cli", "serve", "--variant", "tiny", "--device", "cpu",
         "--port", str(free_port()), "--data-dir", str(tmp_path), "--api-keys", "team:first-secret,team:second-secret"],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode != 0
    assert "two API keys have the id 'team'" in done.stderr
    assert (
        "first-secret" not in done.stderr + done.stdout and "second-secret" not in done.stderr + done.stdout
    )


# -- 3. limits at the edge -------------------------------------------------------------------------------


def test_declared_oversized_body_is_413_before_it_is_sent(live: LiveServer):
    # 100 MiB declared, one byte sent: the answer comes without the server waiting for the rest.
    head = f"POST /fal-ai/ovi HTTP/1.1\nHost: x\nAuthorization: Key {ALICE}\nContent-Type: application/json\nContent-Length: {100 << 20}\n"
    answer = raw_request(live.port, head, b"{")
    status_line, _, rest = answer.partition(b"\r\n")
    assert status_line.startswith(b"HTTP/1.1 413"), answer[:300]
    assert b"x-fal-error-type: request_too_large" in rest.lower()


def test_streamed_oversized_body_is_413_in_fal_shape(live: LiveServer):
    def chunks():  # no Content-Length: chunked transfer, counted as it arrives
        yield b'{"prompt": "'
        for _ in range(40):
            yield b"a" * (1 << 20)
        yield b'"}'

    response = client(live, ALICE).post(T2V, content=chunks(), headers={"Content-Type": "application/json"})
    assert response.status_code == 413
    body = response.json()
    assert body["error_type"] == "request_too_large" and "32 MiB" in body["detail"]
    assert response.headers["x-fal-error-type"] == "request_too_large"


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"prompt": "p", "seed": 2**63}, "seed"),
        ({"prompt": "p", "seed": -1}, "seed"),
        ({"prompt": "she says <S>hello"}, "prompt"),
        ({"prompt": "   "}, "prompt"),
        ({"prompt": "p", "num_inference_steps": 0}, "num_inference_steps"),
        ({"prompt": "p", "resolution": "4096x4096"}, "resolution"),
    ],
)
def test_bad_input_is_stored_failed_at_submit(live: LiveServer, body: dict, field: str):
    alice = client(live, ALICE)
    submitted = submit(alice, body)
    # Failed at submit: COMPLETED at once (fal's behaviour), result 422, and it never reached the worker.
    assert submitted["status"] == "COMPLETED", submitted
    result = alice.get(submitted["response_url"])
    assert result.status_code == 422
    assert result.json()["detail"][0]["loc"] == ["body", field]
    status = alice.get(submitted["status_url"], params={"logs": 1}).json()
    assert not any(line["message"].startswith("started") for line in status["logs"])


def test_oversized_prompt_is_not_stored(live: LiveServer):
    alice = client(live, ALICE)
    db = live.data_dir / "jobs.sqlite3"
    before = sum(p.stat().st_size for p in live.data_dir.glob("jobs.sqlite3*"))
    submitted = submit(alice, {"prompt": "x" * (4 << 20)})
    assert submitted["status"] == "COMPLETED"
    [error] = alice.get(submitted["response_url"]).json()["detail"]
    assert error["loc"] == ["body", "prompt"] and "4194304 characters long; the limit is 4000" in error["msg"]
    after = sum(p.stat().st_size for p in db.parent.glob("jobs.sqlite3*"))
    assert after - before < 256 << 10, (before, after)  # the 4 MiB prompt itself was not written


@pytest.mark.parametrize("raw_id", ["%E2%82%AC", "..%2F..%2Fetc", "a%0D%0Ab", "x" * 300])
def test_malformed_request_ids_are_404_json(live: LiveServer, raw_id: str):
    alice = client(live, ALICE)
    for method, suffix in (("GET", "/status"), ("GET", ""), ("PUT", "/cancel"), ("GET", "/status/stream")):
        response = alice.request(method, f"{live.base}/fal-ai/ovi/requests/{raw_id}{suffix}")
        assert response.status_code == 404, (suffix, response.text)
        assert response.headers["content-type"] == "application/json"
        assert response.json() in ({"status": "NOT_FOUND"}, {"detail": response.json().get("detail")})


# -- 7. secrets ------------------------------------------------------------------------------------------


def test_secrets_never_reach_the_log_or_health(live: LiveServer):
    alice = client(live, ALICE)
    alice.post(T2V, json={"prompt": "p", "seed": -5})  # an error path too
    httpx.get(f"{live.base}/fal-ai/ovi/requests/x/status", headers={"Authorization": "Key alice:wrong-guess"})
    health = httpx.get(f"{live.base}/health").text
    signing_key = (live.data_dir / "webhook_ed25519.pem").read_text().splitlines()[1]
    log = live.log_path.read_text(errors="replace")
    assert "auth: 2 API key(s): alice, bob" in log
    for secret in ("alice-secret-1", "bob-secret-2", "wrong-guess", signing_key):
        assert secret not in log and secret not in health


# -- 2. outbound URL policy --------------------------------------------------------------------------------


def test_image_url_to_internal_addresses_is_refused_with_one_message(live: LiveServer, outside: Outside):
    alice = client(live, ALICE)
    closed = free_port()
    internal = [
        f"{live.base}/health",  # the server itself
        f"http://localhost:{live.port}/health",
        f"http://0x7f000001:{live.port}/health",
        f"http://2130706433:{live.port}/health",
        f"http://[::ffff:127.0.0.1]:{live.port}/health",
        f"http://127.0.0.1:{closed}/x.png",  # a closed port: must read the same as an open one
        f"{outside.base}/to-internal",  # an allowed host redirecting inward: the hop is checked
        f"{outside.base}/missing.png",  # HTTP 404 from an allowed host: same text again
        "http://169.254.169.254/latest/meta-data/",
    ]
    ids = [submit(alice, {"prompt": "p", "image_url": url, **SMALL}, I2V)["request_id"] for url in internal]
    for url, rid in zip(internal, ids, strict=True):
        result = alice.get(f"/fal-ai/ovi/requests/{rid}")
        assert result.status_code == 422, (url, result.text)
        [error] = result.json()["detail"]
        assert error["loc"] == ["body", "image_url"] and error["msg"] == REFUSED_MESSAGE, (url, error)


def test_image_url_on_an_allowed_network_is_fetched_before_the_worker(live: LiveServer, outside: Outside):
    alice = client(live, ALICE)
    submitted = submit(
        alice, {"prompt": "p", "image_url": f"{outside.base}/frame.png", "seed": 4, **SMALL}, I2V
    )
    wait_finished(alice, submitted["request_id"])
    result = alice.get(submitted["response_url"])
    assert result.status_code == 200, result.text
    assert httpx.get(result.json()["video"]["url"]).headers["content-type"] == "video/mp4"


def test_a_slow_drip_image_fails_at_submit_and_never_takes_the_worker(live: LiveServer, outside: Outside):
    alice = client(live, ALICE)
    submitted = submit(alice, {"prompt": "p", "image_url": f"{outside.base}/drip.png", **SMALL}, I2V)
    assert submitted["status"] == "COMPLETED"  # the fetch deadline (--fetch-timeout 5) ran out at submit
    result = alice.get(submitted["response_url"])
    assert result.status_code == 422 and result.json()["detail"][0]["msg"] == REFUSED_MESSAGE
    logs = alice.get(submitted["status_url"], params={"logs": 1}).json()["logs"]
    assert not any(line["message"].startswith("started") for line in logs)


def test_a_key_has_at_most_four_image_downloads_in_flight(live: LiveServer, outside: Outside):
    alice, bob = client(live, ALICE), client(live, BOB)
    drip = {"prompt": "p", "image_url": f"{outside.base}/drip.png", **SMALL}
    answers: list[int] = []
    threads = [
        threading.Thread(target=lambda: answers.append(alice.post(I2V, json=drip).status_code))
        for _ in range(4)
    ]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + FETCH_TIMEOUT_S
    while outside.drips_open < 4:  # all four downloads are running (each lasts the fetch deadline)
        assert time.monotonic() < deadline, outside.drips_open
        time.sleep(0.01)
    fifth = alice.post(I2V, json=drip)
    other = alice.post(T2V, json={"prompt": "p", **SMALL})  # no download: not limited
    for thread in threads:
        thread.join()
    assert fifth.status_code == 429 and fifth.json()["error_type"] == "rate_limited", fifth.text
    assert "image_url downloads in progress" in fifth.json()["detail"] and fifth.headers["retry-after"]
    assert answers == [200] * 4 and other.status_code == 200
    assert bob.post(I2V, json=drip).status_code == 200  # another key was never limited


def test_own_uploads_are_read_from_the_store(live: LiveServer):
    # 127.0.0.1 is not an allowed network for this server: the upload can only come from its file store.
    alice = client(live, ALICE)
    urls = alice.post(
        "/storage/upload/initiate", json={"content_type": "image/png", "file_name": "f.png"}
    ).json()
    from .conftest import png_bytes

    assert (
        httpx.put(urls["upload_url"], content=png_bytes(), headers={"Content-Type": "image/png"}).status_code
        == 200
    )
    submitted = submit(alice, {"prompt": "p", "image_url": urls["file_url"], "seed": 2, **SMALL}, I2V)
    wait_finished(alice, submitted["request_id"])
    assert alice.get(submitted["response_url"]).status_code == 200


@pytest.mark.parametrize(
    "hook",
    ["http://127.0.0.1:{port}/hook", "http://localhost:{port}/hook", "file:///etc/passwd", "gopher://x/"],
)
def test_refused_webhook_urls_are_422_at_submit(live: LiveServer, hook: str):
    response = client(live, ALICE).post(
        T2V, json={"prompt": "p"}, params={"fal_webhook": hook.format(port=live.port)}
    )
    assert response.status_code == 422, response.text
    [error] = response.json()["detail"]
    assert error["loc"] == ["query", "fal_webhook"] and error["msg"] == REFUSED_MESSAGE


def test_webhook_on_an_allowed_network_is_delivered(live: LiveServer, outside: Outside):
    alice = client(live, ALICE)
    rid = submit(alice, {"prompt": "p", "seed": -1}, params={"fal_webhook": f"{outside.base}/hook-a"})[
        "request_id"
    ]
    deadline = time.monotonic() + 30
    while not any(json.loads(body)["request_id"] == rid for _, body in outside.hooks):
        assert time.monotonic() < deadline, outside.hooks
        time.sleep(0.05)


def test_webhook_failures_are_logged_without_network_detail(live: LiveServer):
    alice = client(live, ALICE)
    with socket.socket() as sock:  # a port on the allowed host that was free a moment ago: refused
        sock.bind(("127.0.0.2", 0))
        closed = sock.getsockname()[1]
    hook = f"http://127.0.0.2:{closed}/hook"
    submitted = submit(alice, {"prompt": "p", "seed": -1}, params={"fal_webhook": hook})
    deadline = time.monotonic() + 30
    while True:
        logs = alice.get(submitted["status_url"], params={"logs": 1}).json()["logs"]
        failures = [line["message"] for line in logs if line["message"].startswith("webhook to")]
        if failures:
            break
        assert time.monotonic() < deadline, logs
        time.sleep(0.05)
    assert failures[0] == f"webhook to {hook} failed (could not connect, attempt 1); retrying in 0s"


# -- 5. uploads ------------------------------------------------------------------------------------------


def test_unreserved_upload_key_is_refused_before_the_body(live: LiveServer):
    head = (
        f"PUT /storage/put/uploads/{uuid.uuid4().hex}/x.bin HTTP/1.1\nHost: x\nContent-Length: {80 << 20}\n"
    )
    answer = raw_request(live.port, head, b"x" * 1024)
    assert answer.startswith(b"HTTP/1.1 404"), answer[:300]


@pytest.mark.parametrize("content_type", ["text/html\r\nX-Evil: 1", "image/p\u00e9ng", "not a type", ""])
def test_upload_content_type_must_be_a_mime_type(live: LiveServer, content_type: str):
    response = client(live, ALICE).post("/storage/upload/initiate", json={"content_type": content_type})
    assert response.status_code == 422, response.text
    assert response.json()["detail"][0]["loc"] == ["body", "content_type"]


@pytest.mark.parametrize(
    ("content_type", "file_name", "disposition"),
    [
        ("text/html", "page.html", "attachment"),
        ("image/svg+xml", "x.svg", "attachment"),
        ("application/octet-stream", "notes.meta.json", "attachment"),
        ("image/png", "frame.pending", "inline"),
        ("video/mp4", "clip.mp4", "inline"),
    ],
)
def test_uploads_are_served_safely(live: LiveServer, content_type: str, file_name: str, disposition: str):
    alice = client(live, ALICE)
    initiate = alice.post(
        "/storage/upload/initiate", json={"content_type": content_type, "file_name": file_name}
    )
    assert initiate.status_code == 200, initiate.text
    urls = initiate.json()
    body = b"<script>alert(document.cookie)</script>"
    assert (
        httpx.put(urls["upload_url"], content=body, headers={"Content-Type": content_type}).status_code == 200
    )
    served = httpx.get(urls["file_url"])
    assert served.status_code == 200 and served.content == body
    assert served.headers["x-content-type-options"] == "nosniff"
    assert served.headers["content-security-policy"] == "sandbox"
    assert served.headers["content-disposition"].startswith(disposition)
    assert urls["file_url"].endswith("/" + file_name)


# -- 4. fair share on a live server ------------------------------------------------------------------------


def test_one_key_cannot_fill_the_queue(tmp_path):
    """Guards "one key can fill the queue": before the per-key quota, every submit here was accepted."""
    quota = 3
    # API only (--workers 0): nothing runs, so what is queued stays queued for the whole test.
    server = start_server(
        tmp_path, "--workers", "0", "--max-queued-per-key", str(quota), api_keys=f"{ALICE},{BOB}"
    )
    try:
        alice, bob = client(server, ALICE), client(server, BOB)
        body = {"prompt": "p", **SMALL}
        held = [submit(alice, body)["request_id"] for _ in range(quota)]
        refused = alice.post(T2V, json=body)
        assert refused.status_code == 429, refused.text
        assert set(refused.json()) == {"detail", "error_type"}, refused.json()  # fal's error shape
        assert refused.json()["error_type"] == "rate_limited" and str(quota) in refused.json()["detail"]
        assert int(refused.headers["retry-after"]) > 0
        assert bob.post(T2V, json=body).status_code == 200  # another key is not limited by alice's queue
        cancel = alice.put(f"{T2V}/requests/{held[0]}/cancel")
        assert cancel.status_code == 202, cancel.text
        assert alice.post(T2V, json=body).status_code == 200  # the cancelled request freed its place
        assert alice.post(T2V, json=body).status_code == 429  # and only that one
    finally:
        server.stop()


class _HookReceiver:
    """A webhook receiver on its own port of the allowed host; with `hold`, each call waits for it."""

    def __init__(self, hold: threading.Event | None = None, hold_s: float = 0) -> None:
        self.calls: list[str] = []  # request ids, once the answer is about to go back
        self.arrived: list[str] = []  # request ids, as soon as the body is read
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802
                rid = json.loads(self.rfile.read(int(self.headers["Content-Length"])))["request_id"]
                receiver.arrived.append(rid)
                if hold is not None:
                    hold.wait(hold_s)
                receiver.calls.append(rid)
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.2", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.2:{self.httpd.server_address[1]}/hook"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()


def wait_until(predicate, timeout: float, what) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, what()
        time.sleep(0.02)


def test_a_slow_webhook_receiver_delays_only_its_own_webhooks(live: LiveServer):
    """Guards "one slow receiver delays every other webhook": with one delivery thread, job 2's webhook
    waited behind job 1's held delivery. Job 1 runs on the worker; job 2 is refused at submit (seed -1),
    so its webhook is due at once and no generation time sits inside the server's 15 s webhook timeout,
    which bounds how long the slow receiver may hold (it answers by 12 s at the latest)."""
    release = threading.Event()
    slow, fast = _HookReceiver(release, hold_s=12), _HookReceiver()
    alice = client(live, ALICE)
    try:
        job1 = submit(alice, {"prompt": "p", "seed": 11, **SMALL}, params={"fal_webhook": slow.url})
        wait_until(lambda: slow.arrived == [job1["request_id"]], 120, lambda: (slow.arrived, live.log()))
        job2 = submit(alice, {"prompt": "p", "seed": -1}, params={"fal_webhook": fast.url})
        wait_until(lambda: fast.calls, 10, lambda: "fast webhook not delivered while the slow one was held")
        held = slow.calls == [] and not release.is_set()
        release.set()
        assert held, "the slow receiver answered before the fast webhook arrived (its 12 s hold ran out)"
        assert fast.calls == [job2["request_id"]]
        for job, receiver in ((job1, slow), (job2, fast)):
            url = receiver.url
            wait_until(
                lambda job=job, url=url: (
                    f"webhook delivered to {url} (HTTP 200, attempt 1)"
                    in [
                        line["message"]
                        for line in alice.get(job["status_url"], params={"logs": 1}).json()["logs"]
                    ]
                ),
                30,
                lambda job=job: alice.get(job["status_url"], params={"logs": 1}).json(),
            )
        assert slow.calls == [job1["request_id"]] and fast.calls == [job2["request_id"]]  # each exactly once
    finally:
        release.set()
        slow.httpd.shutdown()
        fast.httpd.shutdown()


def test_health_answers_while_an_oversized_body_is_arriving(live: LiveServer):
    """Guards against a large upload stalling the server (a body read that blocks the event loop or a
    worker thread the API needs): the upload pauses halfway until /health has answered, so /health must
    complete before the body is done; the body then goes over 32 MiB and is refused with fal's 413."""
    health: list[int] = []

    def chunks():  # chunked transfer, 1 MiB at a time; 48 MiB in all
        yield b'{"prompt": "'
        for i in range(48):
            if i == 16:  # 16 MiB sent, under the limit: the server is still reading this body
                health.append(httpx.get(f"{live.base}/health", timeout=30).status_code)
            yield b"a" * (1 << 20)
        yield b'"}'

    response = client(live, ALICE).post(T2V, content=chunks(), headers={"Content-Type": "application/json"})
    assert health == [200]  # answered while the upload was paused mid-body
    assert response.status_code == 413 and response.json()["error_type"] == "request_too_large", response.text
