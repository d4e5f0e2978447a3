"""Where uploaded inputs and generated MP4s live: a local directory (default) or an S3-compatible bucket.

Files are addressed by an opaque key (`outputs/<job id>/output.mp4`, `uploads/<uuid>/<name>`); the
random part makes the key unguessable, so downloads need no API key (fal's file URLs work the same way).
The API serves local files at `<public base>/files/<key>`; S3 files are redirected to a presigned URL.

Bookkeeping (declared content types, pending upload markers) lives beside the files under names that
start with a dot (`.meta/<key>.json`, `.pending/<key>`): a key's every segment starts with a letter or
digit, so no key can name them, and any file name a user uploads is a valid key. Local files are
written to a hidden temporary name and renamed into place, so a crash never leaves half a file under a
key; retention deletes stale temporaries with everything else.
"""

from __future__ import annotations

import io
import json
import logging
import mimetypes
import os
import re
import shutil
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, BinaryIO, Protocol

logger = logging.getLogger(__name__)

_KEY = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._\-]*(/[A-Za-z0-9][A-Za-z0-9._\-]*)*$")
_PENDING = ".pending"
_META = ".meta"


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

    def read_bytes(self, key: str) -> bytes:
        """The whole file; raises FileNotFoundError. For small inputs (images), not outputs."""
        ...

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
    if not _KEY.match(key) or ".." in key:
        raise FileNotFoundError(f"invalid file key {key[:200]!r}")
    return key


def safe_file_name(name: str | None, content_type: str) -> str:
    name = re.sub(r"[^A-Za-z0-9._\-]", "_", (name or "").rsplit("/", 1)[-1]).lstrip("._-")[:100]
    if not name:
        name = "upload" + (mimetypes.guess_extension(content_type or "") or ".bin")
    return name


class LocalFiles:
    """Files under `root`; `.meta/<key>.json` keeps the declared content type."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    def _path(self, key: str) -> Path:
        return self.root / check_key(key)

    def _meta(self, key: str) -> Path:
        return self.root / _META / f"{check_key(key)}.json"

    def _marker(self, key: str) -> Path:
        return self.root / _PENDING / check_key(key)

    def _write(self, key: str, content_type: str, write: Callable[[IO[bytes]], None]) -> int:
        """`write` fills a hidden temporary file that is renamed to the key's path once complete."""
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
        try:
            with open(tmp, "wb") as out:
                write(out)
            meta = self._meta(key)
            meta.parent.mkdir(parents=True, exist_ok=True)
            meta.write_text(json.dumps({"content_type": content_type}))
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
        return path.stat().st_size

    def put_file(self, key: str, src: Path, content_type: str) -> int:
        def copy(out: IO[bytes]) -> None:
            with open(src, "rb") as inp:
                shutil.copyfileobj(inp, out, 1 << 20)

        return self._write(key, content_type, copy)

    def put_bytes(self, key: str, data: bytes, content_type: str) -> int:
        return self._write(key, content_type, lambda out: out.write(data))

    def reserve_upload(self, file_name: str, content_type: str) -> str:
        key = f"uploads/{uuid.uuid4().hex}/{safe_file_name(file_name, content_type)}"
        marker = self._marker(key)
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.write_text(content_type)
        return key

    def write_upload(self, key: str, stream: BinaryIO | Iterator[bytes], content_type: str | None) -> int:
        marker = self._marker(key)
        if not marker.is_file():  # checked before the first byte of the body is read
            raise FileNotFoundError(
                f"no pending upload at {key!r}: call /storage/upload/initiate first (upload URLs are one-time)"
            )
        declared = marker.read_text()

        def copy(out: IO[bytes]) -> None:
            for chunk in _chunks(stream):
                out.write(chunk)

        size = self._write(key, content_type or declared or "application/octet-stream", copy)
        marker.unlink(missing_ok=True)
        return size

    def read_bytes(self, key: str) -> bytes:
        return self.local_path(key).read_bytes()  # type: ignore[union-attr]

    def local_path(self, key: str) -> Path | None:
        path = self._path(key)
        if not path.is_file():
            raise FileNotFoundError(f"no file {key!r} (outputs are deleted after the retention period)")
        return path

    def remote_url(self, key: str) -> str:
        raise NotImplementedError("local files are served by the API at /files/<key>")

    def content_type(self, key: str) -> str:
        meta = self._meta(key)
        if meta.is_file():
            return json.loads(meta.read_text())["content_type"]
        return mimetypes.guess_type(self._path(key).name)[0] or "application/octet-stream"

    def delete_older_than(self, max_age_s: float) -> int:
        cutoff = time.time() - max_age_s
        deleted = 0
        bookkeeping = (self.root / _META, self.root / _PENDING)
        for path in sorted(self.root.rglob("*"), reverse=True):
            if path.is_file() and path.stat().st_mtime < cutoff:
                path.unlink(missing_ok=True)
                deleted += not (path.name.startswith(".") or any(p in path.parents for p in bookkeeping))
            elif path.is_dir() and path not in bookkeeping and not any(path.iterdir()):
                path.rmdir()
        if deleted:
            logger.info("retention: deleted %d files older than %.1f h", deleted, max_age_s / 3600)
        return deleted


def _chunks(stream: BinaryIO | Iterator[bytes]) -> Iterator[bytes]:
    if hasattr(stream, "read"):
        return iter(lambda: stream.read(1 << 20), b"")  # type: ignore[union-attr]
    return stream  # type: ignore[return-value]


class _IteratorReader(io.RawIOBase):
    """A read-only file over an iterator of chunks (boto3's upload_fileobj streams from it)."""

    def __init__(self, chunks: Iterator[bytes]):
        self._chunks, self._rest, self.size = chunks, b"", 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:  # type: ignore[no-untyped-def]
        while not self._rest:
            chunk = next(self._chunks, None)
            if chunk is None:
                return 0
            self._rest = chunk
        n = min(len(buffer), len(self._rest))
        buffer[:n], self._rest = self._rest[:n], self._rest[n:]
        self.size += n
        return n


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

    def _marker(self, key: str) -> str:
        return f"{self.prefix}{_PENDING}/{check_key(key)}"

    def reserve_upload(self, file_name: str, content_type: str) -> str:
        key = f"uploads/{uuid.uuid4().hex}/{safe_file_name(file_name, content_type)}"
        self.client.put_object(Bucket=self.bucket, Key=self._marker(key), Body=content_type.encode())
        return key

    def write_upload(self, key: str, stream: BinaryIO | Iterator[bytes], content_type: str | None) -> int:
        marker = self._marker(key)
        try:
            declared = self.client.get_object(Bucket=self.bucket, Key=marker)["Body"].read().decode()
        except self.client.exceptions.NoSuchKey as exc:
            raise FileNotFoundError(f"no pending upload at {key!r}") from exc
        reader = _IteratorReader(_chunks(stream))
        content_type = content_type or declared or "application/octet-stream"
        self.client.upload_fileobj(
            reader, self.bucket, self._obj(key), ExtraArgs={"ContentType": content_type}
        )
        self.client.delete_object(Bucket=self.bucket, Key=marker)
        return reader.size

    def read_bytes(self, key: str) -> bytes:
        try:
            return self.client.get_object(Bucket=self.bucket, Key=self._obj(key))["Body"].read()
        except self.client.exceptions.NoSuchKey as exc:
            raise FileNotFoundError(f"no file {key!r}") from exc

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
