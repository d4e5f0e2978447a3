"""Server memory while N uploads of M MiB stream in at once (`PUT /storage/put/<key>`).

Starts `ovi-server serve --variant tiny` on loopback, reserves N uploads, PUTs them in parallel from
generators (chunked, 1 MiB at a time), samples the server's RSS every 20 ms, and prints one JSON line:
{"bench": "uploads", "n": 4, "mib": 80, "rss_before_mib": ..., "rss_peak_mib": ..., "growth_mib": ...}

    python -m benchmarks.bench_uploads --n 4 --mib 80
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import psutil

REPO = Path(__file__).resolve().parents[1]
KEY = "bench:bench-secret"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=4, help="parallel uploads")
    parser.add_argument("--mib", type=int, default=80, help="size of each upload in MiB")
    parser.add_argument("--port", type=int, default=18977)
    args = parser.parse_args()
    base = f"http://127.0.0.1:{args.port}"
    with tempfile.TemporaryDirectory() as data:
        cmd = [sys.executable, "-m", "ovi_server.cli", "serve", "--variant", "tiny", "--device", "cpu",
               "--port", str(args.port), "--api-keys", KEY, "--data-dir", data, "--log-level", "warning"]  # fmt: skip
        server = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            deadline = time.monotonic() + 120
            while True:
                try:
                    if httpx.get(f"{base}/health", timeout=1).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                if time.monotonic() > deadline:
                    raise SystemExit("server did not start")
                time.sleep(0.2)
            auth = {"Authorization": f"Key {KEY}"}
            urls = [
                httpx.post(
                    f"{base}/storage/upload/initiate", json={"content_type": "video/mp4"}, headers=auth
                ).json()["upload_url"]
                for _ in range(args.n)
            ]
            process = psutil.Process(server.pid)
            time.sleep(1.0)
            before = process.memory_info().rss
            peak = before
            done = threading.Event()

            def sample() -> None:
                nonlocal peak
                while not done.is_set():
                    peak = max(peak, process.memory_info().rss)
                    time.sleep(0.02)

            def body():
                for _ in range(args.mib):
                    yield b"\0" * (1 << 20)

            def upload(url: str) -> None:
                response = httpx.put(url, content=body(), timeout=300)
                assert response.status_code == 200, response.text

            sampler = threading.Thread(target=sample)
            sampler.start()
            threads = [threading.Thread(target=upload, args=(u,)) for u in urls]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            done.set()
            sampler.join()
        finally:
            server.terminate()
            server.wait(30)
    mib = 1 << 20
    print(json.dumps({"bench": "uploads", "n": args.n, "mib": args.mib, "rss_before_mib": round(before / mib),
                      "rss_peak_mib": round(peak / mib), "growth_mib": round((peak - before) / mib)}))  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
