from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from ray_vdr.config import ImageLimits
from ray_vdr.data.images import ImageRejected, decode_image, normalize_image

LIMITS = ImageLimits(min_side=16, max_side=512, max_pixels=4_000_000)


def encode(img: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def reason(value, limits=LIMITS) -> str:
    with pytest.raises(ImageRejected) as e:
        normalize_image(value, limits)
    return e.value.reason


def test_rgb_png_passes_through_unchanged():
    data = encode(Image.new("RGB", (64, 80), (10, 20, 30)))
    assert normalize_image(data, LIMITS) is data or normalize_image(data, LIMITS) == data
    assert normalize_image({"bytes": data, "path": "x.png"}, LIMITS) == data


@pytest.mark.parametrize(
    ("img", "fmt", "expected"),
    [
        (Image.new("CMYK", (40, 40), (0, 255, 255, 0)), "JPEG", (255, 0, 0)),  # cyan-free, magenta+yellow → red
        (Image.new("LA", (40, 40), (128, 255)), "PNG", (128, 128, 128)),
        (Image.new("RGBA", (40, 40), (0, 0, 0, 0)), "PNG", (255, 255, 255)),  # transparent → white paper
        (Image.new("1", (40, 40), 1), "PNG", (255, 255, 255)),
    ],
)
def test_modes_become_rgb(img, fmt, expected):
    out = Image.open(io.BytesIO(normalize_image(encode(img, fmt), LIMITS)))
    assert out.mode == "RGB"
    assert np.allclose(np.asarray(out)[20, 20], expected, atol=8)


def test_palette_with_transparency_and_16_bit():
    pal = Image.new("P", (32, 32), 0)
    pal.putpalette([200, 10, 10] * 256)
    pal.info["transparency"] = 0
    out = Image.open(io.BytesIO(normalize_image(encode(pal, transparency=0), LIMITS)))
    assert out.mode == "RGB" and tuple(np.asarray(out)[5, 5]) == (255, 255, 255)
    arr = (np.arange(32 * 32, dtype=np.uint16).reshape(32, 32) * 60).astype(np.uint16)
    sixteen = Image.fromarray(arr)
    assert sixteen.mode.startswith("I")
    out = Image.open(io.BytesIO(normalize_image(encode(sixteen), LIMITS)))
    assert out.mode == "RGB" and np.asarray(out).max() == 255  # scaled, not clipped to 0/255 garbage


def test_rejects_with_reasons():
    assert reason(None) == "missing_image"
    assert reason(b"") == "missing_image"
    assert reason({"bytes": None, "path": "p.png"}) == "missing_image"
    assert reason("a/path.png") == "bad_type"
    assert reason(b"definitely not an image") == "corrupt_image"
    png = encode(Image.new("RGB", (64, 64), "white"))
    assert reason(png[: len(png) // 2]) == "corrupt_image"
    assert reason(encode(Image.new("RGB", (1, 1)))) == "too_small"
    assert reason(png, ImageLimits(max_bytes=10)) == "too_many_bytes"


def test_decompression_bomb_rejected_before_decoding():
    # a 1-bit 20000x20000 PNG is a few KB on disk and 400M pixels once decoded
    bomb = encode(Image.new("1", (20000, 20000), 0))
    assert len(bomb) < 200_000
    assert reason(bomb) == "decompression_bomb"


def test_large_pages_are_downscaled_keeping_aspect():
    img, changed = decode_image(encode(Image.new("RGB", (1024, 2048), "white")), LIMITS)
    assert changed and img.size == (256, 512)


def test_exif_orientation_applied():
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise to display
    data = encode(Image.new("RGB", (60, 30), "white"), "JPEG", exif=exif.tobytes())
    img, changed = decode_image(data, LIMITS)
    assert changed and img.size == (30, 60)
