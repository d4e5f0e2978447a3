"""MP4 muxing: a real encode read back through probe(): codecs, rate, size, durations, faststart."""

from __future__ import annotations

import math
import threading

import av
import numpy as np
import pytest
import torch

from ovi_server.media.mux import Mp4Writer, probe, write_mp4

FPS = 24
SR = 16000


def _tone(seconds: float) -> torch.Tensor:
    t = torch.arange(int(seconds * SR)) / SR
    return 0.3 * torch.sin(2 * math.pi * 440 * t)


def _gradient_video(frames: int, height: int, width: int) -> torch.Tensor:
    """[3, T, H, W] float in [-1, 1], a moving gradient (what the VAE decoder hands over)."""
    t = torch.linspace(0, 1, frames)[None, :, None, None]
    y = torch.linspace(-1, 1, height)[None, None, :, None]
    x = torch.linspace(-1, 1, width)[None, None, None, :]
    channels = torch.tensor([1.0, 0.5, -0.5])[:, None, None, None]
    return torch.sin(3 * x + 2 * y + 6 * t + channels).expand(3, frames, height, width).contiguous()


def _assert_duration_close(info: dict, frames: int) -> None:
    one_frame = 1 / FPS
    assert info["video_duration"] == pytest.approx(frames / FPS, abs=one_frame)
    assert info["audio_duration"] == pytest.approx(frames / FPS, abs=one_frame)


def test_mux_float_cthw_with_longer_audio(tmp_path):
    frames = 12
    out = write_mp4(tmp_path / "clip.mp4", _gradient_video(frames, 64, 96), _tone(1.0), fps=FPS)
    assert out == tmp_path / "clip.mp4"
    info = probe(out)
    assert info["video_codec"] == "h264"
    assert info["pix_fmt"] == "yuv420p"
    assert info["fps"] == FPS
    assert (info["width"], info["height"]) == (96, 64)
    assert info["num_frames"] == frames
    assert info["audio_codec"] == "aac"
    assert info["sample_rate"] == SR and info["audio_channels"] == 1
    assert info["faststart"] is True
    _assert_duration_close(info, frames)  # 1 s of audio cut to 0.5 s
    assert sorted(p.name for p in tmp_path.iterdir()) == ["clip.mp4"]


def test_mux_uint8_thwc_with_short_audio_is_padded(tmp_path):
    frames = 10
    video = (_gradient_video(frames, 32, 48).permute(1, 2, 3, 0) * 127 + 128).to(torch.uint8)  # [T, H, W, 3]
    info = probe(write_mp4(tmp_path / "a.mp4", video, _tone(0.1)[None, :].numpy(), fps=FPS))
    assert (info["width"], info["height"], info["num_frames"]) == (48, 32, frames)
    _assert_duration_close(info, frames)


def test_frames_survive_encoding(tmp_path):
    video = _gradient_video(6, 64, 64)
    path = write_mp4(tmp_path / "a.mp4", video, None, fps=FPS)
    with av.open(str(path)) as container:
        decoded = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    expected = ((video.clamp(-1, 1) + 1) / 2 * 255).to(torch.uint8).permute(1, 2, 3, 0).numpy()
    assert len(decoded) == 6
    # yuv420p halves chroma resolution, so a small colourful clip is off by a few levels; a swapped
    # channel order (RGB read as BGR) would be off by tens.
    got = np.stack(decoded).astype(int)
    assert np.abs(got - expected.astype(int)).mean() < 6
    assert np.abs(got - expected[..., ::-1].astype(int)).mean() > 20
    info = probe(path)
    assert info["audio_codec"] is None and info["video_codec"] == "h264"


def test_odd_sizes_are_padded_to_even(tmp_path):
    video = torch.rand(3, 5, 33, 47) * 2 - 1
    info = probe(write_mp4(tmp_path / "odd.mp4", video, _tone(0.5)))
    assert (info["width"], info["height"]) == (48, 34)
    assert info["pix_fmt"] == "yuv420p"


def test_bad_input_leaves_no_files(tmp_path):
    with pytest.raises(ValueError, match="cannot tell the layout"):
        write_mp4(tmp_path / "x.mp4", torch.zeros(3, 4, 4, 3), None)
    with pytest.raises(ValueError, match="audio must be mono"):
        write_mp4(tmp_path / "x.mp4", torch.zeros(3, 2, 8, 8), torch.zeros(2, 100))
    with pytest.raises(ValueError, match="uint8 or float"):
        write_mp4(tmp_path / "x.mp4", torch.zeros(3, 2, 8, 8, dtype=torch.int32), None)
    # An encoder failure after the temporary file exists: unknown x264 preset.
    with pytest.raises(av.FFmpegError):
        write_mp4(tmp_path / "x.mp4", torch.zeros(3, 2, 8, 8), None, preset="no-such-preset")
    assert list(tmp_path.iterdir()) == []


def test_overwrites_existing_output(tmp_path):
    path = tmp_path / "out.mp4"
    path.write_bytes(b"old")
    write_mp4(path, torch.zeros(3, 2, 16, 16), _tone(0.1))
    assert probe(path)["num_frames"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.mp4"]


def _decoded_rgb(path) -> np.ndarray:
    with av.open(str(path)) as container:
        return np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)]).astype(int)


def _encoder_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "mp4-encoder"]


def test_frames_added_in_chunks_play_in_order(tmp_path):
    """The pipeline adds 1 frame, then 4 at a time, as the VAE decodes them."""
    video = _gradient_video(9, 64, 64)
    frames = ((video + 1) / 2 * 255).to(torch.uint8).permute(1, 2, 3, 0)  # [T, H, W, 3]
    with Mp4Writer(tmp_path / "a.mp4", fps=FPS, sample_rate=SR) as writer:
        for start, stop in ((0, 1), (1, 5), (5, 9)):
            writer.add(frames[start:stop])
        path = writer.close(_tone(9 / FPS))
    got = _decoded_rgb(path)
    assert got.shape == (9, 64, 64, 3)
    errors = np.abs(got[:, None] - frames.numpy()[None].astype(int)).mean(axis=(2, 3, 4))  # [decoded, source]
    assert (errors.argmin(axis=1) == np.arange(9)).all()  # each frame is closest to its own source
    assert errors.diagonal().max() < 6
    _assert_duration_close(probe(path), 9)
    assert [p.name for p in tmp_path.iterdir()] == ["a.mp4"] and _encoder_threads() == []


def test_a_closed_writer_takes_nothing_more(tmp_path):
    frames = torch.zeros(1, 32, 32, 3, dtype=torch.uint8)
    with Mp4Writer(tmp_path / "a.mp4") as writer:
        writer.add(frames)
        path = writer.close(_tone(1 / FPS))
        with pytest.raises(ValueError, match="closed or aborted"):
            writer.add(frames)
        with pytest.raises(ValueError, match="closed or aborted"):
            writer.close(_tone(1 / FPS))
    assert probe(path)["num_frames"] == 1  # the file stands


def test_leaving_the_writer_by_an_error_leaves_no_file(tmp_path):
    frames = torch.zeros(4, 32, 32, 3, dtype=torch.uint8)
    with pytest.raises(RuntimeError, match="decode failed"), Mp4Writer(tmp_path / "a.mp4") as writer:
        writer.add(frames)
        raise RuntimeError("decode failed")
    assert list(tmp_path.iterdir()) == [] and _encoder_threads() == []


def test_an_encoder_failure_reaches_the_caller(tmp_path):
    """The encoder runs on its own thread: its error surfaces at the next add or at close."""
    frames = torch.zeros(4, 32, 32, 3, dtype=torch.uint8)
    with pytest.raises(av.FFmpegError), Mp4Writer(tmp_path / "a.mp4", preset="no-such-preset") as writer:
        for _ in range(20):  # more chunks than the queue holds: add must not block on a dead encoder
            writer.add(frames)
        writer.close(_tone(1.0))
    assert list(tmp_path.iterdir()) == [] and _encoder_threads() == []


def test_writer_refuses_a_size_change_and_an_empty_video(tmp_path):
    with pytest.raises(ValueError, match="one size per video"), Mp4Writer(tmp_path / "a.mp4") as writer:
        writer.add(torch.zeros(1, 32, 32, 3, dtype=torch.uint8))
        writer.add(torch.zeros(4, 32, 48, 3, dtype=torch.uint8))
    with pytest.raises(ValueError, match="no video frames"), Mp4Writer(tmp_path / "b.mp4") as writer:
        writer.close(_tone(1.0))
    assert list(tmp_path.iterdir()) == [] and _encoder_threads() == []
