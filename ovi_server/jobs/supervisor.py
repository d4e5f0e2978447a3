"""`serve --workers N`: start N `ovi-server worker` processes beside the API, restart any that dies (with
backoff), stop them on shutdown. No torch here: the API process never loads the model.

Workers are separate processes rather than threads so that each GPU gets its own process (one CUDA
context, one model copy), a crash or a SIGKILL takes down one worker and not the API, and the same
`ovi-server worker` command scales the queue to other hosts.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from ovi_server.config import ServerConfig

logger = logging.getLogger(__name__)

RESTART_BACKOFF_S = (1.0, 2.0, 5.0, 10.0, 30.0, 60.0)  # after the n-th quick death in a row
STABLE_AFTER_S = 60.0  # a worker that ran this long before dying is restarted after the first delay again


def visible_cuda_devices() -> int:
    """How many CUDA devices a worker would see; 0 on a host without an NVIDIA driver.

    Asked of a short-lived child with torch (the API process never imports it) and only when a driver
    is present, so a CPU host pays nothing.
    """
    if not (os.path.exists("/dev/nvidiactl") or shutil.which("nvidia-smi")):
        return 0
    probe = [sys.executable, "-c", "import torch; print(torch.cuda.device_count())"]
    try:
        done = subprocess.run(probe, capture_output=True, text=True, timeout=120, check=True)
        return int(done.stdout.strip().splitlines()[-1])
    except (subprocess.SubprocessError, ValueError, IndexError):
        logger.warning("could not count CUDA devices; starting one worker", exc_info=True)
        return 0


def worker_devices(config: ServerConfig, count_cuda: Callable[[], int] = visible_cuda_devices) -> list[str]:
    """The device of each worker `serve` starts: one per visible CUDA device by default (one on a CPU
    host); an explicit --workers N spreads N workers over the devices round-robin."""
    device = config.engine.device
    if device not in ("auto", "cuda"):
        return [device] * (1 if config.workers is None else config.workers)  # cpu or cuda:N: all on it
    gpus = count_cuda()
    if gpus == 0:
        if device == "cuda":
            return ["cuda"] * (1 if config.workers is None else config.workers)  # the worker says why not
        return ["cpu"] * (1 if config.workers is None else config.workers)
    n = gpus if config.workers is None else config.workers
    return [f"cuda:{i % gpus}" for i in range(n)]


@dataclass(frozen=True)
class WorkerSlot:
    """Where one worker runs: its --device, and the GPUs it sees (CUDA_VISIBLE_DEVICES; None: inherited)."""

    device: str
    visible_gpus: str | None = None


def worker_slots(
    config: ServerConfig, count_cuda: Callable[[], int] = visible_cuda_devices
) -> list[WorkerSlot]:
    """One slot per worker. A worker whose requests run on several GPUs (--sp N, --cfg-parallel: rank r
    uses cuda:r) gets its own block of that many GPUs, as CUDA_VISIBLE_DEVICES; by default as many such
    workers as the visible GPUs hold, at least one."""
    engine = config.engine
    world = engine.sp * (2 if engine.cfg_parallel else 1)
    if world == 1:
        return [WorkerSlot(d) for d in worker_devices(config, count_cuda)]
    gpus = count_cuda() if engine.device in ("auto", "cuda") else 0
    n = (max(1, gpus // world) if gpus else 1) if config.workers is None else config.workers
    if gpus == 0:  # the CPU (gloo ranks), or an explicit device: the ranks place themselves
        return [WorkerSlot("cpu" if engine.device == "auto" else engine.device)] * n
    if gpus < world:  # not enough GPUs for one request: the worker says so at start-up (check_spec)
        return [WorkerSlot("cuda")] * n
    listed = os.environ.get("CUDA_VISIBLE_DEVICES")
    ids = [i.strip() for i in listed.split(",")][:gpus] if listed else [str(i) for i in range(gpus)]
    return [WorkerSlot("cuda", ",".join(ids[(w * world + r) % gpus] for r in range(world))) for w in range(n)]


def worker_argv(config: ServerConfig, device: str) -> list[str]:
    """The `ovi-server worker` command line that runs one worker with this server's settings."""
    from dataclasses import replace

    from ovi_server import settings

    queue = config.queue or f"sqlite:///{config.data_dir / 'jobs.sqlite3'}"
    config = replace(config, engine=replace(config.engine, device=device), queue=queue)
    return [sys.executable, "-m", "ovi_server.cli", "worker", *settings.to_argv(config, "worker")]


def _term_with_parent() -> None:
    """In the child, before exec: SIGTERM when the parent dies (Linux prctl PR_SET_PDEATHSIG)."""
    if sys.platform == "linux":
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG


@dataclass
class _Child:
    index: int
    argv: list[str]
    env: dict[str, str]
    proc: subprocess.Popen | None = None
    started: float = 0.0
    quick_deaths: int = 0
    restart_at: float = 0.0
    history: list[int] = field(default_factory=list)  # pids, oldest first


class Supervisor:
    """Keeps one process per argv running until `stop()`."""

    def __init__(
        self,
        argvs: list[list[str]],
        env: dict[str, str] | None = None,
        poll_s: float = 0.2,
        child_env: list[dict[str, str]] | None = None,
    ):
        """`child_env`: per worker, variables on top of `env` (e.g. its CUDA_VISIBLE_DEVICES)."""
        base = dict(os.environ if env is None else env)
        cpu_workers = sum("cpu" in a[a.index("--device") + 1] for a in argvs if "--device" in a)
        if cpu_workers > 1 and "OMP_NUM_THREADS" not in base:
            # Several CPU workers on one host: share the cores instead of each taking all of them.
            base["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // cpu_workers))
        extra = child_env or [{} for _ in argvs]
        self.children = [
            _Child(i, argv, {**base, **more}) for i, (argv, more) in enumerate(zip(argvs, extra, strict=True))
        ]
        self.poll_s = poll_s
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        for child in self.children:
            self._spawn(child)
        self._thread = threading.Thread(target=self._watch, name="supervisor", daemon=True)
        self._thread.start()

    def pids(self) -> list[int]:
        with self._lock:
            return [c.proc.pid for c in self.children if c.proc is not None and c.proc.poll() is None]

    def _spawn(self, child: _Child) -> None:
        # Own session: a Ctrl-C in the terminal reaches the server, which then stops its workers in
        # order. If the server itself dies (SIGKILL, OOM), the kernel sends each worker SIGTERM.
        child.proc = subprocess.Popen(
            child.argv, env=child.env, start_new_session=True, preexec_fn=_term_with_parent
        )
        child.started = time.monotonic()
        child.history.append(child.proc.pid)
        logger.info("worker %d started (pid %d): %s", child.index, child.proc.pid, " ".join(child.argv[3:]))

    def _watch(self) -> None:
        while not self._stop.wait(self.poll_s):
            with self._lock:
                for child in self.children:
                    self._check(child)

    def _check(self, child: _Child) -> None:
        assert child.proc is not None
        now = time.monotonic()
        if child.restart_at:
            if now >= child.restart_at and not self._stop.is_set():
                child.restart_at = 0.0
                self._spawn(child)
            return
        code = child.proc.poll()
        if code is None:
            return
        lived = now - child.started
        child.quick_deaths = 0 if lived >= STABLE_AFTER_S else child.quick_deaths + 1
        delay = RESTART_BACKOFF_S[min(max(child.quick_deaths - 1, 0), len(RESTART_BACKOFF_S) - 1)]
        how = f"signal {-code}" if code < 0 else f"exit code {code}"
        logger.warning(
            "worker %d (pid %d) died (%s) after %.0fs; restarting in %.0fs",
            child.index, child.proc.pid, how, lived, delay,
        )  # fmt: skip
        child.restart_at = now + delay

    def stop(self, timeout: float = 30.0) -> None:
        """SIGTERM every worker (each puts its running job back at its next step), wait, then SIGKILL."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
        procs = [c.proc for c in self.children if c.proc is not None and c.proc.poll() is None]
        for proc in procs:
            proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for proc in procs:
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                logger.warning("worker pid %d did not stop in %.0fs; killing it", proc.pid, timeout)
                proc.kill()
                proc.wait()
        if procs:
            logger.info("stopped %d worker(s)", len(procs))
