"""HTTP routes: fal's queue API, sync run, storage, JWKS, health and metrics. No try/except (see errors.py).

Read top to bottom: submit → status (poll and SSE) → result → cancel → sync run → storage → misc.
Routes talk to `request.app.state.store` (a JobStore) and `.files` (a FileStore), nothing else.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import replace
from typing import Any, TypeVar

from fastapi import APIRouter, Depends, HTTPException, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, RedirectResponse, StreamingResponse

from ovi_server import outbound
from ovi_server.api import limits, schemas
from ovi_server.api.auth import require_key, require_key_or_token
from ovi_server.api.errors import FalError, Unauthorized, is_request_id
from ovi_server.errors import JobNotFound
from ovi_server.jobs.store import (
    Job,
    JobFailure,
    JobStatus,
    JobStore,
    NewJob,
    Priority,
)
from ovi_server.request import GenerationRequest

logger = logging.getLogger(__name__)
T = TypeVar("T")

router = APIRouter()
authed = [Depends(require_key)]
SSE_POLL_S = 0.25
SSE_PING_S = 15.0
RUN_POLL_S = 0.25
MAX_UPLOAD_BYTES = 90 << 20
QUOTA_RETRY_AFTER_S = 10
MAX_FETCHES_PER_KEY = 4  # image_url downloads in flight per key (the I/O pool has 32 threads)


def base_url(request: Request) -> str:
    """Origin for absolute URLs: configured public URL, else X-Forwarded-Proto/Host, else the request's."""
    configured = request.app.state.config.public_url
    if configured:
        return configured.rstrip("/")
    proto = request.headers.get("x-forwarded-proto", request.url.scheme).split(",")[0].strip()
    host = request.headers.get("x-forwarded-host") or request.headers.get("host") or request.url.netloc
    return f"{proto}://{host.split(',')[0].strip()}"


def _store(request: Request) -> JobStore:
    return request.app.state.store


def _json(
    body: dict[str, Any], status_code: int = 200, request_id: str | None = None, **headers: str
) -> JSONResponse:
    if request_id:
        headers["x-fal-request-id"] = request_id
    return JSONResponse(body, status_code=status_code, headers=headers)


def _wants_logs(value: str | None) -> bool:
    return (value or "").lower() in ("1", "true", "yes")


async def _slow_io(request: Request, func: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """Run blocking I/O that the client paces (image downloads, upload bodies) on the app's own pool:
    slow clients then cannot take the default executor that parsing and the store use."""
    loop = asyncio.get_running_loop()
    return await loop.run_in_executor(request.app.state.io_pool, functools.partial(func, *args, **kwargs))


def _owned(request: Request, request_id: str, owner: str) -> Job:
    """The caller's own job: another key's request is unknown to it (404, exactly as a missing id)."""
    if not is_request_id(request_id):
        raise JobNotFound(f"no request with id {request_id[:80]!r}")
    job = _store(request).get(request_id)
    if job.owner != owner:
        raise JobNotFound(f"no request with id {request_id!r}")
    return job


def _check_quota(request: Request, owner: str) -> None:
    limit = request.app.state.config.max_queued_per_key
    active = _store(request).active_count(owner)
    if active >= limit:
        raise FalError(
            429,
            f"this API key has {active} requests queued or running, the limit (OVI_MAX_QUEUED_PER_KEY) is "
            f"{limit}; wait for some to finish, then submit again",
            "rate_limited",
            {"Retry-After": str(QUOTA_RETRY_AFTER_S)},
        )


async def _check_webhook(request: Request) -> str | None:
    """`fal_webhook`, if any, checked against the outbound URL policy: refused → 422 now, not at delivery."""
    url = request.query_params.get("fal_webhook") or None
    if url is None:
        return None
    try:
        await asyncio.to_thread(request.app.state.url_policy.check, url)
    except outbound.Refused as exc:
        logger.info("fal_webhook refused: %s", exc.reason)
        raise RequestValidationError(
            [{"loc": ("query", "fal_webhook"), "msg": str(exc), "type": "value_error"}]
        ) from None
    return url


async def _read_input(
    request: Request, app: str, owner: str
) -> tuple[GenerationRequest | None, JobFailure | None]:
    body = await request.body()
    # Off the event loop: parsing a body of many MiB would stall every other request (/health included).
    generation = await asyncio.to_thread(schemas.to_generation_request, app, body)
    if isinstance(generation, JobFailure):
        return None, generation
    return await _fetch_image(request, generation, owner)


async def _fetch_image(
    request: Request, generation: GenerationRequest, owner: str
) -> tuple[GenerationRequest | None, JobFailure | None]:
    """Download an http(s) `image_url` now, into the file store, so that a slow or dead host costs this
    request its fetch deadline and never holds a worker. Our own file URLs are read from the store later.
    A key has at most MAX_FETCHES_PER_KEY downloads in flight, so one key cannot take every I/O thread."""
    image, base = generation.image, base_url(request)
    if image is None or not image.startswith(("http://", "https://")) or image.startswith(f"{base}/files/"):
        return generation, None
    config, fetching = request.app.state.config, request.app.state.fetching
    if fetching[owner] >= MAX_FETCHES_PER_KEY:
        raise FalError(
            429,
            f"this API key has {fetching[owner]} image_url downloads in progress, the limit is "
            f"{MAX_FETCHES_PER_KEY}; wait for those submits to return, or upload the image first",
            "rate_limited",
            {"Retry-After": str(int(config.fetch_timeout_s) + 1)},
        )
    fetching[owner] += 1
    try:
        data = await _slow_io(
            request,
            request.app.state.url_policy.fetch,
            image,
            max_bytes=outbound.DEFAULT_MAX_BYTES,
            deadline_s=config.fetch_timeout_s,
        )
    except outbound.Refused as exc:
        logger.info("image_url not fetched: %s", exc.reason)  # the reason is for the operator only
        return None, schemas.invalid("image_url", str(exc))
    except outbound.TooLarge as exc:
        return None, schemas.invalid("image_url", f"{exc}; send a smaller image (JPEG or WebP)")
    finally:
        fetching[owner] -= 1
    key = f"inputs/{uuid.uuid4().hex}/image"
    await asyncio.to_thread(request.app.state.files.put_bytes, key, data, "application/octet-stream")
    return replace(generation, image=f"{base}/files/{key}"), None


def _new_job(
    request: Request,
    app: str,
    owner: str,
    generation: GenerationRequest | None,
    failure: JobFailure | None,
    webhook_url: str | None = None,
) -> NewJob:
    priority = request.headers.get("x-fal-queue-priority", "normal").lower()
    return NewJob(
        app=app,
        request=generation,
        owner=owner,
        base_url=base_url(request),
        priority=Priority.LOW if priority == "low" else Priority.NORMAL,
        webhook_url=webhook_url,
        start_deadline=schemas.start_deadline(request.headers.get("x-fal-request-timeout"), time.time()),
        failure=failure,
    )


# -- submit ------------------------------------------------------------------------------------------


def _input_doc(model: type) -> dict[str, Any]:
    schema = {"$ref": f"#/components/schemas/{model.__name__}"}
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": schema}}}}


async def _submit(request: Request, app: str, owner: str) -> JSONResponse:
    _check_quota(request, owner)
    webhook_url = await _check_webhook(request)
    generation, failure = await _read_input(request, app, owner)
    store = _store(request)
    job = store.submit(_new_job(request, app, owner, generation, failure, webhook_url))
    logger.info(
        "job %s submitted app=%s owner=%s%s", job.id, app, owner, " (invalid input)" if failure else ""
    )
    position = store.queue_position(job.id) if job.status is JobStatus.QUEUED else 0
    return _json(schemas.submitted(job, base_url(request), position), request_id=job.id)


@router.post(
    f"/{schemas.TEXT_TO_VIDEO}",
    tags=["queue"],
    summary="Submit a text-to-video request",
    openapi_extra=_input_doc(schemas.OviInput),
)
async def submit_text_to_video(request: Request, owner: str = Depends(require_key)) -> JSONResponse:
    return await _submit(request, schemas.TEXT_TO_VIDEO, owner)


@router.post(
    f"/{schemas.IMAGE_TO_VIDEO}",
    tags=["queue"],
    summary="Submit an image-to-video request",
    openapi_extra=_input_doc(schemas.OviImageToVideoInput),
)
async def submit_image_to_video(request: Request, owner: str = Depends(require_key)) -> JSONResponse:
    return await _submit(request, schemas.IMAGE_TO_VIDEO, owner)


# -- status, result, cancel (under fal-ai/ovi for both apps; also accepted under the sub-path) ---------


def _status(request: Request, job: Job, logs: bool) -> dict[str, Any]:
    store = _store(request)
    position = store.queue_position(job.id) if job.status is JobStatus.QUEUED else None
    lines = store.logs(job.id) if logs else None
    return schemas.status_body(job, base_url(request), position, lines)


async def get_status(
    request: Request, request_id: str, logs: str | None = None, owner: str = Depends(require_key)
) -> JSONResponse:
    job = _owned(request, request_id, owner)
    code = 200 if job.status.finished else 202
    return _json(_status(request, job, _wants_logs(logs)), code, request_id=job.id)


async def stream_status(
    request: Request, request_id: str, logs: str | None = None, owner: str = Depends(require_key)
) -> StreamingResponse:
    store = _store(request)
    job = _owned(request, request_id, owner)  # 404 before the stream starts
    with_logs, base = _wants_logs(logs), base_url(request)

    async def events() -> AsyncIterator[str]:
        last_seq, last_sent, last_write = 0, None, time.monotonic()
        while True:
            current = store.get(request_id)
            position = store.queue_position(request_id) if current.status is JobStatus.QUEUED else None
            new_lines = store.logs(request_id, last_seq) if with_logs else []
            fingerprint = (current.status, position)
            if new_lines or fingerprint != last_sent:
                # Each event carries only the lines not sent yet; the JS client accumulates them.
                body = schemas.status_body(current, base, position, new_lines if with_logs else None)
                last_seq = new_lines[-1].seq if new_lines else last_seq
                yield f"data: {json.dumps(body)}\n\n"
                last_sent, last_write = fingerprint, time.monotonic()
            if current.status.finished:
                return
            if time.monotonic() - last_write >= SSE_PING_S:
                yield ": ping\n\n"
                last_write = time.monotonic()
            await asyncio.sleep(SSE_POLL_S)

    headers = {"x-fal-request-id": job.id, "Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    return StreamingResponse(events(), media_type="text/event-stream", headers=headers)


def _result(request: Request, job: Job) -> JSONResponse:
    if not job.status.finished:
        return _json({"detail": "Request is still in progress"}, 400, request_id=job.id)
    if job.result is not None:
        return _json(schemas.output_body(job, base_url(request)), request_id=job.id)
    assert job.failure is not None
    code, body, headers = schemas.failure_response(job.failure)
    return _json(body, code, request_id=job.id, **headers)


async def get_result(request: Request, request_id: str, owner: str = Depends(require_key)) -> JSONResponse:
    return _result(request, _owned(request, request_id, owner))


async def cancel(request: Request, request_id: str, owner: str = Depends(require_key)) -> JSONResponse:
    _owned(request, request_id, owner)  # the owner never changes, so checking first is enough
    before = _store(request).request_cancel(request_id)
    if before.finished:
        return _json({"status": "ALREADY_COMPLETED"}, 400, request_id=request_id)
    logger.info("job %s cancellation requested (was %s)", request_id, before.value)
    return _json({"status": "CANCELLATION_REQUESTED"}, 202, request_id=request_id)


async def get_preview(request: Request, request_id: str, owner: str = Depends(require_key)) -> Response:
    """The latest live preview (PNG, at most 256 px) of a request's video while it denoises."""
    _owned(request, request_id, owner)
    png = _store(request).preview(request_id)
    if png is None:
        raise HTTPException(
            404,
            "no preview yet: one is made every few denoising steps (the status logs say 'preview i/N'); "
            "the server may run with --previews off",
            headers={"x-fal-request-id": request_id},
        )
    headers = {"x-fal-request-id": request_id, "Cache-Control": "no-store"}
    return Response(png, media_type="image/png", headers=headers)


for _root in (schemas.APP_ROOT, schemas.IMAGE_TO_VIDEO):
    _doc = _root == schemas.APP_ROOT
    _base = f"/{_root}/requests/{{request_id}}"
    router.add_api_route(
        f"{_base}/status",
        get_status,
        methods=["GET"],
        tags=["queue"],
        include_in_schema=_doc,
        summary="Request status",
    )
    router.add_api_route(
        f"{_base}/status/stream",
        stream_status,
        methods=["GET"],
        tags=["queue"],
        include_in_schema=_doc,
        summary="Request status as server-sent events",
    )
    router.add_api_route(
        _base,
        get_result,
        methods=["GET"],
        tags=["queue"],
        include_in_schema=_doc,
        summary="Request result",
        responses={200: {"model": schemas.OviOutput}},
    )
    router.add_api_route(
        f"{_base}/preview",
        get_preview,
        methods=["GET"],
        tags=["queue"],
        include_in_schema=_doc,
        summary="Live preview of the video while it denoises (PNG)",
        response_class=Response,
        responses={200: {"content": {"image/png": {}}}},
    )
    router.add_api_route(f"{_base}/cancel", cancel, methods=["PUT"], tags=["queue"], include_in_schema=_doc, summary="Cancel a request")  # fmt: skip


# -- sync run (fal.run): same queue, the response waits for the result --------------------------------


async def _run(request: Request, app: str, owner: str) -> JSONResponse:
    _check_quota(request, owner)
    generation, failure = await _read_input(request, app, owner)
    if failure is not None:
        code, body, headers = schemas.failure_response(failure)
        return _json(body, code, **headers)
    store = _store(request)
    job = store.submit(_new_job(request, app, owner, generation, None))  # no webhook: queue API only
    logger.info("job %s submitted (sync run) app=%s owner=%s", job.id, app, owner)
    while not job.status.finished:
        if await request.is_disconnected():
            store.request_cancel(job.id)
            logger.info("job %s: sync caller went away; cancelling", job.id)
        await asyncio.sleep(RUN_POLL_S)
        job = store.get(job.id)
    return _result(request, job)


@router.post(f"/run/{schemas.TEXT_TO_VIDEO}", tags=["sync"], summary="Run text-to-video and wait", openapi_extra=_input_doc(schemas.OviInput), responses={200: {"model": schemas.OviOutput}})  # fmt: skip
async def run_text_to_video(request: Request, owner: str = Depends(require_key)) -> JSONResponse:
    return await _run(request, schemas.TEXT_TO_VIDEO, owner)


@router.post(f"/run/{schemas.IMAGE_TO_VIDEO}", tags=["sync"], summary="Run image-to-video and wait", openapi_extra=_input_doc(schemas.OviImageToVideoInput), responses={200: {"model": schemas.OviOutput}})  # fmt: skip
async def run_image_to_video(request: Request, owner: str = Depends(require_key)) -> JSONResponse:
    return await _run(request, schemas.IMAGE_TO_VIDEO, owner)


# -- storage (spec §8) ---------------------------------------------------------------------------------


@router.post("/storage/upload/initiate", tags=["storage"], dependencies=authed)
async def upload_initiate(request: Request, body: schemas.UploadInitiate) -> dict[str, str]:
    """JS `fal.storage.upload` step 1: a one-time `upload_url` to PUT to and the `file_url` it will have."""
    key = request.app.state.files.reserve_upload(body.file_name or "", body.content_type)
    base = base_url(request)
    return {"upload_url": f"{base}/storage/put/{key}", "file_url": f"{base}/files/{key}"}


@router.put("/storage/put/{key:path}", tags=["storage"])
async def upload_put(request: Request, key: str) -> dict[str, Any]:
    """Step 2: the bytes. No API key (the JS client sends none); the key is a one-time random name,
    checked before the body is read; the body streams to storage."""
    size = await _store_upload(request, key, _content_type(request.headers.get("content-type")))
    return {"status": "ok", "file_size": size}


def _content_type(header: str | None) -> str | None:
    """A client's Content-Type if it is a well-formed MIME type (it is served back in a header later)."""
    return header if header and schemas.is_mime_type(header) else None


async def _store_upload(request: Request, key: str, content_type: str | None) -> int:
    """Stream the request body into the file store under the reserved `key`, refused with 413 beyond
    MAX_UPLOAD_BYTES (single-part uploads; fal's JS client switches to multipart above 90 MB, which this
    server does not offer). The store checks the key before it pulls the first chunk."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > MAX_UPLOAD_BYTES:
        raise FalError(
            413,
            f"upload of {declared} bytes is over the {MAX_UPLOAD_BYTES >> 20} MiB limit",
            limits.ERROR_TYPE,
        )
    loop = asyncio.get_running_loop()
    body = request.stream()
    received = 0

    async def next_chunk() -> bytes | None:
        nonlocal received
        async for chunk in body:
            received += len(chunk)
            if received > MAX_UPLOAD_BYTES:
                raise FalError(
                    413, f"upload is over the {MAX_UPLOAD_BYTES >> 20} MiB limit", limits.ERROR_TYPE
                )
            if chunk:
                return chunk
        return None

    def chunks() -> Iterator[bytes]:  # runs in the store's thread; each chunk comes from the event loop
        while (chunk := asyncio.run_coroutine_threadsafe(next_chunk(), loop).result()) is not None:
            yield chunk

    return await _slow_io(request, request.app.state.files.write_upload, key, chunks(), content_type)


@router.post("/storage/auth/token", tags=["storage"])
async def upload_token(request: Request, owner: str = Depends(require_key)) -> dict[str, str]:
    """fal-client's CDN upload step 1: a short-lived token for POST /files/upload."""
    token, expires = request.app.state.keys.issue_token(owner)
    expires_at = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(expires))
    return {"token": token, "token_type": "Bearer", "base_url": base_url(request), "expires_at": expires_at}


@router.post("/files/upload", tags=["storage"], dependencies=[Depends(require_key_or_token)])
async def upload_file(request: Request) -> dict[str, str]:
    """fal-client's CDN upload: raw bytes in, `access_url` out."""
    files = request.app.state.files
    content_type = _content_type(request.headers.get("content-type")) or "application/octet-stream"
    key = files.reserve_upload(request.headers.get("x-fal-file-name", ""), content_type)
    await _store_upload(request, key, content_type)
    return {"access_url": f"{base_url(request)}/files/{key}"}


@router.get("/files/{key:path}", tags=["storage"], response_model=None)
async def download(request: Request, key: str) -> Response:
    """Uploaded inputs and generated MP4s. No API key: keys are unguessable, like fal's CDN URLs.

    Uploads are anyone's bytes on our origin: never sniffed, sandboxed (no script runs even if opened),
    and shown inline only when they are media; anything else (HTML, SVG, ...) downloads as an attachment."""
    files = request.app.state.files
    path = files.local_path(key)
    if path is None:
        return RedirectResponse(files.remote_url(key))
    content_type = _content_type(files.content_type(key)) or "application/octet-stream"
    major = content_type.split("/", 1)[0].lower()
    inline = major in ("image", "video", "audio") and "svg" not in content_type.lower()
    return FileResponse(
        path,
        media_type=content_type,
        filename=path.name,
        content_disposition_type="inline" if inline else "attachment",
        headers={"X-Content-Type-Options": "nosniff", "Content-Security-Policy": "sandbox"},
    )


# -- misc ------------------------------------------------------------------------------------------------


@router.get("/.well-known/jwks.json", tags=["webhooks"])
async def jwks(request: Request) -> JSONResponse:
    """Public keys that verify X-Fal-Webhook-Signature."""
    return JSONResponse(request.app.state.signer.jwks(), headers={"Cache-Control": "public, max-age=3600"})


@router.get("/health", tags=["ops"])
async def health(request: Request) -> dict[str, Any]:
    """Liveness for anyone; with a valid key also the queue depth and every worker heard from recently."""
    try:
        request.app.state.keys.identify(request.headers.get("authorization"))
    except Unauthorized:
        return {"status": "ok"}
    store = _store(request)
    counts, workers = await asyncio.gather(asyncio.to_thread(store.counts), asyncio.to_thread(store.workers))
    return {
        "status": "ok",
        "queue_depth": counts[JobStatus.QUEUED],
        "jobs": {status.value: n for status, n in counts.items()},
        "workers": [
            {
                "id": w.id,
                "host": w.host,
                "pid": w.pid,
                "device": w.device,
                "state": w.state.value,
                "job": w.job,
                "last_heartbeat": w.last_heartbeat,
            }
            for w in workers
        ],
    }


@router.get("/metrics", tags=["ops"], dependencies=authed)
async def metrics(request: Request) -> Response:
    return Response(request.app.state.metrics.render(), media_type="text/plain; version=0.0.4")
