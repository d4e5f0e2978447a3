"""Exception handlers: every error leaves as JSON in fal's shape (routes have no try/except).

- request validation → 422 {"detail": [{"loc", "msg", "type"}]}
- unknown request → 404 {"detail": ...}; on cancel {"status": "NOT_FOUND"} (fal's cancel contract)
- unknown file or upload URL (FileNotFoundError from the file store) → 404
- missing / wrong API key → 401 {"detail": ...}
- limits (body too large 413, per-key quota 429) → {"detail", "error_type"} + X-Fal-Error-Type
- anything else → 500 {"detail", "error_type": "internal_error"} + X-Fal-Error-Type
"""

from __future__ import annotations

import logging
import re

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from ovi_server.errors import JobNotFound

logger = logging.getLogger(__name__)


class Unauthorized(Exception):
    """No or a wrong `Authorization: Key ...` header."""


class FalError(HTTPException):
    """An error fal answers as `{"detail", "error_type"}` with `X-Fal-Error-Type` (413, 429, ...).

    An HTTPException, so FastAPI passes it through unchanged when it is raised while reading a body."""

    def __init__(self, status_code: int, detail: str, error_type: str, headers: dict[str, str] | None = None):
        super().__init__(status_code, detail, {"X-Fal-Error-Type": error_type, **(headers or {})})
        self.error_type = error_type


# Job ids are UUIDs; anything that could not be one (or could not go back in a header) is simply unknown.
_REQUEST_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,127}")


def is_request_id(value: str) -> bool:
    return _REQUEST_ID.fullmatch(value) is not None


def _request_id_headers(request: Request) -> dict[str, str]:
    request_id = request.path_params.get("request_id")
    return {"x-fal-request-id": request_id} if request_id and is_request_id(request_id) else {}


async def on_validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    detail = [{"loc": list(e["loc"]), "msg": e["msg"], "type": e["type"]} for e in exc.errors()]
    return JSONResponse({"detail": detail}, status_code=422)


async def on_job_not_found(request: Request, exc: JobNotFound) -> JSONResponse:
    headers = _request_id_headers(request)
    if request.method == "PUT" and request.url.path.endswith("/cancel"):
        return JSONResponse({"status": "NOT_FOUND"}, status_code=404, headers=headers)
    return JSONResponse({"detail": str(exc)}, status_code=404, headers=headers)


async def on_unauthorized(request: Request, exc: Unauthorized) -> JSONResponse:
    return JSONResponse({"detail": str(exc)}, status_code=401, headers={"WWW-Authenticate": "Key"})


async def on_file_not_found(request: Request, exc: FileNotFoundError) -> JSONResponse:
    return JSONResponse({"detail": str(exc)}, status_code=404)


async def on_fal_error(request: Request, exc: FalError) -> JSONResponse:
    return JSONResponse(
        {"detail": exc.detail, "error_type": exc.error_type}, status_code=exc.status_code, headers=exc.headers
    )


async def on_http_error(request: Request, exc: HTTPException) -> JSONResponse:
    return JSONResponse({"detail": exc.detail}, status_code=exc.status_code, headers=exc.headers)


async def on_unexpected(request: Request, exc: Exception) -> JSONResponse:
    logger.exception("%s %s failed", request.method, request.url.path)
    body = {"detail": f"internal server error: {type(exc).__name__}: {exc}", "error_type": "internal_error"}
    headers = {"X-Fal-Error-Type": "internal_error", **_request_id_headers(request)}
    return JSONResponse(body, status_code=500, headers=headers)


def install(app: FastAPI) -> None:
    app.add_exception_handler(RequestValidationError, on_validation_error)  # type: ignore[arg-type]
    app.add_exception_handler(JobNotFound, on_job_not_found)  # type: ignore[arg-type]
    app.add_exception_handler(Unauthorized, on_unauthorized)  # type: ignore[arg-type]
    app.add_exception_handler(FileNotFoundError, on_file_not_found)  # type: ignore[arg-type]
    app.add_exception_handler(FalError, on_fal_error)  # type: ignore[arg-type]
    app.add_exception_handler(HTTPException, on_http_error)  # type: ignore[arg-type]
    app.add_exception_handler(Exception, on_unexpected)
