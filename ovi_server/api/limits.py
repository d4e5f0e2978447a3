"""Request body limit at the edge: a body over `max_bytes` is refused with 413 before it is read whole.

An ASGI middleware rather than a check in the routes, because a route that calls `request.body()` has
already buffered the body: a declared `Content-Length` over the limit is answered at once, without
reading anything; a chunked body is counted as it streams and refused at the first chunk past the limit.
Upload routes stream to storage under their own, larger limit (routes.MAX_UPLOAD_BYTES).
"""

from __future__ import annotations

import json

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ovi_server.api.errors import FalError

ERROR_TYPE = "request_too_large"
UPLOAD_PATHS = ("/storage/put/", "/files/upload")


def too_large(max_bytes: int) -> str:
    return (
        f"the request body is over the {max_bytes / 2**20:g} MiB limit (OVI_MAX_BODY_BYTES); send images "
        "as a URL or upload them first (/storage/upload/initiate) instead of a larger data: URI"
    )


class BodyLimitMiddleware:
    def __init__(self, app: ASGIApp, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"].startswith(UPLOAD_PATHS):
            await self.app(scope, receive, send)
            return
        declared = next((v for k, v in scope["headers"] if k == b"content-length"), b"")
        if declared.isdigit() and int(declared) > self.max_bytes:
            await _refuse(send, too_large(self.max_bytes))
            return
        received = 0

        async def counted() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    # Raised inside the route's body read; api/errors.py turns it into fal's 413.
                    raise FalError(413, too_large(self.max_bytes), ERROR_TYPE)
            return message

        await self.app(scope, counted, send)


async def _refuse(send: Send, detail: str) -> None:
    body = json.dumps({"detail": detail, "error_type": ERROR_TYPE}).encode()
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        (b"x-fal-error-type", ERROR_TYPE.encode()),
        (b"connection", b"close"),  # the unread body would otherwise be taken for the next request
    ]
    await send({"type": "http.response.start", "status": 413, "headers": headers})
    await send({"type": "http.response.body", "body": body})
