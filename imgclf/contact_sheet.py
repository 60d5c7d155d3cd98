"""A contact sheet: a PNG grid of images, each labelled "actual -> predicted (confidence)"
with its file name below. evaluate draws the misclassified test images with it, the label
audit the training images whose label looks wrong.

Deterministic (Pillow's bundled font, fixed geometry, no timestamps), so a rerun on the same
rows gives a byte-identical file.
"""

from __future__ import annotations

import io
import math
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw, ImageFont

from imgclf.images import load_rgb

# Contact-sheet geometry (pixels). Fixed, so the sheet size is a function of the image count.
THUMB = 128
CELL_W = 184
PAD = 6
LINE_H = 14
CELL_H = PAD + THUMB + PAD + 2 * LINE_H + PAD
HEADER_H = 28
SHEET_COLUMNS = 6
FONT_SIZE = 11
_BACKGROUND = (255, 255, 255)
_PLACEHOLDER = (200, 200, 200)
_TEXT = (0, 0, 0)
_MUTED = (90, 90, 90)


def contact_sheet_size(n_images: int) -> tuple[int, int]:
    """(width, height) of a sheet of `n_images` thumbnails (n = 0: the header only)."""
    rows = math.ceil(n_images / SHEET_COLUMNS)
    return SHEET_COLUMNS * CELL_W, HEADER_H + rows * CELL_H


def _font(size: int = FONT_SIZE) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    # Pillow's bundled font, never a system one, so the sheet looks the same on every machine.
    return ImageFont.load_default(size=size)


def _fit(draw: ImageDraw.ImageDraw, text: str, font, width: float) -> str:
    """`text`, shortened with '...' until it fits in `width` pixels."""
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength(text + "...", font=font) > width:
        text = text[:-1]
    return text + "..."


def _draw_arrow(draw: ImageDraw.ImageDraw, x: float, y_mid: float, length: int = 10) -> None:
    # Pillow's bundled font has no U+2192 glyph, so the arrow is drawn.
    draw.line([(x, y_mid), (x + length, y_mid)], fill=_TEXT, width=1)
    draw.polygon(
        [(x + length + 1, y_mid), (x + length - 3, y_mid - 3), (x + length - 3, y_mid + 3)],
        fill=_TEXT,
    )


def _thumbnail(path: Path) -> Image.Image | None:
    """The image as the model saw it (EXIF-upright RGB), shrunk to fit THUMB x THUMB; None when
    it cannot be read."""
    try:
        img = Image.fromarray(load_rgb(path), "RGB")
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        print(f"cannot read {path} for a contact sheet: {exc}", file=sys.stderr)
        return None
    img.thumbnail((THUMB, THUMB), Image.Resampling.LANCZOS)
    return img


@dataclass(frozen=True)
class SheetResult:
    png: bytes
    shown: int
    unreadable: int


def contact_sheet(
    rows: Sequence[Mapping[str, Any]], title: str, max_images: int, *,
    what: str = "misclassified", ranked: str = "most confident",
    none: str = "no misclassified test images",
) -> SheetResult:  # fmt: skip
    """A PNG grid of the first `max_images` rows (as from `misclassified_rows`, i.e. most
    confident first), each labelled "actual -> predicted (confidence)" with the file name below;
    the header counts them (`what`, `ranked`: how the shown ones were chosen; `none`: the header
    without rows). Unreadable images get a grey placeholder and are counted."""
    shown = list(rows[: max(0, int(max_images))])
    width, height = contact_sheet_size(len(shown))
    sheet = Image.new("RGB", (width, height), _BACKGROUND)
    draw = ImageDraw.Draw(sheet)
    font = _font()
    header = f"{title}: {len(rows)} {what}"
    if len(shown) < len(rows):
        header += f", the {len(shown)} {ranked} shown"
    if not rows:
        header = f"{title}: {none}"
    draw.text((PAD, (HEADER_H - FONT_SIZE) // 2), header, fill=_TEXT, font=_font(FONT_SIZE + 2))

    unreadable = 0
    for k, row in enumerate(shown):
        x0 = (k % SHEET_COLUMNS) * CELL_W
        y0 = HEADER_H + (k // SHEET_COLUMNS) * CELL_H
        thumb = _thumbnail(Path(row["path"]))
        if thumb is None:
            unreadable += 1
            box = (x0 + (CELL_W - THUMB) // 2, y0 + PAD)
            draw.rectangle([box, (box[0] + THUMB - 1, box[1] + THUMB - 1)], fill=_PLACEHOLDER)
            draw.text((box[0] + PAD, box[1] + THUMB // 2), "unreadable", fill=_TEXT, font=font)
        else:
            # Centre the thumbnail in its THUMB x THUMB box.
            sheet.paste(
                thumb,
                (x0 + (CELL_W - thumb.width) // 2, y0 + PAD + (THUMB - thumb.height) // 2),
            )
        text_w = CELL_W - 2 * PAD
        y_text = y0 + PAD + THUMB + PAD
        arrow_w = 15
        score = f" ({float(row['confidence']):.2f})"
        # Share the line between the two class names, each shortened only if it has to be.
        budget = text_w - arrow_w - draw.textlength(score, font=font)
        actual = _fit(draw, str(row["actual"]), font, budget / 2)
        predicted = _fit(
            draw, str(row["predicted"]), font, budget - draw.textlength(actual, font=font)
        )
        x = x0 + PAD
        draw.text((x, y_text), actual, fill=_TEXT, font=font)
        x += draw.textlength(actual, font=font) + 2
        _draw_arrow(draw, x, y_text + FONT_SIZE / 2 + 1)
        x += arrow_w + 1
        draw.text((x, y_text), predicted + score, fill=_TEXT, font=font)
        name = _fit(draw, Path(str(row["id"])).name, font, text_w)
        draw.text((x0 + PAD, y_text + LINE_H), name, fill=_MUTED, font=font)

    buf = io.BytesIO()
    sheet.save(buf, format="PNG", optimize=False)
    return SheetResult(png=buf.getvalue(), shown=len(shown), unreadable=unreadable)
