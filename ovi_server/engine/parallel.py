"""One request on several processes: sequence parallel (Ulysses) and CFG parallel.

Layout: `world = sp * cfg` processes on one host (rank r uses cuda:r, or the CPU with gloo), arranged
as a device mesh ("cfg", "ring", "ulysses") of shape (world // sp, 1, sp). Inside a "cfg" slice the
`sp` ranks split every token stream of the fusion model (diffusers' context parallelism with the
model's `_cp_plan`: split at `TokenShard`, gathered at the heads, Ulysses all-to-all around self and
audio<->video attention). With `--cfg-parallel` the two slices run the positive and the negative pass
of each step; one all-gather of the two predictions per step lets every rank apply CFG and step its
solvers, so all ranks hold the same latents throughout. Without it, extra slices are replicas.

We start the processes ourselves (no torchrun): `start_followers` spawns ranks 1.. for a leader that
serves requests (CLI `generate`, the server's worker), `run_spmd` runs one function on every rank
(golden checks, tests). Rank 0 encodes the text once, sends the denoising job to the others, and
decodes the latents once.

Fail-stop: if any rank fails during a job, the leader kills every follower and raises RankFailed naming
the rank (`Followers`); the group takes no more jobs, and a server worker restarts with fresh ranks.
"""

from __future__ import annotations

import dataclasses
import logging
import multiprocessing.connection
import os
import signal
import threading
import time
import traceback
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Any
from unittest import mock

import torch
import torch.distributed as dist
import torch.multiprocessing
from diffusers import ContextParallelConfig
from torch import Tensor
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from ovi_server.engine.sampler import (
    Conditioning,
    Guidance,
    Latents,
    StepCallback,
    cfg,
    denoise,
    make_plan,
    negative_pass,
    positive_pass,
)
from ovi_server.errors import Cancelled, ConfigError, RankFailed
from ovi_server.models.fusion import OviFusion

logger = logging.getLogger(__name__)

TIMEOUT = timedelta(minutes=30)  # a collective that waits this long means a rank died
RENDEZVOUS_TIMEOUT = timedelta(minutes=3)  # every rank joins within this, or start-up fails
# after a rank failed, how long rank 0 may stay inside the job before it ends its own process: gloo fails
# a collective whose peer is gone at once, but an NCCL collective may wait for the dead rank until TIMEOUT
FAILED_GRACE = timedelta(seconds=15)
LEADER_POLL_S = 1.0  # how often a follower checks that rank 0 is alive


@dataclass(frozen=True)
class ParallelSpec:
    """What the user asked for: `--sp N [--cfg-parallel]`."""

    sp: int = 1
    cfg_parallel: bool = False

    @property
    def world_size(self) -> int:
        return self.sp * (2 if self.cfg_parallel else 1)

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def check_spec(spec: ParallelSpec, device_type: str, num_heads: tuple[int, ...] = ()) -> None:
    """Raises ConfigError, saying what to change, for a layout this host or model cannot run."""
    if spec.sp < 1:
        raise ConfigError(f"--sp must be at least 1, got {spec.sp}")
    flags = f"--sp {spec.sp}" + (" --cfg-parallel" if spec.cfg_parallel else "")
    if device_type == "cuda":
        visible = torch.cuda.device_count()
        if spec.world_size > visible:
            raise ConfigError(
                f"{flags} needs {spec.world_size} GPUs (one process each) but {visible} are visible; "
                f"lower --sp{' or drop --cfg-parallel' if spec.cfg_parallel else ''}, "
                "or make more GPUs visible (CUDA_VISIBLE_DEVICES)"
            )
        if not dist.is_nccl_available():
            raise ConfigError(
                f"{flags} on CUDA needs torch.distributed's nccl backend, missing from this torch build"
            )
    elif not dist.is_gloo_available():
        raise ConfigError(
            f"{flags} on the CPU needs torch.distributed's gloo backend, missing from this torch build"
        )
    for heads in num_heads:
        if heads % spec.sp:
            raise ConfigError(
                f"--sp {spec.sp} does not divide the model's {heads} attention heads (Ulysses gives each "
                f"process heads/sp of them); use a degree that divides {heads}"
            )


@dataclass
class ParallelGroup:
    """This process's place among the ranks that run one request together."""

    spec: ParallelSpec
    rank: int
    device: torch.device
    mesh: DeviceMesh  # ("cfg", "ring", "ulysses")
    # control messages (jobs, the per-step stop flag) travel on a gloo group through host memory, so
    # they never wait on a device synchronize
    host_group: dist.ProcessGroup
    followers: Followers | None = None  # on rank 0 of `start_followers`: the processes of ranks 1..

    @property
    def is_leader(self) -> bool:
        return self.rank == 0

    @property
    def cfg_rank(self) -> int:
        """Which slice: 0 runs the positive pass under CFG parallel, 1 the negative one."""
        return self.mesh.get_local_rank("cfg")

    # ---------------------------------------------------------------------------------------- model
    def apply(self, model: OviFusion) -> None:
        """Sequence parallelism on `model` (after `set_attention_backend`, before any compile)."""
        if self.spec.sp == 1:
            return
        check_spec(
            self.spec, self.device.type, (model.video_model.cfg.num_heads, model.audio_model.cfg.num_heads)
        )
        config = ContextParallelConfig(ulysses_degree=self.spec.sp, mesh=self.mesh)
        try:
            with _accelerator_count_at_least_one():
                model.enable_parallelism(config=config)
        except ValueError as exc:  # e.g. an attention backend without context-parallel support
            raise ConfigError(f"--sp {self.spec.sp}: {exc}") from exc
        model.sequence_parallel_degree = self.spec.sp

    # ------------------------------------------------------------------------------------- guidance
    def guided_predict(
        self, model: OviFusion, x: Latents, t: Tensor, cond: Conditioning, guidance: Guidance
    ) -> tuple[Tensor, Tensor]:
        """sampler.guided_predict with the passes on the two "cfg" slices: one all-gather per step."""
        if not self.spec.cfg_parallel:
            video_pos, audio_pos = positive_pass(model, x, t, cond)
            video_neg, audio_neg = negative_pass(model, x, t, cond, guidance)
        else:
            if self.cfg_rank == 0:
                video, audio = positive_pass(model, x, t, cond)
            else:
                video, audio = negative_pass(model, x, t, cond, guidance)
            mine = torch.cat([video.flatten(), audio.flatten()])
            both = [torch.empty_like(mine) for _ in range(2)]
            dist.all_gather(both, mine, group=self.mesh.get_group("cfg"))
            (video_pos, audio_pos), (video_neg, audio_neg) = (
                (u[: video.numel()].view_as(video), u[video.numel() :].view_as(audio)) for u in both
            )
        return cfg(video_neg, video_pos, guidance.video_scale), cfg(
            audio_neg, audio_pos, guidance.audio_scale
        )

    # ---------------------------------------------------------------------------- leader/followers
    def broadcast(self, obj: Any) -> Any:
        """`obj` from rank 0 to every rank (pickled; tensors should be on the CPU)."""
        box = [obj]
        dist.broadcast_object_list(box, src=0, group=self.host_group)
        return box[0]

    def denoise(self, model: OviFusion, job: DenoiseJob, on_step: StepCallback) -> Latents:
        """The leader's side of a denoising job: sends it to the other ranks, runs its share, returns the
        final latents. `on_step` runs here only; if it raises (cancellation), every rank stops after
        the same step and the group takes the next job. Any other failure, on any rank, stops the group
        for good: RankFailed names the rank (see `Followers`)."""
        followers = self.followers
        assert followers is not None, "denoise runs on rank 0 of start_followers"
        told_to_stop: list[BaseException] = []  # what on_step raised: `agree` told every rank to stop

        def on_step_agreed(done: int, total: int, x: Latents) -> None:
            try:
                on_step(done, total, x)
            except BaseException as exc:
                told_to_stop.append(exc)
                raise

        with followers.busy():
            try:
                self.broadcast(job)
                return self._run(model, job, on_step_agreed)
            except BaseException as exc:
                if told_to_stop and exc is told_to_stop[0]:
                    raise
                failure = followers.fail(exc)
                if not isinstance(exc, Exception):  # Ctrl-C: as it is; the followers are stopped all the same
                    raise
                raise failure from exc

    def follow(self, model: OviFusion) -> None:
        """A follower's life: run the leader's jobs until it sends None."""
        while (job := self.broadcast(None)) is not None:
            try:
                self._run(model, job, None)
            except Cancelled:
                continue

    def _run(self, model: OviFusion, job: DenoiseJob, on_step: StepCallback | None) -> Latents:
        noise = Latents(job.noise.video.to(self.device), job.noise.audio.to(self.device))
        cond = Conditioning(
            *(
                None if u is None else u.to(self.device)
                for u in (getattr(job.cond, f.name) for f in dataclasses.fields(job.cond))
            )
        )
        plan = make_plan(job.solver, job.steps, job.shift, job.guidance, self.device)

        def agree(done: int, total: int, x: Latents) -> None:
            stop = torch.zeros(1, dtype=torch.int32)
            error: BaseException | None = None
            if on_step is not None:
                try:
                    on_step(done, total, x)
                except BaseException as exc:  # noqa: BLE001 -- re-raised below, after telling the others
                    error, stop[0] = exc, 1
            dist.broadcast(stop, src=0, group=self.host_group)  # a CPU tensor: no device synchronize
            if error is not None:
                raise error
            if stop.item():
                raise Cancelled("stopped by the leader")

        return denoise(model, noise, cond, plan, agree, self.guided_predict)

    def stop_followers(self) -> None:
        """Lets the followers exit (after a failure they are gone already)."""
        if not self.is_leader or not dist.is_initialized():
            return
        if self.followers is None or self.followers.close():
            self.broadcast(None)


class Followers:
    """Rank 0's hold on ranks 1..: their processes, the errors they report, and a thread that sees one die.

    When any rank fails during a job, the group is stopped for good: every follower is killed and rank 0
    raises RankFailed naming the rank that failed first. The survivors cannot be brought back in step:
    they may be waiting inside a collective of the failed step that only the failed rank could finish,
    and a next job's collectives would pair with those (a hang, or garbage). Killing them also ends rank
    0's own wait: gloo fails a collective whose peer has gone. NCCL may not, so if rank 0 is still inside
    the job FAILED_GRACE after a failure, the watcher ends this process with os._exit(1): the supervisor
    restarts a server worker with fresh ranks, and its job is queued again when its lease runs out.
    """

    def __init__(self, procs: list[Any], errors: Any, world_size: int, device_type: str):
        self.procs = procs  # rank r is procs[r - 1]
        self.errors = errors  # a SimpleQueue of reports (rank, error_type, summary, traceback)
        self.world_size = world_size
        self.device_type = device_type  # "cuda": NCCL collectives, which a dead peer can hang
        self.failure: RankFailed | None = None  # set once, when the group is stopped
        self.cause = ""  # the failed rank's own words, set with `failure`
        self._closing = False
        self._lock = threading.Lock()
        self._idle = threading.Event()  # rank 0 is not inside a job
        self._idle.set()
        threading.Thread(target=self._watch, name="ovi-followers", daemon=True).start()

    @contextmanager
    def busy(self):
        """Around a job; refuses it (RankFailed) once the group has failed."""
        self._idle.clear()
        if self.failure is not None:  # no job on a dead group
            self._idle.set()
            # a fresh exception per refusal: one raised again and again would pile up tracebacks
            raise RankFailed(str(self.failure), self.failure.rank, self.failure.error_type)
        try:
            yield
        finally:
            # After a failure on NCCL, rank 0 stays "busy" for good: its stream may hold collectives that
            # wait for a dead rank, and any device synchronize (or the process's CUDA teardown) would
            # wait with them, so the watcher ends the process FAILED_GRACE after the failure. The job's
            # failure is stored first if the worker gets there in time, else its lease requeues it.
            # gloo leaves nothing queued: the process carries on and exits as it means to.
            if self.failure is None or self.device_type != "cuda":
                self._idle.set()

    def close(self) -> bool:
        """Before telling the followers to exit: their exit is not a failure. False if they are gone.
        After a failure on NCCL this ends the process here: tearing down CUDA with collectives still
        queued for a dead rank can hang, and once the interpreter shuts down the watcher cannot run."""
        with self._lock:
            self._closing = True
            failure = self.failure
        if failure is not None and self.device_type == "cuda":
            logger.critical("exiting: this process's parallel group failed (%s)", failure)
            logging.shutdown()
            os._exit(1)
        return failure is None

    def fail(self, leader_error: BaseException | None = None) -> RankFailed:
        """Stops the group (once) and says which rank failed first: a follower that reported an error or
        died, else rank 0 with `leader_error`."""
        with self._lock:
            if self.failure is None:
                self.failure = self._stop_all(leader_error)
            return self.failure

    def _stop_all(self, leader_error: BaseException | None) -> RankFailed:
        # those that ended before we kill them (a sentinel is ready at once; exitcode may lag behind it)
        ended = multiprocessing.connection.wait([p.sentinel for p in self.procs], timeout=0)
        dead = [rank for rank, p in enumerate(self.procs, 1) if p.sentinel in ended]
        for proc in self.procs:
            proc.kill()  # nothing to save on a follower; SIGKILL also ends one blocked in an NCCL call
        for proc in self.procs:
            proc.join(10)
        reports = []
        while not self.errors.empty():
            reports.append(self.errors.get())
        trace = ""
        if reports:  # in the order they were sent: the first is the cause, the others saw it fail
            rank, error_type, summary, trace = reports[0]
        elif dead:
            rank = dead[0]
            code = self.procs[rank - 1].exitcode or 0
            how = f"killed by {signal.Signals(-code).name}" if code < 0 else f"exit code {code}"
            error_type, summary = "ProcessExit", f"its process ended ({how}) without reporting an error"
        else:
            assert leader_error is not None, "stopped with neither a dead follower nor an error"
            rank, error_type = 0, type(leader_error).__name__
            summary = f"{error_type}: {leader_error}"  # its traceback travels with the exception
        self.cause = summary
        logger.error(
            "parallel rank %d of %d failed: %s; the other ranks were stopped%s",
            rank, self.world_size, summary, f"\n{trace}" if trace else "",
        )  # fmt: skip
        return RankFailed(
            f"parallel rank {rank} of {self.world_size} failed: {summary}. The other ranks were stopped and "
            "this process takes no more parallel requests (a server worker restarts with fresh ranks)",
            rank,
            error_type,
        )

    def _watch(self) -> None:
        multiprocessing.connection.wait([p.sentinel for p in self.procs])  # until a follower exits
        with self._lock:
            if self._closing:
                return
        failure = self.fail()
        if self.device_type != "cuda":
            return  # gloo raises in rank 0's next collective: nothing is left waiting for the dead rank
        if not self._idle.wait(FAILED_GRACE.total_seconds()):
            logger.critical(
                "rank 0 is still inside the failed job %.0fs after: %s; exiting (a server worker is "
                "restarted with fresh ranks and its job queued again)",
                FAILED_GRACE.total_seconds(), failure,
            )  # fmt: skip
            logging.shutdown()
            os._exit(1)


@dataclass(frozen=True)
class DenoiseJob:
    """What the leader sends the followers for one request (CPU tensors)."""

    noise: Latents
    cond: Conditioning
    solver: str
    steps: int
    shift: float
    guidance: Guidance


@contextmanager
def _accelerator_count_at_least_one():
    # diffusers 0.42.1 `ModelMixin._resolve_parallel_config` computes the rank's device as
    # `rank % torch.accelerator.device_count()`, a division by zero on a host without an accelerator.
    # The device it computes is only recorded there; our mesh (built below) decides the placement.
    if torch.accelerator.device_count() > 0:
        yield
        return
    with mock.patch.object(torch.accelerator, "device_count", return_value=1):
        yield


def _use_device(spec: ParallelSpec, rank: int, device_type: str) -> tuple[torch.device, str]:
    """The rank's device and backend, made current for the calling thread (CUDA's current device and
    the CPU thread count are per thread)."""
    if device_type == "cuda":
        torch.cuda.set_device(rank)
        return torch.device("cuda", rank), "cpu:gloo,cuda:nccl"
    # the ranks share the host's cores: without this each would start one thread per core
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // spec.world_size))
    return torch.device("cpu"), "gloo"


def init_group(spec: ParallelSpec, rank: int, store: dist.Store, device_type: str) -> ParallelGroup:
    """Joins the process group of `spec.world_size` ranks that `store` rendezvouses."""
    device, backend = _use_device(spec, rank, device_type)
    dist.init_process_group(backend, store=store, rank=rank, world_size=spec.world_size, timeout=TIMEOUT)
    host_group = dist.new_group(backend="gloo") if device_type == "cuda" else dist.group.WORLD
    mesh = init_device_mesh(
        device_type,
        (spec.world_size // spec.sp, 1, spec.sp),
        mesh_dim_names=("cfg", "ring", "ulysses"),
    )
    return ParallelGroup(spec, rank, device, mesh, host_group)


def close_group() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def _leader_store(world_size: int) -> dist.TCPStore:
    # port 0: the OS picks a free port on the loopback; followers connect to store.port
    return dist.TCPStore(
        "127.0.0.1", 0, world_size, is_master=True, timeout=RENDEZVOUS_TIMEOUT, wait_for_workers=False
    )


def _follower_store(port: int, world_size: int) -> dist.TCPStore:
    return dist.TCPStore("127.0.0.1", port, world_size, is_master=False, timeout=RENDEZVOUS_TIMEOUT)


# --------------------------------------------------------------------------------------- leader mode
def start_followers(
    spec: ParallelSpec, device_type: str, follower: Callable[..., None], *args: Any
) -> ParallelGroup:
    """Spawns ranks 1.. running `follower(group, *args)` and makes this process rank 0."""
    store = _leader_store(spec.world_size)
    context = torch.multiprocessing.get_context("spawn")
    errors = context.SimpleQueue()
    procs = [
        context.Process(
            target=_follower_main,
            args=(spec, rank, store.port, device_type, follower, args, errors, os.getpid()),
            daemon=True,
            name=f"ovi-rank{rank}",
        )
        for rank in range(1, spec.world_size)
    ]
    for proc in procs:
        proc.start()
    followers = Followers(procs, errors, spec.world_size, device_type)  # watching from now on
    _use_device(spec, 0, device_type)  # for this thread; the rendezvous below runs on another
    # Rank 0 joins on a thread of its own while this one watches the followers: one that dies before
    # joining (a start-up error, a crash in its imports) would otherwise hold rank 0 inside
    # init_process_group until RENDEZVOUS_TIMEOUT, its report unread.
    joined: dict[str, Any] = {}

    def join() -> None:
        try:
            joined["group"] = init_group(spec, 0, store, device_type)
        except BaseException as exc:  # noqa: BLE001 -- handed to the thread that started us
            joined["error"] = exc

    rendezvous = threading.Thread(target=join, name="ovi-rendezvous", daemon=True)
    rendezvous.start()
    while rendezvous.is_alive():
        rendezvous.join(0.1)
        if followers.failure is not None:  # the watcher saw a follower end and stopped the others
            failure = followers.failure
            raise RankFailed(
                f"parallel start-up failed: rank {failure.rank} of {spec.world_size} ended before the group "
                f"was up: {followers.cause}. The other ranks were stopped",
                failure.rank,
                failure.error_type,
            )
    if "error" in joined:
        followers.fail(joined["error"])
        raise joined["error"]
    group = joined["group"]
    group.followers = followers
    return group


def _follower_main(
    spec: ParallelSpec,
    rank: int,
    port: int,
    device_type: str,
    follower: Callable[..., None],
    args: tuple,
    errors: Any,
    leader_pid: int,
) -> None:
    # the pid from rank 0 itself: were rank 0 gone by now, os.getppid() here would already be init's
    threading.Thread(
        target=_exit_with_leader, args=(leader_pid,), name="ovi-leader-watch", daemon=True
    ).start()
    try:
        group = init_group(spec, rank, _follower_store(port, spec.world_size), device_type)
        follower(group, *args)
    except BaseException as exc:  # noqa: BLE001 -- reported to rank 0, which stops the group
        # kept under PIPE_BUF (4096 bytes), so the report is one atomic write even if we are killed now
        summary = _clip(f"{type(exc).__name__}: {exc}", 500)
        errors.put((rank, type(exc).__name__, summary, _clip(traceback.format_exc(), 2500, keep_end=True)))
        # no close_group(): the other ranks may be inside a collective with this one. Exiting closes our
        # connections, which fails theirs (gloo), and rank 0's watcher sees the process end (any backend).
        os._exit(1)
    close_group()


def _clip(text: str, nbytes: int, keep_end: bool = False) -> str:
    """At most `nbytes` of UTF-8 (the pipe's atomic-write limit is in bytes, not characters)."""
    data = text.encode()
    data = data[-nbytes:] if keep_end else data[:nbytes]
    return data.decode(errors="ignore")


def _exit_with_leader(leader_pid: int) -> None:
    """A follower does not outlive rank 0, its parent: if rank 0 is killed (SIGKILL, the OOM killer), a
    follower blocked in an NCCL collective would hold its GPU's memory until TIMEOUT, and the worker the
    supervisor restarts would find the GPU full. The parent is polled rather than asked for with
    PR_SET_PDEATHSIG, which fires when the thread that spawned us ends, not the process."""
    while os.getppid() == leader_pid:
        time.sleep(LEADER_POLL_S)
    os._exit(1)


# ----------------------------------------------------------------------------------------- SPMD mode
def run_spmd(spec: ParallelSpec, device_type: str, fn: Callable[..., Any], *args: Any) -> Any:
    """Runs `fn(group, *args)` on every rank (rank 0 in this process) and returns rank 0's result;
    raises if any rank fails."""
    store = _leader_store(spec.world_size)
    context = torch.multiprocessing.get_context("spawn")
    errors = context.SimpleQueue()
    procs = [
        context.Process(
            target=_spmd_main,
            args=(spec, rank, store.port, device_type, fn, args, errors),
            name=f"ovi-rank{rank}",
        )
        for rank in range(1, spec.world_size)
    ]
    for proc in procs:
        proc.start()
    try:
        group = init_group(spec, 0, store, device_type)
        try:
            result = fn(group, *args)
        finally:
            close_group()
    finally:
        for proc in procs:
            proc.join()
    failures = []
    while not errors.empty():
        failures.append(errors.get())
    if failures or any(p.exitcode for p in procs):
        raise RuntimeError("a parallel rank failed:\n" + "\n".join(failures or ["(no traceback)"]))
    return result


def _spmd_main(spec, rank, port, device_type, fn, args, errors) -> None:
    try:
        group = init_group(spec, rank, _follower_store(port, spec.world_size), device_type)
        try:
            fn(group, *args)
        finally:
            close_group()
    except BaseException:  # noqa: BLE001 -- reported to rank 0, which raises
        errors.put(f"rank {rank}: {traceback.format_exc()}")
        os._exit(1)


def gather_tokens(group: ParallelGroup | None, x: Tensor, length: int) -> Tensor:
    """The whole token stream [B, L, ...] from each rank's share [B, L/sp, ...], cut to `length`."""
    if group is None or group.spec.sp == 1:
        return x[:, :length]
    parts = [torch.empty_like(x) for _ in range(group.spec.sp)]
    dist.all_gather(parts, x.contiguous(), group=group.mesh.get_group("ulysses"))
    return torch.cat(parts, dim=1)[:, :length]
