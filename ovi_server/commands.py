"""What each `ovi-server` command does, given its settings (config.ServerConfig, built by settings.py)
and its parsed arguments; cli.py declares the commands and their flags.

  serve      the API process: checks, the job store, worker processes, uvicorn
  worker     one worker process: the job store, the engine, until SIGTERM
  generate   prompt (+ image) → MP4 on this machine, with progress bars
  weights    check | download the official checkpoint files
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import dataclasses
import ipaddress
import logging
import mimetypes
import signal
import socket
import sys
import time
from pathlib import Path

from ovi_server.config import ServerConfig
from ovi_server.shapes import parse_size

logger = logging.getLogger("ovi_server.cli")


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


def serve(config: ServerConfig, args: argparse.Namespace) -> int:
    """The HTTP API and its worker processes (SIGTERM/SIGINT drain them)."""
    import uvicorn

    from ovi_server.api.app import build_app, build_files
    from ovi_server.jobs.backends import open_store
    from ovi_server.jobs.metrics import Metrics
    from ovi_server.jobs.supervisor import Supervisor, worker_argv, worker_slots

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
        [worker_argv(config, slot.device) for slot in slots],
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

    common = {"log_level": config.log.level.lower(), "timeout_graceful_shutdown": 5}
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


def worker(config: ServerConfig, args: argparse.Namespace) -> int:
    """One worker process: SIGTERM/SIGINT stop it cleanly; its running job goes back to the queue."""
    from ovi_server.api.app import build_files
    from ovi_server.jobs.backends import open_store
    from ovi_server.jobs.worker import Worker

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
    return process.exit_code


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


def image_source(value: str) -> str:
    """URLs and data URIs pass through; a local file becomes a data URI (the pipeline never opens paths)."""
    if value.startswith(("http://", "https://", "data:")):
        return value
    from PIL import Image, UnidentifiedImageError

    from ovi_server.errors import InvalidInput

    path = Path(value).expanduser()
    if not path.is_file():
        raise InvalidInput("--image", f"{value}: no such file")
    try:
        with Image.open(path) as image:
            image.verify()  # the header and structure; the pipeline decodes it fully later
    except (UnidentifiedImageError, OSError, SyntaxError) as exc:
        raise InvalidInput(
            "--image", f"{value}: not an image we can read ({exc}); use PNG, JPEG or WebP"
        ) from None
    mime = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
    return f"data:{mime};base64,{base64.b64encode(path.read_bytes()).decode()}"


def generate(config: ServerConfig, args: argparse.Namespace) -> int:
    from ovi_server.config import load_variant
    from ovi_server.errors import OviError
    from ovi_server.request import GenerationRequest, Progress, check_request

    started = time.monotonic()
    engine = config.engine
    try:
        size = parse_size(args.resolution, "--resolution")
        image = image_source(args.image) if args.image else None
    except OviError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    request = GenerationRequest(
        prompt=args.prompt,
        image=image,
        size=size,
        steps=args.steps,
        seed=args.seed,
        solver=args.solver,
        video_guidance_scale=args.video_guidance,
        audio_guidance_scale=args.audio_guidance,
        video_negative_prompt=args.negative_prompt,
        audio_negative_prompt=args.audio_negative_prompt,
    )
    if engine.compile == "auto":
        # one clip: the start-up compile (22 s on an H200) costs more than it saves (0.18 s per step,
        # about 5 s over 30 steps; benchmarks/RESULTS.md). --compile on still compiles.
        engine = dataclasses.replace(engine, compile="off")
    try:  # before anything heavy is imported or loaded: a typo costs milliseconds
        check_request(load_variant(engine.variant), request)
    except OviError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2

    from tqdm import tqdm

    from ovi_server.engine.pipeline import OviPipeline

    bars: dict[str, tqdm] = {}

    def on_progress(event: Progress) -> None:
        bar = bars.get(event.stage)
        if bar is None:
            bar = bars[event.stage] = tqdm(
                total=event.total,
                desc=f"{event.stage:<12}",
                unit="step" if event.stage == "denoise" else "it",
                leave=True,
                file=sys.stderr,
            )
        bar.update(event.done - bar.n)
        if event.done >= event.total:
            bar.close()

    try:
        print(f"loading {engine.variant} ...", file=sys.stderr)
        pipeline = OviPipeline.from_config(engine)
        try:
            clip = pipeline.generate(request, Path(args.output), on_progress)
        finally:
            pipeline.close()
    except OviError as exc:
        for bar in bars.values():
            bar.close()
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(
        f"wrote {clip.path}  seed={clip.seed}  {clip.width}x{clip.height}  {clip.num_frames} frames "
        f"{clip.duration_s:.2f}s @ {clip.fps} fps  in {time.monotonic() - started:.1f}s"
    )
    return 0


def weights_check(config: ServerConfig, args: argparse.Namespace) -> int:
    from ovi_server import weights
    from ovi_server.config import load_variant
    from ovi_server.errors import OviError

    try:
        cfg = load_variant(config.engine.variant)
        reports = weights.check(config.engine.weights_dir, cfg, fp8=config.engine.fp8)
    except OviError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"{cfg.name}: {config.engine.weights_dir.resolve()}")
    for report in reports:
        print("  " + report.line())
    bad = [r for r in reports if not r.present or r.keys_ok is False]
    print(f"{len(reports) - len(bad)} ok, {len(bad)} missing or bad")
    if any(r.present for r in bad):
        print(f"fix: delete the BAD files above, then run: {fix_command(config)}")
    elif bad:
        print(f"fix: {fix_command(config)}")
    return 1 if bad else 0


def fix_command(config: ServerConfig) -> str:
    """The `weights download` command for the same variant and directory (it skips files already there)."""
    import shlex

    engine = config.engine
    fp8 = " --fp8" if engine.fp8 else ""
    return f"ovi-server weights download --variant {shlex.quote(engine.variant)} --weights {shlex.quote(str(engine.weights_dir))}{fp8}"


def weights_download(config: ServerConfig, args: argparse.Namespace) -> int:
    from ovi_server import weights
    from ovi_server.config import load_variant
    from ovi_server.errors import OviError

    try:
        paths = weights.download(
            config.engine.weights_dir, load_variant(config.engine.variant), fp8=config.engine.fp8
        )
    except OviError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for path in paths:
        print(path)
    return 0
