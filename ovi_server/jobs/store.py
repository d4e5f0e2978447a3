"""Job records and the `JobStore` protocol the API and the worker share. No HTTP, no torch.

A job is one fal request. fal's clients only know IN_QUEUE / IN_PROGRESS / COMPLETED; our states say
more (how it completed) and `api/schemas.py` folds them into fal's three.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any, Protocol

from ovi_server.engine.request import GenerationRequest


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
    INTERRUPTED = "interrupted"  # the server died while it ran, more often than max_attempts allows
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
    cancel_requested: bool = False
    start_deadline: float | None = None
    result: JobResult | None = None
    failure: JobFailure | None = None
    webhook_url: str | None = None
    webhook_state: WebhookState = WebhookState.NONE
    webhook_attempts: int = 0
    webhook_next_at: float | None = None


class JobStore(Protocol):
    """Durable queue + job records. Every method is safe to call from any thread."""

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

    def claim_next(self) -> Job | None:
        """Atomically move the first queued job (priority, then age) to RUNNING; None when idle.

        Queued jobs whose start deadline passed are failed with START_TIMEOUT on the way.
        """
        ...

    def append_log(self, job_id: str, message: str, level: str = "INFO") -> None: ...

    def logs(self, job_id: str, after_seq: int = 0) -> list[LogLine]: ...

    def put_preview(self, job_id: str, png: bytes) -> None:
        """Keep `png` as the job's live preview (replacing the last one); any API process can serve it."""
        ...

    def preview(self, job_id: str) -> bytes | None:
        """The job's latest preview PNG; None before the first. Raises errors.JobNotFound."""
        ...

    def succeed(self, job_id: str, result: JobResult) -> Job: ...

    def fail(self, job_id: str, failure: JobFailure) -> Job:
        """Finish a job with `failure`; CANCELLED kind ends it CANCELLED, any other FAILED."""
        ...

    def request_cancel(self, job_id: str) -> JobStatus:
        """Returns the status before the call. QUEUED: cancelled now; RUNNING: flagged for the worker."""
        ...

    def release(self, job_id: str) -> None:
        """Put a RUNNING job back at the head of the queue without counting the attempt (clean shutdown)."""
        ...

    def recover(self, max_attempts: int) -> tuple[list[str], list[str]]:
        """At start-up: re-queue jobs left RUNNING by a dead server, or fail those out of attempts.

        Returns (requeued ids, failed ids).
        """
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
