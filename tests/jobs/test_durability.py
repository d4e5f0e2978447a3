"""SIGKILL the live server and its worker mid-job (a power cut), start it again on the same data dir:
no accepted request vanishes.

Every request submitted before the kill ends COMPLETED: the one that was running is queued again when
its lease runs out and finishes, the queued ones run, a cancelled one stays cancelled, an invalid one
keeps its 422.
"""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
from collections.abc import Iterator

import pytest
from clients.live import REPO, LiveServer, check_mp4, start_server, wait_for

T2V = "/fal-ai/ovi"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    live = start_server(tmp_path_factory.mktemp("durability"), "--workers", "1", "--lease-seconds", "2")
    yield live
    live.stop()


def running_ids(server: LiveServer) -> set[str]:
    """Read the dead server's store directly: which requests were running when it died."""
    with sqlite3.connect(server.data_dir / "jobs.sqlite3") as db:
        return {row[0] for row in db.execute("SELECT id FROM jobs WHERE status = 'running'")}


def test_sigkill_mid_job_then_restart(server: LiveServer):
    with server.client() as http:
        submit = lambda body: http.post(T2V, json=body).json()["request_id"]  # noqa: E731
        # Back-to-back long jobs, so one is running whenever the kill lands (tiny runs 50 steps in ~1 s).
        long = [submit({"prompt": f"long {i}", "num_inference_steps": 50, "seed": i}) for i in range(4)]
        queued = [submit({"prompt": f"queued {i}", "num_inference_steps": 2}) for i in range(2)]
        cancelled = submit({"prompt": "cancelled", "num_inference_steps": 2})
        invalid = submit({"prompt": "bad", "num_inference_steps": 0})
        assert http.put(f"{T2V}/requests/{cancelled}/cancel").status_code == 202

        def denoising() -> bool:
            logs = http.get(f"{T2V}/requests/{long[0]}/status", params={"logs": 1}).json()["logs"] or []
            return any(line["message"].startswith("denoise") for line in logs)

        wait_for(denoising, 60, "the first job never started denoising")
        (worker,) = server.workers()
    os.kill(worker["pid"], signal.SIGKILL)  # the worker first: killed alone it would be restarted
    server.stop(signal.SIGKILL)
    interrupted = running_ids(server)
    assert len(interrupted) == 1, "expected the kill to land while a job ran"
    # The killed generation's scratch directory is still there ...
    leftovers = list((server.data_dir / "tmp").glob(f"ovi-*-{next(iter(interrupted))}-*"))
    assert len(leftovers) == 1, list((server.data_dir / "tmp").iterdir())

    server.start()
    # ... until the next worker process starts (after the API: `serve` starts its workers beside it)
    wait_for(lambda: not leftovers[0].exists(), 120, "the new worker did not sweep the scratch directory")
    with server.client() as http:

        def status(rid: str) -> dict:
            return http.get(f"{T2V}/requests/{rid}/status", params={"logs": 1}).json()

        every = [*long, *queued, cancelled, invalid]
        wait_for(lambda: all(status(r)["status"] == "COMPLETED" for r in every), 180, "jobs did not complete")

        for rid in interrupted:
            assert any("queued again" in line["message"] for line in status(rid)["logs"])
        for seed, rid in enumerate(long):
            result = http.get(f"{T2V}/requests/{rid}")
            assert result.status_code == 200, result.text
            assert result.json()["seed"] == seed
            check_mp4(result.json()["video"]["url"])
        for rid in queued:
            assert http.get(f"{T2V}/requests/{rid}").status_code == 200
        assert http.get(f"{T2V}/requests/{cancelled}").json()["error_type"] == "request_cancelled"
        assert http.get(f"{T2V}/requests/{invalid}").status_code == 422


def test_a_second_server_on_the_same_data_dir_refuses_to_start(server: LiveServer):
    cmd = [sys.executable, "-m", "ovi_server.cli", "serve", "--data-dir", str(server.data_dir), "--port", "0"]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=60)
    assert done.returncode != 0 and "another ovi-server is using" in done.stderr
