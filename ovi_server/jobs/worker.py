"""The generation worker: claims one job at a time from the store, runs the engine, stores the MP4.

The only module that imports the engine. It loads the pipeline once, turns `Progress` events into
throttled log lines ("denoise 12/30") and live previews ("preview 10/30", the PNG in the store), checks
for cancellation between steps, and always finishes the job
it claimed: success, invalid input (422), cancelled, or failed with a message that says what to do.
"""

from __future__ import annotations

import base64
import hashlib
import logging
import os
import re
import shutil
import tempfile
import threading
import time
from dataclasses import replace
from pathlib import Path
from typing import Protocol

from ovi_server.config import EngineConfig
from ovi_server.engine.request import MAX_RANDOM_SEED, Clip, GenerationRequest, Progress, ProgressCallback
from ovi_server.errors import Cancelled, InvalidInput
from ovi_server.jobs.files import FileStore
from ovi_server.jobs.metrics import Metrics
from ovi_server.jobs.store import FailureKind, FieldError, Job, JobFailure, JobResult, JobStore

logger = logging.getLogger(__name__)

LOG_EVERY_S = 1.0  # at most one "denoise i/n" line per second per job (the last step is always written)


class _ShuttingDown(Exception):
    """Raised from the progress callback when the server stops: the job goes back to the queue."""


class Pipeline(Protocol):
    def generate(self, request: GenerationRequest, out_path: Path, on_progress: ProgressCallback) -> Clip: ...


def load_pipeline(config: EngineConfig) -> Pipeline:
    from ovi_server.engine.pipeline import OviPipeline  # imports torch: only here, only in the worker

    return OviPipeline.from_config(config)


class Worker:
    """Runs jobs from `store` one at a time; `start()` runs it in a daemon thread of the server process."""

    def __init__(
        self,
        config: EngineConfig,
        store: JobStore,
        files: FileStore,
        metrics: Metrics | None = None,
        pipeline: Pipeline | None = None,
        poll_s: float = 0.1,
        tmp_dir: Path | None = None,
    ):
        self.config, self.store, self.files, self.metrics = config, store, files, metrics
        self.pipeline = pipeline
        self.poll_s = poll_s
        # Where each job's scratch directory goes (`serve`: <data dir>/tmp); there, those left by dead
        # processes are swept at start-up. The system temp dir (the default) is not swept: not ours alone.
        self.tmp_dir = Path(tmp_dir) if tmp_dir is not None else Path(tempfile.gettempdir())
        if tmp_dir is not None:
            self.tmp_dir.mkdir(parents=True, exist_ok=True)
            sweep_scratch(self.tmp_dir)
        self.ready = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self.run_forever, name="worker", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def run_forever(self) -> None:
        if self.pipeline is None:
            started = time.perf_counter()
            logger.info(
                "loading pipeline variant=%s weights=%s", self.config.variant, self.config.weights_dir
            )
            self.pipeline = load_pipeline(self.config)
            logger.info("pipeline ready in %.1fs", time.perf_counter() - started)
        self.ready.set()
        while not self._stop.is_set():
            try:
                busy = self.run_once()
            except Exception:  # noqa: BLE001 -- e.g. the store is briefly unwritable: keep serving
                logger.exception("worker: unexpected error outside a generation; going on")
                busy = False
            if not busy:
                self._stop.wait(self.poll_s)

    def run_once(self) -> bool:
        """Claim and run one job; False when the queue was empty."""
        job = self.store.claim_next()
        if job is None:
            return False
        self.run_job(job)
        return True

    def run_job(self, job: Job) -> None:
        assert self.pipeline is not None and job.request is not None
        request = job.request
        if request.seed is None:
            request = replace(request, seed=random_seed(job.id))
        w, h = request.size or (0, 0)
        logger.info(
            "job %s started variant=%s size=%dx%d steps=%s seed=%d attempt=%d",
            job.id, self.config.variant, w, h, request.steps, request.seed, job.attempts,
        )  # fmt: skip
        logger.debug("job %s prompt=%r", job.id, request.prompt)
        asked = "size of the image" if request.image else f"{w}x{h} requested"
        steps = "default" if request.steps is None else request.steps
        self.store.append_log(job.id, f"started: {asked}, {steps} steps, seed {request.seed}")
        started = time.perf_counter()
        failure: JobFailure | None = None
        with tempfile.TemporaryDirectory(
            prefix=f"{SCRATCH_PREFIX}{os.getpid()}-{job.id}-", dir=self.tmp_dir
        ) as tmp:
            try:
                request = replace(request, image=self._local_image(job, request.image))
                clip = self.pipeline.generate(request, Path(tmp) / "output.mp4", self._progress(job))
                key = f"outputs/{job.id}/output.mp4"
                size = self.files.put_file(key, clip.path, "video/mp4")
            except _ShuttingDown:
                self.store.release(job.id)
                self.store.append_log(job.id, "server shutting down; queued again", "WARN")
                logger.info("job %s put back in the queue: shutting down", job.id)
                return
            except Cancelled:
                failure = JobFailure(FailureKind.CANCELLED, "Request was cancelled")
            except InvalidInput as exc:
                failure = JobFailure(
                    FailureKind.INVALID_INPUT, str(exc), (FieldError(("body", exc.field), exc.msg, exc.kind),)
                )
            except Exception as exc:  # noqa: BLE001 -- any crash fails this job, never the worker
                failure = _infrastructure_failure(exc, request)
                logger.exception("job %s failed", job.id)
        seconds = time.perf_counter() - started
        if failure is None:
            self.store.succeed(job.id, JobResult(key, size, clip.seed, seconds))
            timings = ", ".join(f"{k} {v:.1f}s" for k, v in clip.timings.items())
            made = f"{clip.width}x{clip.height}, {clip.num_frames} frames"
            self.store.append_log(job.id, f"done in {seconds:.1f}s: {made} ({timings})")
            logger.info("job %s done in %.1fs: %s (%s)", job.id, seconds, made, timings)
        else:
            self.store.fail(job.id, failure)
            level = "WARN" if failure.kind in (FailureKind.CANCELLED, FailureKind.INVALID_INPUT) else "ERROR"
            self.store.append_log(job.id, failure.message, level)
            logger.info(
                "job %s ended %s after %.1fs: %s", job.id, failure.kind.value, seconds, failure.message
            )
        if self.metrics is not None:
            outcome = "succeeded" if failure is None else failure.kind.value
            self.metrics.inference_seconds.observe(seconds)
            self.metrics.job_seconds.labels(outcome).observe(time.time() - job.created_at)

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
            if progress.stage == "denoise" and progress.done > 0 and self.metrics is not None:
                self.metrics.step_seconds.observe(now - last_step)
            last_step = now
            if self._stop.is_set():
                raise _ShuttingDown(job.id)
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
    return True


def random_seed(job_id: str) -> int:
    """The seed for a request without one: random (job ids are UUID4s), but the same if the job is re-run
    after a crash, so the re-run produces the video the first run would have."""
    return int.from_bytes(hashlib.sha256(job_id.encode()).digest()[:8], "big") & MAX_RANDOM_SEED


def _infrastructure_failure(exc: Exception, request: GenerationRequest) -> JobFailure:
    w, h = request.size or (0, 0)
    if type(exc).__name__ == "OutOfMemoryError":  # torch.OutOfMemoryError, without importing torch here
        return JobFailure(
            FailureKind.OUT_OF_MEMORY,
            f"out of accelerator memory generating {w}x{h} with {request.steps} steps; retry with a smaller "
            "resolution, or restart the server with --offload model (or block) or --fp8",
        )
    return JobFailure(
        FailureKind.INTERNAL,
        f"generation failed: {type(exc).__name__}: {exc}; the server log has the traceback. "
        "Retry once; if it fails again, report it with the request id.",
    )
