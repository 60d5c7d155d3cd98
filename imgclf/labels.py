"""Class labels and file names -> safe, portable directory and file names.

A label (a folder name of a class tree, or a Dataturks label) becomes the directory
`data/images/<class_dir>/`; the original label is kept in the manifest `label` column.

Rules (`class_dir_name`, `safe_file_name`):
- Unicode NFC (macOS hands out NFD names: "rosé" must be one class whatever typed it);
- no path separators, control characters (tab and newline included) or format characters,
  nor characters Windows refuses (<>:"|?*): each becomes "_"; runs of other whitespace become
  one space; no leading dots or spaces (no hidden folders, no "." or ".."), no trailing dots
  or spaces (Windows drops them);
- at most 150 UTF-8 bytes (a hash of the original keeps truncated names distinct);
- a name that is not UTF-8 (Latin-1 from an old file share, the raw names of a tar archive)
  keeps each undecodable byte as the text \\xNN (`readable`): "caf\\xe9", never a crash.
- Case is kept, but two different labels whose folder names differ only in case (or become
  equal after the rules above) are an ERROR, not a silent merge: on macOS and Windows they
  would land in the same folder, and whether "Cat" and "cat" are one class is the user's
  decision (see `ClassNameCollision`). Labels that differ only by surrounding whitespace or
  Unicode normal form are the same label (`normalize_label`).
"""

from __future__ import annotations

import hashlib
import re
import unicodedata
from collections.abc import Iterable, Mapping

from imgclf.errors import UserError

_FORBIDDEN = re.compile(r'[/\\<>:"|?*]')
_WHITESPACE = re.compile(r"\s+")
_MAX_BYTES = 150
_MAX_SUFFIX_BYTES = 16  # ".jpeg" is 5: anything much longer after the last dot is no extension
NAME_MAX = 255  # bytes in one file name on Linux (ext4, xfs, btrfs) and macOS


class ClassNameCollision(UserError, ValueError):
    """Different labels that would share one class folder."""


def readable(text: str) -> str:
    """`text` with every byte that was not UTF-8 written as \\xNN; valid text unchanged.

    Python hands out a file name that is not UTF-8 with each such byte as a lone surrogate
    (U+DC80-U+DCFF), which no UTF-8 file, CSV or terminal can hold. JSON may hold other lone
    surrogates ("\\ud83c", half an emoji): those are written as \\uXXXX."""
    try:
        raw = text.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:
        return text.encode("utf-8", "backslashreplace").decode("utf-8")
    return raw.decode("utf-8", "backslashreplace")


def normalize_label(label: str) -> str:
    """The label as recorded in the manifest: NFC, surrounding whitespace removed, readable."""
    return unicodedata.normalize("NFC", readable(label)).strip()


def _clean(name: str) -> str:
    name = unicodedata.normalize("NFC", name)
    name = "".join("_" if unicodedata.category(ch) in ("Cc", "Cf") else ch for ch in name)
    name = _FORBIDDEN.sub("_", name)
    name = _WHITESPACE.sub(" ", name)
    return name.lstrip(". ").rstrip(". ")


def _shorten(stem: str, suffix: str, original: str, max_bytes: int = _MAX_BYTES) -> str:
    if len((stem + suffix).encode("utf-8")) <= max_bytes:
        return stem + suffix
    tag = "_" + hashlib.sha256(original.encode("utf-8")).hexdigest()[:8]
    if len(suffix.encode("utf-8")) > _MAX_SUFFIX_BYTES:  # no extension: part of the name
        stem, suffix = stem + suffix, ""
    budget = max_bytes - len((tag + suffix).encode("utf-8"))
    short = stem.encode("utf-8")[:budget].decode("utf-8", errors="ignore").rstrip(". ")
    return short + tag + suffix


def fit_name(name: str, max_bytes: int = NAME_MAX) -> str:
    """`name` unchanged when it fits in `max_bytes` of UTF-8, else shortened as safe_file_name
    shortens (its extension kept, a hash of the whole name keeping it apart from others)."""
    stem, dot, ext = name.rpartition(".")
    if not dot or not stem:
        stem, ext = name, ""
    return _shorten(stem, "." + ext if ext else "", name, max_bytes)


def class_dir_name(label: str) -> str:
    """The folder name for `label`; "" when nothing usable is left (e.g. "..", "   ")."""
    label = readable(label)
    cleaned = _clean(label)
    return _shorten(cleaned, "", label) if cleaned else ""


def safe_file_name(name: str, default_suffix: str = "") -> str:
    """A safe base name for a file called `name` (its last path component is used).

    `default_suffix` (e.g. ".jpg") is appended when the name has no extension, and the name
    is "image" + suffix when nothing usable is left.
    """
    base = readable(re.split(r"[/\\]", name)[-1])  # split first: readable writes backslashes
    cleaned = _clean(base) or "image"
    stem, dot, ext = cleaned.rpartition(".")
    if not dot or not stem:
        stem, ext = cleaned, ""
        suffix = default_suffix
    else:
        suffix = "." + ext
    return _shorten(stem, suffix, base)


def class_dirs(labels: Iterable[str], where: Mapping[str, str] | None = None) -> dict[str, str]:
    """Map every label to its class folder, or raise `ClassNameCollision` listing every clash.

    Labels whose folder name is "" are left out (the caller reports their items). `where`
    (label -> e.g. "line 12") says where each label is first found, for the message.
    """
    by_key: dict[str, set[str]] = {}
    mapping: dict[str, str] = {}
    for label in sorted(set(labels)):
        folder = class_dir_name(label)
        if not folder:
            continue
        mapping[label] = folder
        by_key.setdefault(folder.casefold(), set()).add(label)
    clashes = {key: sorted(group) for key, group in by_key.items() if len(group) > 1}
    if clashes:
        found = where or {}
        lines = [
            "  "
            + ", ".join(
                f"{label!r} -> {mapping[label]!r}"
                + (f" (first on {found[label]})" if label in found else "")
                for label in group
            )
            for _, group in sorted(clashes.items())
        ]
        raise ClassNameCollision(
            "different labels would share one class folder (folder names are compared "
            "ignoring case, after removing characters that are not safe in file names):\n"
            + "\n".join(lines)
            + "\nRename the labels (in the export, or the folders of the class tree) so that "
            "they are identical if they are one class, or differ by more than case and "
            "punctuation if they are not."
        )
    return mapping
