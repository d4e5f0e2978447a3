"""Image-to-video input: fetch the image, decode it, and resize it into the first video frame.

`load_first_frame` is the one call the pipeline makes. The resize is the reference's
`preprocess_image_tensor`: uint8 RGB -> [-1, 1] float, then `F.interpolate(bicubic,
align_corners=False)` to the size `shapes.best_hw_for_area` picks, no crop and no clamp (bicubic
overshoots slightly beyond [-1, 1]; the reference keeps that and so do we).
"""

from __future__ import annotations

import base64
import binascii
import io
import urllib.parse
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps, UnidentifiedImageError
from torch import Tensor

from ovi_server import outbound
from ovi_server.errors import InvalidInput
from ovi_server.outbound import URLPolicy
from ovi_server.shapes import best_hw_for_area

FIELD = "image_url"
DEFAULT_MAX_BYTES = outbound.DEFAULT_MAX_BYTES
DEFAULT_MAX_PIXELS = 40_000_000  # 8K UHD is 33 MP; more is almost surely a mistake or a decompression bomb
DEFAULT_TIMEOUT_S = outbound.DEFAULT_DEADLINE_S
_SUPPORTED = "send a PNG, JPEG or WebP image"


def load_first_frame(
    source: str,
    area: int,
    *,
    max_bytes: int = DEFAULT_MAX_BYTES,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    allow_paths: bool = True,
    policy: URLPolicy | None = None,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """The i2v first frame from an http(s) URL, a `data:` URI or (with `allow_paths`) a local file.

    Args:
        source: where the image is; request input, so every failure is `InvalidInput("image_url")`.
        area: the variant's `video_area` in pixels (720² or 960²).
        allow_paths: accept local file paths (for the CLI). The HTTP API admits only http(s) and
            data: URIs at the edge (api/schemas.py); pass False wherever `source` is untrusted and
            unchecked, since a path lets the caller read any image file the server can.
        policy: which hosts http(s) URLs may reach (default: public addresses only; outbound.py).
        device, dtype: where and in which precision the frame is scaled and resized (the compute
            dtype: see `image_to_first_frame`).
    Returns:
        [1, 3, 1, H, W] in `dtype`, [-1, 1] up to bicubic overshoot, H and W multiples of 32.
    """
    data = read_image_bytes(
        source, max_bytes=max_bytes, timeout_s=timeout_s, allow_paths=allow_paths, policy=policy
    )
    image = decode_image(data, max_pixels=max_pixels, label=_describe(source))
    return image_to_first_frame(image, area, device=device, dtype=dtype)


def read_image_bytes(
    source: str,
    *,
    max_bytes: int,
    timeout_s: float,
    allow_paths: bool = True,
    policy: URLPolicy | None = None,
) -> bytes:
    """The raw bytes behind `source`, at most `max_bytes` of them; http(s) within `timeout_s` in all."""
    source = source.strip()
    scheme = urllib.parse.urlsplit(source).scheme.lower()
    if scheme in ("http", "https"):
        return _download(source, max_bytes=max_bytes, timeout_s=timeout_s, policy=policy or URLPolicy())
    if scheme == "data":
        return _decode_data_uri(source, max_bytes=max_bytes)
    if allow_paths and (scheme in ("", "file") or len(scheme) == 1):  # one letter: a Windows drive
        return _read_file(Path(source.removeprefix("file://")), max_bytes=max_bytes)
    raise InvalidInput(
        FIELD,
        f"{_describe(source)} is not an http(s) URL or a data: URI; send a link to the image or a data URI",
    )


def decode_image(data: bytes, *, max_pixels: int, label: str = "the image") -> Image.Image:
    """Decoded RGB image, EXIF orientation applied. Alpha is dropped, not composited (reference parity)."""
    try:
        with warnings.catch_warnings():
            # We check the size ourselves, with a message the user can act on.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            width, height = image.size  # header only; pixels are not decoded yet
            if width * height > max_pixels:
                raise InvalidInput(
                    FIELD,
                    f"{label} is {width}x{height} = {width * height:,} pixels; the limit is "
                    f"{max_pixels:,} pixels, so scale it down (the video is under 1 megapixel)",
                )
            image.load()
    except InvalidInput:
        raise
    except Image.DecompressionBombError as exc:
        raise InvalidInput(FIELD, f"{label} is too large to decode ({exc}); scale it down") from exc
    except UnidentifiedImageError as exc:
        raise InvalidInput(
            FIELD, f"could not decode {label}: not a recognised image format; {_SUPPORTED}"
        ) from exc
    except (OSError, SyntaxError, ValueError) as exc:  # truncated or corrupt files surface as these
        raise InvalidInput(FIELD, f"could not decode {label} ({exc}); {_SUPPORTED}") from exc
    # The reference reads files with cv2.imread, which applies EXIF orientation; PIL does not by itself.
    image = ImageOps.exif_transpose(image)
    return _to_rgb(image)


def image_to_first_frame(
    image: Image.Image | np.ndarray | Tensor,
    area: int,
    *,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """Reference `preprocess_image_tensor` on an RGB image: -> [1, 3, 1, H, W] `dtype` in [-1, 1].

    Args:
        image: PIL RGB image, or uint8 [H, W, 3] array or tensor.
        area: target pixel area; (H, W) is `best_hw_for_area(h, w, area)`.
        device, dtype: the reference moves the [0, 1] float32 frame to the device in its compute
            dtype (bf16 on a GPU) *before* scaling to [-1, 1] and the bicubic resize, so both round
            in that dtype; we do the same.
    """
    if isinstance(image, Image.Image):
        pixels = torch.from_numpy(np.asarray(_to_rgb(image), dtype=np.uint8).copy())
    else:
        pixels = torch.as_tensor(image)
    if pixels.dtype != torch.uint8 or pixels.ndim != 3 or pixels.shape[2] != 3:
        raise ValueError(f"expected uint8 [H, W, 3], got {pixels.dtype} {tuple(pixels.shape)}")
    # [1, 3, h, w]; the same float steps as the reference: /255, then *2 - 1.
    frame = (pixels.permute(2, 0, 1).unsqueeze(0).float() / 255.0).to(device, dtype)
    frame = frame * 2.0 - 1.0
    h, w = frame.shape[2], frame.shape[3]
    target_h, target_w = best_hw_for_area(h, w, area)
    if (target_h, target_w) != (h, w):
        frame = F.interpolate(frame, size=(target_h, target_w), mode="bicubic", align_corners=False)
    return frame.unsqueeze(2)  # [1, 3, 1, H, W]: a one-frame video for the VAE


def _to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode -> RGB the way cv2.imread(IMREAD_COLOR) would read the file."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        # PIL clips 16-bit values to 255 when converting; cv2 keeps the top 8 bits.
        wide = np.asarray(image, dtype=np.uint32) >> 8
        image = Image.fromarray(wide.clip(0, 255).astype(np.uint8), mode="L")
    return image if image.mode == "RGB" else image.convert("RGB")


def _download(url: str, *, max_bytes: int, timeout_s: float, policy: URLPolicy) -> bytes:
    """Through the outbound URL policy: one generic message for every refusal or network failure."""
    try:
        return policy.fetch(url, max_bytes=max_bytes, deadline_s=timeout_s)
    except outbound.Refused as exc:
        raise InvalidInput(FIELD, str(exc)) from exc
    except outbound.TooLarge as exc:
        # how much more would come is unknown: the message names the limit
        raise InvalidInput(
            FIELD, _too_many_bytes(_describe(url), max_bytes, max_bytes, at_least=True)
        ) from exc


def _decode_data_uri(uri: str, *, max_bytes: int) -> bytes:
    """`data:[<mediatype>][;base64],<data>` (RFC 2397) -> bytes."""
    header, comma, payload = uri.partition(",")
    if not comma:
        raise InvalidInput(
            FIELD, "the data: URI has no ',' before its data; expected data:image/png;base64,<data>"
        )
    is_base64 = header.lower().endswith(";base64")
    # Base64 grows data by 4/3; check before decoding so a huge URI costs no extra memory.
    if len(payload) * (3 / 4 if is_base64 else 1 / 3) > max_bytes:
        raise InvalidInput(
            FIELD, _too_many_bytes("the data: URI", len(payload) * 3 // 4, max_bytes, at_least=True)
        )
    if is_base64:
        try:
            data = base64.b64decode(urllib.parse.unquote(payload), validate=False)
        except (binascii.Error, ValueError) as exc:
            raise InvalidInput(FIELD, f"the data: URI is not valid base64 ({exc})") from exc
    else:
        data = urllib.parse.unquote_to_bytes(payload)
    if len(data) > max_bytes:
        raise InvalidInput(FIELD, _too_many_bytes("the data: URI", len(data), max_bytes))
    if not data:
        raise InvalidInput(FIELD, "the data: URI holds no data")
    return data


def _read_file(path: Path, *, max_bytes: int) -> bytes:
    try:
        size = path.stat().st_size
        if size > max_bytes:
            raise InvalidInput(FIELD, _too_many_bytes(str(path), size, max_bytes))
        return path.read_bytes()
    except OSError as exc:
        raise InvalidInput(FIELD, f"could not read {path}: {exc.strerror or exc}") from exc


def _too_many_bytes(label: str, size: int, max_bytes: int, at_least: bool = False) -> str:
    more = "more than " if at_least else ""
    return (
        f"{label} is {more}{size / 2**20:.1f} MiB; the limit is {max_bytes / 2**20:.1f} MiB, "
        "so send a smaller file (JPEG or WebP compress well)"
    )


def _describe(source: str) -> str:
    """A short, log-safe name for the source: data URIs are not echoed in full."""
    source = source.strip()
    if source[:5].lower() == "data:":
        return f"the data: URI ({source.partition(',')[0][:60]},...)"
    return repr(source if len(source) <= 200 else source[:200] + "...")
