"""`SqliteJobStore`: the default `JobStore`, one file in the data dir, WAL mode.

One connection per thread (the event loop, the worker and the webhook sender each get their own);
WAL lets readers (status polls) run while the worker writes. Claims use `UPDATE ... RETURNING` inside
`BEGIN IMMEDIATE`, so two workers on the same file never take the same job.
"""

from __future__ import annotations

import dataclasses
import json
import sqlite3
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from ovi_server.engine.request import GenerationRequest
from ovi_server.errors import JobNotFound
from ovi_server.jobs.store import (
    FailureKind,
    FieldError,
    Job,
    JobFailure,
    JobResult,
    JobStatus,
    LogLine,
    NewJob,
    Priority,
    WebhookState,
)

SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,      -- submit order
    id TEXT NOT NULL UNIQUE,
    app TEXT NOT NULL,
    status TEXT NOT NULL,
    request TEXT,                               -- GenerationRequest as JSON; NULL if invalid at submit
    owner TEXT NOT NULL,
    base_url TEXT NOT NULL,
    priority INTEGER NOT NULL,
    created_at REAL NOT NULL,
    started_at REAL,
    finished_at REAL,
    attempts INTEGER NOT NULL DEFAULT 0,
    cancel_requested INTEGER NOT NULL DEFAULT 0,
    start_deadline REAL,
    result TEXT,                                -- JobResult as JSON
    failure TEXT,                               -- JobFailure as JSON
    webhook_url TEXT,
    webhook_state TEXT NOT NULL,
    webhook_attempts INTEGER NOT NULL DEFAULT 0,
    webhook_next_at REAL
);
CREATE INDEX IF NOT EXISTS jobs_queue ON jobs (status, priority, seq);
CREATE INDEX IF NOT EXISTS jobs_owner ON jobs (owner, status);
CREATE TABLE IF NOT EXISTS logs (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    job_id TEXT NOT NULL,
    timestamp REAL NOT NULL,
    level TEXT NOT NULL,
    message TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS logs_job ON logs (job_id, seq);
CREATE TABLE IF NOT EXISTS previews (           -- the latest live preview of each job (denoising)
    job_id TEXT PRIMARY KEY,
    png BLOB NOT NULL
);
"""


class SqliteJobStore:
    def __init__(self, path: Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._local = threading.local()
        self._conn().executescript(SCHEMA)

    def _conn(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            # autocommit (isolation_level=None): each statement commits; multi-statement changes use BEGIN.
            conn = sqlite3.connect(self.path, isolation_level=None, timeout=30, check_same_thread=False)
            conn.row_factory = sqlite3.Row
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")
            conn.execute("PRAGMA busy_timeout=30000")
            self._local.conn = conn
        return conn

    def close(self) -> None:
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None

    # -- queue -------------------------------------------------------------------------------------

    def submit(self, new: NewJob) -> Job:
        now = time.time()
        job_id = str(uuid.uuid4())
        status = JobStatus.QUEUED if new.failure is None else JobStatus.FAILED
        webhook = WebhookState.PENDING if new.webhook_url else WebhookState.NONE
        self._conn().execute(
            "INSERT INTO jobs (id, app, status, request, owner, base_url, priority, created_at, finished_at,"
            " start_deadline, failure, webhook_url, webhook_state, webhook_next_at)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                job_id,
                new.app,
                status.value,
                _dump_request(new.request),
                new.owner,
                new.base_url,
                int(new.priority),
                now,
                now if new.failure else None,
                new.start_deadline,
                _dump_failure(new.failure),
                new.webhook_url,
                webhook.value,
                now if new.webhook_url else None,
            ),
        )
        return self.get(job_id)

    def get(self, job_id: str) -> Job:
        row = self._conn().execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
        if row is None:
            raise JobNotFound(f"no request with id {job_id!r}")
        return _job(row)

    def active_count(self, owner: str) -> int:
        row = (
            self._conn()
            .execute(
                "SELECT COUNT(*) FROM jobs WHERE owner = ? AND status IN ('queued', 'running')", (owner,)
            )
            .fetchone()
        )
        return int(row[0])

    def queue_position(self, job_id: str) -> int:
        job = self.get(job_id)
        row = (
            self._conn()
            .execute(
                "SELECT COUNT(*) FROM jobs WHERE status = 'queued' AND (priority < ? OR (priority = ? AND seq <"
                " (SELECT seq FROM jobs WHERE id = ?)))",
                (int(job.priority), int(job.priority), job_id),
            )
            .fetchone()
        )
        return int(row[0])

    def claim_next(self) -> Job | None:
        now = time.time()
        conn = self._conn()
        conn.execute("BEGIN IMMEDIATE")
        try:
            expired = conn.execute(
                "SELECT id, start_deadline FROM jobs WHERE status = 'queued' AND start_deadline < ?", (now,)
            ).fetchall()
            for row in expired:
                failure = JobFailure(
                    FailureKind.START_TIMEOUT,
                    "the request did not start within its x-fal-request-timeout; "
                    "resubmit with a longer timeout or when the queue is shorter",
                )
                self._finish(conn, row["id"], JobStatus.FAILED, failure=failure, now=now)
            row = conn.execute(
                "UPDATE jobs SET status = 'running', started_at = ?, attempts = attempts + 1"
                " WHERE id = (SELECT id FROM jobs WHERE status = 'queued' ORDER BY priority, seq LIMIT 1)"
                " RETURNING *",
                (now,),
            ).fetchone()
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        return None if row is None else _job(row)

    def _finish(
        self,
        conn: sqlite3.Connection,
        job_id: str,
        status: JobStatus,
        *,
        now: float,
        result: JobResult | None = None,
        failure: JobFailure | None = None,
    ) -> None:
        conn.execute(
            "UPDATE jobs SET status = ?, finished_at = ?, result = ?, failure = ?,"
            " webhook_next_at = CASE WHEN webhook_state = 'pending' THEN ? ELSE webhook_next_at END"
            " WHERE id = ?",
            (status.value, now, _dump_result(result), _dump_failure(failure), now, job_id),
        )

    def succeed(self, job_id: str, result: JobResult) -> Job:
        self._finish(self._conn(), job_id, JobStatus.SUCCEEDED, result=result, now=time.time())
        return self.get(job_id)

    def fail(self, job_id: str, failure: JobFailure) -> Job:
        status = JobStatus.CANCELLED if failure.kind is FailureKind.CANCELLED else JobStatus.FAILED
        self._finish(self._conn(), job_id, status, failure=failure, now=time.time())
        return self.get(job_id)

    def request_cancel(self, job_id: str) -> JobStatus:
        conn = self._conn()
        conn.execute("BEGIN IMMEDIATE")
        try:
            row = conn.execute("SELECT status FROM jobs WHERE id = ?", (job_id,)).fetchone()
            if row is None:
                raise JobNotFound(f"no request with id {job_id!r}")
            before = JobStatus(row["status"])
            if before is JobStatus.QUEUED:
                failure = JobFailure(FailureKind.CANCELLED, "Request was cancelled")
                self._finish(conn, job_id, JobStatus.CANCELLED, failure=failure, now=time.time())
            elif before is JobStatus.RUNNING:
                conn.execute("UPDATE jobs SET cancel_requested = 1 WHERE id = ?", (job_id,))
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        return before

    def release(self, job_id: str) -> None:
        self._conn().execute(
            "UPDATE jobs SET status = 'queued', started_at = NULL, attempts = MAX(attempts - 1, 0)"
            " WHERE id = ? AND status = 'running'",
            (job_id,),
        )

    def recover(self, max_attempts: int) -> tuple[list[str], list[str]]:
        """Called once at start-up, before the worker runs, by the only server on this data dir (cli.py
        holds a lock), so every RUNNING row is an orphan of a dead process.

        Orphans are re-queued rather than failed: a generation has no side effects and re-runs with the
        same seed, so running it again is what the caller wants, and a deploy or crash does not turn
        accepted requests into errors. But a request that was running during `max_attempts` deaths is
        failed with a reason: it may be what kills the server (host OOM), and retrying it forever would
        take every request behind it down too.
        """
        conn = self._conn()
        requeued: list[str] = []
        failed: list[str] = []
        rows = conn.execute("SELECT id, attempts, cancel_requested FROM jobs WHERE status = 'running'")
        for row in rows.fetchall():
            job_id = row["id"]
            if row["cancel_requested"]:
                self.fail(job_id, JobFailure(FailureKind.CANCELLED, "Request was cancelled"))
                failed.append(job_id)
            elif row["attempts"] >= max_attempts:
                msg = (
                    f"the server stopped while this request was running, {row['attempts']} times; "
                    "it is not retried again (it may be what crashes the server: check the server log "
                    "and memory); resubmit it to try again"
                )
                self.fail(job_id, JobFailure(FailureKind.INTERRUPTED, msg))
                self.append_log(job_id, msg, "ERROR")
                failed.append(job_id)
            else:
                conn.execute(
                    "UPDATE jobs SET status = 'queued', started_at = NULL WHERE id = ? AND status = 'running'",
                    (job_id,),
                )
                self.append_log(job_id, "server restarted while this request ran; queued again", "WARN")
                requeued.append(job_id)
        return requeued, failed

    # -- logs, metrics, webhooks ---------------------------------------------------------------------

    def append_log(self, job_id: str, message: str, level: str = "INFO") -> None:
        self._conn().execute(
            "INSERT INTO logs (job_id, timestamp, level, message) VALUES (?, ?, ?, ?)",
            (job_id, time.time(), level, message),
        )

    def logs(self, job_id: str, after_seq: int = 0) -> list[LogLine]:
        rows = self._conn().execute(
            "SELECT seq, timestamp, level, message FROM logs WHERE job_id = ? AND seq > ? ORDER BY seq",
            (job_id, after_seq),
        )
        return [LogLine(r["seq"], r["timestamp"], r["level"], r["message"]) for r in rows.fetchall()]

    def put_preview(self, job_id: str, png: bytes) -> None:
        self._conn().execute(
            "INSERT INTO previews (job_id, png) VALUES (?, ?) ON CONFLICT (job_id) DO UPDATE SET png = excluded.png",
            (job_id, png),
        )

    def preview(self, job_id: str) -> bytes | None:
        row = self._conn().execute("SELECT png FROM previews WHERE job_id = ?", (job_id,)).fetchone()
        if row is None:
            self.get(job_id)  # JobNotFound for an unknown id
            return None
        return bytes(row[0])

    def counts(self) -> dict[JobStatus, int]:
        counts = dict.fromkeys(JobStatus, 0)
        for row in self._conn().execute("SELECT status, COUNT(*) FROM jobs GROUP BY status").fetchall():
            counts[JobStatus(row[0])] = int(row[1])
        return counts

    def delete_finished_before(self, cutoff: float) -> int:
        conn = self._conn()
        conn.execute("BEGIN IMMEDIATE")
        try:
            ids = [
                row[0]
                for row in conn.execute(
                    "SELECT id FROM jobs WHERE finished_at < ? AND webhook_state != 'pending'", (cutoff,)
                ).fetchall()
            ]
            conn.executemany("DELETE FROM logs WHERE job_id = ?", [(i,) for i in ids])
            conn.executemany("DELETE FROM previews WHERE job_id = ?", [(i,) for i in ids])
            conn.executemany("DELETE FROM jobs WHERE id = ?", [(i,) for i in ids])
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        return len(ids)

    def due_webhooks(self, now: float) -> list[Job]:
        rows = self._conn().execute(
            "SELECT * FROM jobs WHERE webhook_state = 'pending' AND status IN ('succeeded', 'failed',"
            " 'cancelled') AND webhook_next_at <= ? ORDER BY webhook_next_at",
            (now,),
        )
        return [_job(r) for r in rows.fetchall()]

    def record_webhook(self, job_id: str, state: WebhookState, next_at: float | None) -> None:
        self._conn().execute(
            "UPDATE jobs SET webhook_state = ?, webhook_attempts = webhook_attempts + 1, webhook_next_at = ?"
            " WHERE id = ?",
            (state.value, next_at, job_id),
        )


# -- (de)serialisation -------------------------------------------------------------------------------


def _dump_request(request: GenerationRequest | None) -> str | None:
    return None if request is None else json.dumps(dataclasses.asdict(request))


def _load_request(text: str | None) -> GenerationRequest | None:
    if text is None:
        return None
    data: dict[str, Any] = json.loads(text)
    if data.get("size") is not None:
        data["size"] = tuple(data["size"])
    return GenerationRequest(**data)


def _dump_result(result: JobResult | None) -> str | None:
    return None if result is None else json.dumps(dataclasses.asdict(result))


def _dump_failure(failure: JobFailure | None) -> str | None:
    if failure is None:
        return None
    data = dataclasses.asdict(failure)
    data["kind"] = failure.kind.value
    return json.dumps(data)


def _load_failure(text: str | None) -> JobFailure | None:
    if text is None:
        return None
    data = json.loads(text)
    errors = tuple(
        FieldError(tuple(e["loc"]), e["msg"], e["type"], e.get("ctx")) for e in data["field_errors"]
    )
    return JobFailure(FailureKind(data["kind"]), data["message"], errors)


def _job(row: sqlite3.Row) -> Job:
    return Job(
        id=row["id"],
        app=row["app"],
        status=JobStatus(row["status"]),
        request=_load_request(row["request"]),
        owner=row["owner"],
        base_url=row["base_url"],
        priority=Priority(row["priority"]),
        created_at=row["created_at"],
        started_at=row["started_at"],
        finished_at=row["finished_at"],
        attempts=row["attempts"],
        cancel_requested=bool(row["cancel_requested"]),
        start_deadline=row["start_deadline"],
        result=None if row["result"] is None else JobResult(**json.loads(row["result"])),
        failure=_load_failure(row["failure"]),
        webhook_url=row["webhook_url"],
        webhook_state=WebhookState(row["webhook_state"]),
        webhook_attempts=row["webhook_attempts"],
        webhook_next_at=row["webhook_next_at"],
    )
