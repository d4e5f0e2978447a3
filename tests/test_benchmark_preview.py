"""Smoke test of benchmarks/preview.py on the tiny variant: it runs and reports its figures (no timing)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent


def test_preview_benchmark_reports_the_ratio():
    flags = ["--variant", "tiny", "--steps", "3", "--shapes", "720x720_5s", "--reps", "1"]
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.preview", *flags],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout.splitlines()[-1])
    assert report["bench"] == "preview" and report["variant"] == "tiny" and report["steps_timed"] == 2
    assert report["video_latent"] == [48, 3, 4, 4] and report["png_bytes"] > 0
    preview_s = (report["preview_render_ms_p50"] + report["preview_store_ms_p50"]) / 1e3
    ratio = preview_s / report["step_s_p50"]
    # the fields are rounded to 1 us (a tiny step is well under a millisecond) and the ratio to 1e-5
    rounding = ratio * (1e-6 / preview_s + 0.5e-6 / report["step_s_p50"]) + 0.5e-5
    assert abs(report["preview_over_step"] - ratio) <= rounding
    assert report["shapes"]["720x720_5s"]["video_latent"] == [48, 31, 44, 44]
