"""imgclf.images on real files: every format ingest accepts, and every way a file can be bad."""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from imgclf.images import (
    FORMAT_EXTENSIONS,
    BadImage,
    ImageInfo,
    decode_image,
    inspect_image,
    load_rgb,
)
from tests.helpers import make_image


@pytest.fixture(autouse=True)
def _pixel_limit_untouched():
    before = Image.MAX_IMAGE_PIXELS
    yield
    assert before == Image.MAX_IMAGE_PIXELS, "inspect_image must restore Pillow's global limit"


def png_header_only(path: Path, width: int, height: int) -> Path:
    """A 60-byte PNG whose header claims width x height: a decompression bomb's calling card."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        crc = zlib.crc32(kind + body) & 0xFFFFFFFF
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", crc)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    data = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr)
    data += chunk(b"IDAT", zlib.compress(b"\0" * 16)) + chunk(b"IEND", b"")
    path.write_bytes(data)
    return path


def exif_rotated_jpeg(path: Path, size=(64, 48), orientation: int = 6) -> Path:
    rng = np.random.default_rng(1)
    pixels = rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
    exif = Image.Exif()
    exif[0x0112] = orientation
    Image.fromarray(pixels).save(path, exif=exif)
    return path


def bad_reason(path: Path, max_pixels: int = 89_478_485) -> str:
    with pytest.raises(BadImage) as info:
        inspect_image(path, max_pixels)
    assert info.value.detail
    return info.value.reason


@pytest.mark.parametrize(
    ("name", "mode", "fmt"),
    [
        ("rgb.jpg", "RGB", "JPEG"),
        ("rgb.png", "RGB", "PNG"),
        ("palette.gif", "P", "GIF"),
        ("cmyk.jpg", "CMYK", "JPEG"),
        ("gray.jpg", "L", "JPEG"),
        ("gray.png", "L", "PNG"),
        ("rgba.png", "RGBA", "PNG"),
        ("bilevel.bmp", "1", "BMP"),
        ("rgb.webp", "RGB", "WEBP"),
        ("rgb.tif", "RGB", "TIFF"),
    ],
)
def test_accepted_formats(tmp_path, name, mode, fmt):
    path = make_image(tmp_path / name, size=(64, 48), mode=mode)
    assert inspect_image(path) == ImageInfo(64, 48, fmt)
    rgb = load_rgb(path)
    assert rgb.dtype == np.uint8 and rgb.shape == (48, 64, 3)


def test_exif_orientation_swaps_width_and_height(tmp_path):
    path = exif_rotated_jpeg(tmp_path / "rotated.jpg", size=(64, 48), orientation=6)
    assert inspect_image(path) == ImageInfo(48, 64, "JPEG")
    assert load_rgb(path).shape == (64, 48, 3)
    # Orientation 3 (upside down) keeps the size but turns the pixels.
    flipped = exif_rotated_jpeg(tmp_path / "flipped.jpg", orientation=3)
    assert inspect_image(flipped) == ImageInfo(64, 48, "JPEG")


def test_load_rgb_from_bytes_equals_from_path(tmp_path):
    path = make_image(tmp_path / "a.png", seed=3)
    assert np.array_equal(load_rgb(path.read_bytes()), load_rgb(path))
    assert np.array_equal(load_rgb(str(path)), np.asarray(Image.open(path).convert("RGB")))


def test_transparency_is_composited_on_white(tmp_path):
    rgba = np.zeros((4, 4, 4), dtype=np.uint8)
    rgba[..., 0] = 200  # red, stored even where fully transparent
    rgba[:2, :, 3] = 255
    Image.fromarray(rgba, "RGBA").save(tmp_path / "alpha.png")
    rgb = load_rgb(tmp_path / "alpha.png")
    assert (rgb[:2] == [200, 0, 0]).all()
    assert (rgb[2:] == 255).all()
    # A palette GIF with a transparent index.
    pal = Image.new("P", (4, 4), 1)
    pal.putpalette([0, 0, 0, 10, 20, 30] + [0] * 762)
    pal.save(tmp_path / "t.gif", transparency=1)
    assert (load_rgb(tmp_path / "t.gif") == 255).all()


def test_animated_gif_first_frame(tmp_path):
    frames = [Image.new("RGB", (8, 8), color) for color in ((255, 0, 0), (0, 0, 255))]
    frames[0].save(tmp_path / "anim.gif", save_all=True, append_images=frames[1:])
    assert inspect_image(tmp_path / "anim.gif") == ImageInfo(8, 8, "GIF")
    rgb = load_rgb(tmp_path / "anim.gif")
    assert tuple(rgb[0, 0]) == (255, 0, 0)


def test_16_bit_grayscale_is_scaled(tmp_path):
    values = np.full((4, 4), 65535, dtype=np.uint16)
    values[0, 0] = 0
    Image.fromarray(values).save(tmp_path / "g16.png")
    rgb = load_rgb(tmp_path / "g16.png")
    assert rgb.shape == (4, 4, 3)
    assert tuple(rgb[1, 1]) == (255, 255, 255) and tuple(rgb[0, 0]) == (0, 0, 0)


def test_a_float_image_in_0_to_1_is_scaled_not_black(tmp_path):
    # A float TIFF of 0..1 values used to become 0s and 1s of 255: a black picture, trained on.
    values = np.linspace(0.0, 1.0, 16, dtype=np.float32).reshape(4, 4)
    Image.fromarray(values, mode="F").save(tmp_path / "f01.tif")
    rgb = load_rgb(tmp_path / "f01.tif")
    assert tuple(rgb[0, 0]) == (0, 0, 0) and tuple(rgb[3, 3]) == (255, 255, 255)
    assert rgb[1, 2, 0] == round(6 / 15 * 255)
    # Floats on the 0..255 scale keep their values.
    Image.fromarray(values * 200, mode="F").save(tmp_path / "f200.tif")
    assert load_rgb(tmp_path / "f200.tif")[3, 3, 0] == 200


def test_bad_files(tmp_path):
    jpeg = make_image(tmp_path / "ok.jpg", size=(64, 48)).read_bytes()
    png = make_image(tmp_path / "ok.png", size=(64, 48)).read_bytes()
    (tmp_path / "empty.jpg").write_bytes(b"")
    (tmp_path / "LICENSE.txt").write_text("CC-BY 2.0\n")
    (tmp_path / "half.jpg").write_bytes(jpeg[: len(jpeg) // 2])
    (tmp_path / "half.png").write_bytes(png[: len(png) // 2])
    broken = bytearray(png)
    broken[-20] ^= 0xFF  # inside the image data: the chunk CRC no longer matches
    (tmp_path / "crc.png").write_bytes(bytes(broken))
    header = bytearray(jpeg[:200]) + b"\x00" * 50  # a JPEG that stops inside its header
    (tmp_path / "header.jpg").write_bytes(bytes(header))
    Image.new("RGB", (16, 16)).save(tmp_path / "icon.ico")

    assert bad_reason(tmp_path / "empty.jpg") == "empty_file"
    assert bad_reason(tmp_path / "LICENSE.txt") == "not_an_image"
    assert bad_reason(tmp_path / "half.jpg") == "truncated"
    assert bad_reason(tmp_path / "half.png") == "truncated"
    assert bad_reason(tmp_path / "crc.png") == "corrupt"
    assert bad_reason(tmp_path / "header.jpg") in ("corrupt", "truncated")
    assert bad_reason(tmp_path / "icon.ico") == "unsupported_format"
    assert bad_reason(tmp_path / "missing.jpg") == "unreadable"

    # The served model's decoder (and label-image's) says the same of the same bytes, the
    # formats ingest refuses included: a model is served only what it could be trained on.
    Image.new("RGB", (16, 16)).save(tmp_path / "image.ppm")
    assert bad_reason(tmp_path / "image.ppm") == "unsupported_format"
    for name in ("empty.jpg", "LICENSE.txt", "half.jpg", "half.png", "crc.png", "header.jpg",
                 "icon.ico", "image.ppm"):  # fmt: skip
        with pytest.raises(BadImage) as info:
            decode_image((tmp_path / name).read_bytes())
        assert info.value.reason == bad_reason(tmp_path / name), name
    with pytest.raises(BadImage, match=r"^unsupported_format: ICO image; accepted: BMP, GIF"):
        decode_image((tmp_path / "icon.ico").read_bytes())
    np.testing.assert_array_equal(decode_image(jpeg), load_rgb(tmp_path / "ok.jpg"))
    # Every format ingest accepts still decodes.
    for fmt in FORMAT_EXTENSIONS:
        buffer = io.BytesIO()
        Image.new("RGB", (16, 16), (200, 10, 10)).save(buffer, format=fmt)
        assert decode_image(buffer.getvalue()).shape == (16, 16, 3), fmt


def test_decompression_bombs(tmp_path):
    # A header claiming 100,000 x 100,000: refused before a single pixel is allocated.
    bomb = png_header_only(tmp_path / "bomb.png", 100_000, 100_000)
    assert bad_reason(bomb) == "too_large"
    # A real solid image above a low limit: Pillow's warning zone (1x-2x) and error zone (>2x).
    solid = tmp_path / "solid.png"
    Image.new("RGB", (100, 100), (10, 20, 30)).save(solid)
    assert bad_reason(solid, max_pixels=9_000) == "too_large"
    assert bad_reason(solid, max_pixels=1_000) == "too_large"
    assert inspect_image(solid, max_pixels=10_000) == ImageInfo(100, 100, "PNG")
    # The served model's decoder refuses the same from the header, leaving Pillow's limit alone.
    for data, max_pixels in ((bomb.read_bytes(), 89_478_485), (solid.read_bytes(), 9_000)):
        with pytest.raises(BadImage, match=f"pixels > ingest.max_image_pixels={max_pixels}"):
            decode_image(data, max_pixels)
    assert decode_image(solid.read_bytes(), max_pixels=10_000).shape == (100, 100, 3)


@pytest.mark.parametrize("max_pixels", [89_478_485, 9_000, 1_000])
def test_a_decompression_bomb_skip_quotes_ingest_max_image_pixels(tmp_path, max_pixels):
    big = png_header_only(tmp_path / "bomb.png", 100_000, 100_000)
    small = make_image(tmp_path / "solid.png", size=(100, 100))
    path = big if max_pixels == 89_478_485 else small
    with pytest.raises(BadImage) as e:
        inspect_image(path, max_pixels)
    assert e.value.reason == "too_large"
    assert f"ingest.max_image_pixels={max_pixels}" in e.value.detail
    assert str(2 * max_pixels) not in e.value.detail  # Pillow's own threshold
    pixels = 100_000 * 100_000 if path is big else 10_000
    assert e.value.detail.startswith(f"{pixels} pixels > ")
