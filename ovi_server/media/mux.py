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
import queue
import threading
import uuid
from dataclasses import dataclass
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
    The file appears at `path` only when complete (see `Mp4Writer`).
    """
    frames = _frames_thwc_uint8(video, layout)  # [T, H, W, 3]; bad input fails here, before any file
    if frames.shape[0] == 0:
        raise ValueError("no video frames to write")
    with Mp4Writer(
        path,
        fps=fps,
        sample_rate=sample_rate,
        with_audio=audio is not None,
        crf=crf,
        preset=preset,
        audio_bitrate=audio_bitrate,
    ) as writer:
        writer.add(frames)
        return writer.close(audio)


class Mp4Writer:
    """An MP4 written while its frames are still being made (H.264 yuv420p + AAC, moov atom first).

    `add` queues frames for an encoder thread and returns at once (it blocks only when
    `QUEUE_CHUNKS` chunks are waiting), so the encoding overlaps whatever makes the next frames: in
    the pipeline, the video decode on the GPU. `close(audio)` waits for the video, adds the audio and
    puts the file in place. The file appears at `path` only when complete: it is written to a hidden
    temporary file in the same directory and renamed, and the temporary file is removed on any error,
    on `abort()`, and when a `with` block is left by an exception.
    """

    QUEUE_CHUNKS = 4

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        fps: int = 24,
        sample_rate: int = 16000,
        with_audio: bool = True,
        crf: int = DEFAULT_CRF,
        preset: str = DEFAULT_PRESET,
        audio_bitrate: int = DEFAULT_AUDIO_BITRATE,
    ):
        self.path = Path(path)
        self.fps, self.sample_rate, self.with_audio = fps, sample_rate, with_audio
        self._options = {"crf": str(crf), "preset": preset}
        self._audio_bitrate = audio_bitrate
        self.num_frames = 0
        self._size: tuple[int, int] | None = None  # (height, width) as added, before padding
        self._tmp = self.path.with_name(f".{self.path.name}.{uuid.uuid4().hex[:8]}.tmp")
        self._queue: queue.Queue[Any] = queue.Queue(self.QUEUE_CHUNKS)
        self._error: BaseException | None = None
        self._done = False
        self._thread = threading.Thread(target=self._encode_all, name="mp4-encoder", daemon=True)
        self._thread.start()

    def __enter__(self) -> Mp4Writer:
        return self

    def __exit__(self, kind: type[BaseException] | None, *_: object) -> None:
        if kind is not None or not self._done:
            self.abort()

    def add(self, frames: Tensor | np.ndarray, layout: Layout = "thwc") -> None:
        """Queues frames ([T, H, W, 3] uint8 by default; any `write_mp4` layout); raises the encoder's
        error if it has failed."""
        if self._done:
            raise ValueError("frames added to a writer that is closed or aborted")
        self._raise_encoder_error()
        array = _frames_thwc_uint8(frames, layout)
        if self._size is None:
            self._size = array.shape[1:3]
        elif array.shape[1:3] != self._size:
            raise ValueError(f"frames of {array.shape[1:3]} after frames of {self._size}: one size per video")
        pad_h, pad_w = array.shape[1] % 2, array.shape[2] % 2
        if pad_h or pad_w:
            if self.num_frames == 0:
                logger.info(
                    "padding %dx%d video to %dx%d for yuv420p",
                    array.shape[2], array.shape[1], array.shape[2] + pad_w, array.shape[1] + pad_h,
                )  # fmt: skip
            array = np.pad(array, ((0, 0), (0, pad_h), (0, pad_w), (0, 0)), mode="edge")
        self._put(array)
        self.num_frames += array.shape[0]

    def close(self, audio: Tensor | np.ndarray | None = None) -> Path:
        """Finishes the file and moves it to `path`. `audio` ([N], [1, N] or [1, 1, N] float in [-1, 1]
        at `sample_rate`) is cut or padded with silence to the video's duration (frames / fps)."""
        if self._done:
            raise ValueError("the writer is closed or aborted already")
        try:
            if self.num_frames == 0:
                raise ValueError("no video frames to write")
            if (audio is None) == self.with_audio:
                raise ValueError(
                    "audio given to a video-only writer" if audio is not None else "audio missing"
                )
            waveform = (
                None if audio is None else _fit_audio(audio, self.num_frames, self.fps, self.sample_rate)
            )
            self._put(_Finish(waveform))
            self._thread.join()
            self._raise_encoder_error()
            os.replace(self._tmp, self.path)
            self._done = True
            return self.path
        except BaseException:
            self.abort()
            raise

    def abort(self) -> None:
        """Stops the encoder and removes the partial file; nothing appears at `path`."""
        if self._thread.is_alive():
            while True:  # frames still queued are not worth encoding
                try:
                    self._queue.get_nowait()
                except queue.Empty:
                    break
            self._put(_ABORT, check=False)
            self._thread.join()
        self._tmp.unlink(missing_ok=True)
        self._done = True

    def _put(self, item: Any, check: bool = True) -> None:
        # a bounded wait, so a dead encoder cannot leave the caller blocked on a full queue
        while True:
            if check:
                self._raise_encoder_error()
            if not self._thread.is_alive():
                return
            try:
                self._queue.put(item, timeout=0.5)
                return
            except queue.Full:
                continue

    def _raise_encoder_error(self) -> None:
        if self._error is not None:
            raise self._error

    def _encode_all(self) -> None:
        """The encoder thread: owns the container from open to close."""
        try:
            # "faststart" makes the muxer move the moov atom to the front in a second pass over the file.
            with av.open(
                str(self._tmp), mode="w", format="mp4", options={"movflags": "+faststart"}
            ) as container:
                video_stream = audio_stream = None
                pts = 0
                while not isinstance(item := self._queue.get(), _Finish):
                    if item is _ABORT:
                        return
                    if video_stream is None:
                        video_stream, audio_stream = self._add_streams(
                            container, item.shape[2], item.shape[1]
                        )
                    for rgb in item:
                        frame = av.VideoFrame.from_ndarray(rgb, format="rgb24")
                        frame.pts, pts = pts, pts + 1
                        frame.time_base = Fraction(1, self.fps)
                        container.mux(video_stream.encode(frame))
                container.mux(video_stream.encode(None))
                if audio_stream is not None and item.waveform is not None:
                    samples = av.AudioFrame.from_ndarray(item.waveform[None, :], format="fltp", layout="mono")
                    samples.sample_rate = self.sample_rate
                    samples.pts = 0
                    samples.time_base = Fraction(1, self.sample_rate)
                    container.mux(audio_stream.encode(samples))  # the codec splits it into 1024-sample frames
                    container.mux(audio_stream.encode(None))
        except BaseException as exc:  # noqa: BLE001 -- handed to the caller's thread by add/close
            self._error = exc

    def _add_streams(self, container: Any, width: int, height: int) -> tuple[Any, Any]:
        video_stream = container.add_stream("libx264", rate=Fraction(self.fps))
        video_stream.width, video_stream.height = width, height
        video_stream.pix_fmt = "yuv420p"
        video_stream.options = dict(self._options)
        # x264's frame threads (one per core): PyAV's default asks for slice threads, which scale worse
        # (4.5 s for 121 frames of 992x512 on 16 cores, benchmarks/RESULTS.md); same quality settings
        video_stream.codec_context.thread_type = "FRAME"
        video_stream.codec_context.thread_count = 0  # auto
        audio_stream = None
        if self.with_audio:
            audio_stream = container.add_stream("aac", rate=self.sample_rate, layout="mono")
            audio_stream.bit_rate = self._audio_bitrate
        return video_stream, audio_stream


@dataclass(frozen=True)
class _Finish:
    waveform: np.ndarray | None


_ABORT = object()


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
