"""Proxy mode (spec §10): a request carrying `x-fal-target-url` is served as if it had been sent to that URL.

The JS client, configured with `proxyUrl: {url: BASE/api/fal/proxy, when: "always"}`, sends every call
(submit, status, SSE stream, result, cancel, run, storage initiate) to the proxy URL and puts the fal
URL it meant in `x-fal-target-url`. We rewrite the ASGI scope to the target's path and query and hand it
to our own routes, so responses (SSE included) stream through unchanged. Works on any path.
"""

from __future__ import annotations

import json
from urllib.parse import unquote, urlsplit

from starlette.types import ASGIApp, Receive, Scope, Send

PROXY_PATH = "/api/fal/proxy"
# fal host → our path prefix (spec §1.1: queue at the root, sync run under /run, REST and CDN at the root).
HOST_PREFIX = {
    "queue.fal.run": "",
    "queue.falrun.com": "",
    "fal.run": "/run",
    "falrun.com": "/run",
    "rest.fal.ai": "",
    "rest.alpha.fal.ai": "",
    "v3.fal.media": "",
}


class FalProxyMiddleware:
    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        target = next((v.decode("latin-1") for k, v in scope["headers"] if k == b"x-fal-target-url"), None)
        if target is None:
            if scope["path"] == PROXY_PATH and scope["method"] != "OPTIONS":
                await _bad_request(send, "Invalid request: missing the x-fal-target-url header")
                return
            await self.app(scope, receive, send)
            return
        url = urlsplit(target)
        prefix = HOST_PREFIX.get(url.hostname or "")
        if prefix is None or url.scheme not in ("http", "https"):
            await _bad_request(
                send, f"Invalid request: target {target!r} is not a fal queue, run or REST URL"
            )
            return
        path = prefix + (url.path or "/")
        scope = {
            **scope,
            "path": unquote(path),
            "raw_path": path.encode(),
            "query_string": url.query.encode(),
        }
        await self.app(scope, receive, send)


async def _bad_request(send: Send, detail: str) -> None:
    body = json.dumps({"detail": detail}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": 400, "headers": headers})
    await send({"type": "http.response.body", "body": body})
