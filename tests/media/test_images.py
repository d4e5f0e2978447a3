"""I2V image input: every source kind, PIL modes, limits, errors a user sees, reference parity."""

from __future__ import annotations

import base64
import io
import socket
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import quote_from_bytes

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import GOLDEN_DIR
from PIL import Image
from safetensors.torch import load_file

from ovi_server.errors import InvalidInput
from ovi_server.media.images import decode_image, image_to_first_frame, load_first_frame, read_image_bytes
from ovi_server.outbound import REFUSED_MESSAGE, URLPolicy, parse_networks

AREA = 64 * 96  # the tiny area of the loop_i2v golden case


def _png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def _data_uri(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def _golden_image() -> tuple[torch.Tensor, torch.Tensor]:
    tensors = load_file(str(GOLDEN_DIR / "loop" / "loop_i2v_unipc4.safetensors"))
    return tensors["image_uint8_hwc"], tensors["first_frame"]


PIXELS = np.arange(20 * 30 * 3, dtype=np.uint8).reshape(20, 30, 3)
PNG = _png(Image.fromarray(PIXELS))


class _Handler(BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        if self.path == "/image.png":
            self._send(200, PNG)
        elif self.path == "/redirect":
            self.send_response(302)
            self.send_header("Location", "/image.png")
            self.end_headers()
        elif self.path == "/declared-big":
            self.send_response(200)
            self.send_header("Content-Length", str(10**9))
            self.end_headers()
        elif self.path == "/undeclared-big":
            # No Content-Length: only the streaming check can stop it.
            self.send_response(200)
            self.end_headers()
            try:
                for _ in range(64):
                    self.wfile.write(b"\0" * 4096)
            except (BrokenPipeError, ConnectionResetError):
                pass  # the client gave up at its size cap, as it should
        elif self.path == "/text":
            self._send(200, b"<html>not an image</html>")
        else:
            self._send(404, b"missing")

    def _send(self, status: int, body: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:  # keep pytest output clean
        pass


@pytest.fixture(scope="module")
def server() -> Iterator[str]:
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


# The test servers listen on loopback, which the outbound URL policy opens only when told to.
LOOPBACK = URLPolicy(parse_networks("127.0.0.0/8"))


def _error(source: str, **limits) -> InvalidInput:
    kwargs = {"max_bytes": 1 << 20, "max_pixels": 10**6, "timeout_s": 5.0, "policy": LOOPBACK} | limits
    with pytest.raises(InvalidInput) as info:
        load_first_frame(source, AREA, **kwargs)
    assert info.value.field == "image_url"
    return info.value


def test_first_frame_matches_reference_preprocessing():
    image, expected = _golden_image()
    torch.testing.assert_close(image_to_first_frame(image, AREA), expected, atol=1e-4, rtol=1e-4)
    # The same through the whole loader: PNG data URI -> decode -> resize.
    frame = load_first_frame(_data_uri(_png(Image.fromarray(image.numpy()))), AREA)
    assert frame.shape == (1, 3, 1, 64, 96) and frame.dtype == torch.float32
    torch.testing.assert_close(frame, expected, atol=1e-4, rtol=1e-4)


def test_first_frame_in_bf16_is_rounded_before_scaling_and_resizing():
    """With a bf16 compute dtype the reference converts the [0, 1] frame to bf16 first, then scales and
    resizes in bf16; converting the finished float32 frame instead gives different values."""
    pixels = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (50, 70, 3), dtype=np.uint8))
    frame = image_to_first_frame(pixels, AREA, dtype=torch.bfloat16)
    assert frame.dtype == torch.bfloat16 and frame.shape == (1, 3, 1, 64, 96)
    unit = (pixels.permute(2, 0, 1)[None].float() / 255.0).to(torch.bfloat16)
    expected = F.interpolate(unit * 2.0 - 1.0, size=(64, 96), mode="bicubic", align_corners=False)
    assert torch.equal(frame[:, :, 0], expected)
    late = image_to_first_frame(pixels, AREA).to(torch.bfloat16)  # float32 all the way, rounded at the end
    assert not torch.equal(frame, late)


def test_loads_from_http_url(server):
    frame = load_first_frame(f"{server}/image.png", AREA, timeout_s=5.0, policy=LOOPBACK)
    torch.testing.assert_close(frame, image_to_first_frame(PIXELS, AREA))
    assert read_image_bytes(f"{server}/redirect", max_bytes=1 << 20, timeout_s=5.0, policy=LOOPBACK) == PNG


def test_loopback_is_refused_by_default(server):
    # The same server, without the policy opening loopback: refused with the generic message.
    err = _error(f"{server}/image.png", policy=None)
    assert err.msg == REFUSED_MESSAGE


def test_loads_from_path_unless_disallowed(tmp_path):
    path = tmp_path / "in.png"
    path.write_bytes(PNG)
    frame = load_first_frame(str(path), AREA)
    torch.testing.assert_close(frame, image_to_first_frame(PIXELS, AREA))
    torch.testing.assert_close(load_first_frame(f"file://{path}", AREA), frame)
    assert (
        _error(str(tmp_path / "missing.png")).msg
        == f"could not read {tmp_path / 'missing.png'}: No such file or directory"
    )
    err = _error(str(path), allow_paths=False)
    assert (
        err.msg
        == f"{str(path)!r} is not an http(s) URL or a data: URI; send a link to the image or a data URI"
    )
    assert _error("ftp://example.com/a.png").msg.startswith("'ftp://example.com/a.png' is not an http(s) URL")


def test_exif_orientation_is_applied():
    # Left half red, right half blue, stored 40x20 with "rotate 90° clockwise to display" (6).
    pixels = np.zeros((20, 40, 3), dtype=np.uint8)
    pixels[:, :20, 0] = 255
    pixels[:, 20:, 2] = 255
    exif = Image.Exif()
    exif[0x0112] = 6
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG", exif=exif, quality=95)
    shown = np.asarray(decode_image(buf.getvalue(), max_pixels=10**6))
    assert shown.shape == (40, 20, 3)  # portrait once rotated
    assert shown[5, 10, 0] > 200 and shown[5, 10, 2] < 50  # the red half is now on top
    assert shown[35, 10, 2] > 200 and shown[35, 10, 0] < 50


def test_rgba_drops_alpha_like_the_reference():
    rgba = np.zeros((4, 4, 4), dtype=np.uint8)
    rgba[...] = (10, 20, 30, 0)  # fully transparent: cv2.imread keeps the colour, no white background
    rgb = np.asarray(decode_image(_png(Image.fromarray(rgba, mode="RGBA")), max_pixels=100))
    assert (rgb == (10, 20, 30)).all()


def test_palette_and_grayscale_images():
    palette = Image.new("P", (4, 4))
    palette.putpalette([0, 0, 0, 200, 100, 50] + [0] * (256 * 3 - 6))
    palette.putpixel((1, 1), 1)
    rgb = np.asarray(decode_image(_png(palette), max_pixels=100))
    assert tuple(rgb[1, 1]) == (200, 100, 50) and tuple(rgb[0, 0]) == (0, 0, 0)

    gray = np.asarray(decode_image(_png(Image.new("L", (3, 2), 100)), max_pixels=100))
    assert gray.shape == (2, 3, 3) and (gray == 100).all()

    wide = Image.fromarray(np.full((2, 2), 0x8000, dtype=np.uint16))  # 16-bit: keep the top 8 bits
    assert (np.asarray(decode_image(_png(wide), max_pixels=100)) == 128).all()


def test_non_image_bytes():
    err = _error(_data_uri(b"hello, not an image", "text/plain"))
    assert err.msg == (
        "could not decode the data: URI (data:text/plain;base64,...): not a recognised image format; "
        "send a PNG, JPEG or WebP image"
    )


def test_non_image_url(server):
    err = _error(f"{server}/text")
    assert err.msg == (
        f"could not decode '{server}/text': not a recognised image format; send a PNG, JPEG or WebP image"
    )


def test_too_many_pixels():
    err = _error(_data_uri(PNG), max_pixels=500)
    assert err.msg == (
        "the data: URI (data:image/png;base64,...) is 30x20 = 600 pixels; the limit is 500 pixels, "
        "so scale it down (the video is under 1 megapixel)"
    )


def test_too_many_bytes(server):
    err = _error(_data_uri(PNG), max_bytes=100)
    assert "MiB; the limit is 0.0 MiB, so send a smaller file" in err.msg
    err = _error(f"{server}/declared-big", max_bytes=1 << 20)
    assert err.msg == (
        f"'{server}/declared-big' is more than 1.0 MiB; the limit is 1.0 MiB, so send a smaller file "
        "(JPEG or WebP compress well)"
    )
    err = _error(f"{server}/undeclared-big", max_bytes=100_000)
    assert err.msg.startswith(f"'{server}/undeclared-big' is more than 0.1 MiB; the limit is 0.1 MiB")


def test_http_error_status(server):
    # The same text as for a closed port or a refused address: answers must not map a network.
    assert _error(f"{server}/gone.png").msg == REFUSED_MESSAGE


def test_unreachable_url():
    with socket.socket() as sock:  # a loopback port that was free a moment ago and is closed now
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    assert _error(f"http://127.0.0.1:{port}/x.png").msg == REFUSED_MESSAGE


def test_malformed_data_uri():
    assert _error("data:image/png;base64").msg == (
        "the data: URI has no ',' before its data; expected data:image/png;base64,<data>"
    )
    assert _error("data:image/png;base64,").msg == "the data: URI holds no data"


def test_truncated_image():
    err = _error(_data_uri(PNG[: len(PNG) // 2]))
    assert err.msg.startswith("could not decode the data: URI (data:image/png;base64,...) (")
    assert err.msg.endswith("); send a PNG, JPEG or WebP image")


def test_percent_encoded_data_uri():
    assert read_image_bytes(f"data:image/png,{quote_from_bytes(PNG)}", max_bytes=1 << 20, timeout_s=1) == PNG
