"""`open_store(config)`: the `JobStore` a `--queue` URL names. No torch."""

from __future__ import annotations

from urllib.parse import urlparse

from ovi_server.config import ServerConfig
from ovi_server.errors import ConfigError
from ovi_server.jobs.store import JobStore


def open_store(config: ServerConfig) -> JobStore:
    """`sqlite:///PATH` (default: `<data dir>/jobs.sqlite3`) or `redis://[:password@]HOST:PORT/DB`
    (also `rediss://` and `unix:///path/redis.sock?db=0`)."""
    url = config.queue or f"sqlite:///{config.data_dir / 'jobs.sqlite3'}"
    scheme = urlparse(url).scheme
    if scheme == "sqlite":
        from ovi_server.jobs.sqlite import SqliteJobStore

        path = url.removeprefix("sqlite://")
        if not path.startswith("/"):
            raise ConfigError(f"--queue {url!r}: expected sqlite:///ABSOLUTE/PATH (three slashes)")
        return SqliteJobStore(path, lease_s=config.lease_s, max_attempts=config.max_attempts)
    if scheme in ("redis", "rediss", "unix"):
        from ovi_server.jobs.redis import RedisJobStore

        return RedisJobStore(url, lease_s=config.lease_s, max_attempts=config.max_attempts)
    raise ConfigError(f"--queue {url!r}: expected sqlite:///PATH or redis://HOST:PORT/DB")


def is_shared_queue(config: ServerConfig) -> bool:
    """True when the queue can span hosts (Redis), so every host must reach the same files."""
    return urlparse(config.queue or "").scheme in ("redis", "rediss", "unix")
