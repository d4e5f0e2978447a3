"""`python -m benchmarks.acceptance` on a CPU: every item that can run on one runs (tiny model), the
rest are skipped with their reason, and the repository's RESULTS.md is left alone."""

from __future__ import annotations

import json
import re
from pathlib import Path

from conftest import run_module

REPO_ROOT = Path(__file__).resolve().parent.parent
RESULTS = REPO_ROOT / "benchmarks" / "RESULTS.md"


def test_cpu_run_passes_what_a_cpu_can_check_and_skips_the_rest(tmp_path):
    before = RESULTS.read_bytes()
    out = tmp_path / "acceptance.json"
    done = run_module("benchmarks.acceptance", "--device", "cpu", "--variant", "tiny", "--json", str(out))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    last = done.stdout.strip().splitlines()[-1]
    assert re.fullmatch(r"acceptance: \d+ passed, 0 failed, \d+ skipped", last), last
    report = json.loads(out.read_text())
    status = {item["item"]: item for item in report["items"]}
    for name in (
        "end to end: fal default request",
        "attention _native_math vs native",
        "offload block: output",
        "fp8: peak memory",
    ):
        assert status[name]["status"] == "PASS", status[name]
    skipped = {name: item["note"] for name, item in status.items() if item["status"] == "SKIP"}
    assert "CUDA" in skipped["pytest -m gpu"]
    assert "bfloat16 or float16" in skipped["attention _native_cudnn vs native"]
    assert "--reference" in skipped["step vs reference"]
    assert "--gpu-memory limits CUDA memory" in skipped["32 GB card: end to end"]
    assert all(skipped.values()), skipped  # every skip says why
    counts = report["summary"]
    assert last == f"acceptance: {counts['PASS']} passed, {counts['FAIL']} failed, {counts['SKIP']} skipped"
    assert RESULTS.read_bytes() == before  # a CPU run records only when asked (--record)


def test_card_child_reports_the_choices_it_ran_with(tmp_path):
    """The card items' process (on a GPU: fal's default request under --gpu-memory) on the tiny model:
    its JSON says what the pipeline chose and what the request took."""
    out = tmp_path / "card.json"
    flags = ("--card-child", "8", "--device", "cpu", "--variant", "tiny", "--json", str(out))
    done = run_module("benchmarks.acceptance", *flags, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "--gpu-memory has no effect on the CPU" in done.stderr
    data = json.loads(out.read_text())
    assert data["valid_mp4"] is True and data["s"] > 0 and data["build_s"] > 0
    assert (data["offload"], data["text_encoder"], data["tiled"], data["compiled"]) == (
        "none",
        "resident",
        False,
        False,
    )
    assert set(data["timings"]) == {"encode_text", "denoise", "decode", "mux"}


def test_recorded_run_appends_its_table(tmp_path):
    from benchmarks.acceptance import Result, append_results

    results = tmp_path / "RESULTS.md"
    results.write_text("# Benchmark results\n")
    report = {
        "variant": "720x720_5s",
        "device": "cuda",
        "dtype": "bfloat16",
        "command": "python -m benchmarks.acceptance --device cuda",
        "environment": {
            "gpu": "NVIDIA H100 80GB HBM3",
            "cuda": "12.8",
            "torch": "2.13.0",
            "diffusers": "0.42.1",
            "git": "abc123",
            "date_utc": "2026-11-28T04:00:00Z",
            "load_average_start": [0.1, 0.1, 0.1],
        },
        "items": [vars(Result("offload block: peak memory", "FAIL", "25.1 GB", "<= 24 GB", "a | b"))],
        "summary": {"PASS": 0, "FAIL": 1, "SKIP": 0},
    }
    append_results(results, report)
    text = results.read_text()
    assert text.startswith("# Benchmark results\n")
    assert "## acceptance, 720x720_5s on cuda (2026-11-28T04:00:00Z)" in text
    assert "NVIDIA H100 80GB HBM3" in text and "`python -m benchmarks.acceptance --device cuda`" in text
    assert "| offload block: peak memory | FAIL | 25.1 GB | <= 24 GB | a / b |" in text
    assert text.rstrip().endswith("`acceptance: 0 passed, 1 failed, 0 skipped`")
