"""`SqliteJobStore`: the default `JobStore`, one file in the data dir, WAL mode; one host, many processes.

One connection per thread (the event loop, each worker and the webhook sender get their own);
WAL lets readers (status polls) run while a worker writes. Claims use `UPDATE ... RETURNING` inside
`BEGIN IMMEDIATE`, so two worker processes on the same file never take the same job. A claim sets
`lease` (a fresh token) and `lease_until`; the worker's heartbeat moves `lease_until` on, and every claim
(and the API's janitor) first puts back jobs whose lease ran out.
"""

from __future__ import annotations

import sqlite3
import threading
import time
import uuid
from pathlib import Path

from ovi_server.errors import JobNotFound
from ovi_server.jobs.store import (
    CANCELLED,
    START_TIMEOUT,
    FailureKind,
    Job,
    JobFailure,
    JobResult,
    JobStatus,
    LeaseLost,
    LogLine,
    NewJob,
    Priority,
    WebhookState,
    WorkerInfo,
    dump_failure,
    dump_request,
    dump_result,
    dump_worker,
    interrupted_failure,
    load_failure,
    load_request,
    load_result,
    load_worker,
)

WORKER_FORGET_S = 3600.0  # a worker silent this long is dropped from the workers table

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
    webhook_next_at REAL,
    worker TEXT,                                -- worker id while running
    lease TEXT,                                 -- token of the current claim
    lease_until REAL                            -- unix seconds; renewed by the worker's heartbeat
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
CREATE TABLE IF NOT EXISTS workers (
    id TEXT PRIMARY KEY,
    last_heartbeat REAL NOT NULL,
    info TEXT NOT NULL                          -- WorkerInfo as JSON
);
"""
# Columns added after the first release; a data dir made by an older version gets them on open.
_ADDED_COLUMNS = {"worker": "TEXT", "lease": "TEXT", "lease_until": "REAL"}


class SqliteJobStore:
    def __init__(self, path: Path, lease_s: float = 30.0, max_attempts: int = 2, poll_s: float = 0.05):
        self.path = Path(path)
        self.lease_s, self.max_attempts, self.poll_s = lease_s, max_attempts, poll_s
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._local = threading.local()
        conn = self._conn()
        conn.executescript(SCHEMA)
        have = {row[1] for row in conn.execute("PRAGMA table_info(jobs)").fetchall()}
        for name, kind in _ADDED_COLUMNS.items():
            if name not in have:
                conn.execute(f"ALTER TABLE jobs ADD COLUMN {name} {kind}")

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
        row = (
            self._conn()
            .execute(
                "INSERT INTO jobs (id, app, status, request, owner, base_url, priority, created_at, finished_at,"
                " start_deadline, failure, webhook_url, webhook_state, webhook_next_at)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) RETURNING *",
                (
                    job_id,
                    new.app,
                    status.value,
                    dump_request(new.request),
                    new.owner,
                    new.base_url,
                    int(new.priority),
                    now,
                    now if new.failure else None,
                    new.start_deadline,
                    dump_failure(new.failure),
                    new.webhook_url,
                    webhook.value,
                    now if new.webhook_url else None,
                ),
            )
            .fetchone()
        )
        # the row as inserted: a worker may claim it before a second read would run
        return _job(row)

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

    def claim_next(self, worker_id: str = "", block_s: float = 0.0) -> Job | None:
        # SQLite has no blocking read: poll every `poll_s` (50 ms) until `block_s` has passed, with a
        # read-only look first, so that idle workers do not queue up for the write lock.
        deadline = time.monotonic() + block_s
        while True:
            job = self._claim(worker_id) if self._anything_to_claim() else None
            if job is not None or time.monotonic() >= deadline:
                return job
            time.sleep(min(self.poll_s, max(0.0, deadline - time.monotonic())))

    def _anything_to_claim(self) -> bool:
        row = (
            self._conn()
            .execute(
                "SELECT EXISTS (SELECT 1 FROM jobs WHERE status = 'queued') OR EXISTS (SELECT 1 FROM jobs"
                " WHERE status = 'running' AND (lease_until IS NULL OR lease_until < ?))",
                (time.time(),),
            )
            .fetchone()
        )
        return bool(row[0])

    def _claim(self, worker_id: str) -> Job | None:
        now = time.time()
        conn = self._conn()
        conn.execute("BEGIN IMMEDIATE")
        try:
            self._requeue_expired(conn, now)
            expired = conn.execute(
                "SELECT id FROM jobs WHERE status = 'queued' AND start_deadline < ?", (now,)
            ).fetchall()
            for row in expired:
                self._finish(conn, row["id"], JobStatus.FAILED, failure=START_TIMEOUT, now=now)
            row = conn.execute(
                "UPDATE jobs SET status = 'running', started_at = ?, attempts = attempts + 1, worker = ?,"
                " lease = ?, lease_until = ?"
                " WHERE id = (SELECT id FROM jobs WHERE status = 'queued' ORDER BY priority, seq LIMIT 1)"
                " RETURNING *",
                (now, worker_id, uuid.uuid4().hex, now + self.lease_s),
            ).fetchone()
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        return None if row is None else _job(row)

    def renew(self, job_id: str, lease: str) -> bool:
        cursor = self._conn().execute(
            "UPDATE jobs SET lease_until = ? WHERE id = ? AND lease = ? AND status = 'running'",
            (time.time() + self.lease_s, job_id, lease),
        )
        return cursor.rowcount == 1

    def _finish(
        self,
        conn: sqlite3.Connection,
        job_id: str,
        status: JobStatus,
        *,
        now: float,
        result: JobResult | None = None,
        failure: JobFailure | None = None,
        lease: str | None = None,
    ) -> None:
        cursor = conn.execute(
            "UPDATE jobs SET status = ?, finished_at = ?, result = ?, failure = ?, lease = NULL,"
            " lease_until = NULL,"
            " webhook_next_at = CASE WHEN webhook_state = 'pending' THEN ? ELSE webhook_next_at END"
            " WHERE id = ? AND (? IS NULL OR (lease = ? AND status = 'running'))",
            (status.value, now, dump_result(result), dump_failure(failure), now, job_id, lease, lease),
        )
        if cursor.rowcount == 0:
            if lease is not None:
                raise LeaseLost(f"job {job_id}: lease {lease} is no longer held; result discarded")
            raise JobNotFound(f"no request with id {job_id!r}")

    def succeed(self, job_id: str, result: JobResult, lease: str | None = None) -> Job:
        self._finish(self._conn(), job_id, JobStatus.SUCCEEDED, result=result, now=time.time(), lease=lease)
        return self.get(job_id)

    def fail(self, job_id: str, failure: JobFailure, lease: str | None = None) -> Job:
        status = JobStatus.CANCELLED if failure.kind is FailureKind.CANCELLED else JobStatus.FAILED
        self._finish(self._conn(), job_id, status, failure=failure, now=time.time(), lease=lease)
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
                self._finish(conn, job_id, JobStatus.CANCELLED, failure=CANCELLED, now=time.time())
            elif before is JobStatus.RUNNING:
                conn.execute("UPDATE jobs SET cancel_requested = 1 WHERE id = ?", (job_id,))
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        return before

    def release(self, job_id: str, lease: str | None = None, count_attempt: bool = False) -> None:
        self._conn().execute(
            "UPDATE jobs SET status = 'queued', started_at = NULL, worker = NULL, lease = NULL,"
            " lease_until = NULL, attempts = CASE WHEN ? THEN attempts ELSE MAX(attempts - 1, 0) END"
            " WHERE id = ? AND status = 'running' AND (? IS NULL OR lease = ?)",
            (count_attempt, job_id, lease, lease),
        )

    def requeue_expired(self, now: float | None = None) -> tuple[list[str], list[str]]:
        conn = self._conn()
        conn.execute("BEGIN IMMEDIATE")
        try:
            outcome = self._requeue_expired(conn, time.time() if now is None else now)
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        return outcome

    def _requeue_expired(self, conn: sqlite3.Connection, now: float) -> tuple[list[str], list[str]]:
        """Jobs keep their `seq`, so a re-queued job is at the head of its priority's queue again. Running it
        again is what the caller wants (a generation has no side effects and re-runs with the same seed),
        but a job whose worker died `max_attempts` times is failed: it may be what kills the workers."""
        requeued: list[str] = []
        failed: list[str] = []
        rows = conn.execute(
            "SELECT id, attempts, cancel_requested, worker FROM jobs WHERE status = 'running'"
            " AND (lease_until IS NULL OR lease_until < ?)",
            (now,),
        ).fetchall()
        for row in rows:
            job_id = row["id"]
            if row["cancel_requested"]:
                self._finish(conn, job_id, JobStatus.CANCELLED, failure=CANCELLED, now=now)
                failed.append(job_id)
            elif row["attempts"] >= self.max_attempts:
                failure = interrupted_failure(row["attempts"])
                self._finish(conn, job_id, JobStatus.FAILED, failure=failure, now=now)
                self._log(conn, job_id, failure.message, "ERROR")
                failed.append(job_id)
            else:
                conn.execute(
                    "UPDATE jobs SET status = 'queued', started_at = NULL, worker = NULL, lease = NULL,"
                    " lease_until = NULL WHERE id = ?",
                    (job_id,),
                )
                msg = f"worker {row['worker'] or '?'} stopped renewing its lease (killed or frozen); queued again"
                self._log(conn, job_id, msg, "WARN")
                requeued.append(job_id)
        return requeued, failed

    # -- workers -----------------------------------------------------------------------------------

    def heartbeat(self, worker: WorkerInfo) -> None:
        self._conn().execute(
            "INSERT INTO workers (id, last_heartbeat, info) VALUES (?, ?, ?)"
            " ON CONFLICT (id) DO UPDATE SET last_heartbeat = excluded.last_heartbeat, info = excluded.info",
            (worker.id, worker.last_heartbeat, dump_worker(worker)),
        )

    def remove_worker(self, worker_id: str) -> None:
        self._conn().execute("DELETE FROM workers WHERE id = ?", (worker_id,))

    def workers(self) -> list[WorkerInfo]:
        conn = self._conn()
        now = time.time()
        conn.execute("DELETE FROM workers WHERE last_heartbeat < ?", (now - WORKER_FORGET_S,))
        rows = conn.execute(
            "SELECT info FROM workers WHERE last_heartbeat >= ? ORDER BY id", (now - 3 * self.lease_s,)
        ).fetchall()
        return [load_worker(row[0]) for row in rows]

    # -- logs, metrics, webhooks ---------------------------------------------------------------------

    def append_log(self, job_id: str, message: str, level: str = "INFO") -> None:
        self._log(self._conn(), job_id, message, level)

    @staticmethod
    def _log(conn: sqlite3.Connection, job_id: str, message: str, level: str) -> None:
        conn.execute(
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


# -- rows --------------------------------------------------------------------------------------------


def _job(row: sqlite3.Row) -> Job:
    return Job(
        id=row["id"],
        app=row["app"],
        status=JobStatus(row["status"]),
        request=load_request(row["request"]),
        owner=row["owner"],
        base_url=row["base_url"],
        priority=Priority(row["priority"]),
        created_at=row["created_at"],
        started_at=row["started_at"],
        finished_at=row["finished_at"],
        attempts=row["attempts"],
        cancel_requested=bool(row["cancel_requested"]),
        start_deadline=row["start_deadline"],
        result=load_result(row["result"]),
        failure=load_failure(row["failure"]),
        webhook_url=row["webhook_url"],
        webhook_state=WebhookState(row["webhook_state"]),
        webhook_attempts=row["webhook_attempts"],
        webhook_next_at=row["webhook_next_at"],
        worker=row["worker"],
        lease=row["lease"],
        lease_until=row["lease_until"],
    )
