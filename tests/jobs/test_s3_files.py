"""S3Files against moto's S3 server on 127.0.0.1 (extra `[s3]` + moto; skipped without them)."""

from __future__ import annotations

import socket
from collections.abc import Iterator

import httpx
import pytest

pytest.importorskip("boto3")
moto_server = pytest.importorskip("moto.server")

from ovi_server.jobs.files import S3Files  # noqa: E402


@pytest.fixture(scope="module")
def endpoint() -> Iterator[str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    yield f"http://127.0.0.1:{port}"
    server.stop()


@pytest.fixture
def files(endpoint: str, monkeypatch: pytest.MonkeyPatch) -> S3Files:
    for name, value in {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
    }.items():
        monkeypatch.setenv(name, value)
    store = S3Files("ovi-test", prefix="ovi/", endpoint_url=endpoint)
    store.client.create_bucket(Bucket="ovi-test")
    return store


def test_outputs_and_presigned_downloads(files: S3Files, tmp_path):
    src = tmp_path / "output.mp4"
    src.write_bytes(b"mp4 bytes")
    assert files.put_file("outputs/job/output.mp4", src, "video/mp4") == 9
    assert files.local_path("outputs/job/output.mp4") is None
    response = httpx.get(files.remote_url("outputs/job/output.mp4"))
    assert response.status_code == 200 and response.content == b"mp4 bytes"
    assert files.content_type("outputs/job/output.mp4") == "video/mp4"


def test_uploads_are_one_time(files: S3Files):
    key = files.reserve_upload("frame.png", "image/png")
    assert files.write_upload(key, iter([b"png", b"!"]), None) == 4
    assert files.content_type(key) == "image/png"
    with pytest.raises(FileNotFoundError):
        files.write_upload(key, iter([b"again"]), None)


def test_retention(files: S3Files):
    files.put_bytes("outputs/old/output.mp4", b"x", "video/mp4")
    assert files.delete_older_than(3600) == 0
    assert files.delete_older_than(-1) >= 1
    listed = files.client.list_objects_v2(Bucket="ovi-test", Prefix="ovi/outputs/old/")
    assert listed.get("KeyCount", 0) == 0


def test_uploads_stream_and_any_file_name_works(files: S3Files):
    key = files.reserve_upload("frame.pending", "image/png")  # a name the bookkeeping once reserved
    assert key.endswith("/frame.pending")
    assert files.write_upload(key, iter([b"a" * (3 << 20), b"b" * 5]), None) == (3 << 20) + 5
    assert files.read_bytes(key) == b"a" * (3 << 20) + b"b" * 5
    with pytest.raises(FileNotFoundError):
        files.read_bytes("uploads/none/x.png")
