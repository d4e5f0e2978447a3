"""Worker processes against a live `ovi-server serve` (tiny variant, CPU), on SQLite and on Redis.

Faults a user would notice: a worker SIGKILLed or frozen mid-job, a late finisher, a SIGTERM; every job
must still complete once, with one result and one webhook. The API process must not load torch.
"""

from __future__ import annotations

import os
import re
import signal
import sqlite3
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from clients.live import REPO, LiveServer, Receiver, check_mp4, start_server, wait_for
from clients.redis_server import RedisServer

T2V = "/fal-ai/ovi"


@pytest.fixture(params=["sqlite", "redis"])
def queue_args(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[list[str]]:
    """Extra `serve` flags for the backend; Redis: a fresh redis-server for this test."""
    if request.param == "sqlite":
        yield []
        return
    redis = RedisServer(tmp_path / "redis")
    yield ["--queue", redis.url]
    redis.stop()


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    hook = Receiver()
    yield hook
    hook.close()


def status(http: httpx.Client, rid: str) -> dict:
    return http.get(f"{T2V}/requests/{rid}/status", params={"logs": 1}).json()


def submit(http: httpx.Client, count: int, receiver: Receiver | None = None) -> list[str]:
    """`count` text-to-video jobs of 40 steps (long enough to catch one running), seed i for job i,
    with a webhook to `receiver` if given; their request ids."""
    url = T2V if receiver is None else f"{T2V}?fal_webhook={receiver.url}"
    return [
        http.post(url, json={"prompt": f"p{i}", "num_inference_steps": 40, "seed": i}).json()["request_id"]
        for i in range(count)
    ]


def messages(http: httpx.Client, rid: str) -> list[str]:
    return [line["message"] for line in status(http, rid)["logs"]]


def all_completed(http: httpx.Client, ids: list[str]) -> bool:
    return all(status(http, rid)["status"] == "COMPLETED" for rid in ids)


def freeze_busy_worker(server: LiveServer, timeout: float = 60) -> tuple[int, str]:
    """SIGSTOP a worker in the middle of denoising; (pid, request id).

    Its last heartbeat names its job, and its job's last log line says where it is: "denoise k/n" (or the
    live preview's "preview k/n", written every few steps) with k < n means it will call back at least once more before its job ends (the n/n line is always
    written), so a stop request or a lost lease is seen before the job could finish.
    """
    deadline = time.monotonic() + timeout
    with server.client() as http:
        while time.monotonic() < deadline:
            for worker in server.workers():
                if worker["state"] != "busy":
                    continue
                os.kill(worker["pid"], signal.SIGSTOP)
                (now,) = [w for w in server.workers() if w["id"] == worker["id"]]
                if now["state"] == "busy":
                    done = re.fullmatch(
                        r"(?:denoise|preview) (\d+)/(\d+)", (messages(http, now["job"]) or [""])[-1]
                    )
                    if done and int(done[1]) < int(done[2]):
                        return now["pid"], now["job"]
                os.kill(worker["pid"], signal.SIGCONT)  # not mid-denoise: try again
            time.sleep(0.02)
    raise AssertionError(f"no worker was caught denoising within {timeout}s")


def sigterm_pending(pid: int) -> bool:
    """Whether a (stopped) process has a SIGTERM waiting for it (/proc/PID/status, ShdPnd bit mask)."""
    status = Path(f"/proc/{pid}/status").read_text()
    pending = int(re.search(r"^ShdPnd:\s*([0-9a-f]+)$", status, re.MULTILINE)[1], 16)
    return bool(pending & (1 << (signal.SIGTERM - 1)))


def torch_loaded(pid: int) -> bool:
    """Whether a live process has torch's shared library mapped (what `import torch` does)."""
    return "libtorch_cpu" in Path(f"/proc/{pid}/maps").read_text()


def worker_jobs_total(server: LiveServer, outcome: str) -> float:
    with server.client() as http:
        text = http.get("/metrics").text
    pattern = rf'^ovi_worker_jobs_total\{{[^}}]*outcome="{outcome}"[^}}]*\}} (\S+)$'
    return sum(float(v) for v in re.findall(pattern, text, re.MULTILINE))


def test_sigkill_of_a_busy_worker_loses_nothing(tmp_path: Path, queue_args: list[str], receiver: Receiver):
    server = start_server(tmp_path, "--workers", "2", "--lease-seconds", "2", *queue_args)
    try:
        workers = server.wait_for_workers(2)
        assert server.proc is not None and not torch_loaded(server.proc.pid)  # the API process
        assert all(torch_loaded(w["pid"]) for w in workers)  # ... while its workers have it
        with server.client() as http:
            ids = submit(http, 6, receiver)
            pid, killed_job = freeze_busy_worker(server)
            os.kill(pid, signal.SIGKILL)
            wait_for(lambda: all_completed(http, ids), 240, "not every job completed after the kill")
            receiver.wait(len(ids))

            for seed, rid in enumerate(ids):
                result = http.get(f"{T2V}/requests/{rid}")
                assert result.status_code == 200, result.text
                assert result.json()["seed"] == seed
                lines = messages(http, rid)
                assert sum(m.startswith("webhook delivered") for m in lines) == 1, lines
            assert any("queued again" in m for m in messages(http, killed_job))
            check_mp4(http.get(f"{T2V}/requests/{killed_job}").json()["video"]["url"])
            assert sorted(h["x-fal-webhook-request-id"] for h, _ in receiver.calls) == sorted(ids)

        # the supervisor started a new worker in place of the killed one (the dead one's entry goes once
        # its heartbeat is 3 leases old)
        def replaced() -> bool:
            ready = [w["pid"] for w in server.workers() if w["state"] != "loading"]
            return len(ready) == 2 and pid not in ready

        wait_for(replaced, 120, "the killed worker was not replaced")
    finally:
        server.stop()


def test_a_frozen_worker_loses_its_job_and_its_late_result_is_discarded(tmp_path: Path, receiver: Receiver):
    """SQLite lease expiry with the server running: SIGSTOP past the lease, another worker finishes the
    job; SIGCONT, and the late worker stores nothing."""
    server = start_server(tmp_path, "--workers", "2", "--lease-seconds", "2")
    try:
        server.wait_for_workers(2)
        with server.client() as http:
            ids = submit(http, 3, receiver)
            pid, frozen_job = freeze_busy_worker(server)
            try:
                wait_for(lambda: all_completed(http, ids), 240, "the frozen worker's job was not re-run")
                winner = http.get(f"{T2V}/requests/{frozen_job}").json()
            finally:
                os.kill(pid, signal.SIGCONT)
            # it wakes up, finds its lease gone at its next heartbeat and goes back to idle
            wait_for(
                lambda: [w["state"] for w in server.workers() if w["pid"] == pid] == ["idle"],
                60,
                "the woken worker did not drop its stale job",
            )
            assert http.get(f"{T2V}/requests/{frozen_job}").json() == winner  # the result stored once
            assert winner["video"]["url"].endswith(f"/{frozen_job}/2/output.mp4")  # by the second attempt
            check_mp4(winner["video"]["url"])
            receiver.wait(len(ids))
            lines = messages(http, frozen_job)
            assert sum("queued again" in m for m in lines) == 1
            assert sum(m.startswith("started on") for m in lines) == 2
            assert sum(m.startswith("webhook delivered") for m in lines) == 1
            assert Counter(h["x-fal-webhook-request-id"] for h, _ in receiver.calls)[frozen_job] == 1
        assert "result discarded" in server.log() or "lost the lease" in server.log()
    finally:
        server.stop()


def test_sigterm_drains_the_workers_and_the_job_runs_after_a_restart(tmp_path: Path):
    server = start_server(tmp_path, "--workers", "1")
    with server.client() as http:
        (worker,) = server.wait_for_workers(1)
        ids = submit(http, 3)
        pid, running = freeze_busy_worker(server)
    assert server.proc is not None
    server.proc.send_signal(signal.SIGTERM)
    wait_for(lambda: sigterm_pending(pid), 60, "the server did not pass the SIGTERM on to its worker")
    os.kill(pid, signal.SIGCONT)  # now it handles the SIGTERM, in the middle of its job
    assert server.proc.wait(60) == 0
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)  # the worker is gone too
    with sqlite3.connect(server.data_dir / "jobs.sqlite3") as db:
        rows = dict(db.execute("SELECT id, status || ':' || attempts FROM jobs").fetchall())
        log = [m for (m,) in db.execute("SELECT message FROM logs WHERE job_id = ?", (running,))]
    assert "running:" not in " ".join(rows.values())  # nothing is left running
    assert rows[running] == "queued:0"  # put back without counting the attempt
    assert log[-1] == "worker shutting down; queued again"

    server.start()
    try:
        with server.client() as http:
            wait_for(lambda: all_completed(http, ids), 180, "jobs did not complete after the restart")
            assert all(http.get(f"{T2V}/requests/{rid}").status_code == 200 for rid in ids)
    finally:
        server.stop()


def test_200_queued_jobs_over_3_workers_none_lost_none_duplicated(tmp_path: Path):
    redis = RedisServer(tmp_path / "redis")
    # API only: queue everything first, then start the workers, so that all three drain one backlog.
    server = start_server(tmp_path, "--workers", "0", "--queue", redis.url, "--max-queued-per-key", "1000")
    workers: list = []
    try:
        with server.client() as http:
            ids = [
                http.post(T2V, json={"prompt": f"p{i}", "num_inference_steps": 1}).json()["request_id"]
                for i in range(200)
            ]
            assert len(set(ids)) == 200
            assert http.get("/health").json()["queue_depth"] == 200
            workers = [start_worker(server, redis.url, tmp_path / f"worker{i}.log") for i in range(3)]
            wait_for(lambda: all_completed(http, ids), 600, "the backlog was not drained")
            assert all(http.get(f"{T2V}/requests/{rid}").status_code == 200 for rid in ids)
            runs = [sum(m.startswith("started on") for m in messages(http, rid)) for rid in ids]
            assert runs == [1] * 200  # each job ran once
            # ... and the workers' own counters say so too (a duplicate run would add one)
            wait_for(lambda: worker_jobs_total(server, "succeeded") == 200, 30, "worker counters disagree")
            assert len(server.workers()) == 3
        assert "shared across hosts but files are local" in server.log_path.read_text()  # says so at start-up
    finally:
        for proc in workers:
            proc.terminate()
            proc.wait(30)
        server.stop()
        redis.stop()


def start_worker(server: LiveServer, queue: str | None, log: Path) -> subprocess.Popen:
    """`ovi-server worker` by hand, on the API's data dir (its local files) and queue."""
    cmd = [
        sys.executable, "-m", "ovi_server.cli", "worker", "--variant", "tiny", "--device", "cpu",
        "--data-dir", str(server.data_dir), *(["--queue", queue] if queue else []),
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log.open("ab"), stderr=subprocess.STDOUT)


def test_a_worker_started_by_hand_joins_the_api_on_its_data_dir(tmp_path: Path):
    server = start_server(tmp_path, "--workers", "0")  # holds the data dir's lock
    worker = start_worker(server, None, tmp_path / "worker.log")
    try:
        (listed,) = server.wait_for_workers(1)
        assert listed["pid"] == worker.pid and listed["device"] == "cpu"
        with server.client() as http:
            rid = http.post(T2V, json={"prompt": "p", "num_inference_steps": 2}).json()["request_id"]
            wait_for(lambda: all_completed(http, [rid]), 120, "the hand-started worker did not run the job")
            check_mp4(http.get(f"{T2V}/requests/{rid}").json()["video"]["url"])  # its file, served by the API
    finally:
        worker.terminate()
        assert worker.wait(30) == 0  # SIGTERM: a clean stop
        server.stop()
