"""What the MP4 encode (media/mux.py: write_mp4) costs, on noise and on smooth frames.

    python -m benchmarks.mux [--size 992x512] [--frames 121] [--repeats 3] [--pace S]

Random weights decode to noise, the hardest content there is for x264; a real clip is much closer to the
smooth frames here (moving sine patterns). Both are uint8 [T, H, W, 3] as the pipeline hands them over,
with 5 s of silence as the audio. Prints one JSON line: the median seconds of each, and the settings.

--pace S: the frames reach an `Mp4Writer` as the pipeline hands them over (1, then 4 at a time, one
chunk per latent frame), one chunk every S seconds, the caller sleeping meanwhile as it waits on a GPU
decode; `tail_s` is how long the encode then runs on after the last chunk (what the overlap leaves),
`total_s` the whole.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from benchmarks.run import environment
from ovi_server.media.mux import DEFAULT_CRF, DEFAULT_PRESET, Mp4Writer, video_to_uint8, write_mp4


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.mux", description=__doc__.split("\n")[0])
    p.add_argument("--size", default="992x512", help="WxH (fal's default request)")
    p.add_argument("--frames", type=int, default=121, help="video frames (5 s at 24 fps + 1)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--pace", type=float, help="seconds between chunks of frames (a GPU decode's pace)")
    return p.parse_args(argv)


def clips(width: int, height: int, frames: int) -> dict[str, torch.Tensor]:
    """uint8 [T, H, W, 3]: uniform noise, and smooth patterns drifting from frame to frame."""
    g = torch.Generator().manual_seed(0)
    noise = torch.rand(frames, height, width, 3, generator=g) * 2 - 1
    y = torch.linspace(-1, 1, height)[None, :, None, None]
    x = torch.linspace(-1, 1, width)[None, None, :, None]
    t = torch.linspace(0, 6, frames)[:, None, None, None]
    phase = torch.tensor([0.0, 2.0, 4.0])[None, None, None, :]
    smooth = torch.sin(3 * x + t + phase) * torch.cos(2 * y - t)
    return {"noise": video_to_uint8(noise), "smooth": video_to_uint8(smooth)}


def paced(path: Path, video: torch.Tensor, audio: torch.Tensor, pace: float) -> float:
    """Writes `video` in the pipeline's chunks, one every `pace` seconds; returns the seconds from the
    last chunk to the finished file."""
    chunks = [video[:1], *video[1:].split(4)]
    with Mp4Writer(path) as writer:
        for chunk in chunks:
            time.sleep(pace)
            writer.add(chunk)
        last = time.perf_counter()
        writer.close(audio)
    return time.perf_counter() - last


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    width, height = (int(v) for v in args.size.split("x"))
    audio = torch.zeros(round(args.frames / 24 * 16000))
    seconds: dict[str, float] = {}
    tail_s: dict[str, float] = {}
    sizes: dict[str, int] = {}
    with tempfile.TemporaryDirectory(prefix="ovi-mux-") as tmp:
        for name, video in clips(width, height, args.frames).items():
            times, tails = [], []
            for _ in range(args.repeats):
                path = Path(tmp) / f"{name}.mp4"
                started = time.perf_counter()
                if args.pace is None:
                    write_mp4(path, video, audio, layout="thwc")
                else:
                    tails.append(paced(path, video, audio, args.pace))
                times.append(time.perf_counter() - started)
            seconds[name] = statistics.median(times)
            if tails:
                tail_s[name] = statistics.median(tails)
            sizes[name] = path.stat().st_size
    env = environment(torch.device("cpu"))
    env["load_average_end"] = os.getloadavg()
    print(
        json.dumps(
            {
                "bench": "mux",
                "size": [width, height],
                "frames": args.frames,
                "crf": DEFAULT_CRF,
                "preset": DEFAULT_PRESET,
                "repeats": args.repeats,
                "pace_s": args.pace,
                "median_s" if args.pace is None else "total_s": seconds,
                **({"tail_s": tail_s} if tail_s else {}),
                "file_bytes": sizes,
                "environment": env,
            }
        )
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
