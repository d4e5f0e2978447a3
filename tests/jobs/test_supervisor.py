"""`serve --workers N`: which devices the workers get, the command line each runs, restarts with backoff."""

from __future__ import annotations

import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest

from ovi_server.cli import build_parser, build_server_config, main
from ovi_server.config import EngineConfig, LogConfig, ServerConfig
from ovi_server.jobs.supervisor import Supervisor, WorkerSlot, worker_argv, worker_devices, worker_slots


def devices(workers: int | None, device: str = "auto", gpus: int = 0) -> list[str]:
    config = ServerConfig(engine=EngineConfig(device=device), workers=workers)
    return worker_devices(config, count_cuda=lambda: gpus)


def test_one_worker_per_gpu_by_default_and_one_without_a_gpu():
    assert devices(None, gpus=8) == [f"cuda:{i}" for i in range(8)]
    assert devices(None, gpus=0) == ["cpu"]
    assert devices(0, gpus=8) == []  # API only
    assert devices(3, gpus=2) == ["cuda:0", "cuda:1", "cuda:0"]  # round-robin
    assert devices(2, device="cpu", gpus=8) == ["cpu", "cpu"]
    assert devices(None, device="cuda:3", gpus=8) == ["cuda:3"]


def test_a_sequence_parallel_worker_gets_its_own_block_of_gpus(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)

    def slots(workers: int | None, sp: int, cfg: bool, gpus: int) -> list[WorkerSlot]:
        config = ServerConfig(engine=EngineConfig(sp=sp, cfg_parallel=cfg), workers=workers)
        return worker_slots(config, count_cuda=lambda: gpus)

    assert slots(None, 2, False, 8) == [WorkerSlot("cuda", f"{2 * i},{2 * i + 1}") for i in range(4)]
    assert slots(None, 2, True, 8) == [WorkerSlot("cuda", "0,1,2,3"), WorkerSlot("cuda", "4,5,6,7")]
    assert slots(None, 4, True, 4) == [WorkerSlot("cuda")]  # too few GPUs: the worker's start-up says so
    assert slots(None, 2, False, 0) == [WorkerSlot("cpu")]
    assert slots(None, 1, False, 2) == [WorkerSlot("cuda:0"), WorkerSlot("cuda:1")]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,5,6,7")
    assert slots(None, 2, False, 4) == [WorkerSlot("cuda", "3,5"), WorkerSlot("cuda", "6,7")]


def test_a_worker_command_line_carries_the_server_settings(tmp_path: Path):
    config = ServerConfig(
        engine=EngineConfig(
            variant="720x720_5s", weights_dir=tmp_path / "w", dtype="bf16", offload="model", fp8=True
        ),
        data_dir=tmp_path / "data",
        queue="redis://queue-host:6379/2",
        lease_s=12.5,
        max_attempts=3,
        storage="s3",
        s3_bucket="b",
        s3_endpoint_url="http://127.0.0.1:9000",
        log=LogConfig(level="debug", format="json"),
    )
    argv = worker_argv(config, "cuda:1")
    assert argv[:4] == [sys.executable, "-m", "ovi_server.cli", "worker"]
    args = build_parser().parse_args(argv[3:])
    assert build_server_config(args) == replace(config, engine=replace(config.engine, device="cuda:1"))


def test_a_worker_that_dies_is_restarted_and_stop_ends_it(tmp_path: Path):
    dies = [sys.executable, "-c", "import sys; sys.exit(3)"]
    lives = [sys.executable, "-c", "import time; time.sleep(600)"]
    supervisor = Supervisor([dies, lives], poll_s=0.05)
    supervisor.start()
    try:
        deadline = time.monotonic() + 30
        while len(supervisor.children[0].history) < 3:  # restarted after 1 s, then 2 s
            assert time.monotonic() < deadline, "the dying worker was not restarted"
            time.sleep(0.05)
        assert len(supervisor.children[1].history) == 1  # the healthy one is left alone
        survivor = supervisor.children[1].proc
    finally:
        supervisor.stop(timeout=10)
    assert survivor is not None and survivor.returncode == -15  # SIGTERM
    assert supervisor.pids() == []


def test_a_negative_worker_count_is_refused(tmp_path: Path):
    with pytest.raises(SystemExit, match="--workers -1: expected 0 or more"):
        main(["serve", "--workers", "-1", "--data-dir", str(tmp_path), "--port", "0"])
