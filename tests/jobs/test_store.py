"""SqliteJobStore: queue order, atomic claims, cancel, restart recovery and persistence."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from ovi_server.engine.request import GenerationRequest
from ovi_server.errors import JobNotFound
from ovi_server.jobs.sqlite import SqliteJobStore
from ovi_server.jobs.store import (
    FailureKind,
    FieldError,
    JobFailure,
    JobResult,
    JobStatus,
    NewJob,
    Priority,
    WebhookState,
)

REQUEST = GenerationRequest(prompt="a cat", size=(992, 512), steps=2, seed=None, video_negative_prompt="blur")


@pytest.fixture
def store(tmp_path: Path) -> SqliteJobStore:
    return SqliteJobStore(tmp_path / "jobs.sqlite3")


def new(priority: Priority = Priority.NORMAL, **kw) -> NewJob:
    return NewJob(app="fal-ai/ovi", request=REQUEST, priority=priority, **kw)


def test_submit_and_get_round_trip(store: SqliteJobStore):
    job = store.submit(new(owner="k1", base_url="http://h", webhook_url="http://w"))
    again = store.get(job.id)
    assert again == job
    assert again.request == REQUEST and again.request.size == (992, 512)
    assert again.status is JobStatus.QUEUED and again.webhook_state is WebhookState.PENDING
    with pytest.raises(JobNotFound):
        store.get("nope")


def test_claims_go_by_priority_then_age(store: SqliteJobStore):
    low = store.submit(new(Priority.LOW))
    first = store.submit(new())
    second = store.submit(new())
    assert [store.queue_position(j.id) for j in (first, second, low)] == [0, 1, 2]
    claimed = [store.claim_next() for _ in range(3)]
    assert [j.id for j in claimed if j] == [first.id, second.id, low.id]
    assert all(j.status is JobStatus.RUNNING and j.attempts == 1 for j in claimed if j)
    assert store.claim_next() is None


def test_two_workers_never_claim_the_same_job(tmp_path: Path):
    path = tmp_path / "jobs.sqlite3"
    store = SqliteJobStore(path)
    ids = {store.submit(new()).id for _ in range(30)}
    claimed: list[str] = []

    def work() -> None:
        own = SqliteJobStore(path)  # a second process would open its own store
        while (job := own.claim_next()) is not None:
            claimed.append(job.id)

    threads = [threading.Thread(target=work) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(claimed) == sorted(ids)


def test_cancel_queued_and_running(store: SqliteJobStore):
    running = store.submit(new())
    queued = store.submit(new())
    store.claim_next()
    assert store.request_cancel(queued.id) is JobStatus.QUEUED
    cancelled = store.get(queued.id)
    assert cancelled.status is JobStatus.CANCELLED and cancelled.failure.kind is FailureKind.CANCELLED
    assert store.claim_next() is None  # a cancelled job never runs
    assert store.request_cancel(running.id) is JobStatus.RUNNING
    assert store.get(running.id).cancel_requested and store.get(running.id).status is JobStatus.RUNNING
    store.fail(running.id, JobFailure(FailureKind.CANCELLED, "Request was cancelled"))
    assert store.request_cancel(running.id) is JobStatus.CANCELLED  # already finished: unchanged
    with pytest.raises(JobNotFound):
        store.request_cancel("nope")


def test_restart_requeues_interrupted_jobs_then_gives_up(tmp_path: Path):
    path = tmp_path / "jobs.sqlite3"
    store = SqliteJobStore(path)
    job = store.submit(new())
    waiting = store.submit(new())
    store.claim_next()
    store.close()

    store = SqliteJobStore(path)  # "the server died while it ran"
    assert store.recover(max_attempts=2) == ([job.id], [])
    assert store.get(job.id).status is JobStatus.QUEUED and store.get(waiting.id).status is JobStatus.QUEUED
    assert store.queue_position(job.id) == 0  # keeps its place at the head of the queue
    assert "queued again" in store.logs(job.id)[-1].message

    assert store.claim_next().id == job.id  # second attempt, and the server dies again
    assert store.recover(max_attempts=2) == ([], [job.id])
    failed = store.get(job.id)
    assert failed.status is JobStatus.FAILED and failed.failure.kind is FailureKind.INTERRUPTED
    assert "2 times" in failed.failure.message and "resubmit" in failed.failure.message


def test_restart_finishes_a_job_whose_cancel_was_pending(store: SqliteJobStore):
    job = store.submit(new())
    store.claim_next()
    store.request_cancel(job.id)
    assert store.recover(max_attempts=2) == ([], [job.id])
    assert store.get(job.id).status is JobStatus.CANCELLED


def test_everything_survives_reopening(tmp_path: Path):
    path = tmp_path / "jobs.sqlite3"
    store = SqliteJobStore(path)
    done = store.submit(new())
    failure = JobFailure(
        FailureKind.INVALID_INPUT, "x: bad", (FieldError(("body", "x"), "bad", "t", {"ge": 1}),)
    )
    bad = store.submit(NewJob(app="fal-ai/ovi", request=None, failure=failure))
    store.claim_next()
    store.append_log(done.id, "denoise 1/2")
    store.succeed(done.id, JobResult("outputs/x/output.mp4", 123, 42, 1.5))
    store.close()

    store = SqliteJobStore(path)
    job = store.get(done.id)
    assert job.status is JobStatus.SUCCEEDED and job.result == JobResult("outputs/x/output.mp4", 123, 42, 1.5)
    assert [line.message for line in store.logs(done.id)] == ["denoise 1/2"]
    failed = store.get(bad.id)
    assert failed.status is JobStatus.FAILED and failed.request is None
    assert failed.failure.field_errors == (FieldError(("body", "x"), "bad", "t", {"ge": 1}),)
    assert store.counts()[JobStatus.SUCCEEDED] == 1 and store.counts()[JobStatus.FAILED] == 1


def test_start_deadline(store: SqliteJobStore):
    late = store.submit(new(start_deadline=time.time() - 1))
    fine = store.submit(new(start_deadline=time.time() + 60))
    assert store.claim_next().id == fine.id
    failed = store.get(late.id)
    assert failed.status is JobStatus.FAILED and failed.failure.kind is FailureKind.START_TIMEOUT


def test_due_webhooks_are_finished_jobs_only(store: SqliteJobStore):
    job = store.submit(new(webhook_url="http://127.0.0.1:1/hook"))
    store.submit(new())
    assert store.due_webhooks(time.time() + 1) == []
    store.claim_next()
    store.succeed(job.id, JobResult("k", 1, 1, 0.1))
    assert [j.id for j in store.due_webhooks(time.time() + 1)] == [job.id]
    store.record_webhook(job.id, WebhookState.PENDING, time.time() + 100)
    assert store.due_webhooks(time.time()) == []
    store.record_webhook(job.id, WebhookState.DELIVERED, None)
    assert store.get(job.id).webhook_attempts == 2


def test_retention_forgets_old_finished_jobs_but_not_pending_webhooks(store: SqliteJobStore):
    old = store.submit(new())
    hooked = store.submit(new(webhook_url="http://127.0.0.1:9/hook"))
    waiting = store.submit(new())
    for job in (old, hooked):
        store.claim_next()
        store.append_log(job.id, "line")
        store.succeed(job.id, JobResult("k", 1, 1, 0.1))
    assert store.delete_finished_before(time.time() + 1) == 1  # `hooked` still owes a webhook
    with pytest.raises(JobNotFound):
        store.get(old.id)
    assert store.logs(old.id) == [] and store.get(hooked.id) and store.get(waiting.id)


def test_preview_keeps_the_latest_png_per_job_and_goes_with_retention(store: SqliteJobStore):
    job, other = store.submit(new()), store.submit(new())
    assert store.preview(job.id) is None
    store.put_preview(job.id, b"\x89PNG first")
    store.put_preview(job.id, b"\x89PNG second")
    assert store.preview(job.id) == b"\x89PNG second" and store.preview(other.id) is None
    with pytest.raises(JobNotFound):
        store.preview("nope")
    store.claim_next()
    store.succeed(job.id, JobResult("k", 1, 1, 0.1))
    assert store.delete_finished_before(time.time() + 1) == 1
    with pytest.raises(JobNotFound):
        store.preview(job.id)
    assert store._conn().execute("SELECT COUNT(*) FROM previews").fetchone()[0] == 0
