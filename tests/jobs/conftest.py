"""The job stores under test: SQLite in a temp dir, and Redis on a redis-server the tests start."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from clients.redis_server import RedisServer

from ovi_server.jobs.redis import RedisJobStore
from ovi_server.jobs.sqlite import SqliteJobStore
from ovi_server.jobs.store import JobStore

# opens a store on the test's backend; calling it again opens a second client on the same data
StoreFactory = Callable[..., JobStore]


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    yield server
    server.stop()


@pytest.fixture(params=["sqlite", "redis"])
def open_store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[StoreFactory]:
    opened: list[JobStore] = []
    if request.param == "sqlite":

        def factory(**kw) -> JobStore:
            opened.append(SqliteJobStore(tmp_path / "jobs.sqlite3", **kw))
            return opened[-1]

    else:
        server = request.getfixturevalue("redis_server")
        prefix = f"test-{uuid.uuid4().hex[:8]}"  # each test its own keys on the shared server

        def factory(**kw) -> JobStore:
            opened.append(RedisJobStore(server.url, prefix=prefix, **kw))
            return opened[-1]

    yield factory
    for store in opened:
        store.close()


@pytest.fixture
def store(open_store: StoreFactory) -> JobStore:
    return open_store()
