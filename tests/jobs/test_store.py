"""Both JobStores (SQLite, Redis Streams): queue order, atomic claims, cancel, leases, persistence, webhooks.

Every test runs once per backend (the `open_store` fixture in conftest.py).
"""

from __future__ import annotations

import threading
import time
from dataclasses import replace

import pytest

from ovi_server.errors import JobNotFound
from ovi_server.jobs.store import (
    FailureKind,
    FieldError,
    JobFailure,
    JobResult,
    JobStatus,
    JobStore,
    LeaseLost,
    NewJob,
    Priority,
    WebhookState,
    WorkerInfo,
    WorkerState,
)
from ovi_server.request import GenerationRequest

from .conftest import StoreFactory

REQUEST = GenerationRequest(prompt="a cat", size=(992, 512), steps=2, seed=None, video_negative_prompt="blur")


def new(priority: Priority = Priority.NORMAL, **kw) -> NewJob:
    return NewJob(app="fal-ai/ovi", request=REQUEST, priority=priority, **kw)


def test_submit_and_get_round_trip(store: JobStore):
    job = store.submit(new(owner="k1", base_url="http://h", webhook_url="http://w"))
    again = store.get(job.id)
    assert again == job
    assert again.request == REQUEST and again.request.size == (992, 512)
    assert again.status is JobStatus.QUEUED and again.webhook_state is WebhookState.PENDING
    with pytest.raises(JobNotFound):
        store.get("nope")


def test_claims_go_by_priority_then_age(store: JobStore):
    low = store.submit(new(Priority.LOW))
    first = store.submit(new())
    second = store.submit(new())
    assert [store.queue_position(j.id) for j in (first, second, low)] == [0, 1, 2]
    claimed = [store.claim_next() for _ in range(3)]
    assert [j.id for j in claimed if j] == [first.id, second.id, low.id]
    assert all(j.status is JobStatus.RUNNING and j.attempts == 1 for j in claimed if j)
    assert store.claim_next() is None


def test_two_workers_never_claim_the_same_job(open_store: StoreFactory):
    store = open_store()
    ids = {store.submit(new()).id for _ in range(30)}
    claimed: list[str] = []

    def work(name: str) -> None:
        own = open_store()  # a second process would open its own store
        while (job := own.claim_next(name)) is not None:
            claimed.append(job.id)

    threads = [threading.Thread(target=work, args=(f"w{i}",)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(claimed) == sorted(ids)


def test_an_idle_worker_blocks_until_a_job_arrives(open_store: StoreFactory):
    store = open_store()
    got: list = []
    waiter = threading.Thread(target=lambda: got.append(open_store().claim_next("w", block_s=30)))
    waiter.start()
    time.sleep(0.3)  # the worker is waiting now (if it were not, it would still get the job below)
    job = store.submit(new())
    waiter.join(30)
    assert [j.id for j in got] == [job.id]
    assert store.claim_next("w", block_s=0.2) is None  # nothing left: returns after the wait


def test_cancel_queued_and_running(store: JobStore):
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


def test_an_expired_lease_goes_back_to_the_head_of_the_queue_then_gives_up(store: JobStore):
    job = store.submit(new())
    waiting = store.submit(new())
    claimed = store.claim_next("dead-worker")
    assert claimed.id == job.id and claimed.worker == "dead-worker" and claimed.lease
    assert store.requeue_expired() == ([], [])  # the lease still runs

    later = time.time() + store.lease_s + 1  # "the worker was SIGKILLed and never renewed"
    assert store.requeue_expired(now=later) == ([job.id], [])
    assert store.get(job.id).status is JobStatus.QUEUED and store.get(waiting.id).status is JobStatus.QUEUED
    assert store.queue_position(job.id) == 0  # keeps its place at the head of the queue
    assert "queued again" in store.logs(job.id)[-1].message

    again = store.claim_next("second-worker")
    assert again.id == job.id and again.attempts == 2 and again.lease != claimed.lease
    assert store.requeue_expired(now=time.time() + store.lease_s + 1) == ([], [job.id])  # dies again
    failed = store.get(job.id)
    assert failed.status is JobStatus.FAILED and failed.failure.kind is FailureKind.INTERRUPTED
    assert "2 times" in failed.failure.message and "resubmit" in failed.failure.message
    assert store.claim_next("w").id == waiting.id and store.claim_next("w") is None


def test_a_late_finisher_loses_its_result(store: JobStore):
    job = store.submit(new())
    frozen = store.claim_next("frozen")
    assert store.renew(job.id, frozen.lease)
    store.requeue_expired(now=time.time() + store.lease_s + 1)  # frozen past its lease
    taken = store.claim_next("other")
    assert not store.renew(job.id, frozen.lease) and store.renew(job.id, taken.lease)
    with pytest.raises(LeaseLost):
        store.succeed(job.id, JobResult("late", 1, 1, 0.1), frozen.lease)
    with pytest.raises(LeaseLost):
        store.fail(job.id, JobFailure(FailureKind.INTERNAL, "late"), frozen.lease)
    store.release(job.id, frozen.lease)  # a stale release changes nothing either
    assert store.get(job.id).status is JobStatus.RUNNING and store.get(job.id).worker == "other"
    done = store.succeed(job.id, JobResult("winner", 1, 1, 0.1), taken.lease)
    assert done.status is JobStatus.SUCCEEDED and done.result.file_key == "winner"
    with pytest.raises(LeaseLost):
        store.succeed(job.id, JobResult("twice", 1, 1, 0.1), taken.lease)  # stored exactly once
    assert store.get(job.id).result.file_key == "winner"


def test_release_puts_a_job_back_first_counting_the_attempt_only_when_asked(store: JobStore):
    job = store.submit(new())
    behind = store.submit(new())
    first = store.claim_next("w")
    store.release(job.id, first.lease)  # clean shutdown
    assert store.get(job.id).status is JobStatus.QUEUED and store.get(job.id).attempts == 0
    second = store.claim_next("w")
    assert second.id == job.id and second.attempts == 1
    store.release(job.id, second.lease, count_attempt=True)  # the worker could not store its result
    third = store.claim_next("w")
    assert third.id == job.id and third.attempts == 2
    assert store.claim_next("w").id == behind.id


def test_restart_finishes_a_job_whose_cancel_was_pending(store: JobStore):
    job = store.submit(new())
    store.claim_next("w")
    store.request_cancel(job.id)
    assert store.requeue_expired(now=time.time() + store.lease_s + 1) == ([], [job.id])
    assert store.get(job.id).status is JobStatus.CANCELLED


def test_workers_are_listed_while_they_heartbeat(store: JobStore):
    now = time.time()
    busy = WorkerInfo(
        "a", "host1", 11, "cuda:0", WorkerState.BUSY, "job-1", now, now, {"jobs_succeeded": 3.0}
    )
    gone = WorkerInfo("b", "host2", 12, "cuda:1", WorkerState.IDLE, None, now - 10 * store.lease_s, now)
    store.heartbeat(busy)
    store.heartbeat(gone)
    assert store.workers() == [busy]
    store.heartbeat(replace(busy, state=WorkerState.IDLE, job=None))
    assert [w.state for w in store.workers()] == [WorkerState.IDLE]
    store.remove_worker("a")
    assert store.workers() == []


def test_everything_survives_reopening(open_store: StoreFactory):
    store = open_store()
    done = store.submit(new())
    failure = JobFailure(
        FailureKind.INVALID_INPUT, "x: bad", (FieldError(("body", "x"), "bad", "t", {"ge": 1}),)
    )
    bad = store.submit(NewJob(app="fal-ai/ovi", request=None, failure=failure))
    store.claim_next()
    store.append_log(done.id, "denoise 1/2")
    store.succeed(done.id, JobResult("outputs/x/output.mp4", 123, 42, 1.5))
    store.close()

    store = open_store()
    job = store.get(done.id)
    assert job.status is JobStatus.SUCCEEDED and job.result == JobResult("outputs/x/output.mp4", 123, 42, 1.5)
    assert [line.message for line in store.logs(done.id)] == ["denoise 1/2"]
    failed = store.get(bad.id)
    assert failed.status is JobStatus.FAILED and failed.request is None
    assert failed.failure.field_errors == (FieldError(("body", "x"), "bad", "t", {"ge": 1}),)
    assert store.counts()[JobStatus.SUCCEEDED] == 1 and store.counts()[JobStatus.FAILED] == 1


def test_start_deadline(store: JobStore):
    late = store.submit(new(start_deadline=time.time() - 1))
    fine = store.submit(new(start_deadline=time.time() + 60))
    assert store.claim_next().id == fine.id
    failed = store.get(late.id)
    assert failed.status is JobStatus.FAILED and failed.failure.kind is FailureKind.START_TIMEOUT


def test_due_webhooks_are_finished_jobs_only(store: JobStore):
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


def test_retention_forgets_old_finished_jobs_but_not_pending_webhooks(store: JobStore):
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


def test_preview_keeps_the_latest_png_per_job_and_goes_with_retention(store: JobStore):
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
        store.preview(job.id)  # the preview went with the job (a kept preview would still be returned)


def test_active_count_is_an_owners_queued_and_running_jobs(store: JobStore):
    mine = [store.submit(new(owner="alice")) for _ in range(3)]
    store.submit(new(owner="bob"))
    failure = JobFailure(FailureKind.INVALID_INPUT, "x: bad", (FieldError(("body", "x"), "bad"),))
    store.submit(NewJob(app="fal-ai/ovi", request=None, owner="alice", failure=failure))  # finished at once
    assert (
        store.active_count("alice") == 3 and store.active_count("bob") == 1 and store.active_count("eve") == 0
    )
    running = store.claim_next("w")
    assert running.id == mine[0].id and store.active_count("alice") == 3  # running still counts
    store.succeed(running.id, JobResult("k", 1, 1, 0.1), running.lease)
    store.request_cancel(mine[1].id)
    assert store.active_count("alice") == 1
