"""Queue benchmark: pick-up latency and submit rate of a live `ovi-server serve --workers N`, real workers.

Real parts only: the CLI's server and worker processes running the tiny variant (random weights, CPU,
1 denoising step), the chosen queue (SQLite in a temp data dir, or a redis-server started here on a
unix socket). Three measurements:

- idle pick-up: with every worker idle, submit one request, wait for it to finish, repeat; latency is
  the job's `started_at - created_at` (the store's clocks: submit in the API, claim in the worker);
- submits/s: POST `--jobs` requests from `--clients` threads while the workers drain them;
- backlog pick-up: from those jobs, the gap between a worker storing one job and claiming its next
  (`started_at` of its next job minus `finished_at` of its previous one), i.e. the claim overhead
  under load; and the drain rate;
- recovery after SIGKILL: a 50-step request, its worker killed mid-run; seconds from the kill until
  another worker has claimed it again (bounded by the lease, `--lease-seconds`, plus a third of it).

    python -m benchmarks.queue --queue sqlite --workers 4 --jobs 1000
    python -m benchmarks.queue --queue redis --workers 4 --jobs 1000

Prints one JSON line (STYLE.md §11).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import defaultdict
from pathlib import Path

import httpx

from ovi_server.config import ServerConfig
from ovi_server.jobs.backends import open_store
from ovi_server.jobs.store import Job, JobStore

REPO = Path(__file__).resolve().parents[1]
BODY = {"prompt": "A cat says <S>hi<E> <AUDCAP>meow<ENDAUDCAP>", "num_inference_steps": 1}


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise SystemExit(f"timed out: {what}")
        time.sleep(0.05)


def start_redis(directory: Path) -> tuple[subprocess.Popen, str]:
    binary = shutil.which("redis-server")
    if binary is None:
        raise SystemExit("--queue redis needs redis-server (apt-get install redis-server)")
    sock = directory / "redis.sock"
    proc = subprocess.Popen(
        [
            binary,
            "--port",
            "0",
            "--unixsocket",
            str(sock),
            "--dir",
            str(directory),
            "--save",
            "",
            "--appendonly",
            "no",
        ],
        stdout=subprocess.DEVNULL,
    )
    wait(sock.exists, 20, "redis-server start")
    return proc, f"unix://{sock}?db=0"


def finished_count(store: JobStore) -> int:
    return sum(n for status, n in store.counts().items() if status.finished)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--queue", choices=["sqlite", "redis"], default="sqlite")
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--jobs", type=int, default=1000, help="requests queued for the backlog part")
    parser.add_argument("--idle-jobs", type=int, default=50, help="one-at-a-time requests for idle pick-up")
    parser.add_argument("--clients", type=int, default=8, help="submitting threads")
    parser.add_argument("--lease-seconds", type=float, default=30.0)
    args = parser.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="ovi-bench-queue-"))
    redis_proc = None
    queue_url = None
    if args.queue == "redis":
        redis_proc, queue_url = start_redis(tmp)
    port = free_port()
    cmd = [
        sys.executable, "-m", "ovi_server.cli", "serve", "--variant", "tiny", "--device", "cpu",
        "--port", str(port), "--data-dir", str(tmp / "data"), "--workers", str(args.workers),
        "--log-level", "warning", "--lease-seconds", str(args.lease_seconds),
        "--max-queued-per-key", str(args.jobs + args.idle_jobs + 10),
    ] + (["--queue", queue_url] if queue_url else [])  # fmt: skip
    log = (tmp / "server.log").open("wb")
    server = subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    store = open_store(ServerConfig(data_dir=tmp / "data", queue=queue_url))
    failed = False
    try:
        with httpx.Client(base_url=base, timeout=60) as http:

            def ready_workers() -> int:
                try:
                    return sum(w["state"] == "idle" for w in http.get("/health").json().get("workers", []))
                except httpx.TransportError:
                    return 0

            wait(lambda: ready_workers() == args.workers, 600, "workers ready")

            # 1. idle pick-up: one request at a time, every worker waiting
            idle: list[float] = []
            for _ in range(args.idle_jobs):
                rid = http.post("/fal-ai/ovi", json=BODY).json()["request_id"]
                wait(lambda rid=rid: store.get(rid).status.finished, 120, "idle job")
                job = store.get(rid)
                idle.append(job.started_at - job.created_at)

            # 2. submits/s with the workers draining at the same time
            ids: list[str] = []
            lock = threading.Lock()
            per_client = [
                args.jobs // args.clients + (i < args.jobs % args.clients) for i in range(args.clients)
            ]

            def submit(n: int) -> None:
                with httpx.Client(base_url=base, timeout=60) as own:
                    for _ in range(n):
                        rid = own.post("/fal-ai/ovi", json=BODY).json()["request_id"]
                        with lock:
                            ids.append(rid)

            started = time.perf_counter()
            threads = [threading.Thread(target=submit, args=(n,)) for n in per_client]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            submit_s = time.perf_counter() - started
            wait(lambda: finished_count(store) == args.idle_jobs + args.jobs, 3600, "backlog drained")
            drain_s = time.perf_counter() - started

            # 4. recovery: SIGKILL the worker of a running request
            body = {**BODY, "num_inference_steps": 50}
            rid = http.post("/fal-ai/ovi", json=body).json()["request_id"]
            wait(lambda: store.get(rid).status.value == "running", 120, "long job started")
            victim = store.get(rid)
            pid = next(w["pid"] for w in http.get("/health").json()["workers"] if w["id"] == victim.worker)
            os.kill(pid, signal.SIGKILL)
            killed_at = time.time()
            wait(lambda: store.get(rid).attempts == 2, 600, "killed job re-claimed")
            recovery_s = store.get(rid).started_at - killed_at
            wait(lambda: store.get(rid).status.finished, 600, "killed job finished")
            recovered = store.get(rid).status.value

        # 3. backlog pick-up: per worker, the gap from storing one job to claiming the next
        jobs = [store.get(i) for i in ids]
        by_worker: dict[str, list[Job]] = defaultdict(list)
        for job in jobs:
            by_worker[job.worker or "?"].append(job)
        gaps: list[float] = []
        for own in by_worker.values():
            own.sort(key=lambda j: j.started_at or 0)
            gaps += [b.started_at - a.finished_at for a, b in zip(own, own[1:], strict=False)]
        outcomes = defaultdict(int)
        for job in jobs:
            outcomes[job.status.value] += 1
        report = {
            "bench": "queue",
            "queue": args.queue,
            "workers": args.workers,
            "jobs": args.jobs,
            "variant": "tiny",
            "steps": 1,
            "idle_pickup_ms": {
                "n": len(idle),
                "p50": round(statistics.median(idle) * 1000, 1),
                "p99": round(percentile(idle, 99) * 1000, 1),
                "max": round(max(idle) * 1000, 1),
            },
            "submits_per_s": round(args.jobs / submit_s, 1),
            "backlog_pickup_ms": {
                "n": len(gaps),
                "p50": round(statistics.median(gaps) * 1000, 1),
                "p99": round(percentile(gaps, 99) * 1000, 1),
            },
            "drain_jobs_per_s": round(args.jobs / drain_s, 2),
            "lease_s": args.lease_seconds,
            "recovery_after_sigkill_s": round(recovery_s, 2),
            "recovered_job": recovered,
            "outcomes": dict(outcomes),
            "failures": sorted(
                {f"{j.failure.kind.value}: {j.failure.message[:200]}" for j in jobs if j.failure}
            ),
            "jobs_per_worker": sorted(len(v) for v in by_worker.values()),
            "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "git_sha": subprocess.run(
                ["git", "rev-parse", "--short=12", "HEAD"], cwd=REPO, capture_output=True, text=True
            ).stdout.strip(),
            "load_avg": os.getloadavg(),
            "cpus": os.cpu_count(),
        }
        print(json.dumps(report))
        failed = bool(report["failures"])
    finally:
        server.terminate()
        server.wait(60)
        store.close()
        if redis_proc is not None:
            redis_proc.terminate()
            redis_proc.wait(10)
        if failed:
            print(f"kept {tmp} (server.log) for the failed requests", file=sys.stderr)
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
