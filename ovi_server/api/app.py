"""`build_app(config, store)`: the FastAPI app. Shared objects live on `app.state`; no torch here."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware

from ovi_server import __version__
from ovi_server.api import errors, pages, schemas
from ovi_server.api.auth import KeyRing
from ovi_server.api.limits import BodyLimitMiddleware
from ovi_server.api.proxy import FalProxyMiddleware
from ovi_server.api.routes import router
from ovi_server.config import ServerConfig
from ovi_server.jobs.files import FileStore, LocalFiles, S3Files
from ovi_server.jobs.metrics import Metrics
from ovi_server.jobs.store import JobStore
from ovi_server.jobs.webhooks import WebhookSender, WebhookSigner
from ovi_server.outbound import URLPolicy, parse_networks

logger = logging.getLogger(__name__)

RETENTION_SWEEP_S = 600.0
IO_THREADS = 32


def build_files(config: ServerConfig) -> FileStore:
    if config.storage == "s3":
        if not config.s3_bucket:
            raise ValueError("storage 's3' needs a bucket: --s3-bucket or OVI_S3_BUCKET")
        return S3Files(config.s3_bucket, config.s3_prefix, config.s3_endpoint_url)
    return LocalFiles(config.data_dir / "files")


def build_app(
    config: ServerConfig,
    store: JobStore,
    files: FileStore | None = None,
    metrics: Metrics | None = None,
) -> FastAPI:
    """The HTTP API over `store`. `files`/`metrics` default to the config's; pass them to share with a Worker."""
    files = files if files is not None else build_files(config)
    metrics = metrics if metrics is not None else Metrics(store)
    signer = WebhookSigner.load_or_create(config.data_dir / "webhook_ed25519.pem")
    url_policy = URLPolicy(parse_networks(config.allowed_networks))
    sender = WebhookSender(
        store,
        signer,
        schemas.webhook_payload,
        config.webhook_retry_base_s,
        config.webhook_max_retries,
        policy=url_policy,
    )

    io_pool = ThreadPoolExecutor(IO_THREADS, thread_name_prefix="io")

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        sender.start()
        sweeper = asyncio.create_task(_sweep(store, files, config.output_retention_hours * 3600))
        janitor = asyncio.create_task(_requeue_expired(store))
        yield
        sweeper.cancel()
        janitor.cancel()
        sender.stop()
        io_pool.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(
        title="ovi-server",
        version=__version__,
        description="Self-hosted Ovi (text/image → video with audio) behind fal.ai's queue API "
        "(`fal-ai/ovi`, `fal-ai/ovi/image-to-video`).",
        lifespan=lifespan,
        docs_url=None,  # pages.py serves /docs and /redoc from local assets
        redoc_url=None,
    )
    app.state.config = config
    app.state.store = store
    app.state.files = files
    app.state.metrics = metrics
    app.state.signer = signer
    app.state.keys = KeyRing(config.api_keys)
    app.state.url_policy = url_policy
    app.state.io_pool = io_pool  # image downloads and upload bodies (routes._slow_io)
    app.state.fetching = collections.Counter()  # key id → image_url downloads in flight
    errors.install(app)
    app.include_router(router)
    pages.install(app)
    app.add_middleware(BodyLimitMiddleware, max_bytes=config.max_body_bytes)  # sees the proxied path
    app.add_middleware(FalProxyMiddleware)
    # Outermost: answers browser preflights for proxy mode before the proxy looks at them (spec §13).
    app.add_middleware(
        CORSMiddleware,
        allow_origins=["*"],
        allow_methods=["GET", "POST", "PUT", "OPTIONS"],
        allow_headers=["*"],
        expose_headers=["x-fal-request-id", "X-Fal-Error-Type"],
    )
    _document_inputs(app)
    return app


async def _sweep(store: JobStore, files: FileStore, max_age_s: float) -> None:
    """Retention: outputs, uploads and finished job records older than `max_age_s` go, every 10 minutes."""
    while True:
        await asyncio.to_thread(files.delete_older_than, max_age_s)
        forgotten = await asyncio.to_thread(store.delete_finished_before, time.time() - max_age_s)
        if forgotten:
            logger.info(
                "retention: forgot %d finished requests older than %.1f h", forgotten, max_age_s / 3600
            )
        await asyncio.sleep(RETENTION_SWEEP_S)


async def _requeue_expired(store: JobStore) -> None:
    """Put back jobs whose worker stopped renewing its lease, even while every live worker is busy (the
    workers also do it whenever they claim)."""
    while True:
        await asyncio.sleep(max(0.05, store.lease_s / 3))
        try:
            requeued, failed = await asyncio.to_thread(store.requeue_expired)
        except Exception:  # noqa: BLE001 -- a store outage must not end the janitor
            logger.warning("janitor: could not check leases", exc_info=True)
            continue
        if requeued or failed:
            logger.warning(
                "janitor: %d job(s) whose worker stopped queued again, %d failed (out of attempts)",
                len(requeued), len(failed),
            )  # fmt: skip


def _document_inputs(app: FastAPI) -> None:
    """Put the fal input models into the OpenAPI components (routes read raw JSON to enqueue 422s)."""
    default_openapi = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            doc = default_openapi()
            components = doc.setdefault("components", {}).setdefault("schemas", {})
            for model in schemas.INPUT_MODELS.values():
                components[model.__name__] = model.model_json_schema(
                    ref_template="#/components/schemas/{model}"
                )
            app.openapi_schema = doc
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
