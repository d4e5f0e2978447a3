"""Job records and the `JobStore` protocol the API and the worker share. No HTTP, no torch.

A job is one fal request. fal's clients only know IN_QUEUE / IN_PROGRESS / COMPLETED; our states say
more (how it completed) and `api/schemas.py` folds them into fal's three.
"""

from __future__ import annotations

import dataclasses
import enum
import json
from dataclasses import dataclass, field
from typing import Any, Protocol

from ovi_server.request import GenerationRequest


class JobStatus(enum.StrEnum):
    QUEUED = "queued"  # accepted, waiting for the worker (fal IN_QUEUE)
    RUNNING = "running"  # claimed by the worker, generating (fal IN_PROGRESS)
    SUCCEEDED = "succeeded"  # finished, `result` holds the MP4 (fal COMPLETED, result 200)
    FAILED = "failed"  # finished with `failure`: bad input, crash, timeout (fal COMPLETED, result 4xx/5xx)
    CANCELLED = "cancelled"  # cancelled before or while running (fal COMPLETED, result 400)

    @property
    def finished(self) -> bool:
        return self in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED)


class Priority(enum.IntEnum):
    NORMAL = 0  # served first
    LOW = 1


class FailureKind(enum.StrEnum):
    INVALID_INPUT = "invalid_input"  # the request itself is wrong (422)
    CANCELLED = "cancelled"  # the user cancelled it
    START_TIMEOUT = "start_timeout"  # x-fal-request-timeout passed before the worker picked it up
    OUT_OF_MEMORY = "out_of_memory"  # the accelerator ran out of memory
    INTERRUPTED = "interrupted"  # its worker died or froze while it ran, more often than max_attempts allows
    INTERNAL = "internal"  # any other exception in the worker


@dataclass(frozen=True)
class FieldError:
    """One invalid field. `loc` ends with the field name (ours or fal's; the API maps ours to fal's)."""

    loc: tuple[str | int, ...]
    msg: str
    type: str = "value_error"
    ctx: dict[str, Any] | None = None


@dataclass(frozen=True)
class JobFailure:
    kind: FailureKind
    message: str  # what went wrong and what to do, for a human
    field_errors: tuple[FieldError, ...] = ()


@dataclass(frozen=True)
class JobResult:
    file_key: str  # key in the file store of the MP4
    file_size: int
    seed: int
    inference_time_s: float


@dataclass(frozen=True)
class LogLine:
    seq: int
    timestamp: float  # unix seconds
    level: str  # INFO, WARN, ERROR, ...
    message: str


class WebhookState(enum.StrEnum):
    NONE = "none"  # no fal_webhook on submit
    PENDING = "pending"  # waits for the job to finish, or for its next attempt
    DELIVERED = "delivered"
    GAVE_UP = "gave_up"  # every retry failed; the job's logs say why


@dataclass(frozen=True)
class NewJob:
    """What the API hands to `JobStore.submit`. `request` is None when the input was invalid at submit."""

    app: str  # the endpoint id as submitted, e.g. "fal-ai/ovi/image-to-video"
    request: GenerationRequest | None
    owner: str = "anonymous"  # API key id; the webhook's X-Fal-Webhook-User-Id
    base_url: str = ""  # the origin the client used; webhooks build their URLs from it
    priority: Priority = Priority.NORMAL
    webhook_url: str | None = None
    start_deadline: float | None = None  # unix seconds; x-fal-request-timeout
    failure: JobFailure | None = None  # set: the job is stored already FAILED (fal: 200, then 422)


@dataclass(frozen=True)
class Job:
    id: str
    app: str
    status: JobStatus
    request: GenerationRequest | None
    owner: str
    base_url: str
    priority: Priority
    created_at: float
    started_at: float | None = None
    finished_at: float | None = None
    attempts: int = 0  # how many times a worker claimed it
    worker: str | None = None  # id of the worker holding it while RUNNING
    lease: str | None = None  # token of the current claim; a worker whose token is stale lost the job
    lease_until: float | None = None  # unix seconds; the worker's heartbeat pushes it forward
    cancel_requested: bool = False
    start_deadline: float | None = None
    result: JobResult | None = None
    failure: JobFailure | None = None
    webhook_url: str | None = None
    webhook_state: WebhookState = WebhookState.NONE
    webhook_attempts: int = 0
    webhook_next_at: float | None = None


class WorkerState(enum.StrEnum):
    LOADING = "loading"  # the process is up, the model is loading
    IDLE = "idle"  # waiting for a job
    BUSY = "busy"  # running `job`


@dataclass(frozen=True)
class WorkerInfo:
    """What a worker process says about itself in each heartbeat (GET /health, /metrics)."""

    id: str
    host: str
    pid: int
    device: str
    state: WorkerState
    job: str | None = None  # request id while BUSY
    last_heartbeat: float = 0.0  # unix seconds
    started_at: float = 0.0
    # Counters since the process started: jobs_<outcome>, denoise_steps, denoise_seconds, inference_seconds.
    stats: dict[str, float] = field(default_factory=dict)


class LeaseLost(Exception):
    """The caller's claim on a job is stale: its lease expired and the job was queued again (or finished by
    another worker). The caller's result is discarded."""


class JobStore(Protocol):
    """Durable queue + job records. Every method is safe to call from any thread, in any process.

    A worker's claim is a lease of `lease_s` seconds that its heartbeat (`renew`) extends; a job whose
    lease expired (the worker was killed or froze) goes back to the head of the queue, counting an
    attempt, and after `max_attempts` fails as INTERRUPTED. Calls that take `lease` refuse with
    `LeaseLost` when it is not the job's current lease.
    """

    lease_s: float

    def submit(self, new: NewJob) -> Job: ...

    def get(self, job_id: str) -> Job:
        """Raises errors.JobNotFound."""
        ...

    def active_count(self, owner: str) -> int:
        """How many of `owner`'s jobs are QUEUED or RUNNING (the per-key quota)."""
        ...

    def queue_position(self, job_id: str) -> int:
        """0: next to run. Only meaningful while QUEUED."""
        ...

    def claim_next(self, worker_id: str = "", block_s: float = 0.0) -> Job | None:
        """Atomically move the first queued job (priority, then age) to RUNNING under a new lease held by
        `worker_id`; wait up to `block_s` seconds for one; None when there is none.

        Queued jobs whose start deadline passed are failed with START_TIMEOUT on the way.
        """
        ...

    def renew(self, job_id: str, lease: str) -> bool:
        """Extend the lease by `lease_s` from now; False when it is no longer the job's lease."""
        ...

    def append_log(self, job_id: str, message: str, level: str = "INFO") -> None: ...

    def logs(self, job_id: str, after_seq: int = 0) -> list[LogLine]: ...

    def put_preview(self, job_id: str, png: bytes) -> None:
        """Keep `png` as the job's live preview (replacing the last one); any API process can serve it."""
        ...

    def preview(self, job_id: str) -> bytes | None:
        """The job's latest preview PNG; None before the first. Raises errors.JobNotFound."""
        ...

    def succeed(self, job_id: str, result: JobResult, lease: str | None = None) -> Job:
        """Raises LeaseLost when `lease` is given and stale (the job is not changed)."""
        ...

    def fail(self, job_id: str, failure: JobFailure, lease: str | None = None) -> Job:
        """Finish a job with `failure`; CANCELLED kind ends it CANCELLED, any other FAILED."""
        ...

    def request_cancel(self, job_id: str) -> JobStatus:
        """Returns the status before the call. QUEUED: cancelled now; RUNNING: flagged for the worker."""
        ...

    def release(self, job_id: str, lease: str | None = None, count_attempt: bool = False) -> None:
        """Put a RUNNING job back at the head of the queue; a clean shutdown does not count the attempt,
        a worker that could not store its result does. A stale `lease` changes nothing."""
        ...

    def requeue_expired(self, now: float | None = None) -> tuple[list[str], list[str]]:
        """Re-queue RUNNING jobs whose lease expired before `now`, or fail those out of attempts (and
        cancel those with a pending cancel). Returns (requeued ids, failed ids)."""
        ...

    def heartbeat(self, worker: WorkerInfo) -> None:
        """Record a worker's state; `workers()` lists it while its heartbeats are recent."""
        ...

    def remove_worker(self, worker_id: str) -> None: ...

    def workers(self) -> list[WorkerInfo]:
        """Workers heard from within the last 3 leases, by id."""
        ...

    def counts(self) -> dict[JobStatus, int]: ...

    def delete_finished_before(self, cutoff: float) -> int:
        """Retention: forget jobs (and their logs and previews) finished before `cutoff` (unix seconds); returns how many.
        Jobs with a webhook still PENDING are kept."""
        ...

    def due_webhooks(self, now: float) -> list[Job]:
        """Finished jobs whose webhook is PENDING and due."""
        ...

    def record_webhook(self, job_id: str, state: WebhookState, next_at: float | None) -> None: ...

    def close(self) -> None: ...


# -- JSON forms of the records, shared by the stores ----------------------------------------------------


def dump_request(request: GenerationRequest | None) -> str | None:
    return None if request is None else json.dumps(dataclasses.asdict(request))


def load_request(text: str | None) -> GenerationRequest | None:
    if text is None:
        return None
    data: dict[str, Any] = json.loads(text)
    if data.get("size") is not None:
        data["size"] = tuple(data["size"])
    return GenerationRequest(**data)


def dump_result(result: JobResult | None) -> str | None:
    return None if result is None else json.dumps(dataclasses.asdict(result))


def load_result(text: str | None) -> JobResult | None:
    return None if text is None else JobResult(**json.loads(text))


def dump_failure(failure: JobFailure | None) -> str | None:
    if failure is None:
        return None
    data = dataclasses.asdict(failure)
    data["kind"] = failure.kind.value
    return json.dumps(data)


def load_failure(text: str | None) -> JobFailure | None:
    if text is None:
        return None
    data = json.loads(text)
    errors = tuple(
        FieldError(tuple(e["loc"]), e["msg"], e["type"], e.get("ctx")) for e in data["field_errors"]
    )
    return JobFailure(FailureKind(data["kind"]), data["message"], errors)


def dump_worker(worker: WorkerInfo) -> str:
    return json.dumps(dataclasses.asdict(worker))


def load_worker(text: str) -> WorkerInfo:
    data = json.loads(text)
    data["state"] = WorkerState(data["state"])
    return WorkerInfo(**data)


def interrupted_failure(attempts: int) -> JobFailure:
    return JobFailure(
        FailureKind.INTERRUPTED,
        f"the worker running this request stopped (killed, crashed or frozen), {attempts} times; it is "
        "not retried again (it may be what crashes the worker: check the worker log and memory); "
        "resubmit it to try again",
    )


CANCELLED = JobFailure(FailureKind.CANCELLED, "Request was cancelled")
START_TIMEOUT = JobFailure(
    FailureKind.START_TIMEOUT,
    "the request did not start within its x-fal-request-timeout; "
    "resubmit with a longer timeout or when the queue is shorter",
)
