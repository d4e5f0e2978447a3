"""fal's request and response shapes for `fal-ai/ovi` and `fal-ai/ovi/image-to-video`.

The only module that knows fal's field names (`num_inference_steps`, `image_url`, `queue_position`, ...).
`to_generation_request` turns a fal input into our `GenerationRequest`; the other functions turn our job
records into fal's status, result and webhook bodies (spec: shared/specs/fal-queue-api.md §4, §6, §7, §12).
"""

from __future__ import annotations

import datetime as dt
import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from ovi_server.config import SamplingDefaults
from ovi_server.errors import InvalidInput
from ovi_server.jobs.store import FailureKind, FieldError, Job, JobFailure, JobStatus, LogLine
from ovi_server.prompt import MAX_PROMPT_CHARS, validate_prompt
from ovi_server.request import GenerationRequest
from ovi_server.shapes import DEFAULT_RESOLUTION, FAL_RESOLUTIONS

TEXT_TO_VIDEO = "fal-ai/ovi"
IMAGE_TO_VIDEO = "fal-ai/ovi/image-to-video"
# Status, result and cancel URLs drop the endpoint's sub-path (both clients do), so both apps share this root.
APP_ROOT = "fal-ai/ovi"

MAX_SEED = 2**63 - 1  # the engine's generator takes a signed 64-bit seed
Resolution = Literal[FAL_RESOLUTIONS]  # type: ignore[valid-type] -- the one list, in shapes.py
SAMPLING = SamplingDefaults()  # fal's negative prompts are the reference's


class OviInput(BaseModel):
    """Input of fal-ai/ovi (text → video with audio). Unknown keys are ignored, as on fal."""

    model_config = ConfigDict(extra="ignore")

    prompt: str = Field(
        description="Text prompt; speech goes between <S> and <E>, the audio caption between <AUDCAP> "
        "and <ENDAUDCAP>."
    )
    negative_prompt: str = Field(
        SAMPLING.video_negative_prompt,
        max_length=MAX_PROMPT_CHARS,
        description="Negative prompt for video.",
    )
    audio_negative_prompt: str = Field(
        SAMPLING.audio_negative_prompt,
        max_length=MAX_PROMPT_CHARS,
        description="Negative prompt for audio.",
    )
    num_inference_steps: int = Field(30, ge=1, le=50, description="Number of denoising steps.")
    seed: int | None = Field(
        None,
        ge=0,
        le=MAX_SEED,
        description="Random seed (0 ≤ seed < 2^63); a random one is drawn and returned when absent.",
    )
    resolution: Resolution = Field(
        DEFAULT_RESOLUTION, description="Resolution of the generated video (width x height)."
    )


class OviImageToVideoInput(OviInput):
    """Input of fal-ai/ovi/image-to-video: the text input plus the first frame."""

    image_url: str = Field(description="The first frame: an http(s) URL or a data: URI (PNG, JPEG or WebP).")


class File(BaseModel):
    url: str
    content_type: str = "video/mp4"
    file_name: str = "output.mp4"
    file_size: int


class OviOutput(BaseModel):
    video: File
    seed: int = Field(description="The seed used; equals the request's seed when one was given.")


INPUT_MODELS: dict[str, type[OviInput]] = {TEXT_TO_VIDEO: OviInput, IMAGE_TO_VIDEO: OviImageToVideoInput}

# Our GenerationRequest / InvalidInput field names → fal's (for 422 locations from the worker).
FAL_FIELD = {
    "prompt": "prompt",
    "image": "image_url",
    "steps": "num_inference_steps",
    "seed": "seed",
    "size": "resolution",
    "video_negative_prompt": "negative_prompt",
    "audio_negative_prompt": "audio_negative_prompt",
}


def to_generation_request(app: str, body: bytes) -> GenerationRequest | JobFailure:
    """A fal request body (raw JSON) → our request, or the 422 failure (stored; the result replays it)."""
    try:
        fal = INPUT_MODELS[app].model_validate_json(body or b"null")
    except ValidationError as exc:
        errors = tuple(
            FieldError(("body", *e["loc"]), e["msg"], e["type"], _plain_ctx(e.get("ctx")))
            for e in exc.errors()
        )
        summary = "; ".join(f"{e.loc[-1]}: {e.msg}" for e in errors)
        return JobFailure(FailureKind.INVALID_INPUT, summary, errors)
    try:
        # Everything that needs neither the model nor the network is checked here, at submit, so a bad
        # request is stored already failed and never takes a worker slot.
        validate_prompt(fal.prompt)
    except InvalidInput as exc:
        return invalid("prompt", exc.msg, exc.kind)
    image = getattr(fal, "image_url", None)
    if image is not None and not image.startswith(("http://", "https://", "data:")):
        return invalid("image_url", f"expected an http(s) URL or a data: URI, got {image[:40]!r}")
    width, height = (int(v) for v in fal.resolution.split("x"))
    return GenerationRequest(
        prompt=fal.prompt,
        image=image,
        size=(width, height),
        steps=fal.num_inference_steps,
        seed=fal.seed,
        video_negative_prompt=fal.negative_prompt,
        audio_negative_prompt=fal.audio_negative_prompt,
    )


def invalid(field: str, msg: str, kind: str = "value_error") -> JobFailure:
    """The stored 422 for one bad field of the body (fal's name)."""
    return JobFailure(FailureKind.INVALID_INPUT, f"{field}: {msg}", (FieldError(("body", field), msg, kind),))


def start_deadline(header: str | None, now: float) -> float | None:
    """`x-fal-request-timeout: <seconds>` → the unix time by which the request must start (None: no limit)."""
    # Clients check the value (> 1 s); a malformed one is ignored rather than failing the submit.
    if header is None or not re.fullmatch(r"\s*\d+(\.\d*)?\s*", header):
        return None
    return now + float(header)


def _plain_ctx(ctx: dict[str, Any] | None) -> dict[str, Any] | None:
    """pydantic's ctx may hold exceptions; keep what JSON can carry."""
    if not ctx:
        return None
    return {k: v if isinstance(v, str | int | float | bool | None) else str(v) for k, v in ctx.items()}


# -- queue responses ---------------------------------------------------------------------------------


def request_urls(base_url: str, job_id: str) -> dict[str, str]:
    response_url = f"{base_url}/{APP_ROOT}/requests/{job_id}"
    return {
        "response_url": response_url,
        "status_url": f"{response_url}/status",
        "cancel_url": f"{response_url}/cancel",
    }


def submitted(job: Job, base_url: str, queue_position: int) -> dict[str, Any]:
    status = "IN_QUEUE" if job.status is JobStatus.QUEUED else "COMPLETED"
    return {
        "status": status,
        "request_id": job.id,
        **request_urls(base_url, job.id),
        "queue_position": queue_position,
        "gateway_request_id": job.id,
    }


def fal_status(job: Job) -> str:
    if job.status is JobStatus.QUEUED:
        return "IN_QUEUE"
    if job.status is JobStatus.RUNNING:
        return "IN_PROGRESS"
    return "COMPLETED"


def log_item(line: LogLine) -> dict[str, str]:
    timestamp = dt.datetime.fromtimestamp(line.timestamp, tz=dt.UTC).isoformat()
    return {"message": line.message, "level": line.level, "source": "USER", "timestamp": timestamp}


def status_body(
    job: Job, base_url: str, queue_position: int | None, logs: list[LogLine] | None
) -> dict[str, Any]:
    """fal's status object; `logs` None renders `"logs": null` (the client asked for logs=0)."""
    body: dict[str, Any] = {
        "status": fal_status(job),
        "request_id": job.id,
        **request_urls(base_url, job.id),
        "logs": None if logs is None else [log_item(line) for line in logs],
    }
    if job.status is JobStatus.QUEUED:
        body["queue_position"] = queue_position or 0
    if job.status.finished:
        inference_time = job.result.inference_time_s if job.result else None
        body["metrics"] = {"inference_time": inference_time}
        if job.failure is not None:
            body["error"] = job.failure.message
            body["error_type"] = ERROR_TYPES[job.failure.kind][1]
    return body


# -- results -----------------------------------------------------------------------------------------


def output_body(job: Job, base_url: str) -> dict[str, Any]:
    assert job.result is not None
    video = File(url=f"{base_url}/files/{job.result.file_key}", file_size=job.result.file_size)
    return OviOutput(video=video, seed=job.result.seed).model_dump()


# FailureKind → (result status code, fal error_type, extra headers); 504 + "user" is never retried by clients.
ERROR_TYPES: dict[FailureKind, tuple[int, str, dict[str, str]]] = {
    FailureKind.INVALID_INPUT: (422, "validation_error", {}),
    FailureKind.CANCELLED: (400, "request_cancelled", {}),
    FailureKind.START_TIMEOUT: (504, "request_timeout", {"X-Fal-Request-Timeout-Type": "user"}),
    FailureKind.OUT_OF_MEMORY: (500, "out_of_memory", {}),
    FailureKind.INTERRUPTED: (500, "runner_disconnected", {}),
    FailureKind.INTERNAL: (500, "internal_error", {}),
}


def failure_response(failure: JobFailure) -> tuple[int, dict[str, Any], dict[str, str]]:
    """(HTTP status, JSON body, extra headers) that fal returns for a failed request's result."""
    code, error_type, headers = ERROR_TYPES[failure.kind]
    if failure.kind is FailureKind.INVALID_INPUT:
        return code, {"detail": [_fal_field_error(e) for e in failure.field_errors]}, {}
    return (
        code,
        {"detail": failure.message, "error_type": error_type},
        {"X-Fal-Error-Type": error_type, **headers},
    )


def _fal_field_error(error: FieldError) -> dict[str, Any]:
    loc = list(error.loc) or ["body"]
    loc[-1] = FAL_FIELD.get(str(loc[-1]), loc[-1])
    if loc[0] != "body":
        loc.insert(0, "body")
    item: dict[str, Any] = {"loc": loc, "msg": error.msg, "type": error.type}
    if error.ctx:
        item["ctx"] = error.ctx
    return item


def webhook_payload(job: Job) -> dict[str, Any]:
    """The webhook body for a finished job (spec §7); URLs use the origin the job was submitted to."""
    head = {"request_id": job.id, "gateway_request_id": job.id}
    if job.result is not None:
        return {**head, "status": "OK", "payload": output_body(job, job.base_url)}
    assert job.failure is not None
    code, body, _ = failure_response(job.failure)
    return {**head, "status": "ERROR", "error": f"Invalid status code: {code}", "payload": body}


class UploadInitiate(BaseModel):
    """Body of POST /storage/upload/initiate (JS client)."""

    model_config = ConfigDict(extra="ignore")

    content_type: str = Field("application/octet-stream", max_length=255)
    file_name: str | None = Field(None, max_length=1000)

    @field_validator("content_type")
    @classmethod
    def _mime_type(cls, value: str) -> str:
        if not is_mime_type(value):
            raise ValueError("expected a MIME type such as image/png (type/subtype, ASCII, no spaces)")
        return value


# RFC 6838 names (type/subtype), optionally `; param=value` pairs: what may go back in a Content-Type header.
_TOKEN = r"[A-Za-z0-9][A-Za-z0-9!#$&^_.+-]{0,126}"
_MIME = re.compile(rf"{_TOKEN}/{_TOKEN}([ \t]*;[ \t]*{_TOKEN}=(?:{_TOKEN}|\"[ !#-~]*\"))*")


def is_mime_type(value: str) -> bool:
    return len(value) <= 255 and _MIME.fullmatch(value) is not None
