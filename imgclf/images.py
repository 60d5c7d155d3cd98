"""Validating image files (ingest) and decoding them to RGB pixels (ingest and bottlenecks).

Two entry points:

- `inspect_image(path, max_pixels)` decodes a file fully, once, and returns its size (after EXIF
  orientation) and format, or raises `BadImage(reason, detail)` with a short reason code
  (`empty_file`, `not_an_image`, `unsupported_format`, `corrupt`, `truncated`, `too_large`,
  `unreadable`). Ingest uses it to turn every bad file into a reported skip.
- `decode_image(bytes, max_pixels)`: `load_rgb` for files from outside (a served request), its
  failures as `BadImage` with the same reason codes; it refuses the formats ingest refuses.
- `load_rgb(path_or_bytes)` returns the pixels the models see, as uint8 [H, W, 3]:
  - EXIF orientation is applied (the image is turned the way a viewer shows it);
  - animated GIF/WebP/APNG and multi-page TIFF: the first frame;
  - palette (P), grayscale (1, L), CMYK, YCbCr...: converted to RGB by Pillow;
  - 16-bit and 32-bit grayscale (I;16, I, F): scaled to 0..255 (16-bit range if above 255;
    a float image within 0..1 times 255);
  - any transparency (an alpha channel, or a palette/tRNS transparent colour) is composited on
    a white background, so transparent pixels are white whatever colour they store.
"""

from __future__ import annotations

import io
import re
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from imgclf.errors import UserError

# Pillow's own default (about a 9,500 x 9,500 image); params.yaml ingest.max_image_pixels.
DEFAULT_MAX_PIXELS = 89_478_485

# Formats ingest accepts, with the extension a file gets when its name has none. Pillow reads
# many more (ICO, PSD, PCX...); they are refused as `unsupported_format` because they are rarely
# photos and other tools that read data/images (tf.io.decode_image) do not read them; and so
# decode_image (label-image, the served model) refuses them too.
FORMAT_EXTENSIONS: dict[str, str] = {
    "JPEG": ".jpg",
    "MPO": ".jpg",  # multi-picture JPEG written by some cameras: a JPEG to every reader
    "PNG": ".png",
    "GIF": ".gif",
    "BMP": ".bmp",
    "WEBP": ".webp",
    "TIFF": ".tif",
}

_EXIF_ORIENTATION = 0x0112
_TRANSPOSED_ORIENTATIONS = {5, 6, 7, 8}  # the ones that swap width and height


class BadImage(UserError):
    """A file that ingest must skip: `reason` is a short code for reports, `detail` says why."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class ImageInfo:
    width: int  # as displayed, i.e. after EXIF orientation
    height: int
    format: str  # Pillow's format name: JPEG, PNG, GIF...


def inspect_image(path: str | Path, max_pixels: int = DEFAULT_MAX_PIXELS) -> ImageInfo:
    """Decode `path` fully and return its displayed size and format, or raise `BadImage`.

    `verify()` checks the container (PNG chunk CRCs...) without decoding; it leaves the image
    unusable, so the file is opened again and `load()`ed, which decodes every pixel and is what
    catches truncated or damaged JPEG data. An image above `max_pixels` is `too_large` (a
    decompression bomb), decided from the header before any pixel is decoded: Pillow's global
    `Image.MAX_IMAGE_PIXELS` is set to `max_pixels` for the call (and restored) and its
    DecompressionBombWarning/Error become `too_large`. Not thread-safe (global limit and
    catch_warnings): call it from one thread.
    """
    path = Path(path)
    try:
        size = path.stat().st_size
    except OSError as e:
        raise BadImage("unreadable", f"{type(e).__name__}: {e}") from None
    if size == 0:
        raise BadImage("empty_file", "the file has 0 bytes")
    previous_limit = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = max_pixels
    try:
        info = _inspect(path, max_pixels)
    finally:
        Image.MAX_IMAGE_PIXELS = previous_limit
    return info


def _inspect(path: Path, max_pixels: int) -> ImageInfo:
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            with Image.open(path) as img:
                fmt = img.format or ""
                width, height = img.size
                _check_pixels(width, height, max_pixels)
                _check_format(fmt)
                img.verify()
            with Image.open(path) as img:
                orientation = img.getexif().get(_EXIF_ORIENTATION, 1)
                img.load()
        except BadImage:
            raise
        except Exception as e:  # Pillow's plugins raise OSError, SyntaxError, ValueError...
            raise _decode_failure(e, lambda: _head(path), max_pixels) from None
    if orientation in _TRANSPOSED_ORIENTATIONS:
        width, height = height, width
    return ImageInfo(width=width, height=height, format=fmt)


def _decode_failure(error: Exception, head: Callable[[], bytes], max_pixels: int) -> BadImage:
    """What a failure to open or decode an image file means, as a BadImage; `head` gives the
    file's first bytes (read only when Pillow could not identify it)."""
    if isinstance(error, Image.DecompressionBombWarning | Image.DecompressionBombError):
        return BadImage("too_large", _bomb_detail(error, max_pixels))
    if isinstance(error, UnidentifiedImageError):
        kind = _magic_format(head())
        if kind:  # an image whose header is damaged, not a stray text file
            return BadImage("corrupt", f"starts like a {kind} file but cannot be read")
        return BadImage("not_an_image", "not an image file Pillow can identify")
    if isinstance(error, MemoryError):
        return BadImage("too_large", "out of memory while decoding")
    if isinstance(error, OSError) and error.errno is not None:
        # The system's (permission denied, an I/O error); Pillow's own OSErrors carry none.
        return BadImage("unreadable", f"{type(error).__name__}: {error}")
    return BadImage(_decode_failure_reason(error), f"{type(error).__name__}: {error}")


def _check_format(fmt: str) -> None:
    if fmt not in FORMAT_EXTENSIONS:
        raise BadImage(
            "unsupported_format", f"{fmt} image; accepted: {', '.join(sorted(FORMAT_EXTENSIONS))}"
        )


def _check_pixels(width: int, height: int, max_pixels: int) -> None:
    # Pillow only warns between 1x and 2x its limit; ingest refuses everything above it.
    if width * height > max_pixels:
        raise BadImage(
            "too_large",
            f"{width}x{height} = {width * height} pixels > ingest.max_image_pixels={max_pixels}",
        )


def _bomb_detail(error: Exception, max_pixels: int) -> str:
    # Pillow quotes its own threshold (twice the limit for its error), not the user's param.
    m = re.search(r"Image size \((\d+) pixels\)", str(error))
    size = f"{int(m.group(1))} pixels" if m else "more pixels"
    return (
        f"{size} > ingest.max_image_pixels={max_pixels} (a decompression bomb, refused from "
        "its header; raise ingest.max_image_pixels to accept such images)"
    )


_MAGIC = (
    (b"\xff\xd8\xff", "JPEG"),
    (b"\x89PNG\r\n\x1a\n", "PNG"),
    (b"GIF87a", "GIF"),
    (b"GIF89a", "GIF"),
    (b"BM", "BMP"),
    (b"II*\x00", "TIFF"),
    (b"MM\x00*", "TIFF"),
)


def _head(path: Path) -> bytes:
    with open(path, "rb") as f:
        return f.read(16)


def _magic_format(head: bytes) -> str | None:
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "WEBP"
    return next((name for magic, name in _MAGIC if head.startswith(magic)), None)


def _decode_failure_reason(error: Exception) -> str:
    if isinstance(error, EOFError) or "truncat" in str(error).lower():
        return "truncated"
    if "too large" in str(error).lower():  # e.g. PNG text chunks above Pillow's safety limit
        return "too_large"
    return "corrupt"


def load_rgb(
    source: str | Path | bytes | bytearray | memoryview,
    max_pixels: int | None = None,
    *,
    accepted_only: bool = False,
) -> np.ndarray:
    """Decode an image file (path or encoded bytes) to uint8 RGB [H, W, 3]; see the module doc.
    With `max_pixels`, a larger image is refused (`BadImage` too_large) from its header, before
    a pixel is decoded; Pillow's global limit is left alone either way. With `accepted_only`, a
    format ingest refuses (not in FORMAT_EXTENSIONS) is `BadImage` unsupported_format.

    Thread-safe (the bottleneck stage calls it from tf.data workers).
    """
    fp = io.BytesIO(bytes(source)) if isinstance(source, bytes | bytearray | memoryview) else source
    with Image.open(fp) as img:
        if max_pixels is not None:
            _check_pixels(*img.size, max_pixels)
        if accepted_only:
            _check_format(img.format or "")
        img.seek(0)
        # exif_transpose returns a new, loaded image (or a copy when there is nothing to do).
        upright = ImageOps.exif_transpose(img)
    return to_rgb_array(upright)


def decode_image(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """`load_rgb` for a file that comes from outside the pipeline (a served request): any
    failure is a `BadImage` with ingest's reason codes, an image above `max_pixels` is
    refused from its header, before a pixel is decoded, and so is a format ingest refuses
    (unsupported_format: a model is served only what it could have been trained on).
    Thread-safe, as load_rgb."""
    if not data:
        raise BadImage("empty_file", "the file has 0 bytes")
    try:
        return load_rgb(data, max_pixels, accepted_only=True)
    except BadImage:
        raise
    except Exception as e:
        raise _decode_failure(e, lambda: data[:16], max_pixels) from None


def to_rgb_array(img: Image.Image) -> np.ndarray:
    """The RGB pixels of an already opened image (see the module doc for the conversions)."""
    mode = img.mode
    if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        values = np.asarray(img, dtype=np.float64)
        if values.max(initial=0) > 255:
            values = values / 257.0  # 16-bit range -> 8-bit
        elif mode == "F" and values.min(initial=0) >= 0 and values.max(initial=0) <= 1:
            values = values * 255.0  # float in 0..1, the usual range of float images
        gray = np.clip(np.rint(values), 0, 255).astype(np.uint8)
        return np.ascontiguousarray(np.repeat(gray[:, :, None], 3, axis=2))
    has_alpha = mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in img.info
    if has_alpha:
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        rgb = Image.alpha_composite(white, rgba).convert("RGB")
    elif mode != "RGB":
        rgb = img.convert("RGB")
    else:
        rgb = img
    array = np.asarray(rgb, dtype=np.uint8)
    return np.ascontiguousarray(array)
