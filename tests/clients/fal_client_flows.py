"""Drives the unmodified PyPI `fal-client` 1.0.3 against a live ovi-server; one flow per process.

fal-client reads FAL_QUEUE_RUN_HOST / FAL_RUN_HOST once at import and only speaks https (spec §11), so
test_python_client.py runs this file with those variables, FAL_KEY and SSL_CERT_FILE set.
usage: python fal_client_flows.py <flow> [arg]  → prints one JSON line.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from typing import Any

import fal_client

T2V = "fal-ai/ovi"
I2V = "fal-ai/ovi/image-to-video"
SMALL = {"num_inference_steps": 2, "resolution": "992x512"}


def status_dict(status: fal_client.Status) -> dict[str, Any]:
    return {"type": type(status).__name__, **dataclasses.asdict(status)}


def capture(fn, *args, **kwargs) -> dict[str, Any]:
    try:
        return {"ok": True, "value": fn(*args, **kwargs)}
    except fal_client.FalClientHTTPError as exc:
        return {
            "ok": False,
            "status_code": exc.status_code,
            "message": exc.message,
            "error_type": exc.error_type,
        }


def subscribe() -> dict[str, Any]:
    updates: list[dict[str, Any]] = []
    result = fal_client.subscribe(
        T2V,
        arguments={"prompt": "a cat meows", "seed": 123, **SMALL},
        with_logs=True,
        on_queue_update=lambda s: updates.append(status_dict(s)),
    )
    return {"result": result, "updates": updates}


def queue(webhook_url: str) -> dict[str, Any]:
    handle = fal_client.submit(
        T2V, arguments={"prompt": "a dog", "seed": 9, **SMALL}, webhook_url=webhook_url or None
    )
    statuses = []
    while True:
        status = fal_client.status(T2V, handle.request_id, with_logs=True)  # by id: the https base URL
        statuses.append(status_dict(status))
        if isinstance(status, fal_client.Completed):
            break
        time.sleep(0.1)
    return {
        "request_id": handle.request_id,
        "handle_status": status_dict(handle.status(with_logs=True)),  # the server-supplied status_url
        "statuses": statuses,
        "result": fal_client.result(T2V, handle.request_id),
        "handle_result": handle.get(),
    }


def cancel() -> dict[str, Any]:
    first = fal_client.submit(T2V, arguments={"prompt": "runs", **SMALL, "num_inference_steps": 30})
    second = fal_client.submit(T2V, arguments={"prompt": "cancelled", **SMALL})
    before = status_dict(fal_client.status(T2V, second.request_id))
    fal_client.cancel(T2V, second.request_id)
    after = status_dict(fal_client.status(T2V, second.request_id, with_logs=True))
    cancelled_result = capture(fal_client.result, T2V, second.request_id)
    first_result = first.get()
    cancel_again = capture(fal_client.cancel, T2V, first.request_id)
    unknown = capture(fal_client.status, T2V, "00000000-0000-0000-0000-000000000000")
    return {
        "before": before,
        "after": after,
        "cancelled_result": cancelled_result,
        "first_result": first_result,
        "cancel_again": cancel_again,
        "unknown": unknown,
    }


def run() -> dict[str, Any]:
    return {"result": fal_client.run(T2V, arguments={"prompt": "sync", "seed": 77, **SMALL})}


def datauri(png_path: str) -> dict[str, Any]:
    uri = fal_client.encode_file(png_path)
    result = fal_client.subscribe(I2V, arguments={"prompt": "moves", "image_url": uri, "seed": 8, **SMALL})
    return {"result": result}


def validation() -> dict[str, Any]:
    return {
        "zero_steps": capture(fal_client.subscribe, T2V, arguments={"prompt": "p", "num_inference_steps": 0}),
        "too_many_steps": capture(fal_client.run, T2V, arguments={"prompt": "p", "num_inference_steps": 51}),
        "bad_image": capture(fal_client.subscribe, I2V, arguments={"prompt": "p", "image_url": "data:image/png;base64,AAAA", **SMALL}),
    }  # fmt: skip


def badkey() -> dict[str, Any]:
    client = fal_client.SyncClient(key="wrong:key")
    return {"submit": capture(client.submit, T2V, arguments={"prompt": "p"})}


if __name__ == "__main__":
    flow, arg = sys.argv[1], (sys.argv[2] if len(sys.argv) > 2 else "")
    flows = {"subscribe": subscribe, "queue": queue, "cancel": cancel, "run": run, "datauri": datauri}
    flows |= {"validation": validation, "badkey": badkey}
    out = flows[flow](arg) if flow in ("queue", "datauri") else flows[flow]()
    print(json.dumps(out, default=str))
