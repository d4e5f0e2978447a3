"""MP4 output: H.264 video + AAC audio in one file, written with PyAV (libav inside the wheel).

Why PyAV and not an ffmpeg subprocess: see ARCHITECTURE.md, "Media encoding" (measured on this
machine; in short, no pipes and no temporary WAV file, and it was faster).

The reference (`ovi/utils/io_utils.save_video`, moviepy) writes libx264 + AAC at the frame rate given;
we keep libx264/yuv420p/AAC and the float -> uint8 mapping, and add `+faststart` so browsers can
start playing before the download ends. Audio stays at its native 16 kHz (moviepy resampled to
44.1 kHz; AAC-LC plays at 16 kHz everywhere and resampling adds nothing to a 16 kHz signal).
"""

from __future__ import annotations

import logging
import os
import uuid
from fractions import Fraction
from pathlib import Path
from typing import Any, Literal

import av
import numpy as np
import torch
from torch import Tensor

logger = logging.getLogger(__name__)

DEFAULT_CRF = 18  # near-transparent quality; the reference used libx264's default, 23 (smaller files)
DEFAULT_PRESET = "medium"
DEFAULT_AUDIO_BITRATE = 128_000

Layout = Literal["auto", "cthw", "thwc"]


def write_mp4(
    path: str | os.PathLike[str],
    video: Tensor | np.ndarray,
    audio: Tensor | np.ndarray | None,
    *,
    fps: int = 24,
    sample_rate: int = 16000,
    layout: Layout = "auto",
    crf: int = DEFAULT_CRF,
    preset: str = DEFAULT_PRESET,
    audio_bitrate: int = DEFAULT_AUDIO_BITRATE,
) -> Path:
    """Encodes frames and a mono waveform into `path` (H.264 yuv420p + AAC, moov atom first).

    Args:
        video: [3, T, H, W] (the VAE's layout) or [T, H, W, 3]; uint8, or float in [-1, 1]
            (clamped, then mapped like the reference: uint8((x + 1) / 2 * 255), truncating).
            Odd H or W are padded by repeating the last row / column, because yuv420p needs even sides.
        audio: [N], [1, N] or [1, 1, N] float waveform in [-1, 1] at `sample_rate`; cut or padded
            with silence to the video's duration (T / fps). None writes a video-only file.
        layout: "auto" tells the layouts apart by which axis has 3 channels.
    The file appears at `path` only when complete: it is written to a hidden temporary file in the
    same directory and renamed, and the temporary file is removed on any error.
    """
    frames = _frames_thwc_uint8(video, layout)  # [T, H, W, 3]
    num_frames, height, width, _ = frames.shape
    if num_frames == 0:
        raise ValueError("no video frames to write")
    pad_h, pad_w = height % 2, width % 2
    if pad_h or pad_w:
        logger.info("padding %dx%d video to %dx%d for yuv420p", width, height, width + pad_w, height + pad_h)
        frames = np.pad(frames, ((0, 0), (0, pad_h), (0, pad_w), (0, 0)), mode="edge")
    waveform = None if audio is None else _fit_audio(audio, num_frames, fps, sample_rate)

    path = Path(path)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        _encode(tmp, frames, waveform, fps, sample_rate, crf, preset, audio_bitrate)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def _encode(
    path: Path,
    frames: np.ndarray,
    waveform: np.ndarray | None,
    fps: int,
    sample_rate: int,
    crf: int,
    preset: str,
    audio_bitrate: int,
) -> None:
    # "faststart" makes the muxer move the moov atom to the front in a second pass over the file.
    with av.open(str(path), mode="w", format="mp4", options={"movflags": "+faststart"}) as container:
        video_stream = container.add_stream("libx264", rate=Fraction(fps))
        video_stream.width, video_stream.height = frames.shape[2], frames.shape[1]
        video_stream.pix_fmt = "yuv420p"
        video_stream.options = {"crf": str(crf), "preset": preset}
        # x264's frame threads (one per core): PyAV's default asks for slice threads, which scale worse
        # (4.5 s for 121 frames of 992x512 on 16 cores, benchmarks/RESULTS.md); same quality settings
        video_stream.codec_context.thread_type = "FRAME"
        video_stream.codec_context.thread_count = 0  # auto
        audio_stream = None
        if waveform is not None:
            audio_stream = container.add_stream("aac", rate=sample_rate, layout="mono")
            audio_stream.bit_rate = audio_bitrate

        for index, rgb in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(rgb, format="rgb24")
            frame.pts = index
            frame.time_base = Fraction(1, fps)
            container.mux(video_stream.encode(frame))
        container.mux(video_stream.encode(None))

        if audio_stream is not None and waveform is not None:
            samples = av.AudioFrame.from_ndarray(waveform[None, :], format="fltp", layout="mono")
            samples.sample_rate = sample_rate
            samples.pts = 0
            samples.time_base = Fraction(1, sample_rate)
            container.mux(audio_stream.encode(samples))  # the codec splits it into 1024-sample frames
            container.mux(audio_stream.encode(None))


def _frames_thwc_uint8(video: Tensor | np.ndarray, layout: Layout) -> np.ndarray:
    """Any accepted video layout and dtype -> contiguous uint8 [T, H, W, 3]."""
    array = video.detach().to("cpu") if isinstance(video, Tensor) else torch.from_numpy(np.asarray(video))
    if array.ndim != 4:
        raise ValueError(f"video must be 4-D ([3, T, H, W] or [T, H, W, 3]), got shape {tuple(array.shape)}")
    if layout == "auto":
        first, last = array.shape[0] == 3, array.shape[-1] == 3
        if first == last:
            raise ValueError(f"cannot tell the layout of a video shaped {tuple(array.shape)}; pass layout=")
        layout = "cthw" if first else "thwc"
    if layout == "cthw":
        array = array.permute(1, 2, 3, 0)
    if array.shape[-1] != 3:
        raise ValueError(f"video must have 3 channels, got shape {tuple(array.shape)} as {layout}")
    if array.dtype != torch.uint8:
        if not array.is_floating_point():
            raise ValueError(f"video must be uint8 or float in [-1, 1], got {array.dtype}")
        array = video_to_uint8(array)
    return np.ascontiguousarray(array.numpy())


def video_to_uint8(video: Tensor) -> Tensor:
    """Float frames in [-1, 1] -> uint8 on the same device, clamped, mapped as the reference's
    io_utils.save_video does: uint8((x + 1) / 2 * 255), truncating rather than rounding."""
    return ((video.float().clamp(-1, 1) + 1) / 2 * 255).to(torch.uint8)


def _fit_audio(audio: Tensor | np.ndarray, num_frames: int, fps: int, sample_rate: int) -> np.ndarray:
    """Mono float32 waveform cut or zero-padded to exactly the video's duration."""
    wave = audio.detach().to("cpu").float().numpy() if isinstance(audio, Tensor) else np.asarray(audio)
    wave = wave.astype(np.float32, copy=False)
    if wave.ndim > 1:
        if any(size != 1 for size in wave.shape[:-1]):
            raise ValueError(f"audio must be mono ([N], [1, N] or [1, 1, N]), got shape {wave.shape}")
        wave = wave.reshape(-1)
    target = round(num_frames * sample_rate / fps)
    if wave.shape[0] >= target:
        wave = wave[:target]
    else:
        wave = np.pad(wave, (0, target - wave.shape[0]))
    return np.ascontiguousarray(np.clip(wave, -1.0, 1.0))


def probe(path: str | os.PathLike[str]) -> dict[str, Any]:
    """What a player sees in an MP4: codecs, pixel format, rate, size, durations, moov position.

    Durations are in seconds, from the stream headers (the AAC encoder's priming samples are
    excluded by the edit list, as players do). Keys for a stream that is absent are None.
    """
    path = Path(path)
    info: dict[str, Any] = {
        "video_codec": None,
        "pix_fmt": None,
        "fps": None,
        "width": None,
        "height": None,
        "num_frames": None,
        "video_duration": None,
        "audio_codec": None,
        "sample_rate": None,
        "audio_channels": None,
        "audio_duration": None,
        "faststart": _moov_before_mdat(path),
        "size_bytes": path.stat().st_size,
    }
    with av.open(str(path)) as container:
        if container.streams.video:
            stream = container.streams.video[0]
            info.update(
                video_codec=stream.codec_context.name,
                pix_fmt=stream.codec_context.pix_fmt,
                fps=float(stream.average_rate) if stream.average_rate else None,
                width=stream.codec_context.width,
                height=stream.codec_context.height,
                num_frames=stream.frames,
                video_duration=_seconds(stream),
            )
        if container.streams.audio:
            stream = container.streams.audio[0]
            info.update(
                audio_codec=stream.codec_context.name,
                sample_rate=stream.codec_context.sample_rate,
                audio_channels=stream.codec_context.channels,
                audio_duration=_seconds(stream),
            )
    return info


def _seconds(stream: av.stream.Stream) -> float | None:
    if stream.duration is None or stream.time_base is None:
        return None
    return float(stream.duration * stream.time_base)


def _moov_before_mdat(path: Path) -> bool:
    """True when the moov atom precedes mdat (top-level MP4 boxes), i.e. +faststart took effect."""
    with path.open("rb") as file:
        while header := file.read(8):
            if len(header) < 8:
                return False
            size, kind = int.from_bytes(header[:4], "big"), header[4:]
            if kind == b"moov":
                return True
            if kind == b"mdat":
                return False
            if size == 1:  # 64-bit size follows the type
                size = int.from_bytes(file.read(8), "big") - 8
            elif size == 0:  # box runs to the end of the file
                return False
            file.seek(size - 8, os.SEEK_CUR)
    return False
