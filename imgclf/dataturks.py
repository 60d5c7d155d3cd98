"""Reading Dataturks image-classification exports (JSON Lines).

One JSON object per line:
    {"content": "<http(s) URL | path relative to the export's folder | file:// URL>",
     "annotation": {"labels": ["<label>"], "note": ""} | null,
     "extras": ..., "metadata": {"status": "done" | "skipped" | ..., ...} | null}

Variants the tool produced and this reader accepts: `"label"` instead of `"labels"`, a single
string instead of a list, `"notes"` instead of `"note"`, no `status`, a null annotation for
skipped or unfinished items. A whole-file JSON array of the same objects is accepted too.
An item's labels are used whatever its status, except "skipped" (the annotator's verdict);
an item without labels is `unlabelled`.

A line that is not valid JSON, or not a JSON object, is an item with problem `bad_line`
(on_bad_line="skip", the default: one bad line must not sink a 10,000-line export), or is
refused with `DataturksError` (`<file>:<line>: ...`) when on_bad_line="error". Refused at once,
before anything is downloaded, whatever on_bad_line says: a whole-file JSON array that does not
parse, and exports of another Dataturks task type (bounding boxes, polygons, NER...: their
`annotation` is a list).
"""

from __future__ import annotations

import codecs
import json
import re
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from imgclf.errors import UserError
from imgclf.labels import normalize_label, readable

# Dataturks stored uploads as "<uuid or hex id>___<original file name>".
_UPLOAD_PREFIX = re.compile(r"^[0-9A-Fa-f][0-9A-Fa-f-]{7,}___(?=.)")


class DataturksError(UserError, ValueError):
    """The export cannot be used as a whole (malformed line, wrong task type)."""


@dataclass(frozen=True)
class DataturksItem:
    line: int  # 1-based line number in the export (item number for a JSON array)
    content: str  # as written in the export
    labels: tuple[str, ...]  # normalised (NFC, stripped), de-duplicated, in export order
    status: str | None  # metadata.status, None when absent
    problem: str | None = None  # why the item cannot be used (a skip reason), None when fine
    detail: str = ""


# A byte-order mark names the encoding (Windows PowerShell's `>` writes UTF-16 with one); UTF-32
# little-endian's begins with UTF-16's, so it is looked for first.
_BOMS = (
    (codecs.BOM_UTF32_LE, "utf-32"),
    (codecs.BOM_UTF32_BE, "utf-32"),
    (codecs.BOM_UTF16_LE, "utf-16"),
    (codecs.BOM_UTF16_BE, "utf-16"),
)
_NEWLINE = re.compile(r"\r\n|\r|\n")


def export_lines(raw: bytes) -> list[str | UnicodeDecodeError]:
    """The lines of an export's bytes, each decoded on its own: UTF-8 (a BOM allowed), or UTF-16
    or UTF-32 when a BOM says so. A line that is not UTF-8 is its UnicodeDecodeError, so that
    it alone is a bad line. Only \\n, \\r and \\r\\n end a line: a JSON string may hold
    U+2028 or U+0085, at which str.splitlines would cut it."""
    for bom, codec in _BOMS:
        if raw.startswith(bom):
            return list(_NEWLINE.split(raw.decode(codec, errors="replace")))
    lines: list[str | UnicodeDecodeError] = []
    for line in raw.removeprefix(codecs.BOM_UTF8).splitlines():
        try:
            lines.append(line.decode("utf-8"))
        except UnicodeDecodeError as e:
            lines.append(e)
    return lines


def not_utf8(error: UnicodeDecodeError) -> str:
    """What is wrong with a line that is not UTF-8, for a skip row or an error."""
    return f"not UTF-8 text (byte 0x{error.object[error.start]:02x} at column {error.start + 1})"


def read_export(path: str | Path, on_bad_line: str = "skip") -> list[DataturksItem]:
    """Every item of the export at `path`, or `DataturksError` for a file that cannot be one.

    A malformed line is an item with problem "bad_line" (on_bad_line="skip") or an error
    ("error")."""
    path = Path(path)
    if on_bad_line not in ("skip", "error"):
        raise ValueError(f"on_bad_line must be 'skip' or 'error', not {on_bad_line!r}")
    bad: list[DataturksItem] = []
    lines = export_lines(path.read_bytes())
    first = next((line for line in lines if not isinstance(line, str) or line.strip()), "")
    if isinstance(first, str) and first.lstrip().startswith("["):
        if undecoded := [n for n, line in enumerate(lines, 1) if not isinstance(line, str)]:
            raise DataturksError(
                f"{path}:{undecoded[0]}: {not_utf8(lines[undecoded[0] - 1])}. Dataturks exports "
                "are UTF-8 JSON Lines: re-export the data set, or re-save the file as UTF-8."
            )
        text = "\n".join(line for line in lines if isinstance(line, str))
        try:
            records = parse_json(text)
        except json.JSONDecodeError as e:
            raise DataturksError(
                f"{path}:{e.lineno}: invalid JSON ({e.msg}, column {e.colno}). Dataturks "
                "exports are JSON Lines (one object per line); fix or re-export the file."
            ) from None
        numbered = list(enumerate(records, start=1))
    else:
        numbered = []
        for number, line in enumerate(lines, start=1):
            if isinstance(line, UnicodeDecodeError):
                if on_bad_line == "error":
                    raise DataturksError(
                        f"{path}:{number}: {not_utf8(line)}. Dataturks exports are UTF-8: "
                        "re-save the file as UTF-8, fix or delete that line, or set "
                        "ingest.on_bad_line=skip."
                    )
                text = line.object.decode("utf-8", "backslashreplace")
                bad.append(_bad_line(number, not_utf8(line), text))
                continue
            if not line.strip():
                continue
            try:
                record = parse_json(line)
            except json.JSONDecodeError as e:
                if on_bad_line == "error":
                    raise DataturksError(
                        f"{path}:{number}: invalid JSON ({e.msg}, column {e.colno}). Each line "
                        "of a Dataturks export must be one complete JSON object: fix or delete "
                        "that line (or re-export the data set), or set ingest.on_bad_line=skip."
                    ) from None
                bad.append(_bad_line(number, f"invalid JSON ({e.msg}, column {e.colno})", line))
                continue
            if not isinstance(record, dict) and on_bad_line == "skip":
                what = f"a JSON {type(record).__name__}, not an object"
                bad.append(_bad_line(number, what, line))
                continue
            numbered.append((number, record))
    items = [_parse_record(path, number, record) for number, record in numbered]
    items = sorted(items + bad, key=lambda item: item.line)
    if not items:
        raise DataturksError(f"{path}: the export has no items (an empty file?)")
    return items


def parse_json(text: str) -> Any:
    """json.loads; JSON nested deeper than Python's reader can follow (its RecursionError) is
    malformed JSON like any other, so that one such line is a bad line, not a crash."""
    try:
        return json.loads(text)
    except RecursionError:
        raise json.JSONDecodeError("nested too deeply to read", text, 0) from None


def _bad_line(number: int, what: str, line: str) -> DataturksItem:
    text = line.strip()
    shown = text[:60] + ("..." if len(text) > 60 else "")
    return DataturksItem(number, "", (), None, "bad_line", f"{what}: {shown!r}")


def _parse_record(path: Path, number: int, record: Any) -> DataturksItem:
    if not isinstance(record, dict):
        raise DataturksError(
            f"{path}:{number}: expected a JSON object with 'content' and 'annotation', found "
            f"{type(record).__name__}. Is this a Dataturks export?"
        )
    content = record.get("content")
    annotation = record.get("annotation")
    if isinstance(annotation, list):
        raise DataturksError(
            f"{path}:{number}: not an image-classification export: 'annotation' is a list "
            f"({_describe_list_annotation(annotation)}). Ingest takes a Dataturks "
            "IMAGE_CLASSIFICATION export (annotation = {'labels': [...]}) or a folder of "
            "class folders; export the data set as image classification instead."
        )
    metadata = record.get("metadata")
    status = metadata.get("status") if isinstance(metadata, dict) else None
    status = str(status) if status is not None else None
    if not isinstance(content, str) or not content.strip():
        return DataturksItem(
            number, str(content or ""), (), status, "bad_item", "no 'content' string"
        )
    content = content.strip()
    shown = readable(content)
    if shown != content:  # a lone surrogate ("\\ud83c"): no file or URL has one
        return DataturksItem(
            number, shown, (), status, "bad_item",
            "the 'content' holds a lone surrogate escape (half of a character): not a path "
            "or URL; fix the line's text",
        )  # fmt: skip
    if status is not None and status.lower() == "skipped":
        return DataturksItem(number, content, (), status, "skipped", "skipped by the annotator")
    labels, problem = _labels(annotation)
    if problem:
        return DataturksItem(number, content, (), status, "bad_label", problem)
    if not labels:
        detail = "no annotation" if annotation is None else "no label in the annotation"
        if status is not None:
            detail += f" (status {status!r})"
        return DataturksItem(number, content, (), status, "unlabelled", detail)
    return DataturksItem(number, content, labels, status)


def _labels(annotation: Any) -> tuple[tuple[str, ...], str | None]:
    if annotation is None:
        return (), None
    if isinstance(annotation, str | int | float) and not isinstance(annotation, bool):
        raw: Any = annotation  # a bare label
    elif isinstance(annotation, dict):
        raw = annotation.get("labels", annotation.get("label"))
    else:
        return (), f"unexpected annotation: {json.dumps(annotation)[:80]}"
    if raw is None:
        return (), None
    values = raw if isinstance(raw, list) else [raw]
    labels: list[str] = []
    for value in values:
        if isinstance(value, bool) or not isinstance(value, str | int | float):
            return (), f"a label is not a string: {json.dumps(value)[:80]}"
        label = normalize_label(str(value))
        if label and label not in labels:
            labels.append(label)
    return tuple(labels), None


def _describe_list_annotation(annotation: list) -> str:
    first = next((a for a in annotation if isinstance(a, dict)), None)
    if first is None:
        return (
            "empty list"
            if not annotation
            else "a list of " + type(annotation[0]).__name__ + " values"
        ) + ", as in bounding-box, polygon or NER exports"
    points = first.get("points")
    point = points[0] if isinstance(points, list) and points else None
    if isinstance(point, dict) and "x" in point and "y" in point:
        n = len(points)
        shape = "bounding boxes" if n == 2 else f"polygons/shapes of {n} points"
        return (
            f"{len(annotation)} {shape} with labels, image size and x/y points: it looks like "
            "a Dataturks IMAGE_BOUNDING_BOX / polygon export"
        )
    if isinstance(point, dict) and "start" in point:
        return "text spans with start/end offsets: it looks like a Dataturks NER (text) export"
    return f"{len(annotation)} objects with keys {sorted(first)[:6]}"


def is_url(content: str) -> bool:
    return urllib.parse.urlsplit(content).scheme.lower() in ("http", "https")


def local_path(content: str, base_dir: Path) -> Path:
    """The file a non-http(s) `content` names: a file:// URL, or a path (relative to the
    export's folder unless absolute)."""
    parts = urllib.parse.urlsplit(content)
    if parts.scheme.lower() == "file":
        return Path(urllib.request.url2pathname(parts.netloc + parts.path))
    path = Path(content).expanduser()
    return path if path.is_absolute() else base_dir / path


def original_name(content: str) -> str:
    """The original file name of an item: the last path component, URL-decoded, without the
    `<uuid>___` prefix Dataturks added to uploads."""
    if is_url(content) or content.lower().startswith("file:"):
        path = urllib.parse.unquote(urllib.parse.urlsplit(content).path)
    else:
        path = content
    name = re.split(r"[/\\]", path.rstrip("/\\"))[-1]
    return _UPLOAD_PREFIX.sub("", name)
