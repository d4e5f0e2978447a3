"""`RedisJobStore`: the queue on Redis Streams (Redis >= 6.2), for many API and worker processes on many hosts.

Layout (every key starts with `prefix`, default "ovi"):
    {p}:queue:normal, {p}:queue:low   streams, one entry {"job": id} per submit; consumer group "workers"
    {p}:job:{id}                      hash: the job record (the same fields as the SQLite row; "" is None)
    {p}:logs:{id}                     list of JSON [timestamp, level, message]; a line's seq is its index + 1
    {p}:preview:{id}                  the latest live preview PNG (bytes)
    {p}:queued                        sorted set of queued ids, score priority·2^40 + submit seq (positions)
    {p}:status:{status}               set of ids per status (counts)
    {p}:active:{owner}                set of an owner's queued and running ids (the per-key quota)
    {p}:finished                      sorted set of finished ids by finish time (retention)
    {p}:webhooks                      sorted set of ids whose webhook is pending, by when it is due
    {p}:workers                       hash: worker id → WorkerInfo JSON (heartbeats)

The stream does the queueing: a worker takes work with XREADGROUP ... BLOCK (no polling: an idle worker
wakes up as soon as a job is added), the entry stays in the group's pending list while the job runs,
and the worker's heartbeat resets its idle time (XCLAIM ... JUSTID) while renewing the job's lease.
An entry idle for longer than the lease belongs to a dead or frozen worker: the next worker to look
for work takes it over (XAUTOCLAIM), so it runs before newer entries, and the entry's delivery count
is the job's attempt count. A job's outcome is written, and its entry acknowledged (XACK) and deleted,
in one Lua script: the result is stored exactly once, and a worker whose lease was taken cannot store.
State changes that read and then write (claim, finish, cancel, requeue) are Lua scripts, so they are
atomic however many processes share the queue.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any

import redis

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

GROUP = "workers"
STREAMS = {Priority.NORMAL: "normal", Priority.LOW: "low"}
WEBHOOK_CLAIM_S = 120.0  # a due webhook handed to one API process is not handed to another for this long
WORKER_FORGET_S = 3600.0

# Shared by the scripts below: finish a job (status, outcome, ack and delete its stream entry, queue its
# webhook). KEYS are derived from the prefix in ARGV[1]; this store assumes one Redis, not a cluster.
_LUA_FINISH = """
local p = ARGV[1]
local function finish(id, status, result, failure, now)
  local key = p .. ':job:' .. id
  local old, owner = unpack(redis.call('HMGET', key, 'status', 'owner'))
  redis.call('SREM', p .. ':status:' .. old, id)
  redis.call('SREM', p .. ':active:' .. owner, id)
  redis.call('SADD', p .. ':status:' .. status, id)
  redis.call('HSET', key, 'status', status, 'finished_at', now, 'result', result, 'failure', failure,
             'lease', '', 'lease_until', '')
  redis.call('ZREM', p .. ':queued', id)
  redis.call('ZADD', p .. ':finished', now, id)
  local stream, entry = unpack(redis.call('HMGET', key, 'stream', 'entry'))
  if entry and entry ~= '' then
    redis.call('XACK', stream, 'workers', entry)
    redis.call('XDEL', stream, entry)
  end
  if redis.call('HGET', key, 'webhook_state') == 'pending' then
    redis.call('HSET', key, 'webhook_next_at', now)
    redis.call('ZADD', p .. ':webhooks', now, id)
  end
end
local function requeue(id, key, idle_ms, retrycount)
  redis.call('HSET', key, 'status', 'queued', 'started_at', '', 'worker', '', 'lease', '', 'lease_until', '')
  redis.call('SREM', p .. ':status:running', id)
  redis.call('SADD', p .. ':status:queued', id)
  redis.call('ZADD', p .. ':queued', redis.call('HGET', key, 'score'), id)
  local stream, entry = unpack(redis.call('HMGET', key, 'stream', 'entry'))
  -- idle past the lease: the next XAUTOCLAIM takes it, before any newer entry
  redis.call('XCLAIM', stream, 'workers', 'requeued', 0, entry, 'IDLE', idle_ms, 'RETRYCOUNT', retrycount,
             'JUSTID')
end
"""

# ARGV: prefix, id, fields (JSON object), priority stream or "" (already finished), score, now
_LUA_SUBMIT = """
local id, fields, stream, now = ARGV[2], cjson.decode(ARGV[3]), ARGV[4], ARGV[5]
local key = p .. ':job:' .. id
local seq = redis.call('INCR', p .. ':seq')
local score = tonumber(fields['priority']) * 1099511627776 + seq
for k, v in pairs(fields) do redis.call('HSET', key, k, v) end
redis.call('HSET', key, 'score', score)
redis.call('SADD', p .. ':status:' .. fields['status'], id)
if fields['status'] == 'queued' then
  redis.call('SADD', p .. ':active:' .. fields['owner'], id)
  redis.call('ZADD', p .. ':queued', score, id)
  local entry = redis.call('XADD', stream, '*', 'job', id)
  redis.call('HSET', key, 'stream', stream, 'entry', entry)
else
  redis.call('ZADD', p .. ':finished', now, id)
  if fields['webhook_state'] == 'pending' then redis.call('ZADD', p .. ':webhooks', now, id) end
end
return redis.call('HGETALL', key)  -- the job as submitted: a worker may claim it before a second read
"""

# ARGV: prefix, id, worker, lease, lease_until, now, attempts, max_attempts, timeout failure, interrupted failure
_LUA_START = """
local id, worker, lease, lease_until, now = ARGV[2], ARGV[3], ARGV[4], ARGV[5], tonumber(ARGV[6])
local attempts, max_attempts = tonumber(ARGV[7]), tonumber(ARGV[8])
local key = p .. ':job:' .. id
local status, deadline = unpack(redis.call('HMGET', key, 'status', 'start_deadline'))
if not status then return 'gone' end
if status ~= 'queued' then return status end
if deadline and deadline ~= '' and tonumber(deadline) < now then
  finish(id, 'failed', '', ARGV[9], now)
  return 'timeout'
end
if attempts > max_attempts then
  finish(id, 'failed', '', ARGV[10], now)
  return 'interrupted'
end
redis.call('HSET', key, 'status', 'running', 'started_at', now, 'attempts', attempts, 'worker', worker,
           'lease', lease, 'lease_until', lease_until)
redis.call('SREM', p .. ':status:queued', id)
redis.call('SADD', p .. ':status:running', id)
redis.call('ZREM', p .. ':queued', id)
return 'ok'
"""

# ARGV: prefix, id, lease, lease_until
_LUA_RENEW = """
local key = p .. ':job:' .. ARGV[2]
local status, lease, worker, stream, entry = unpack(redis.call('HMGET', key, 'status', 'lease', 'worker',
                                                              'stream', 'entry'))
if status ~= 'running' or lease ~= ARGV[3] then return 0 end
redis.call('HSET', key, 'lease_until', ARGV[4])
redis.call('XCLAIM', stream, 'workers', worker, 0, entry, 'JUSTID')
return 1
"""

# ARGV: prefix, id, status, result, failure, now, lease ("" = unconditional)
_LUA_COMPLETE = """
local id, lease = ARGV[2], ARGV[7]
local status, held = unpack(redis.call('HMGET', p .. ':job:' .. id, 'status', 'lease'))
if not status then return 'missing' end
if lease ~= '' and (status ~= 'running' or held ~= lease) then return 'lost' end
finish(id, ARGV[3], ARGV[4], ARGV[5], ARGV[6])
return 'ok'
"""

# ARGV: prefix, id, cancelled failure, now
_LUA_CANCEL = """
local id = ARGV[2]
local key = p .. ':job:' .. id
local status = redis.call('HGET', key, 'status')
if not status then return '' end
if status == 'queued' then finish(id, 'cancelled', '', ARGV[3], ARGV[4])
elseif status == 'running' then redis.call('HSET', key, 'cancel_requested', 1) end
return status
"""

# ARGV: prefix, id, lease ("" = any), count attempt (1/0), idle ms
_LUA_RELEASE = """
local id, lease = ARGV[2], ARGV[3]
local key = p .. ':job:' .. id
local status, held, attempts = unpack(redis.call('HMGET', key, 'status', 'lease', 'attempts'))
if status ~= 'running' or (lease ~= '' and held ~= lease) then return 0 end
attempts = tonumber(attempts)
if ARGV[4] ~= '1' then attempts = math.max(attempts - 1, 0) end
redis.call('HSET', key, 'attempts', attempts)
requeue(id, key, ARGV[5], attempts)
return 1
"""

# ARGV: prefix, id, now, max_attempts, idle ms, cancelled failure, interrupted failure
_LUA_EXPIRE = """
local id, now = ARGV[2], tonumber(ARGV[3])
local key = p .. ':job:' .. id
local status, lease_until, attempts, cancel = unpack(redis.call('HMGET', key, 'status', 'lease_until',
                                                                 'attempts', 'cancel_requested'))
if status ~= 'running' or (lease_until ~= '' and tonumber(lease_until) >= now) then return '' end
if cancel == '1' then finish(id, 'cancelled', '', ARGV[6], now); return 'failed' end
if tonumber(attempts) >= tonumber(ARGV[4]) then finish(id, 'failed', '', ARGV[7], now); return 'failed' end
requeue(id, key, ARGV[5], tonumber(attempts))
return 'requeued'
"""

# ARGV: prefix, now, claim_until, limit
_LUA_DUE_WEBHOOKS = """
local ids = redis.call('ZRANGEBYSCORE', p .. ':webhooks', '-inf', ARGV[2], 'LIMIT', 0, tonumber(ARGV[4]))
for _, id in ipairs(ids) do redis.call('ZADD', p .. ':webhooks', ARGV[3], id) end
return ids
"""

# ARGV: prefix, id, state, next_at ("" = none)
_LUA_RECORD_WEBHOOK = """
local id, state, next_at = ARGV[2], ARGV[3], ARGV[4]
local key = p .. ':job:' .. id
redis.call('HSET', key, 'webhook_state', state, 'webhook_next_at', next_at)
redis.call('HINCRBY', key, 'webhook_attempts', 1)
if state == 'pending' and next_at ~= '' then redis.call('ZADD', p .. ':webhooks', next_at, id)
else redis.call('ZREM', p .. ':webhooks', id) end
return 1
"""

# ARGV: prefix, cutoff
_LUA_FORGET = """
local n = 0
for _, id in ipairs(redis.call('ZRANGEBYSCORE', p .. ':finished', '-inf', ARGV[2])) do
  local key = p .. ':job:' .. id
  local status, webhook = unpack(redis.call('HMGET', key, 'status', 'webhook_state'))
  if webhook ~= 'pending' then
    if status then redis.call('SREM', p .. ':status:' .. status, id) end
    redis.call('DEL', key, p .. ':logs:' .. id, p .. ':preview:' .. id)
    redis.call('ZREM', p .. ':finished', id)
    n = n + 1
  end
end
return n
"""


class RedisJobStore:
    def __init__(
        self,
        url: str,
        lease_s: float = 30.0,
        max_attempts: int = 2,
        prefix: str = "ovi",
        client: redis.Redis | None = None,
    ):
        self.url, self.lease_s, self.max_attempts, self.prefix = url, lease_s, max_attempts, prefix
        self.redis = client if client is not None else redis.Redis.from_url(url, decode_responses=True)
        self._bytes = redis.Redis.from_url(url)  # previews are PNG bytes, not text
        self.streams = {priority: f"{prefix}:queue:{name}" for priority, name in STREAMS.items()}
        for stream in self.streams.values():
            try:
                self.redis.xgroup_create(stream, GROUP, id="0", mkstream=True)
            except redis.ResponseError as exc:
                if "BUSYGROUP" not in str(exc):
                    raise
        self._scripts = {
            name: self.redis.register_script(_LUA_FINISH + body)
            for name, body in {
                "submit": _LUA_SUBMIT,
                "start": _LUA_START,
                "renew": _LUA_RENEW,
                "complete": _LUA_COMPLETE,
                "cancel": _LUA_CANCEL,
                "release": _LUA_RELEASE,
                "expire": _LUA_EXPIRE,
                "due_webhooks": _LUA_DUE_WEBHOOKS,
                "record_webhook": _LUA_RECORD_WEBHOOK,
                "forget": _LUA_FORGET,
            }.items()
        }

    def _run(self, script: str, *args: Any) -> Any:
        return self._scripts[script](args=[self.prefix, *args])

    def _key(self, job_id: str) -> str:
        return f"{self.prefix}:job:{job_id}"

    @property
    def _idle_ms(self) -> int:
        """An idle time that any XAUTOCLAIM with min-idle = the lease accepts at once."""
        return int(self.lease_s * 1000) + 3_600_000

    def close(self) -> None:
        self.redis.close()
        self._bytes.close()

    # -- queue -------------------------------------------------------------------------------------

    def submit(self, new: NewJob) -> Job:
        now = time.time()
        job_id = str(uuid.uuid4())
        status = JobStatus.QUEUED if new.failure is None else JobStatus.FAILED
        fields = {
            "id": job_id,
            "app": new.app,
            "status": status.value,
            "request": dump_request(new.request) or "",
            "owner": new.owner,
            "base_url": new.base_url,
            "priority": int(new.priority),
            "created_at": now,
            "finished_at": now if new.failure else "",
            "start_deadline": "" if new.start_deadline is None else new.start_deadline,
            "failure": dump_failure(new.failure) or "",
            "webhook_url": new.webhook_url or "",
            "webhook_state": (WebhookState.PENDING if new.webhook_url else WebhookState.NONE).value,
            "webhook_next_at": now if new.webhook_url else "",
            "attempts": 0,
            "webhook_attempts": 0,
            "cancel_requested": 0,
        }
        flat = self._run("submit", job_id, json.dumps(fields), self.streams[new.priority], now)
        return _job(dict(zip(flat[::2], flat[1::2], strict=True)))

    def get(self, job_id: str) -> Job:
        row = self.redis.hgetall(self._key(job_id))
        if not row:
            raise JobNotFound(f"no request with id {job_id!r}")
        return _job(row)

    def active_count(self, owner: str) -> int:
        return int(self.redis.scard(f"{self.prefix}:active:{owner}"))

    def queue_position(self, job_id: str) -> int:
        rank = self.redis.zrank(f"{self.prefix}:queued", job_id)
        if rank is None:
            self.get(job_id)  # JobNotFound for an unknown id
            return 0
        return int(rank)

    def claim_next(self, worker_id: str = "", block_s: float = 0.0) -> Job | None:
        worker_id = worker_id or f"anonymous-{uuid.uuid4().hex[:8]}"
        deadline = time.monotonic() + block_s
        self.requeue_expired()
        while True:
            for stream in self.streams.values():
                job = self._take_expired(stream, worker_id) or self._take_waiting(stream, worker_id)
                if job is not None:
                    return job
            wait_ms = int((deadline - time.monotonic()) * 1000)
            if wait_ms <= 0:
                return None
            # Wait on both streams at once; the loop above then takes work in priority order.
            job = self._take_new({s: ">" for s in self.streams.values()}, worker_id, block_ms=wait_ms)
            if job is not None:
                return job

    def _take_expired(self, stream: str, worker_id: str) -> Job | None:
        """XAUTOCLAIM: the oldest entry idle past the lease (its worker is gone, or it was put back). Not
        JUSTID: the claim must count as a delivery, since the delivery count is the attempt count."""
        while True:
            reply = self.redis.xautoclaim(stream, GROUP, worker_id, int(self.lease_s * 1000), "0-0", count=1)
            entries = reply[1]
            if not entries:
                return None
            entry, fields = entries[0]
            if not fields:  # deleted from the stream (Redis 6.2 reports it so): nothing to run
                self.redis.xack(stream, GROUP, entry)
                continue
            pending = self.redis.xpending_range(stream, GROUP, entry, entry, 1)
            attempts = int(pending[0]["times_delivered"]) if pending else 1
            job = self._start(stream, entry, fields["job"], worker_id, attempts)
            if job is not None:
                return job

    def _take_waiting(self, stream: str, worker_id: str) -> Job | None:
        """The next undelivered entry of `stream` that still waits (skipping cancelled and expired jobs)."""
        while True:
            reply = self.redis.xreadgroup(GROUP, worker_id, {stream: ">"}, count=1)
            if not reply or not reply[0][1]:
                return None
            ((_, ((entry, fields),)),) = reply
            job = self._start(stream, entry, fields["job"], worker_id, 1)
            if job is not None:
                return job

    def _take_new(self, streams: dict[str, str], worker_id: str, block_ms: int | None = None) -> Job | None:
        reply = self.redis.xreadgroup(GROUP, worker_id, streams, count=1, block=block_ms)
        delivered = [
            (stream, entry, fields["job"]) for stream, entries in reply or [] for entry, fields in entries
        ]
        # A blocking read on both streams can hand over one entry of each: run the normal one, put the
        # low one back at once (idle past the lease, delivery count unchanged) for the next look.
        delivered.sort(key=lambda d: list(self.streams.values()).index(d[0]))
        for stream, entry, _ in delivered[1:]:
            self.redis.xclaim(
                stream, GROUP, "requeued", 0, [entry], idle=self._idle_ms, retrycount=0, justid=True
            )
        for stream, entry, job_id in delivered[:1]:
            return self._start(stream, entry, job_id, worker_id, 1)
        return None

    def _start(self, stream: str, entry: str, job_id: str, worker_id: str, attempts: int) -> Job | None:
        """The job of a delivered entry, now RUNNING; None (entry acknowledged) if it no longer waits."""
        now = time.time()
        outcome = self._run(
            "start", job_id, worker_id, uuid.uuid4().hex, now + self.lease_s, now, attempts,
            self.max_attempts, dump_failure(START_TIMEOUT), dump_failure(interrupted_failure(attempts - 1)),
        )  # fmt: skip
        if outcome == "ok":
            return self.get(job_id)
        if outcome in ("gone", "succeeded", "failed", "cancelled"):
            self.redis.xack(stream, GROUP, entry)
            self.redis.xdel(stream, entry)
        # "running": its worker still holds a valid lease (clocks disagree); its next heartbeat takes the
        # entry back. "timeout", "interrupted": finished by the script.
        return None

    def renew(self, job_id: str, lease: str) -> bool:
        return bool(self._run("renew", job_id, lease, time.time() + self.lease_s))

    def _complete(
        self,
        job_id: str,
        status: JobStatus,
        result: JobResult | None,
        failure: JobFailure | None,
        lease: str | None,
    ) -> Job:
        outcome = self._run(
            "complete", job_id, status.value, dump_result(result) or "", dump_failure(failure) or "",
            time.time(), lease or "",
        )  # fmt: skip
        if outcome == "missing":
            raise JobNotFound(f"no request with id {job_id!r}")
        if outcome == "lost":
            raise LeaseLost(f"job {job_id}: lease {lease} is no longer held; result discarded")
        return self.get(job_id)

    def succeed(self, job_id: str, result: JobResult, lease: str | None = None) -> Job:
        return self._complete(job_id, JobStatus.SUCCEEDED, result, None, lease)

    def fail(self, job_id: str, failure: JobFailure, lease: str | None = None) -> Job:
        status = JobStatus.CANCELLED if failure.kind is FailureKind.CANCELLED else JobStatus.FAILED
        return self._complete(job_id, status, None, failure, lease)

    def request_cancel(self, job_id: str) -> JobStatus:
        before = self._run("cancel", job_id, dump_failure(CANCELLED), time.time())
        if not before:
            raise JobNotFound(f"no request with id {job_id!r}")
        return JobStatus(before)

    def release(self, job_id: str, lease: str | None = None, count_attempt: bool = False) -> None:
        self._run("release", job_id, lease or "", "1" if count_attempt else "0", self._idle_ms)

    def requeue_expired(self, now: float | None = None) -> tuple[list[str], list[str]]:
        now = time.time() if now is None else now
        requeued: list[str] = []
        failed: list[str] = []
        for job_id in self.redis.smembers(f"{self.prefix}:status:running"):
            job = self.redis.hmget(self._key(job_id), "lease_until", "attempts", "worker")
            if job[0] and float(job[0]) >= now:
                continue
            interrupted = interrupted_failure(int(job[1] or 0))
            outcome = self._run(
                "expire", job_id, now, self.max_attempts, self._idle_ms,
                dump_failure(CANCELLED), dump_failure(interrupted),
            )  # fmt: skip
            if outcome == "requeued":
                msg = f"worker {job[2] or '?'} stopped renewing its lease (killed or frozen); queued again"
                self.append_log(job_id, msg, "WARN")
                requeued.append(job_id)
            elif outcome == "failed":
                if self.get(job_id).failure == interrupted:
                    self.append_log(job_id, interrupted.message, "ERROR")
                failed.append(job_id)
        return requeued, failed

    # -- workers -----------------------------------------------------------------------------------

    def heartbeat(self, worker: WorkerInfo) -> None:
        self.redis.hset(f"{self.prefix}:workers", worker.id, dump_worker(worker))

    def remove_worker(self, worker_id: str) -> None:
        self.redis.hdel(f"{self.prefix}:workers", worker_id)

    def workers(self) -> list[WorkerInfo]:
        now = time.time()
        listed = [load_worker(text) for text in self.redis.hgetall(f"{self.prefix}:workers").values()]
        stale = [w.id for w in listed if w.last_heartbeat < now - WORKER_FORGET_S]
        if stale:
            self.redis.hdel(f"{self.prefix}:workers", *stale)
        return sorted((w for w in listed if w.last_heartbeat >= now - 3 * self.lease_s), key=lambda w: w.id)

    # -- logs, metrics, webhooks ---------------------------------------------------------------------

    def append_log(self, job_id: str, message: str, level: str = "INFO") -> None:
        self.redis.rpush(f"{self.prefix}:logs:{job_id}", json.dumps([time.time(), level, message]))

    def logs(self, job_id: str, after_seq: int = 0) -> list[LogLine]:
        lines = self.redis.lrange(f"{self.prefix}:logs:{job_id}", after_seq, -1)
        return [LogLine(after_seq + i + 1, *json.loads(line)) for i, line in enumerate(lines)]

    def put_preview(self, job_id: str, png: bytes) -> None:
        self._bytes.set(f"{self.prefix}:preview:{job_id}", png)

    def preview(self, job_id: str) -> bytes | None:
        png = self._bytes.get(f"{self.prefix}:preview:{job_id}")
        if png is None:
            self.get(job_id)  # JobNotFound for an unknown id
        return png

    def counts(self) -> dict[JobStatus, int]:
        with self.redis.pipeline(transaction=False) as pipe:
            for status in JobStatus:
                pipe.scard(f"{self.prefix}:status:{status.value}")
            return dict(zip(JobStatus, map(int, pipe.execute()), strict=True))

    def delete_finished_before(self, cutoff: float) -> int:
        return int(self._run("forget", cutoff))

    def due_webhooks(self, now: float) -> list[Job]:
        """Due deliveries, each handed to one caller only (several API processes may share the queue)."""
        ids = self._run("due_webhooks", now, time.time() + WEBHOOK_CLAIM_S, 50)
        jobs = []
        for job_id in ids:
            try:
                jobs.append(self.get(job_id))
            except JobNotFound:
                self.redis.zrem(f"{self.prefix}:webhooks", job_id)
        return jobs

    def record_webhook(self, job_id: str, state: WebhookState, next_at: float | None) -> None:
        self._run("record_webhook", job_id, state.value, "" if next_at is None else next_at)


def _none(value: str | None) -> str | None:
    return value if value else None


def _float(value: str | None) -> float | None:
    return float(value) if value else None


def _job(row: dict[str, str]) -> Job:
    return Job(
        id=row["id"],
        app=row["app"],
        status=JobStatus(row["status"]),
        request=load_request(_none(row.get("request"))),
        owner=row["owner"],
        base_url=row["base_url"],
        priority=Priority(int(row["priority"])),
        created_at=float(row["created_at"]),
        started_at=_float(row.get("started_at")),
        finished_at=_float(row.get("finished_at")),
        attempts=int(row.get("attempts") or 0),
        cancel_requested=row.get("cancel_requested") == "1",
        start_deadline=_float(row.get("start_deadline")),
        result=load_result(_none(row.get("result"))),
        failure=load_failure(_none(row.get("failure"))),
        webhook_url=_none(row.get("webhook_url")),
        webhook_state=WebhookState(row["webhook_state"]),
        webhook_attempts=int(row.get("webhook_attempts") or 0),
        webhook_next_at=_float(row.get("webhook_next_at")),
        worker=_none(row.get("worker")),
        lease=_none(row.get("lease")),
        lease_until=_float(row.get("lease_until")),
    )
