"""A bounded schemathesis pass over the OpenAPI schema of a live tiny server: no 5xx, every error in
fal's shape. Valid and invalid inputs (schemathesis' positive and negative modes), every documented
operation but the sync /run ones (they wait for the video; they share the submit routes' validation)."""

from __future__ import annotations

import base64

import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from tests.clients.live import LiveServer

from .conftest import ALICE, png_bytes

schemathesis = pytest.importorskip("schemathesis", reason="schemathesis is installed by the [test] extra")

MAX_EXAMPLES = 150  # about 30 s on a 2-core CPU
HEADERS = {
    "Authorization": f"Key {ALICE}",
    # Valid submits really queue a generation: at low priority, so other tests' requests go first.
    "x-fal-queue-priority": "low",
}


def is_fal_error(status: int, body: object) -> bool:
    if not isinstance(body, dict):
        return False
    if set(body) == {"status"}:  # cancel: {"status": "NOT_FOUND" | "ALREADY_COMPLETED"}
        return body["status"] in ("NOT_FOUND", "ALREADY_COMPLETED")
    detail = body.get("detail")
    if isinstance(detail, list):  # validation: [{"loc": [...], "msg": ..., "type": ...}]
        return status == 422 and all(
            isinstance(e, dict) and isinstance(e.get("loc"), list) and isinstance(e.get("msg"), str)
            and isinstance(e.get("type"), str)
            for e in detail
        )  # fmt: skip
    return isinstance(detail, str) and set(body) <= {"detail", "error_type"}


def test_fuzzed_requests_get_no_5xx_and_fal_shaped_errors(live: LiveServer):
    schema = schemathesis.openapi.from_url(f"{live.base}/openapi.json").exclude(path_regex=r"^/run/")
    modes = schemathesis.GenerationMode
    strategy = st.one_of(schema.as_strategy(modes.POSITIVE), schema.as_strategy(modes.NEGATIVE))
    image = "data:image/png;base64," + base64.b64encode(png_bytes()).decode()
    seen: list[str] = []

    @settings(
        max_examples=MAX_EXAMPLES,
        deadline=None,
        database=None,
        phases=[Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    @given(case=strategy)
    def check(case) -> None:
        if isinstance(case.body, dict) and str(case.body.get("image_url", "")).startswith("http"):
            case.body["image_url"] = image  # tests contact no host but loopback (no DNS lookups either)
        response = case.call(base_url=live.base, headers=HEADERS, timeout=30)
        seen.append(f"{case.method} {case.operation.path}")
        label = f"{case.method} {case.formatted_path} -> {response.status_code}: {response.text[:300]}"
        assert response.status_code < 500, label
        if response.status_code >= 400:
            content_type = response.headers.get("content-type") or [""]  # schemathesis: name → values
            assert content_type[0].startswith("application/json"), label
            assert is_fal_error(response.status_code, response.json()), label

    check()
    assert len(set(seen)) >= 8, sorted(set(seen))  # most operations were exercised, not one
