"""Checkpoint loading: strict keys, fp8 files, .pth files, and peak host memory of a meta-device load."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file, save_file

from ovi_server.config import dit_config
from ovi_server.engine.device import CPU_FP32, Placement
from ovi_server.errors import WeightsError
from ovi_server.models.fusion import layerwise_cast_params, load_fusion
from tests.conftest import REPO, golden_cases

CASE = golden_cases("fusion")[0]
VIDEO, AUDIO = dit_config(CASE.config["video"]), dit_config(CASE.config["audio"])


@pytest.fixture(scope="module")
def official():
    return load_file(str(CASE.weight_path()))


def _inputs():
    g = torch.Generator().manual_seed(1)
    ctx = torch.randn(5, VIDEO.text_dim, generator=g)
    return (
        [torch.randn(48, 2, 4, 4, generator=g)],
        [torch.randn(9, 20, generator=g)],
        torch.tensor([500]),
        [ctx],
        [ctx],
    )


def test_missing_key_names_the_file_and_the_key(official, tmp_path):
    path = tmp_path / "model.safetensors"
    broken = dict(official)
    del broken["audio_model.blocks.0.cross_attn.k_fusion.weight"]
    save_file(broken, str(path))
    with pytest.raises(WeightsError) as err:
        load_fusion(path, VIDEO, AUDIO, CPU_FP32)
    message = str(err.value)
    assert str(path) in message
    assert "1 keys missing" in message and "audio_model.blocks.0.cross_attn.k_fusion.weight" in message


def test_unexpected_key_is_an_error(official, tmp_path):
    path = tmp_path / "model.safetensors"
    save_file({**official, "video_model.freqs": torch.zeros(3)}, str(path))
    with pytest.raises(WeightsError, match=r"1 unexpected keys \(first: video_model.freqs\)"):
        load_fusion(path, VIDEO, AUDIO, CPU_FP32)


def test_wrong_shape_says_which_tensor(official, tmp_path):
    path = tmp_path / "model.safetensors"
    save_file({**official, "video_model.head.head.bias": torch.zeros(7)}, str(path))
    with pytest.raises(WeightsError, match="video_model.head.head.bias has shape"):
        load_fusion(path, VIDEO, AUDIO, CPU_FP32)


def test_missing_file_and_garbage_file(tmp_path):
    with pytest.raises(WeightsError, match="file not found"):
        load_fusion(tmp_path / "nope.safetensors", VIDEO, AUDIO, CPU_FP32)
    garbage = tmp_path / "model.safetensors"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(WeightsError, match="cannot be read as a checkpoint"):
        load_fusion(garbage, VIDEO, AUDIO, CPU_FP32)


def test_pth_checkpoint_loads_like_safetensors(official, tmp_path):
    path = tmp_path / "model.pth"
    torch.save(official, path)
    a = load_fusion(CASE.weight_path(), VIDEO, AUDIO, CPU_FP32)
    b = load_fusion(path, VIDEO, AUDIO, CPU_FP32)
    torch.testing.assert_close(a(*_inputs())[0][0], b(*_inputs())[0][0], atol=0, rtol=0)


def _fp8_file(official, tmp_path):
    """The community fp8 file's layout: same keys, the blocks' Linear weights stored as float8_e4m3fn."""
    model = load_fusion(CASE.weight_path(), VIDEO, AUDIO, CPU_FP32)
    fp8_names = {n for n in layerwise_cast_params(model) if ".blocks." in n and n.endswith("weight")}
    path = tmp_path / "model_fp8_e4m3fn.safetensors"
    save_file({k: v.to(torch.float8_e4m3fn) if k in fp8_names else v for k, v in official.items()}, str(path))
    return path, fp8_names


def test_fp8_checkpoint_is_upcast_for_compute(official, tmp_path):
    path, fp8_names = _fp8_file(official, tmp_path)
    model = load_fusion(path, VIDEO, AUDIO, CPU_FP32)
    assert all(p.dtype == torch.float32 for p in model.parameters())
    reference = load_fusion(CASE.weight_path(), VIDEO, AUDIO, CPU_FP32)
    out, ref = model(*_inputs())[0][0], reference(*_inputs())[0][0]
    assert (out - ref).norm() / ref.norm() < 0.08


def test_fp8_checkpoint_can_stay_fp8_in_memory(official, tmp_path):
    path, fp8_names = _fp8_file(official, tmp_path)
    upcast = load_fusion(path, VIDEO, AUDIO, CPU_FP32)
    low_vram = load_fusion(path, VIDEO, AUDIO, CPU_FP32, keep_fp8=True)
    params = dict(low_vram.named_parameters())
    assert {name for name, p in params.items() if p.dtype == torch.float8_e4m3fn} == fp8_names
    assert params["video_model.head.modulation"].dtype == torch.float32
    # the fp8 weights are upcast per layer to exactly what the upcast model holds: the same output
    out, ref = low_vram(*_inputs()), upcast(*_inputs())
    torch.testing.assert_close(out, ref, atol=0, rtol=0)
    assert all(p.dtype == torch.float8_e4m3fn for n, p in low_vram.named_parameters() if n in fp8_names)


def _official_fp8_layout(official, tmp_path):
    """Laid out like the official `model_fp8_e4m3fn.safetensors`: every tensor e4m3fn except those whose
    names contain "norm" or "bias", which are bf16."""
    path = tmp_path / "model_fp8_e4m3fn.safetensors"
    layout = {
        k: v.to(torch.bfloat16 if "norm" in k or "bias" in k else torch.float8_e4m3fn)
        for k, v in official.items()
    }
    save_file(layout, str(path))
    return path, {k: v.dtype for k, v in layout.items()}


def test_fp8_file_keeps_biases_and_norms_in_the_files_dtype(official, tmp_path):
    path, file_dtypes = _official_fp8_layout(official, tmp_path)
    bf16 = Placement(torch.device("cpu"), torch.bfloat16)
    low_vram = load_fusion(path, VIDEO, AUDIO, bf16, keep_fp8=True)
    params = dict(low_vram.named_parameters())
    biases_and_norms = [n for n in params if "norm" in n or "bias" in n]
    assert len(biases_and_norms) > 50
    assert all(params[n].dtype == file_dtypes[n] == torch.bfloat16 for n in biases_and_norms)
    # Linear/Conv weights of the blocks and embeddings stay fp8; fp8 tensors our layers cannot take
    # in fp8 (modulation tables, the head and embeddings kept in the compute dtype) are upcast
    fp8 = {n for n, p in params.items() if p.dtype == torch.float8_e4m3fn}
    assert "video_model.blocks.0.self_attn.q.weight" in fp8 and "audio_model.blocks.1.ffn.0.weight" in fp8
    assert all(file_dtypes[n] == torch.float8_e4m3fn for n in fp8)
    assert params["video_model.blocks.0.modulation.modulation"].dtype == torch.bfloat16
    # and computes exactly what the same file upcast at load computes
    upcast = load_fusion(path, VIDEO, AUDIO, bf16)
    inputs = _inputs()
    out, ref = low_vram(*inputs), upcast(*inputs)
    torch.testing.assert_close(out, ref, atol=0, rtol=0)


MEASURE = textwrap.dedent(
    """
    import json, sys, torch
    from ovi_server.config import dit_config
    from ovi_server.engine.device import CPU_FP32, Placement
    from ovi_server.models.fusion import load_fusion
    import psutil
    cfg = json.loads(sys.argv[2])
    proc = psutil.Process()
    before = proc.memory_info().rss
    model = load_fusion(sys.argv[1], dit_config(cfg["video"]), dit_config(cfg["audio"]), CPU_FP32)
    touched = sum(float(p.double().sum()) for p in model.parameters())  # every page really read
    # this process's own high-water mark: ru_maxrss also takes in the parent's peak when the child was
    # started by vfork + exec (CPython's subprocess does), i.e. the whole pytest process's in a full run
    peak = next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith("VmHWM:"))
    print(json.dumps({"before": before, "peak": peak}))
    """
)


def test_meta_load_peak_rss_stays_near_one_copy(tmp_path):
    """A ~300 MB checkpoint: the load adds less than 1.3x its size to the process's peak RSS."""
    video = dict(CASE.config["video"], dim=768, ffn_dim=3072, num_heads=8, num_layers=3, text_dim=256)
    audio = dict(CASE.config["audio"], dim=768, ffn_dim=3072, num_heads=8, num_layers=3, text_dim=256)
    path = tmp_path / "model.safetensors"
    writer = textwrap.dedent(
        """
        import json, sys, torch
        from safetensors.torch import save_file
        from ovi_server.config import dit_config
        from ovi_server.models.fusion import build_fusion
        cfg = json.loads(sys.argv[2])
        model = build_fusion(dit_config(cfg["video"]), dit_config(cfg["audio"]))
        g = torch.Generator().manual_seed(0)
        save_file({k: torch.randn(v.shape, generator=g) * 0.02 for k, v in model.state_dict().items()}, sys.argv[1])
        """
    )
    cfg = json.dumps({"video": video, "audio": audio})
    subprocess.run([sys.executable, "-c", writer, str(path), cfg], check=True, cwd=REPO)
    size = path.stat().st_size
    assert 200e6 < size < 600e6
    out = subprocess.run(
        [sys.executable, "-c", MEASURE, str(path), cfg], check=True, cwd=REPO, capture_output=True, text=True
    )
    numbers = json.loads(out.stdout.strip().splitlines()[-1])
    added = numbers["peak"] - numbers["before"]
    print(
        f"checkpoint {size / 1e6:.0f} MB, load added {added / 1e6:.0f} MB to peak RSS ({added / size:.2f}x)"
    )
    assert added < 1.3 * size
