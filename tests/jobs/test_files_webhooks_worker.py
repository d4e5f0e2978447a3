"""Local file store (one-time uploads, retention), webhook retries, worker progress lines."""

from __future__ import annotations

import os
import time
from pathlib import Path

import httpx
import pytest

from ovi_server.config import EngineConfig
from ovi_server.jobs.files import LocalFiles
from ovi_server.jobs.sqlite import SqliteJobStore
from ovi_server.jobs.store import JobResult, JobStatus, NewJob, WebhookState
from ovi_server.jobs.webhooks import WebhookSender, WebhookSigner
from ovi_server.jobs.worker import Worker, random_seed
from ovi_server.request import Clip, GenerationRequest, Progress, ProgressCallback


def test_uploads_are_one_time_and_keys_cannot_escape(tmp_path: Path):
    files = LocalFiles(tmp_path / "files")
    key = files.reserve_upload("../../etc/passwd", "text/plain")
    assert key.startswith("uploads/") and ".." not in key
    assert files.write_upload(key, iter([b"abc", b"def"]), None) == 6
    assert files.local_path(key).read_bytes() == b"abcdef" and files.content_type(key) == "text/plain"
    with pytest.raises(FileNotFoundError):
        files.write_upload(key, iter([b"again"]), None)
    for bad in ("../x", "/etc/passwd", "uploads/../../x", "a//b", key + ".meta.json"):
        with pytest.raises(FileNotFoundError):
            files.local_path(bad)


def test_retention_deletes_old_files(tmp_path: Path):
    files = LocalFiles(tmp_path / "files")
    files.put_bytes("outputs/old/output.mp4", b"old", "video/mp4")
    files.put_bytes("outputs/new/output.mp4", b"new", "video/mp4")
    old = files.local_path("outputs/old/output.mp4")
    past = time.time() - 3 * 3600
    for path in old.parent.iterdir():
        os.utime(path, (past, past))
    assert files.delete_older_than(2 * 3600) == 1
    assert not (tmp_path / "files" / "outputs" / "old").exists()
    assert files.local_path("outputs/new/output.mp4").read_bytes() == b"new"


def test_webhook_gives_up_after_its_retries_and_says_so(tmp_path: Path):
    store = SqliteJobStore(tmp_path / "jobs.sqlite3")
    job = store.submit(NewJob(app="fal-ai/ovi", request=None, webhook_url="http://127.0.0.1:9/unreachable"))
    store.succeed(job.id, JobResult("k", 1, 1, 0.1))
    signer = WebhookSigner.load_or_create(tmp_path / "key.pem")
    assert WebhookSigner.load_or_create(tmp_path / "key.pem").jwks() == signer.jwks()  # persisted
    sender = WebhookSender(store, signer, lambda j: {"request_id": j.id}, retry_base_s=0.01, max_retries=2)
    with httpx.Client(timeout=1) as client:
        for _ in range(3):
            (due,) = store.due_webhooks(time.time() + 1)
            assert not sender.deliver(client, due)
    job = store.get(job.id)
    assert job.webhook_state is WebhookState.GAVE_UP and job.webhook_attempts == 3
    messages = [line.message for line in store.logs(job.id)]
    assert "retrying in" in messages[0] and "gave up after 3 attempts" in messages[-1]


class CountingPipeline:
    def generate(self, request: GenerationRequest, out_path: Path, on_progress: ProgressCallback) -> Clip:
        for i in range(request.steps or 1):
            on_progress(Progress("denoise", i + 1, request.steps or 1))
        out_path.write_bytes(b"not really an mp4")
        return Clip(out_path, request.seed or 0, 8, 8, 1, 24, 0.04)


def test_worker_throttles_progress_lines(tmp_path: Path):
    store = SqliteJobStore(tmp_path / "jobs.sqlite3")
    files = LocalFiles(tmp_path / "files")
    request = GenerationRequest(prompt="p", size=(992, 512), steps=50)
    job = store.submit(NewJob(app="fal-ai/ovi", request=request))
    worker = Worker(EngineConfig(), store, files, pipeline=CountingPipeline())
    assert worker.run_once()
    done = store.get(job.id)
    assert done.status is JobStatus.SUCCEEDED and isinstance(done.result.seed, int)
    denoise = [line.message for line in store.logs(job.id) if line.message.startswith("denoise")]
    assert "denoise 50/50" in denoise and len(denoise) < 10
    assert files.local_path(done.result.file_key).read_bytes() == b"not really an mp4"


def test_a_rerun_after_a_crash_gets_the_same_random_seed():
    assert random_seed("4b1c0c9e-1f5c-4d8e-9f2a-0a1b2c3d4e5f") == random_seed(
        "4b1c0c9e-1f5c-4d8e-9f2a-0a1b2c3d4e5f"
    )
    assert random_seed("a") != random_seed("b") and 0 <= random_seed("a") < 2**31


class StoppingPipeline:
    """Stops the worker during the first step, as a SIGTERM would."""

    def __init__(self) -> None:
        self.worker: Worker | None = None

    def generate(self, request: GenerationRequest, out_path: Path, on_progress: ProgressCallback) -> Clip:
        assert self.worker is not None
        self.worker._stop.set()
        on_progress(Progress("denoise", 1, 2))
        raise AssertionError("the worker should have stopped the job")


def test_a_clean_shutdown_puts_the_running_job_back_without_counting_it(tmp_path: Path):
    store = SqliteJobStore(tmp_path / "jobs.sqlite3")
    job = store.submit(NewJob(app="fal-ai/ovi", request=GenerationRequest(prompt="p", steps=2)))
    pipeline = StoppingPipeline()
    pipeline.worker = Worker(EngineConfig(), store, LocalFiles(tmp_path / "files"), pipeline=pipeline)
    assert pipeline.worker.run_once()
    again = store.get(job.id)
    assert again.status is JobStatus.QUEUED and again.attempts == 0
    assert store.logs(job.id)[-1].message == "worker shutting down; queued again"


def test_a_result_that_cannot_be_stored_is_retried_then_the_job_goes_back(tmp_path: Path):
    store = SqliteJobStore(tmp_path / "jobs.sqlite3")
    files = LocalFiles(tmp_path / "files")
    (tmp_path / "files" / "outputs").write_bytes(b"")  # a file where the outputs dir belongs: every put fails
    job = store.submit(NewJob(app="fal-ai/ovi", request=GenerationRequest(prompt="p", steps=2)))
    worker = Worker(EngineConfig(), store, files, pipeline=CountingPipeline(), retry_delays=(0.01, 0.01))
    assert worker.run_once()
    again = store.get(job.id)
    assert again.status is JobStatus.QUEUED and again.attempts == 1  # back in the queue, attempt counted
    assert store.logs(job.id)[-1].message == "the worker could not store the result; queued again"

    (tmp_path / "files" / "outputs").unlink()  # storage is back
    assert worker.run_once()
    done = store.get(job.id)
    assert done.status is JobStatus.SUCCEEDED and done.attempts == 2
    assert files.local_path(done.result.file_key).read_bytes() == b"not really an mp4"
