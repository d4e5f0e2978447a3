"""`ovi-server`: the command line. `serve` runs the fal-compatible HTTP API and supervises its worker
processes; `worker` is one of those processes (start more by hand, on this or other hosts).

Every option has an environment variable (shown in --help); flags win over the environment, which wins
over the defaults. main() uses subparsers so `generate`, `weights`, ... can be added next to `serve`.
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import logging
import signal
import socket
import sys
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

from ovi_server.commands import (
    add_generate_parser,
    add_model_options,
    add_runtime_options,
    add_weights_parser,
    engine_config,
    env_option,
    flag_from_env,
)
from ovi_server.config import ServerConfig, default_data_dir
from ovi_server.log import configure_logging

logger = logging.getLogger("ovi_server.cli")


def add_serve_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "serve",
        help="run the fal-compatible HTTP server and its generation worker",
        description="Serve fal-ai/ovi and fal-ai/ovi/image-to-video over fal's queue API.",
    )
    engine = p.add_argument_group("model")
    add_model_options(engine)
    add_runtime_options(engine)
    add_preview_option(engine)

    net = p.add_argument_group("network")
    env_option(net, "--host", "OVI_HOST", "listen address", "127.0.0.1")
    env_option(net, "--port", "OVI_PORT", "listen port", "8000", type=int)
    env_option(
        net,
        "--public-url",
        "OVI_PUBLIC_URL",
        "origin used in returned URLs (status_url, video.url, ...); default: the address each client "
        "used (Host / X-Forwarded-Proto / X-Forwarded-Host), i.e. the listen address for direct clients",
    )
    env_option(
        net, "--tls-cert", "OVI_TLS_CERT", "PEM certificate: serve HTTPS (fal-client only speaks https)"
    )
    env_option(net, "--tls-key", "OVI_TLS_KEY", "PEM private key for --tls-cert")
    env_option(
        net,
        "--tls-port",
        "OVI_TLS_PORT",
        "with --tls-cert: HTTPS on this port, plain HTTP stays on --port",
        type=int,
    )

    auth = p.add_argument_group("auth")
    env_option(
        auth,
        "--api-keys",
        "OVI_API_KEYS",
        "comma-separated keys, 'id:secret' or bare; clients send 'Key <key>'",
    )
    auth.add_argument(
        "--no-auth",
        action="store_true",
        default=flag_from_env("OVI_NO_AUTH"),
        help="allow running without keys on a non-loopback address [env OVI_NO_AUTH]",
    )

    limits = p.add_argument_group("security limits (README: Security)")
    env_option(
        limits,
        "--allowed-networks",
        "OVI_ALLOWED_NETWORKS",
        "comma-separated CIDR ranges that image_url fetches and webhooks may reach besides public "
        "addresses (e.g. 10.0.0.0/8 for on-prem receivers); default: public addresses only",
        "",
    )
    env_option(limits, "--max-body-bytes", "OVI_MAX_BODY_BYTES", "largest POST body (413 above)", str(32 << 20), type=int)  # fmt: skip
    env_option(limits, "--max-queued-per-key", "OVI_MAX_QUEUED_PER_KEY", "queued + running requests per API key (429 above)", "100", type=int)  # fmt: skip
    env_option(limits, "--fetch-timeout", "OVI_FETCH_TIMEOUT", "seconds to download an image_url at submit, in all", "10", type=float)  # fmt: skip

    add_queue_options(p)
    env_option(
        p.add_argument_group("workers"),
        "--workers",
        "OVI_WORKERS",
        "worker processes to start beside the API: default one per visible CUDA device (one without "
        "CUDA); 0 serves the API alone (start `ovi-server worker` processes yourself)",
        type=int,
    )
    data = p.add_argument_group("retention and webhooks")
    env_option(data, "--retention-hours", "OVI_RETENTION_HOURS", "delete outputs and uploads after", "24", type=float)  # fmt: skip
    env_option(data, "--webhook-retry-base", "OVI_WEBHOOK_RETRY_BASE", "seconds before the first webhook retry (doubles)", "7", type=float)  # fmt: skip
    add_log_options(p)
    p.set_defaults(func=serve)


def add_queue_options(p: argparse.ArgumentParser) -> None:
    """Where jobs and files live (serve and worker)."""
    data = p.add_argument_group("queue and files")
    env_option(
        data, "--data-dir", "OVI_DATA_DIR", "jobs database, files, webhook key (default: the user data dir)"
    )
    env_option(
        data,
        "--queue",
        "OVI_QUEUE",
        "sqlite:///PATH (one host; default: jobs.sqlite3 in the data dir) or redis://HOST:PORT/DB (many hosts)",
    )
    env_option(
        data,
        "--lease-seconds",
        "OVI_LEASE_SECONDS",
        "a running job whose worker has not renewed its lease for this long is queued again",
        "30",
        type=float,
    )
    env_option(
        data,
        "--max-attempts",
        "OVI_MAX_ATTEMPTS",
        "runs of a job whose worker died or froze before it fails (runner_disconnected)",
        "2",
        type=int,
    )
    env_option(data, "--storage", "OVI_STORAGE", "where files live", "local", choices=["local", "s3"])
    env_option(
        data, "--s3-bucket", "OVI_S3_BUCKET", "bucket for --storage s3 (credentials: the usual AWS_* env)"
    )
    env_option(data, "--s3-endpoint-url", "OVI_S3_ENDPOINT_URL", "S3-compatible endpoint (MinIO, R2, ...)")


def add_log_options(p: argparse.ArgumentParser) -> None:
    env_option(p, "--log-level", "OVI_LOG_LEVEL", "debug, info, warning", "info")
    env_option(
        p,
        "--log-format",
        "OVI_LOG_FORMAT",
        "text or json (one object per line)",
        "text",
        choices=["text", "json"],
    )


def add_worker_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "worker",
        help="run one generation worker: load the model once, take jobs from the queue until stopped",
        description="A worker process: claims jobs from --queue, generates, stores the MP4. Start one per "
        "GPU, on any host that reaches the queue and the file storage. SIGTERM stops it cleanly (its "
        "running job goes back to the head of the queue).",
    )
    engine = p.add_argument_group("model")
    add_model_options(engine)
    add_runtime_options(engine)
    add_preview_option(engine)
    add_queue_options(p)
    add_log_options(p)
    p.set_defaults(func=worker)


def add_preview_option(group: argparse._ArgumentGroup) -> None:
    env_option(
        group,
        "--previews",
        "OVI_PREVIEWS",
        "live previews of the video while it denoises: every N steps (and the last), or off",
        "5",
        type=previews_every,
    )


def previews_every(text: str) -> int:
    """--previews: "off" → 0, else a positive number of denoising steps."""
    if text.strip().lower() in ("off", "0", "no", "false"):
        return 0
    if not text.strip().isdigit():
        raise argparse.ArgumentTypeError(f"expected a number of steps or 'off', got {text!r}")
    return int(text)


def build_server_config(args: argparse.Namespace) -> ServerConfig:
    engine = replace(engine_config(args), preview_every=args.previews)
    data_dir = Path(args.data_dir) if args.data_dir else default_data_dir()
    queue_side = {
        "engine": engine,
        "data_dir": data_dir,
        "queue": args.queue or None,
        "lease_s": float(args.lease_seconds),
        "max_attempts": int(args.max_attempts),
        "storage": args.storage,
        "s3_bucket": args.s3_bucket,
        "s3_endpoint_url": args.s3_endpoint_url,
    }
    if args.command == "worker":
        return ServerConfig(**queue_side)
    keys = tuple(k.strip() for k in (args.api_keys or "").split(",") if k.strip())
    return ServerConfig(
        **queue_side,
        host=args.host,
        port=int(args.port),
        public_url=args.public_url.rstrip("/") if args.public_url else None,
        api_keys=keys,
        no_auth=args.no_auth,
        tls_cert=Path(args.tls_cert) if args.tls_cert else None,
        tls_key=Path(args.tls_key) if args.tls_key else None,
        tls_port=int(args.tls_port) if args.tls_port else None,
        output_retention_hours=float(args.retention_hours),
        webhook_retry_base_s=float(args.webhook_retry_base),
        allowed_networks=tuple(str(n) for n in _networks(args.allowed_networks)),
        max_body_bytes=int(args.max_body_bytes),
        max_queued_per_key=int(args.max_queued_per_key),
        fetch_timeout_s=float(args.fetch_timeout),
        workers=None if args.workers in (None, "") else int(args.workers),
    )


def _networks(text: str | None) -> tuple:
    from ovi_server.outbound import parse_networks

    try:
        return parse_networks(text)
    except ValueError as exc:
        raise SystemExit(f"--allowed-networks / OVI_ALLOWED_NETWORKS: {exc}") from None


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return all(ipaddress.ip_address(a[4][0]).is_loopback for a in socket.getaddrinfo(host, None))


def check_auth(config: ServerConfig) -> None:
    from ovi_server.api.auth import KeyRing

    try:
        ids = KeyRing(config.api_keys).ids
    except ValueError as exc:
        raise SystemExit(f"--api-keys / OVI_API_KEYS: {exc}") from None
    if config.api_keys:
        logger.info("auth: %d API key(s): %s", len(ids), ", ".join(ids))
    elif is_loopback(config.host):
        logger.warning(
            "auth: no API keys (OVI_API_KEYS); open to local clients only, listening on %s", config.host
        )
    elif config.no_auth:
        logger.warning("auth: DISABLED on %s (--no-auth): anyone who can reach it can use it", config.host)
    else:
        raise SystemExit(
            f"refusing to listen on {config.host} without API keys: set OVI_API_KEYS=id:secret[,...] "
            "(or --api-keys), listen on 127.0.0.1, or pass --no-auth if a proxy in front authenticates"
        )


def serve(args: argparse.Namespace) -> int:
    import uvicorn

    from ovi_server.api.app import build_app, build_files
    from ovi_server.jobs.backends import open_store
    from ovi_server.jobs.metrics import Metrics
    from ovi_server.jobs.supervisor import Supervisor, worker_argv, worker_slots

    config = build_server_config(args)
    check_auth(config)
    if (config.tls_cert is None) != (config.tls_key is None):
        raise SystemExit("--tls-cert and --tls-key go together")
    for port in (config.port, config.tls_port):
        if port is not None:
            check_port_free(config.host, port)  # before the model loads, which can take minutes
    if config.workers is not None and config.workers < 0:
        raise SystemExit(f"--workers {config.workers}: expected 0 or more")
    logger.info("config %s", config)
    config.data_dir.mkdir(parents=True, exist_ok=True)
    lock = _lock_data_dir(config.data_dir)  # noqa: F841 -- held until the process exits
    store = open_store(config)
    warn_if_files_not_shared(config)
    files = build_files(config)
    slots = worker_slots(config)
    supervisor = Supervisor(
        [worker_argv(config, slot.device, args.log_level, args.log_format) for slot in slots],
        child_env=[
            {"CUDA_VISIBLE_DEVICES": slot.visible_gpus} if slot.visible_gpus else {} for slot in slots
        ],
    )
    where = ", ".join(
        slot.device + (f" (GPUs {slot.visible_gpus})" if slot.visible_gpus else "") for slot in slots
    )
    logger.info("%d worker process(es)%s", len(slots), f" on {where}" if slots else ": API only")
    supervisor.start()
    app = build_app(config, store, files, Metrics(store))

    common = {"log_level": args.log_level.lower(), "timeout_graceful_shutdown": 5}
    tls = (
        {"ssl_certfile": str(config.tls_cert), "ssl_keyfile": str(config.tls_key)} if config.tls_cert else {}
    )
    main_tls = tls if tls and config.tls_port is None else {}
    servers = [uvicorn.Server(uvicorn.Config(app, host=config.host, port=config.port, **main_tls, **common))]
    if tls and config.tls_port is not None:
        # Same app, second listener; the first server runs the lifespan (webhooks, retention) for both.
        extra = uvicorn.Config(app, host=config.host, port=config.tls_port, lifespan="off", **tls, **common)
        servers.append(uvicorn.Server(extra))
    for server in servers:
        scheme = "https" if server.config.ssl_certfile else "http"
        logger.info("listening on %s://%s:%d", scheme, config.host, server.config.port)
    # uvicorn re-raises the SIGTERM/SIGINT it handled once it has shut down; with these handlers in
    # place that re-raise is a no-op, so the workers below are stopped (drained) before the exit.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(
            sig, lambda signum, _frame: logger.info("%s: shutting down", signal.Signals(signum).name)
        )
    try:
        asyncio.run(_serve_all(servers))
    finally:
        supervisor.stop()
        store.close()
    return 0


def check_port_free(host: str, port: int) -> None:
    """One line instead of uvicorn's tracebacks when the address is taken (bound the way uvicorn binds)."""
    family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as exc:
            raise SystemExit(
                f"cannot listen on {host}:{port}: [Errno {exc.errno}] {exc.strerror}; another process has "
                f"it (`ss -ltnp 'sport = :{port}'` shows which): stop it or pick another --port"
            ) from None


def worker(args: argparse.Namespace) -> int:
    """One worker process: SIGTERM/SIGINT stop it cleanly; its running job goes back to the queue."""
    from ovi_server.api.app import build_files
    from ovi_server.jobs.backends import open_store
    from ovi_server.jobs.worker import Worker

    config = build_server_config(args)
    logger.info("worker config %s", config)
    store = open_store(config)
    warn_if_files_not_shared(config)
    from ovi_server.jobs.backends import is_shared_queue

    # Job scratch dirs: in the data dir, where the worker sweeps those of dead processes on this host
    # (by pid); per host when the queue spans hosts and the data dir may be shared between them.
    scratch = config.data_dir / "tmp" / (socket.gethostname() if is_shared_queue(config) else "")
    process = Worker(config.engine, store, build_files(config), tmp_dir=scratch)

    def on_signal(signum: int, _frame: object) -> None:
        logger.info("worker %s: %s, stopping", process.id, signal.Signals(signum).name)
        process.stop()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        process.run_forever()
    finally:
        store.close()
    return 0


def warn_if_files_not_shared(config: ServerConfig) -> None:
    from ovi_server.jobs.backends import is_shared_queue

    if is_shared_queue(config) and config.storage == "local":
        logger.warning(
            "queue %s is shared across hosts but files are local (%s): a video made on another host is "
            "only downloadable if %s is a directory every API and worker host shares (NFS, ...); "
            "otherwise use --storage s3",
            config.queue, config.data_dir / "files", config.data_dir / "files",
        )  # fmt: skip


def _lock_data_dir(data_dir: Path) -> object:
    """One API server per data dir (it owns the webhook sender and the retention sweep); `ovi-server
    worker` processes do not take the lock, so hand-started workers share the dir with it. The lock goes
    away with the process, also on SIGKILL."""
    import fcntl

    handle = open(data_dir / "server.lock", "w")  # noqa: SIM115 -- kept open for the process's life
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise SystemExit(
            f"another ovi-server is using {data_dir}; stop it or give this one its own --data-dir"
        ) from None
    return handle


async def _serve_all(servers: list) -> None:
    tasks = [asyncio.create_task(server.serve()) for server in servers]
    _, pending = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    for server in servers:  # uvicorn's signal handlers reach only one server: stop the others with it
        server.should_exit = True
    await asyncio.gather(*pending)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ovi-server", description="Self-hosted Ovi with fal's API.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add_serve_parser(sub)
    add_worker_parser(sub)
    add_generate_parser(sub)
    add_weights_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    configure_logging(getattr(args, "log_level", "info"), getattr(args, "log_format", "text"))
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
