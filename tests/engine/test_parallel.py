"""Sequence parallel and CFG parallel on the CPU (gloo): the same numbers as one process.

Spawned process groups take seconds to start on a 2-core CI machine, so one spawn of 4 processes
(`--sp 2 --cfg-parallel`) runs every check that needs ranks and hands rank 0's findings back.
"""

from __future__ import annotations

import dataclasses
import itertools
import multiprocessing
import subprocess
import sys
import threading
import time
from pathlib import Path

import av
import numpy as np
import pytest
import torch

from ovi_server.config import dit_config
from ovi_server.engine.device import CPU_FP32
from ovi_server.engine.parallel import ParallelGroup, ParallelSpec, check_spec, run_spmd
from ovi_server.engine.sampler import Conditioning, Guidance, denoise, initial_noise, make_plan
from ovi_server.errors import ConfigError
from ovi_server.golden import run_fusion, run_loop
from ovi_server.models.fusion import load_fusion
from tests.conftest import REPO, golden_cases

pytestmark = pytest.mark.slow


def _golden_model():
    case = golden_cases("fusion")[0]  # 2 heads per tower, 3 blocks
    return load_fusion(
        case.weight_path(), dit_config(case.config["video"]), dit_config(case.config["audio"]), CPU_FP32
    )


def _relative_error(ours: torch.Tensor, reference: torch.Tensor) -> float:
    """max |ours - reference| over max |reference|: float32 rounding of differently shaped GEMMs."""
    return float((ours - reference).abs().max() / reference.abs().max())


def _inputs(model):
    g = torch.Generator().manual_seed(0)
    video = torch.randn(model.video_model.cfg.in_dim, 3, 2, 6, generator=g)  # 9 tokens: odd
    audio = torch.randn(13, model.audio_model.cfg.in_dim, generator=g)  # 13 tokens: odd
    context = torch.randn(7, model.video_model.cfg.text_dim, generator=g)
    return video, audio, context


def _rank_checks(group: ParallelGroup) -> dict:
    """Runs on each of the 4 ranks; rank 0's dict is what the tests look at."""
    torch.set_grad_enabled(False)
    # one thread, as init_group gives each of 4 ranks on a 2-core host: the one-process reference below
    # then runs the same GEMM kernels (a multi-threaded GEMM rounds differently for other row counts)
    assert torch.get_num_threads() == 1
    found: dict = {}
    single, parallel = _golden_model(), _golden_model()
    group.apply(parallel)
    video, audio, context = _inputs(single)
    args = ([video], [audio], torch.tensor([700]), [context], [context])
    for name, kwargs in (("t2v", {}), ("slg", {"slg_layer": 1}), ("i2v", {"first_frame_is_clean": True})):
        (v1,), (a1,) = single(*args, **kwargs)
        (v2,), (a2,) = parallel(*args, **kwargs)
        found[f"forward_{name}"] = (_relative_error(v2, v1), _relative_error(a2, a1), v2.shape, a2.shape)

    # the denoising loop: sequence parallel alone (the two "cfg" slices as replicas), then with CFG parallel
    noise = initial_noise((48, 3, 2, 6), (13, 20), 5, torch.device("cpu"), torch.float32)
    cond = Conditioning(context, context.flip(0), context * 0.5)
    guidance = Guidance(4.0, 3.0, 1)

    def run(predict=None):
        plan = make_plan("unipc", 3, 5.0, guidance, torch.device("cpu"))
        model = single if predict is None else parallel
        return denoise(model, noise, cond, plan, **({} if predict is None else {"predict": predict}))

    reference = run()
    sp_only = dataclasses.replace(group, spec=ParallelSpec(2, cfg_parallel=False))
    for name, predict in (("sp", sp_only.guided_predict), ("sp_cfg", group.guided_predict)):
        out = run(predict)
        found[f"denoise_{name}"] = (
            _relative_error(out.video, reference.video),
            _relative_error(out.audio, reference.audio),
        )

    # golden parity through the same runners `python -m ovi_server.golden check --sp 2` uses
    found["golden"] = [run_fusion.run_case(c, parallel=group).line() for c in golden_cases("fusion")[:2]]
    found["golden"] += [run_loop.run_case(c, parallel=group).line() for c in golden_cases("loop")]
    found["golden"] += [run_loop.run_case(c, parallel=sp_only).line() for c in golden_cases("loop")[:1]]

    # an attention backend without context-parallel support is refused with a clear error
    model = _golden_model()
    model.set_attention_backend("_native_math")
    try:
        group.apply(model)
        found["backend_error"] = None
    except ConfigError as exc:
        found["backend_error"] = str(exc)
    return found


@pytest.fixture(scope="module")
def findings() -> dict:
    return run_spmd(ParallelSpec(sp=2, cfg_parallel=True), "cpu", _rank_checks)


@pytest.mark.parametrize("name", ["t2v", "slg", "i2v"])
def test_sequence_parallel_forward_equals_one_process(findings, name):
    video_err, audio_err, video_shape, audio_shape = findings[f"forward_{name}"]
    assert tuple(video_shape) == (48, 3, 2, 6) and tuple(audio_shape) == (13, 20)  # padding cut off
    assert video_err <= 1e-6 and audio_err <= 1e-6, (video_err, audio_err)


@pytest.mark.parametrize("name", ["sp", "sp_cfg"])
def test_parallel_denoising_equals_one_process(findings, name):
    video_err, audio_err = findings[f"denoise_{name}"]
    assert video_err <= 1e-6 and audio_err <= 1e-6, (video_err, audio_err)


def test_golden_cases_pass_sequence_parallel(findings):
    assert len(findings["golden"]) == 5
    for line in findings["golden"]:
        assert line.startswith("PASS"), line


def test_backend_without_context_parallel_is_refused(findings):
    assert findings["backend_error"] is not None
    assert "--sp 2" in findings["backend_error"] and "_native_math" in findings["backend_error"]


def test_layouts_the_host_or_model_cannot_run_say_what_to_change():
    if torch.cuda.device_count() < 4:
        with pytest.raises(ConfigError, match=r"needs 4 GPUs .* lower --sp or drop --cfg-parallel"):
            check_spec(ParallelSpec(2, cfg_parallel=True), "cuda")
    with pytest.raises(ConfigError, match="does not divide the model's 2 attention heads"):
        check_spec(ParallelSpec(4), "cpu", (2, 2))
    with pytest.raises(ConfigError, match="--sp must be at least 1"):
        check_spec(ParallelSpec(0), "cpu")


def test_a_cancelled_request_stops_every_rank_and_the_next_one_runs(tmp_path):
    from ovi_server.config import EngineConfig
    from ovi_server.engine.pipeline import OviPipeline
    from ovi_server.errors import Cancelled
    from ovi_server.request import GenerationRequest

    pipeline = OviPipeline.from_config(EngineConfig(variant="tiny", device="cpu", sp=2))
    request = GenerationRequest(prompt="A cat says <S>hi<E> Audio: purr", seed=1)
    steps_seen = []

    def cancel_at_step_2(event):
        if event.stage == "denoise":
            steps_seen.append(event.done)
            if event.done == 2:
                raise Cancelled("user")

    try:
        with pytest.raises(Cancelled):
            pipeline.generate(request, tmp_path / "cancelled.mp4", cancel_at_step_2)
        assert steps_seen == [0, 1, 2] and not (tmp_path / "cancelled.mp4").exists()
        clip = pipeline.generate(request, tmp_path / "next.mp4")  # the other rank is waiting for it
        assert clip.path.stat().st_size > 0
    finally:
        pipeline.close()


FAILS_WITHIN_S = 30  # a failed rank ends the request within this (before the fix: after 30 minutes)


def _raise_on_call(module: torch.nn.Module, n: int, error: BaseException) -> None:
    """`module` raises `error` at the start of its n-th call. On block 0 of the video tower (which skip-layer
    guidance never skips; 2 calls per forward, 2 forwards per step), n=6 is the second step's positive
    pass, after the Ulysses all-to-alls of its self-attention: the other ranks wait in the next one."""
    calls = itertools.count(1)

    def hook(_module, _args):
        if next(calls) == n:
            raise error

    module.register_forward_pre_hook(hook)


def _follow_then_fail(group: ParallelGroup, engine) -> None:
    """A follower (`pipeline._follow`) whose model fails in the middle of the first request."""
    from ovi_server.engine.pipeline import OviPipeline

    pipeline = OviPipeline.from_config(engine, group)
    _raise_on_call(pipeline.fusion.video_model.blocks[0], 6, RuntimeError("injected failure on a follower"))
    group.follow(pipeline.fusion)


def _live_ranks() -> list[str]:
    return [p.name for p in multiprocessing.active_children() if p.name.startswith("ovi-rank")]


def _close(pipeline) -> None:
    """pipeline.close(), after killing any rank still alive: a regression fails the test, not hangs it."""
    for proc in multiprocessing.active_children():
        if proc.name.startswith("ovi-rank"):
            proc.kill()
    pipeline.close()


def _in_thread(fn) -> dict:
    """Runs `fn` in a thread; returns what it raised (or returned) once it ends, failing the test if that
    takes longer than FAILS_WITHIN_S: a rank waiting for a dead one would wait for 30 minutes."""
    outcome: dict = {}

    def target():
        try:
            outcome["result"] = fn()
        except BaseException as exc:  # noqa: BLE001 -- handed to the test
            outcome["error"] = exc

    thread = threading.Thread(target=target, daemon=True)
    started = time.monotonic()
    thread.start()
    thread.join(FAILS_WITHIN_S)
    assert not thread.is_alive(), f"still running after {FAILS_WITHIN_S}s: a rank is waiting for a dead one"
    outcome["seconds"] = time.monotonic() - started
    return outcome


def test_a_follower_failing_mid_request_fails_it_promptly_naming_the_rank(tmp_path, monkeypatch):
    from ovi_server.config import EngineConfig
    from ovi_server.engine import pipeline as pipeline_module
    from ovi_server.errors import RankFailed
    from ovi_server.request import GenerationRequest

    monkeypatch.setattr(pipeline_module, "_follow", _follow_then_fail)  # what rank 1 is spawned to run
    pipeline = pipeline_module.OviPipeline.from_config(EngineConfig(variant="tiny", device="cpu", sp=2))
    request = GenerationRequest(prompt="A cat says <S>hi<E> Audio: purr", seed=1)
    try:
        failed = _in_thread(lambda: pipeline.generate(request, tmp_path / "failed.mp4"))
        error = failed.get("error")
        assert isinstance(error, RankFailed), failed
        assert "parallel rank 1 of 2 failed: RuntimeError: injected failure on a follower" in str(error)
        assert not (tmp_path / "failed.mp4").exists()
        assert _live_ranks() == []  # no rank left waiting in a collective
        # the group is stopped for good: the next request is refused at once instead of hanging
        again = _in_thread(lambda: pipeline.generate(request, tmp_path / "next.mp4"))
        assert isinstance(again.get("error"), RankFailed) and pipeline.broken is not None
        assert again["seconds"] < 5
    finally:
        _close(pipeline)


def test_a_follower_killed_between_requests_is_noticed_and_named(tmp_path):
    from ovi_server.config import EngineConfig
    from ovi_server.engine.pipeline import OviPipeline
    from ovi_server.errors import RankFailed
    from ovi_server.request import GenerationRequest

    pipeline = OviPipeline.from_config(EngineConfig(variant="tiny", device="cpu", sp=2))
    try:
        (rank1,) = [p for p in multiprocessing.active_children() if p.name == "ovi-rank1"]
        rank1.kill()  # as the kernel's OOM killer would: no traceback, no report
        deadline = time.monotonic() + FAILS_WITHIN_S
        while pipeline.broken is None and time.monotonic() < deadline:  # the leader's watcher thread
            time.sleep(0.05)
        assert "parallel rank 1 of 2 failed: its process ended (killed by SIGKILL)" in str(pipeline.broken)
        request = GenerationRequest(prompt="A cat says <S>hi<E> Audio: purr", seed=1)
        refused = _in_thread(lambda: pipeline.generate(request, tmp_path / "next.mp4"))
        assert isinstance(refused.get("error"), RankFailed) and refused["seconds"] < 5
    finally:
        _close(pipeline)


def test_a_leader_failing_mid_request_fails_the_job_stops_the_ranks_and_the_worker_exits(tmp_path):
    from ovi_server.config import EngineConfig
    from ovi_server.engine.pipeline import OviPipeline
    from ovi_server.jobs.files import LocalFiles
    from ovi_server.jobs.sqlite import SqliteJobStore
    from ovi_server.jobs.store import FailureKind, JobStatus, NewJob
    from ovi_server.jobs.worker import Worker
    from ovi_server.request import GenerationRequest

    engine = EngineConfig(variant="tiny", device="cpu", sp=2)
    pipeline = OviPipeline.from_config(engine)
    _raise_on_call(pipeline.fusion.video_model.blocks[0], 6, torch.OutOfMemoryError("injected on rank 0"))
    store = SqliteJobStore(tmp_path / "jobs.sqlite3")
    request = GenerationRequest(prompt="A cat says <S>hi<E> Audio: purr", seed=1)
    job = store.submit(NewJob(app="fal-ai/ovi", request=request))
    waiting = store.submit(NewJob(app="fal-ai/ovi", request=request))
    worker = Worker(engine, store, LocalFiles(tmp_path / "files"), pipeline=pipeline, poll_s=0.1)
    try:
        ran = _in_thread(worker.run_forever)  # ends by itself: the worker exits once its ranks failed
        assert "error" not in ran, ran
        failed = store.get(job.id)
        assert failed.status is JobStatus.FAILED and failed.failure.kind is FailureKind.OUT_OF_MEMORY
        assert worker.exit_code == 1  # `ovi-server worker` exits 1; the supervisor starts fresh ranks
        assert _live_ranks() == []  # none left waiting in a collective
        assert store.get(waiting.id).status is JobStatus.QUEUED  # for the restarted worker
        messages = [line.message for line in store.logs(job.id)]
        assert any("out of accelerator memory on parallel rank 0" in m for m in messages), messages
    finally:
        worker.stop()
        _close(pipeline)


LEADER = """
import multiprocessing, time
from ovi_server.engine.parallel import ParallelSpec, start_followers
from tests.engine.test_parallel import block_forever

start_followers(ParallelSpec(sp=2), "cpu", block_forever)
print(*[p.pid for p in multiprocessing.active_children() if p.name.startswith("ovi-rank")], flush=True)
time.sleep(600)
"""


def block_forever(group: ParallelGroup) -> None:
    """A follower stuck where a dead peer does not wake it (in an NCCL collective on a GPU)."""
    while True:
        time.sleep(1)


def _gone(pid: int) -> bool:
    """Exited (a zombie nobody reaps, where the reaper is not init, counts)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return True
    return "\nState:\tZ" in status


def test_followers_exit_when_the_leader_is_killed():
    """SIGKILL of rank 0 (the OOM killer, say) leaves no follower behind holding its device, even one
    that no collective will wake (gloo wakes an idle follower anyway: its peer's socket closes)."""
    leader = subprocess.Popen(
        [sys.executable, "-c", LEADER], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True
    )
    try:
        followers = [int(pid) for pid in leader.stdout.readline().split()]
        assert len(followers) == 1 and not _gone(followers[0])
    finally:
        leader.kill()
        leader.wait()
    deadline = time.monotonic() + FAILS_WITHIN_S
    while not all(map(_gone, followers)) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert all(map(_gone, followers)), f"rank 1 (pid {followers}) outlived rank 0"


# rank 1's target is defined in `python -c`'s __main__, which a spawned process cannot import: it dies
# while unpickling its arguments, before joining the group, and reports nothing
DIES_BEFORE_JOINING = """
import sys
from ovi_server.engine.parallel import ParallelSpec, start_followers
from ovi_server.errors import RankFailed

def follower(group):
    pass

try:
    start_followers(ParallelSpec(sp=2), "cpu", follower)
except RankFailed as exc:
    print("RankFailed", exc.rank, exc, flush=True)
    sys.exit(3)
print("joined", flush=True)
"""


def test_a_follower_that_dies_before_joining_fails_start_up_with_its_cause():
    """Rank 0 used to wait in the rendezvous until its 3-minute timeout and then report a store
    timeout; it now says at once which rank ended, and how."""
    done = subprocess.run(
        [sys.executable, "-c", DIES_BEFORE_JOINING], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 3, (done.stdout, done.stderr[-3000:])
    assert done.stdout.startswith("RankFailed 1 parallel start-up failed: rank 1 of 2 ended before"), (
        done.stdout
    )
    assert "exit code 1" in done.stdout


def _decode(path):
    with av.open(str(path)) as container:
        video = np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)]).astype(int)
    with av.open(str(path)) as container:
        audio = np.concatenate([f.to_ndarray().ravel() for f in container.decode(audio=0)])
    return video, audio


def test_generate_sp2_makes_the_video_sp1_makes(tmp_path):
    def generate(name: str, *flags: str):
        out = tmp_path / f"{name}.mp4"
        command = [sys.executable, "-m", "ovi_server.cli", "generate", "A cat says <S>hi<E> Audio: purr"]
        command += ["--device", "cpu", "-o", str(out), *flags]
        done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
        return _decode(out)

    video1, audio1 = generate("sp1", "--seed", "3", "--sp", "1")
    video2, audio2 = generate("sp2", "--seed", "3", "--sp", "2")
    other, _ = generate("seed4", "--seed", "4", "--sp", "1")
    assert video2.shape == video1.shape and audio2.shape == audio1.shape
    np.testing.assert_array_equal(audio2, audio1)
    # latents agree to float32 rounding; H.264 turns that into at most a few levels on a few pixels,
    # far below what another seed changes
    assert np.abs(video2 - video1).mean() < 1.0 < np.abs(other - video1).mean()


def test_generate_refuses_a_degree_the_heads_cannot_take():
    command = [sys.executable, "-m", "ovi_server.cli", "generate", "A cat says <S>hi<E> Audio: purr"]
    done = subprocess.run(
        [*command, "--device", "cpu", "--sp", "3"], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 2
    assert "--sp 3 does not divide the model's 2 attention heads" in done.stderr
    assert "Traceback" not in done.stderr
