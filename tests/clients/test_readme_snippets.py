"""The README's curl and JavaScript blocks, run as a new user pastes them, against a live tiny server.

Only the address and the key are swapped for the test server's; everything else runs verbatim: the curl
block must set $ID itself, the JavaScript must run as an ES module with nothing defined beside it.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from .live import KEY, LiveServer, start_server
from .test_js_client import JS_DIR, install_js_client

README = Path(__file__).resolve().parents[2] / "README.md"


def readme_block(after: str, language: str) -> str:
    text = README.read_text()
    start = text.index(after)
    match = re.compile(rf"```{language}\n(.*?)```", re.S).search(text, start)
    assert match, f"no {language} block after {after!r}"
    return match.group(1)


def for_server(block: str, server: LiveServer) -> str:
    assert "http://127.0.0.1:8000" in block and "alice:s3cret" in block
    return block.replace("http://127.0.0.1:8000", server.base).replace("alice:s3cret", KEY)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    live = start_server(tmp_path_factory.mktemp("readme"))
    yield live
    live.stop()


def test_curl_block_runs_end_to_end(server: LiveServer, tmp_path: Path):
    if shutil.which("curl") is None:
        pytest.fail("the README's curl block needs curl (apt-get install curl)")
    script = "set -eu\n" + for_server(readme_block("**curl**", "bash"), server)
    run = subprocess.run(["bash", "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    out = run.stdout
    assert "no request with id" not in out, out  # $ID was set
    answers = json_documents(out)
    assert answers[0]["status"] in ("IN_QUEUE", "IN_PROGRESS", "COMPLETED")  # status
    assert any(a.get("status") == "COMPLETED" and "metrics" in a for a in answers)  # the stream's end
    results = [a for a in answers if "video" in a]
    assert len(results) == 2 and all(r["video"]["url"].startswith(server.base) for r in results), out
    assert {"status": "ALREADY_COMPLETED"} in answers
    assert (tmp_path / "preview.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def json_documents(out: str) -> list[dict]:
    """Every JSON object curl printed (its answers end without a newline; SSE events are `data: {...}`)."""
    decoder, documents, i = json.JSONDecoder(), [], 0
    text = out.replace("data: ", "")
    while (i := text.find("{", i)) >= 0:
        document, i = decoder.raw_decode(text, i)
        documents.append(document)
    return documents


def test_javascript_block_runs_as_an_es_module(server: LiveServer):
    if shutil.which("node") is None:
        pytest.fail("the README's JavaScript block needs node and npm (apt-get install nodejs npm)")
    install_js_client()
    script = JS_DIR / "readme_snippet.mjs"
    script.write_text(for_server(readme_block("**JavaScript**", "js"), server))
    try:
        run = subprocess.run(["node", script.name], cwd=JS_DIR, capture_output=True, text=True, timeout=180)
    finally:
        script.unlink()
    assert run.returncode == 0, run.stderr
    urls = re.findall(rf"{re.escape(server.base)}/files/outputs/\S+/output\.mp4", run.stdout)
    assert len(urls) == 2 and urls[0] != urls[1], run.stdout  # text-to-video, then image-to-video
