"""Image decoding and validation: pure functions over bytes and PIL images (no Ray).

Every page image entering training or indexing passes through :func:`normalize_image`. It either returns bytes of
an RGB image within bounds or raises :class:`ImageRejected` with a short machine-readable reason, which callers
record in a rejects table. Nothing is dropped silently.
"""

from __future__ import annotations

import io
import warnings
from typing import Any

import numpy as np
from PIL import Image, ImageOps

from ray_vdr.config import ImageLimits

__all__ = ["ImageRejected", "decode_image", "image_bytes", "normalize_image", "pil_pages"]

# Our own max_pixels check runs before decoding; lift PIL's global guard so it does not pre-empt ours with a warning.
Image.MAX_IMAGE_PIXELS = None


class ImageRejected(ValueError):
    """An image that cannot be used. ``reason`` is a short category, ``detail`` says what was seen."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


def image_bytes(value: Any) -> bytes:
    """Extract encoded bytes from the layouts images arrive in: raw bytes, or the HF Image struct {bytes, path}."""
    if value is None:
        raise ImageRejected("missing_image", "null value")
    if isinstance(value, dict):
        value = value.get("bytes")
        if value is None:
            raise ImageRejected("missing_image", "image struct without bytes")
    if isinstance(value, np.ndarray) and value.dtype == np.uint8:
        value = value.tobytes()
    if not isinstance(value, (bytes, bytearray, memoryview)):
        raise ImageRejected("bad_type", f"expected image bytes, got {type(value).__name__}")
    data = bytes(value)
    if not data:
        raise ImageRejected("missing_image", "empty bytes")
    return data


def _to_rgb(img: Image.Image) -> Image.Image:
    """Convert any PIL mode to RGB the way a reader would see the page (transparency on white, 16-bit scaled)."""
    if img.mode == "RGB":
        return img
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(img, dtype=np.float64)
        hi = arr.max() or 1.0
        return Image.fromarray((arr * (255.0 / hi)).clip(0, 255).astype(np.uint8), "L").convert("RGB")
    if img.mode == "F":
        arr = np.asarray(img, dtype=np.float64)
        lo, hi = arr.min(), arr.max()
        scaled = (arr - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros_like(arr)
        return Image.fromarray(scaled.astype(np.uint8), "L").convert("RGB")
    if img.mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")  # L, 1, CMYK, YCbCr, LAB, HSV


def decode_image(data: bytes, limits: ImageLimits) -> tuple[Image.Image, bool]:
    """Decode and validate. Returns the RGB image and whether it differs from the encoded input."""
    if len(data) > limits.max_bytes:
        raise ImageRejected("too_many_bytes", f"{len(data)} bytes > max_bytes {limits.max_bytes}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            w, h = img.size
            if w * h > limits.max_pixels:
                raise ImageRejected("decompression_bomb", f"{w}x{h} = {w * h} pixels > max_pixels {limits.max_pixels}")
            img.load()
    except ImageRejected:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageRejected("decompression_bomb", str(e)) from None
    except Exception as e:  # PIL raises many types for corrupt data (OSError, SyntaxError, ValueError, ...)
        raise ImageRejected("corrupt_image", f"{type(e).__name__}: {e}") from None
    fmt = img.format
    changed = False
    if getattr(img, "n_frames", 1) > 1:
        img.seek(0)
        changed = True
    # camera pages carry EXIF orientation; apply it so the model sees the page upright
    if img.getexif().get(0x0112, 1) != 1:
        img, changed = ImageOps.exif_transpose(img), True
    w, h = img.size
    if min(w, h) < limits.min_side:
        raise ImageRejected("too_small", f"{w}x{h} has a side < min_side {limits.min_side}")
    if img.mode != "RGB":
        img, changed = _to_rgb(img), True
    if max(w, h) > limits.max_side:
        scale = limits.max_side / max(w, h)
        img = img.resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.Resampling.LANCZOS)
        changed = True
    if fmt not in ("PNG", "JPEG", "WEBP"):
        changed = True
    return img, changed


def normalize_image(value: Any, limits: ImageLimits) -> bytes:
    """Validated image bytes: the input unchanged when it already is a bounded RGB PNG/JPEG/WebP, else a new PNG."""
    data = image_bytes(value)
    img, changed = decode_image(data, limits)
    if not changed:
        return data
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def pil_pages(blobs: list[bytes]) -> list[Image.Image]:
    """Stored page images (already validated when they were written) as RGB PIL images."""
    return [Image.open(io.BytesIO(b)).convert("RGB") for b in blobs]
