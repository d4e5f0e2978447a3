"""Where uploaded inputs and generated MP4s live: a local directory (default) or an S3-compatible bucket.

Files are addressed by an opaque key (`outputs/<job id>/output.mp4`, `uploads/<uuid>/<name>`); the
random part makes the key unguessable, so downloads need no API key (fal's file URLs work the same way).
The API serves local files at `<public base>/files/<key>`; S3 files are redirected to a presigned URL.
"""

from __future__ import annotations

import json
import logging
import mimetypes
import re
import shutil
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO, Protocol

logger = logging.getLogger(__name__)

_KEY = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._\-]*(/[A-Za-z0-9][A-Za-z0-9._\-]*)*$")
_PENDING = ".pending"
_META = ".meta.json"


class FileStore(Protocol):
    def put_file(self, key: str, src: Path, content_type: str) -> int:
        """Copy `src` under `key`; returns the size in bytes."""
        ...

    def reserve_upload(self, file_name: str, content_type: str) -> str:
        """A fresh key that `write_upload` will accept exactly once (the upload_url handshake)."""
        ...

    def write_upload(self, key: str, stream: BinaryIO | Iterator[bytes], content_type: str | None) -> int:
        """Store the body of a PUT to a reserved key. Raises FileNotFoundError if the key was not reserved."""
        ...

    def put_bytes(self, key: str, data: bytes, content_type: str) -> int: ...

    def local_path(self, key: str) -> Path | None:
        """Path of a local file, None if this store is remote. Raises FileNotFoundError if there is no such file."""
        ...

    def remote_url(self, key: str) -> str:
        """A URL the client can fetch directly (remote stores only)."""
        ...

    def content_type(self, key: str) -> str: ...

    def delete_older_than(self, max_age_s: float) -> int:
        """Retention: delete files older than `max_age_s`; returns how many."""
        ...


def check_key(key: str) -> str:
    if not _KEY.match(key) or ".." in key or key.endswith((_PENDING, _META)):
        raise FileNotFoundError(f"invalid file key {key!r}")
    return key


def safe_file_name(name: str | None, content_type: str) -> str:
    name = re.sub(r"[^A-Za-z0-9._\-]", "_", (name or "").rsplit("/", 1)[-1]).lstrip("._-")[:100]
    if not name:
        name = "upload" + (mimetypes.guess_extension(content_type or "") or ".bin")
    return name


class LocalFiles:
    """Files under `root`; a `<key>.meta.json` sidecar keeps the declared content type."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    def _path(self, key: str) -> Path:
        return self.root / check_key(key)

    def _write_meta(self, path: Path, content_type: str) -> None:
        path.with_name(path.name + _META).write_text(json.dumps({"content_type": content_type}))

    def put_file(self, key: str, src: Path, content_type: str) -> int:
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, path)
        self._write_meta(path, content_type)
        return path.stat().st_size

    def put_bytes(self, key: str, data: bytes, content_type: str) -> int:
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        self._write_meta(path, content_type)
        return len(data)

    def reserve_upload(self, file_name: str, content_type: str) -> str:
        key = f"uploads/{uuid.uuid4().hex}/{safe_file_name(file_name, content_type)}"
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.with_name(path.name + _PENDING).write_text(content_type)
        return key

    def write_upload(self, key: str, stream: BinaryIO | Iterator[bytes], content_type: str | None) -> int:
        path = self._path(key)
        marker = path.with_name(path.name + _PENDING)
        if not marker.exists():
            raise FileNotFoundError(
                f"no pending upload at {key!r}: call /storage/upload/initiate first (upload URLs are one-time)"
            )
        declared = marker.read_text()
        size = 0
        with open(path, "wb") as out:
            chunks = iter(lambda: stream.read(1 << 20), b"") if hasattr(stream, "read") else stream
            for chunk in chunks:
                out.write(chunk)
                size += len(chunk)
        self._write_meta(path, content_type or declared or "application/octet-stream")
        marker.unlink()
        return size

    def local_path(self, key: str) -> Path | None:
        path = self._path(key)
        if not path.is_file():
            raise FileNotFoundError(f"no file {key!r} (outputs are deleted after the retention period)")
        return path

    def remote_url(self, key: str) -> str:
        raise NotImplementedError("local files are served by the API at /files/<key>")

    def content_type(self, key: str) -> str:
        path = self._path(key)
        meta = path.with_name(path.name + _META)
        if meta.is_file():
            return json.loads(meta.read_text())["content_type"]
        return mimetypes.guess_type(path.name)[0] or "application/octet-stream"

    def delete_older_than(self, max_age_s: float) -> int:
        cutoff = time.time() - max_age_s
        deleted = 0
        for path in sorted(self.root.rglob("*"), reverse=True):
            if path.is_file() and path.stat().st_mtime < cutoff:
                path.unlink(missing_ok=True)
                deleted += not path.name.endswith((_META, _PENDING))
            elif path.is_dir() and not any(path.iterdir()):
                path.rmdir()
        if deleted:
            logger.info("retention: deleted %d files older than %.1f h", deleted, max_age_s / 3600)
        return deleted


class S3Files:
    """The same interface on an S3-compatible bucket (extra `[s3]`: boto3). Downloads are presigned."""

    def __init__(self, bucket: str, prefix: str = "ovi/", endpoint_url: str | None = None):
        import boto3  # optional dependency: pip install 'ovi-server[s3]'

        self.bucket, self.prefix = bucket, prefix
        self.client = boto3.client("s3", endpoint_url=endpoint_url)

    def _obj(self, key: str) -> str:
        return self.prefix + check_key(key)

    def put_file(self, key: str, src: Path, content_type: str) -> int:
        self.client.upload_file(
            str(src), self.bucket, self._obj(key), ExtraArgs={"ContentType": content_type}
        )
        return Path(src).stat().st_size

    def put_bytes(self, key: str, data: bytes, content_type: str) -> int:
        self.client.put_object(Bucket=self.bucket, Key=self._obj(key), Body=data, ContentType=content_type)
        return len(data)

    def reserve_upload(self, file_name: str, content_type: str) -> str:
        key = f"uploads/{uuid.uuid4().hex}/{safe_file_name(file_name, content_type)}"
        self.client.put_object(Bucket=self.bucket, Key=self._obj(key) + _PENDING, Body=content_type.encode())
        return key

    def write_upload(self, key: str, stream: BinaryIO | Iterator[bytes], content_type: str | None) -> int:
        marker = self._obj(key) + _PENDING
        try:
            declared = self.client.get_object(Bucket=self.bucket, Key=marker)["Body"].read().decode()
        except self.client.exceptions.NoSuchKey as exc:
            raise FileNotFoundError(f"no pending upload at {key!r}") from exc
        data = stream.read() if hasattr(stream, "read") else b"".join(stream)
        self.put_bytes(key, data, content_type or declared or "application/octet-stream")
        self.client.delete_object(Bucket=self.bucket, Key=marker)
        return len(data)

    def local_path(self, key: str) -> Path | None:
        return None

    def remote_url(self, key: str) -> str:
        return self.client.generate_presigned_url(
            "get_object", Params={"Bucket": self.bucket, "Key": self._obj(key)}, ExpiresIn=3600
        )

    def content_type(self, key: str) -> str:
        return self.client.head_object(Bucket=self.bucket, Key=self._obj(key))["ContentType"]

    def delete_older_than(self, max_age_s: float) -> int:
        # Buckets do this better with a lifecycle rule; this keeps the one retention setting meaningful.
        cutoff = time.time() - max_age_s
        deleted = 0
        for page in self.client.get_paginator("list_objects_v2").paginate(
            Bucket=self.bucket, Prefix=self.prefix
        ):
            for obj in page.get("Contents", []):
                if obj["LastModified"].timestamp() < cutoff:
                    self.client.delete_object(Bucket=self.bucket, Key=obj["Key"])
                    deleted += 1
        return deleted
