"""Files appear whole or not at all; scratch directories of dead processes are swept; one slow webhook
receiver delays only its own deliveries."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from ovi_server.config import EngineConfig
from ovi_server.jobs.files import LocalFiles
from ovi_server.jobs.sqlite import SqliteJobStore
from ovi_server.jobs.store import JobResult, NewJob, WebhookState
from ovi_server.jobs.webhooks import WebhookSender, WebhookSigner
from ovi_server.jobs.worker import Worker
from ovi_server.outbound import URLPolicy, parse_networks


def test_an_output_is_never_visible_half_written(tmp_path: Path):
    files = LocalFiles(tmp_path / "files")
    fifo = tmp_path / "output.mp4"
    os.mkfifo(fifo)  # the copy blocks on it mid-file: the state a crash would leave
    copier = threading.Thread(target=files.put_file, args=("outputs/j/output.mp4", fifo, "video/mp4"))
    copier.start()
    directory = tmp_path / "files" / "outputs" / "j"
    deadline = time.monotonic() + 10
    while True:  # open the write end once put_file holds the read end (never block on a dead reader)
        try:
            fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
            break
        except OSError:
            assert time.monotonic() < deadline, "put_file never opened its source"
            time.sleep(0.01)
    os.set_blocking(fd, True)
    with os.fdopen(fd, "wb") as writer:
        writer.write(b"first half")
        writer.flush()
        deadline = time.monotonic() + 10
        while not (directory.is_dir() and any(directory.iterdir())):
            assert time.monotonic() < deadline, "put_file never started writing"
            time.sleep(0.01)
        # Something is being written, but not under the key: a download now is a 404, not half a video.
        assert not (directory / "output.mp4").exists(), list(directory.iterdir())
        writer.write(b", second half")
    copier.join(10)
    assert files.local_path("outputs/j/output.mp4").read_bytes() == b"first half, second half"
    assert [p.name for p in directory.iterdir()] == ["output.mp4"]  # no temporary left behind


def test_scratch_of_dead_processes_is_swept_at_start(tmp_path: Path):
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    dead_pid = int(dead.stdout)
    scratch = tmp_path / "tmp"
    left = scratch / f"ovi-{dead_pid}-0b7e-job-abc"  # left by a SIGKILLed server
    mine = scratch / f"ovi-{os.getpid()}-1c8f-job-def"  # a live worker's, sharing the directory
    other = scratch / "unrelated"
    for path in (left, mine, other):
        path.mkdir(parents=True)
        (path / "output.mp4").write_bytes(b"partial")
    store = SqliteJobStore(tmp_path / "jobs.sqlite3")
    Worker(EngineConfig(), store, LocalFiles(tmp_path / "files"), tmp_dir=scratch)
    assert not left.exists() and mine.exists() and other.exists()


class _Receiver:
    """A webhook receiver on its own loopback address; `hold` keeps every request waiting."""

    def __init__(self, ip: str, hold: threading.Event | None = None) -> None:
        self.calls: list[str] = []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802
                body = self.rfile.read(int(self.headers["Content-Length"]))
                if hold is not None:
                    hold.wait(60)
                receiver.calls.append(json.loads(body)["request_id"])
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.httpd = ThreadingHTTPServer((ip, 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://{ip}:{self.httpd.server_address[1]}/hook"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()


def test_a_slow_webhook_receiver_delays_only_itself(tmp_path: Path):
    store = SqliteJobStore(tmp_path / "jobs.sqlite3")
    hold = threading.Event()
    slow, fast = _Receiver("127.0.0.2", hold), _Receiver("127.0.0.3")
    slow_ids = []
    for url in [slow.url] * 4 + [fast.url] * 3:  # the slow receiver's jobs finished first
        job = store.submit(NewJob(app="fal-ai/ovi", request=None, webhook_url=url))
        store.succeed(job.id, JobResult("k", 1, 1, 0.1))
        if url == slow.url:
            slow_ids.append(job.id)
    signer = WebhookSigner.load_or_create(tmp_path / "key.pem")
    sender = WebhookSender(
        store,
        signer,
        lambda j: {"request_id": j.id},
        timeout_s=120,  # the slow receiver would hold a single delivery thread for this long
        policy=URLPolicy(parse_networks("127.0.0.0/8")),
        workers=4,
        per_host=2,
    )
    sender.start()
    try:
        deadline = time.monotonic() + 30
        while len(fast.calls) < 3:
            assert time.monotonic() < deadline, f"fast receiver got {len(fast.calls)} of 3 while one was slow"
            time.sleep(0.02)
        assert slow.calls == []  # still held: the fast receiver did not wait for it
        hold.set()
        while len(slow.calls) < 4:
            assert time.monotonic() < deadline + 30, slow.calls
            time.sleep(0.02)
        assert sorted(slow.calls) == sorted(slow_ids)
        while any(store.get(i).webhook_state is not WebhookState.DELIVERED for i in slow_ids):
            assert time.monotonic() < deadline + 30
            time.sleep(0.02)
    finally:
        hold.set()
        sender.stop()
