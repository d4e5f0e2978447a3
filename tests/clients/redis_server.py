"""A throwaway `redis-server` (Debian's package) on a unix socket in a temp dir, for the tests.

On CI (CI=true) a missing redis-server fails the test that needs it; elsewhere it skips with the
install command, so a laptop without Redis can still run the rest.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import redis


class RedisServer:
    def __init__(self, directory: Path, appendonly: bool = False):
        binary = shutil.which("redis-server")
        if binary is None:
            message = "redis-server is not installed: apt-get install redis-server"
            if os.environ.get("CI", "").lower() == "true":
                pytest.fail(message)
            pytest.skip(message)
        directory.mkdir(parents=True, exist_ok=True)
        self.socket = directory / "redis.sock"
        self.url = f"unix://{self.socket}?db=0"
        cmd = [
            binary, "--port", "0", "--unixsocket", str(self.socket), "--unixsocketperm", "700",
            "--dir", str(directory), "--save", "", "--appendonly", "yes" if appendonly else "no",
            "--logfile", str(directory / "redis.log"),
        ]  # fmt: skip
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 20
        while True:
            try:
                if redis.Redis(unix_socket_path=str(self.socket)).ping():
                    return
            except (redis.ConnectionError, FileNotFoundError):
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(
                    f"redis-server did not start: {(directory / 'redis.log').read_text()[-2000:]}"
                )
            time.sleep(0.05)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
