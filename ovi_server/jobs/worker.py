"""The generation worker: claims one job at a time from the store, runs the engine, stores the MP4.

The only module that imports the engine. It loads the pipeline once, turns `Progress` events into
throttled log lines ("denoise 12/30") and live previews ("preview 10/30", the PNG in the store), checks
for cancellation between steps, and finishes the job it claimed: success, invalid input (422),
cancelled, or failed with a message that says what to do; or, on a clean stop, puts it back in the
queue. A parallel pipeline whose ranks failed ends the worker (exit code 1) after failing that job; the
supervisor restarts it with fresh ranks. `ovi-server worker` (cli.py) runs one per process.
"""

from __future__ import annotations

import base64
import hashlib
import logging
import os
import re
import shutil
import socket
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Protocol

from ovi_server.config import EngineConfig
from ovi_server.errors import Cancelled, InvalidInput
from ovi_server.jobs.files import FileStore
from ovi_server.jobs.store import (
    CANCELLED,
    FailureKind,
    FieldError,
    Job,
    JobFailure,
    JobResult,
    JobStore,
    LeaseLost,
    WorkerInfo,
    WorkerState,
)
from ovi_server.request import MAX_RANDOM_SEED, Clip, GenerationRequest, Progress, ProgressCallback

logger = logging.getLogger(__name__)

LOG_EVERY_S = 1.0  # at most one "denoise i/n" line per second per job (the last step is always written)


class _ShuttingDown(Exception):
    """Raised from the progress callback when the worker stops: the job goes back to the queue."""


class _LeaseGone(Exception):
    """Raised from the progress callback when the heartbeat found the job's lease taken: stop, store nothing."""


class Pipeline(Protocol):
    def generate(self, request: GenerationRequest, out_path: Path, on_progress: ProgressCallback) -> Clip: ...


def load_pipeline(config: EngineConfig) -> Pipeline:
    from ovi_server.engine.pipeline import OviPipeline  # imports torch: only here, only in the worker

    return OviPipeline.from_config(config)


class Worker:
    """Runs jobs from `store` one at a time: `run_forever()` in a worker process (`ovi-server worker`), or
    `start()` in a thread (tests).

    While it runs, a heartbeat thread renews the current job's lease every `lease_s / 3` and reports the
    worker's state (GET /health). A worker that finds its lease gone (it was frozen past the lease and the
    job went to another worker) stops that job and stores nothing.
    """

    def __init__(
        self,
        config: EngineConfig,
        store: JobStore,
        files: FileStore,
        pipeline: Pipeline | None = None,
        poll_s: float = 1.0,
        device: str | None = None,
        retry_delays: tuple[float, ...] = (0.5, 2.0, 5.0),
        tmp_dir: Path | None = None,
    ):
        self.config, self.store, self.files = config, store, files
        self.pipeline = pipeline
        self.poll_s = poll_s  # longest wait in one claim_next; also how soon a stop is seen when idle
        self.retry_delays = retry_delays  # between tries of storing a finished job's result
        host, pid = socket.gethostname(), os.getpid()
        self.id = f"{host}-{pid}-{uuid.uuid4().hex[:6]}"
        self._info = WorkerInfo(
            self.id, host, pid, device or config.device, WorkerState.LOADING, started_at=time.time()
        )
        self.stats: dict[str, float] = {}
        self.exit_code = 0  # what `ovi-server worker` exits with: 1 when its pipeline broke
        # Where each job's scratch directory goes (`serve`: <data dir>/tmp); there, those left by dead
        # processes are swept at start-up. The system temp dir (the default) is not swept: not ours alone.
        self.tmp_dir = Path(tmp_dir) if tmp_dir is not None else Path(tempfile.gettempdir())
        if tmp_dir is not None:
            self.tmp_dir.mkdir(parents=True, exist_ok=True)
            sweep_scratch(self.tmp_dir)
        self.ready = threading.Event()
        self._stop = threading.Event()
        self._lease_gone = threading.Event()
        self._current: Job | None = None
        self._thread: threading.Thread | None = None
        self._heart: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self.run_forever, name="worker", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Stop taking jobs; a running job goes back to the queue at its next step, uncounted."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def run_forever(self) -> None:
        self._heart = threading.Thread(target=self._heartbeats, name="heartbeat", daemon=True)
        self._heart.start()
        try:
            self._beat()  # listed as "loading" from the start, not only after the first interval
            if self.pipeline is None:
                started = time.perf_counter()
                logger.info(
                    "worker %s loading pipeline variant=%s weights=%s device=%s",
                    self.id, self.config.variant, self.config.weights_dir, self._info.device,
                )  # fmt: skip
                self.pipeline = load_pipeline(self.config)
                logger.info("worker %s ready in %.1fs", self.id, time.perf_counter() - started)
            self._set_state(WorkerState.IDLE)
            self.ready.set()
            while not self._stop.is_set():
                # A parallel pipeline whose ranks failed takes no more jobs (its job failed, saying why).
                # Exiting loses nothing: the supervisor restarts this worker with fresh ranks.
                broken = getattr(self.pipeline, "broken", None)
                if broken is not None:
                    logger.error("worker %s exits to restart its parallel ranks: %s", self.id, broken)
                    self.exit_code = 1
                    break
                try:
                    self.run_once(self.poll_s)
                except Exception:  # noqa: BLE001 -- e.g. the store is briefly unreachable: keep serving
                    logger.exception("worker %s: error outside a generation; going on", self.id)
                    self._stop.wait(1.0)
        finally:
            self._stop.set()
            if self._heart is not None:
                self._heart.join(5)
            try:
                self.store.remove_worker(self.id)
            except Exception:  # noqa: BLE001 -- best effort: /health forgets silent workers anyway
                logger.warning("worker %s: could not remove itself from the store", self.id)
            close = getattr(self.pipeline, "close", None)  # a parallel pipeline lets its other ranks exit
            if close is not None:
                close()
            logger.info("worker %s stopped", self.id)

    def run_once(self, block_s: float = 0.0) -> bool:
        """Claim and run one job, waiting up to `block_s` for one; False when there was none."""
        job = self.store.claim_next(self.id, block_s)
        if job is None:
            return False
        self.run_job(job)
        return True

    # -- heartbeat ----------------------------------------------------------------------------------

    def _set_state(self, state: WorkerState, job: Job | None = None) -> None:
        self._current = job
        self._info = replace(self._info, state=state, job=job.id if job else None)
        self._beat()

    def _beat(self) -> None:
        job = self._current
        if job is not None and job.lease is not None and not self.store.renew(job.id, job.lease):
            if not self._lease_gone.is_set():
                logger.warning(
                    "worker %s lost the lease on job %s; it will stop and store nothing", self.id, job.id
                )
            self._lease_gone.set()
        self._info = replace(self._info, last_heartbeat=time.time(), stats=dict(self.stats))
        self.store.heartbeat(self._info)

    def _heartbeats(self) -> None:
        interval = max(0.05, self.store.lease_s / 3)
        while not self._stop.wait(interval):
            try:
                self._beat()
            except Exception:  # noqa: BLE001 -- a store outage must not kill the heartbeat
                logger.warning("worker %s: heartbeat failed; retrying", self.id, exc_info=True)

    def _count(self, name: str, amount: float = 1.0) -> None:
        self.stats[name] = self.stats.get(name, 0.0) + amount

    # -- one job ------------------------------------------------------------------------------------

    def run_job(self, job: Job) -> None:
        self._lease_gone.clear()
        self._set_state(WorkerState.BUSY, job)
        try:
            self._run_job(job)
        finally:
            self._set_state(WorkerState.IDLE)

    def _run_job(self, job: Job) -> None:
        assert self.pipeline is not None and job.request is not None
        request = job.request
        if request.seed is None:
            request = replace(request, seed=random_seed(job.id))
        w, h = request.size or (0, 0)
        logger.info(
            "job %s started worker=%s variant=%s size=%dx%d steps=%s seed=%d attempt=%d",
            job.id, self.id, self.config.variant, w, h, request.steps, request.seed, job.attempts,
        )  # fmt: skip
        logger.debug("job %s prompt=%r", job.id, request.prompt)
        asked = "size of the image" if request.image else f"{w}x{h} requested"
        steps = "default" if request.steps is None else request.steps
        where = f"{self._info.host} ({self._info.device})"
        self.store.append_log(job.id, f"started on {where}: {asked}, {steps} steps, seed {request.seed}")
        started = time.perf_counter()
        failure: JobFailure | None = None
        with tempfile.TemporaryDirectory(
            prefix=f"{SCRATCH_PREFIX}{os.getpid()}-{job.id}-", dir=self.tmp_dir
        ) as tmp:
            try:
                request = replace(request, image=self._local_image(job, request.image))
                clip = self.pipeline.generate(request, Path(tmp) / "output.mp4", self._progress(job))
            except _ShuttingDown:
                self.store.release(job.id, job.lease)
                self.store.append_log(job.id, "worker shutting down; queued again", "WARN")
                logger.info("job %s put back in the queue: worker %s shutting down", job.id, self.id)
                return
            except _LeaseGone:
                logger.warning(
                    "job %s stopped on worker %s: its lease went to another worker", job.id, self.id
                )
                return
            except Cancelled:
                failure = CANCELLED
            except InvalidInput as exc:
                failure = JobFailure(
                    FailureKind.INVALID_INPUT, str(exc), (FieldError(("body", exc.field), exc.msg, exc.kind),)
                )
            except Exception as exc:  # noqa: BLE001 -- any crash fails this job, never the worker
                failure = _infrastructure_failure(exc, request)
                logger.exception("job %s failed", job.id)
            seconds = time.perf_counter() - started
            if failure is None:
                stored = self._store_outcome(job, lambda: self._store_clip(job, clip, seconds))
            else:
                stored = self._store_outcome(job, lambda: self.store.fail(job.id, failure, job.lease))
        if not stored:
            return
        outcome = "succeeded" if failure is None else failure.kind.value
        self._count(f"jobs_{outcome}")
        self._count("inference_seconds", seconds)
        if failure is None:
            timings = ", ".join(f"{k} {v:.1f}s" for k, v in clip.timings.items())
            made = f"{clip.width}x{clip.height}, {clip.num_frames} frames"
            self.store.append_log(job.id, f"done in {seconds:.1f}s: {made} ({timings})")
            logger.info("job %s done in %.1fs: %s (%s)", job.id, seconds, made, timings)
        else:
            level = "WARN" if failure.kind in (FailureKind.CANCELLED, FailureKind.INVALID_INPUT) else "ERROR"
            self.store.append_log(job.id, failure.message, level)
            logger.info(
                "job %s ended %s after %.1fs: %s", job.id, failure.kind.value, seconds, failure.message
            )

    def _store_clip(self, job: Job, clip: Clip, seconds: float) -> None:
        if self._lease_gone.is_set():
            raise LeaseLost(job.id)
        # One key per attempt: a worker that lost its lease can never overwrite the winner's file.
        key = f"outputs/{job.id}/{job.attempts}/output.mp4"
        size = self.files.put_file(key, clip.path, "video/mp4")
        self.store.succeed(job.id, JobResult(key, size, clip.seed, seconds), job.lease)

    def _store_outcome(self, job: Job, store: Callable[[], object]) -> bool:
        """Store a finished job's outcome, retrying; if that keeps failing, put the job back in the queue
        (counting the attempt) so that it never stays RUNNING. False when nothing was stored."""
        for attempt, delay in enumerate((*self.retry_delays, None), start=1):
            try:
                store()
                return True
            except LeaseLost:
                logger.warning(
                    "job %s finished on worker %s after losing its lease: result discarded", job.id, self.id
                )
                return False
            except Exception:  # noqa: BLE001 -- storage or queue briefly unreachable
                if delay is None:
                    logger.exception("job %s: storing the outcome failed %d times", job.id, attempt)
                    break
                logger.warning(
                    "job %s: storing the outcome failed (try %d); retrying in %.1fs",
                    job.id,
                    attempt,
                    delay,
                    exc_info=True,
                )
                time.sleep(delay)
        try:
            self.store.release(job.id, job.lease, count_attempt=True)
            self.store.append_log(job.id, "the worker could not store the result; queued again", "WARN")
            logger.warning("job %s put back in the queue: its outcome could not be stored", job.id)
        except Exception:  # noqa: BLE001 -- the store itself is down: the lease runs out instead
            logger.exception(
                "job %s: could not put it back either; its lease expires in %.0fs and it is queued again",
                job.id, self.store.lease_s,
            )  # fmt: skip
        return False

    def _local_image(self, job: Job, image: str | None) -> str | None:
        """Our own file URLs (uploads, and images the API fetched at submit) → a data: URI of the stored
        file: the worker never fetches over the network (the API did, under the outbound URL policy)."""
        prefix = f"{job.base_url}/files/"
        if image is None or not job.base_url or not image.startswith(prefix):
            return image
        key = image[len(prefix) :]
        try:
            data = base64.b64encode(self.files.read_bytes(key)).decode()
        except FileNotFoundError as exc:
            raise InvalidInput(
                "image", "the uploaded image no longer exists (uploads expire); upload it again"
            ) from exc
        return f"data:{self.files.content_type(key)};base64,{data}"

    def _progress(self, job: Job) -> ProgressCallback:
        last_log = 0.0
        last_step = time.perf_counter()

        def on_progress(progress: Progress) -> None:
            nonlocal last_log, last_step
            now = time.perf_counter()
            if progress.stage == "denoise" and progress.done > 0:
                self._count("denoise_steps")
                self._count("denoise_seconds", now - last_step)
            last_step = now
            if self._stop.is_set():
                raise _ShuttingDown(job.id)
            if self._lease_gone.is_set():
                raise _LeaseGone(job.id)
            if self.store.get(job.id).cancel_requested:
                raise Cancelled(f"job {job.id} cancelled")
            if progress.done == progress.total or progress.done == 0 or now - last_log >= LOG_EVERY_S:
                self.store.append_log(job.id, f"{progress.stage} {progress.done}/{progress.total}")
                last_log = now
            if self._wants_preview(progress):
                assert progress.preview is not None
                self.store.put_preview(job.id, progress.preview())
                self.store.append_log(job.id, f"preview {progress.done}/{progress.total}")

        return on_progress

    def _wants_preview(self, progress: Progress) -> bool:
        """Every `preview_every` denoising steps, and at the last one (so short runs get one too)."""
        every = self.config.preview_every
        if every <= 0 or progress.preview is None or progress.done == 0:
            return False
        return progress.done % every == 0 or progress.done == progress.total


SCRATCH_PREFIX = "ovi-"
_SCRATCH = re.compile(rf"{SCRATCH_PREFIX}(\d+)-")


def sweep_scratch(tmp_dir: Path) -> int:
    """Delete job scratch directories left by processes that died (SIGKILL, OOM); returns how many.
    A directory's name carries its process id, so live workers sharing `tmp_dir` keep theirs."""
    swept = 0
    for path in tmp_dir.glob(f"{SCRATCH_PREFIX}*"):
        match = _SCRATCH.match(path.name)
        if match is None or not path.is_dir() or _alive(int(match.group(1))):
            continue
        shutil.rmtree(path, ignore_errors=True)
        swept += 1
    if swept:
        logger.info("removed %d scratch directories left by stopped processes in %s", swept, tmp_dir)
    return swept


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    try:  # a killed worker stays a zombie until someone reaps it (its server may be dead too): not alive
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def random_seed(job_id: str) -> int:
    """The seed for a request without one: random (job ids are UUID4s), but the same if the job is re-run
    after a crash, so the re-run produces the video the first run would have."""
    return int.from_bytes(hashlib.sha256(job_id.encode()).digest()[:8], "big") & MAX_RANDOM_SEED


def _infrastructure_failure(exc: Exception, request: GenerationRequest) -> JobFailure:
    w, h = request.size or (0, 0)
    # torch.OutOfMemoryError, without importing torch here; on any rank of a parallel group (RankFailed)
    if getattr(exc, "error_type", type(exc).__name__) == "OutOfMemoryError":
        rank = getattr(exc, "rank", None)
        where = "" if rank is None else f" on parallel rank {rank}"
        return JobFailure(
            FailureKind.OUT_OF_MEMORY,
            f"out of accelerator memory{where} generating {w}x{h} with {request.steps} steps; retry with a "
            "smaller resolution, or restart the server with --offload model (or block) or --fp8",
        )
    return JobFailure(
        FailureKind.INTERNAL,
        f"generation failed: {type(exc).__name__}: {exc}; the server log has the traceback. "
        "Retry once; if it fails again, report it with the request id.",
    )
