"""Smoke test of the benchmark harness on the tiny variant: it runs and reports every stage (no timing)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import run_module

REPO_ROOT = Path(__file__).resolve().parent.parent


def run_bench(*flags: str) -> subprocess.CompletedProcess[str]:
    return run_module("benchmarks.run", *flags)


@pytest.mark.slow
def test_tiny_run_reports_every_stage(tmp_path):
    out = tmp_path / "tiny.json"
    done = run_bench(
        "--variant", "tiny", "--device", "cpu", "--steps", "2", "--checkpoint-load", "--json", str(out)
    )
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(out.read_text())
    assert set(report["stages"]) == {
        "build",
        "encode_text",
        "denoise_step",
        "denoise",
        "decode_video",
        "decode_audio",
        "mux",
        "end_to_end",
    }
    assert report["stages"]["denoise_step"]["n"] == 1  # 2 steps, the first is the warm-up
    assert {"mean_s", "p50_s", "p90_s", "warmup_s"} <= set(report["stages"]["denoise_step"])
    assert report["memory"]["kind"] == "rss" and report["memory"]["peak_gb"] > 0
    assert report["checkpoint_load"]["params"] > 0 and report["checkpoint_load"]["peak_rss_gb"] > 0
    assert report["random_weights"] is True and report["environment"]["git_sha"]
    # the one JSON line STYLE.md §11 asks for is the last line printed without --reference
    assert json.loads(done.stdout.strip().splitlines()[-1])["variant"] == "tiny"


def test_full_size_variant_on_cpu_is_refused_with_a_reason():
    done = run_bench("--variant", "720x720_5s", "--device", "cpu", "--steps", "2")
    assert done.returncode == 2
    assert "too large for a CPU run" in done.stderr and "--device cuda" in done.stderr


def test_reference_flash_attention_stand_in_matches_our_attention():
    """The SDPA stand-in the side by side puts in place of the reference's flash_attention computes what
    our attention() computes, padded keys masked, so a parity error there would be the model's."""
    import torch

    from benchmarks.reference import sdpa_attention
    from ovi_server.models.attention import attention

    generator = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 7, 3, 8, generator=generator) for _ in range(3))  # [B, L, H, D]
    ours = attention(q, k, v, k_lens=[4, 7])
    theirs = sdpa_attention(q, k, v, k_lens=torch.tensor([4, 7], dtype=torch.int32))
    torch.testing.assert_close(theirs, ours)
    torch.testing.assert_close(sdpa_attention(q, k, v), attention(q, k, v))


def test_forward_bench_reports_one_json_line():
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.forward", "--variant", "tiny", "--reps", "2"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    line = json.loads(done.stdout.strip().splitlines()[-1])
    assert line["bench"] == "forward" and len(line["times_s"]) == 2
    assert line["video_tokens"] == 12 and line["audio_tokens"] == 13  # tiny's default t2v shape
    assert 0 < line["min_s"] <= line["median_s"]


def test_reference_step_loop_leaves_no_autocast_between_steps():
    """Our steps run between the reference loop's yields: they must not inherit its bf16 autocast
    (norms in float32, mixed q/k/v dtypes) or its inference mode."""
    import torch

    from benchmarks.reference import reference_step_loop

    class Model(torch.nn.Module):  # the reference FusionModel's calling convention
        video_model = type("VideoModel", (), {"patch_size": (1, 2, 2)})()

        def forward(self, vid, audio, t, vid_context, audio_context, **kwargs):
            assert torch.is_autocast_enabled("cpu")  # the reference's own steps do run under it
            return [vid[0] * 0.5], [audio[0] * 0.5]

    class Scheduler:
        timesteps = torch.tensor([999.0, 500.0, 1.0])

        def step(self, pred, t, sample, return_dict=False):
            return (sample - 0.1 * pred,)

    context = torch.zeros(3, 8)
    steps = reference_step_loop(
        Model(),
        torch.ones(48, 1, 2, 2),
        torch.ones(5, 20),
        (context, context, context),
        (Scheduler(), Scheduler()),
        4.0,
        3.0,
        1,
        torch.bfloat16,
    )
    seen = 0
    for video, _audio in steps:
        assert not torch.is_autocast_enabled("cpu") and not torch.is_inference_mode_enabled()
        assert video.shape == (48, 1, 2, 2)
        seen += 1
    assert seen == 3


def test_mux_bench_paced_reports_the_encode_left_after_the_last_chunk():
    flags = ("--size", "64x32", "--frames", "9", "--repeats", "1", "--pace", "0.01")
    done = run_module("benchmarks.mux", *flags, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout)
    assert set(report["tail_s"]) == set(report["total_s"]) == {"noise", "smooth"}
    # the frames took at least 3 chunks x 10 ms to arrive, and the tail is part of the total
    assert all(report["total_s"][k] >= 0.03 + report["tail_s"][k] for k in ("noise", "smooth"))
    assert report["file_bytes"]["noise"] > report["file_bytes"]["smooth"] > 0


def test_differential_refuses_a_folder_that_is_not_a_reference_checkout(tmp_path):
    done = run_module("benchmarks.differential", "--reference", str(tmp_path))
    assert done.returncode == 2
    assert "is not a character-ai/Ovi checkout" in done.stderr


def test_differential_writer_round_trips_a_golden_case(tmp_path):
    """The generators write through ComponentWriter; a public case re-written by it must read back and pass
    through the golden runner, with sizes and hashes in the manifest matching the files."""
    import hashlib
    import io

    from safetensors.torch import load_file

    from benchmarks.differential import ComponentWriter
    from ovi_server.golden.__main__ import check

    source = REPO_ROOT / "tests" / "golden" / "sampler"
    spec = json.loads((source / "manifest.json").read_text())["cases"][-1]
    writer = ComponentWriter(tmp_path, "sampler", reference="round trip")
    name = writer.tensors("case.safetensors", load_file(str(source / spec["input_file"])))
    writer.case(**{**spec, "input_file": name})
    manifest = json.loads(writer.close().read_text())
    data = (tmp_path / "sampler" / name).read_bytes()
    assert manifest["files"][name] == {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    assert check(tmp_path, ["sampler"], out=io.StringIO()) == (1, 0)
