"""Small file helpers every stage needs: atomic writes, stable JSON/CSV, hashing."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

_CHUNK = 1 << 20
# mkstemp creates 0600 files; outputs get the usual umask-based mode instead. Read once:
# os.umask can only be read by setting it, which is not thread-safe.
_UMASK = os.umask(0)
os.umask(_UMASK)


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write via a temporary file in the same folder and rename: readers (and a re-run
    after kill -9) see the old file or the new one, never half of one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~_UMASK)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(path: str | Path, obj: Any) -> None:
    """Stable JSON (sorted keys, fixed indent, trailing newline) so reruns are byte-identical."""
    text = json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False) + "\n"
    atomic_write_bytes(path, text.encode("utf-8"))


def read_json(path: str | Path) -> Any:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def is_metric(value: Any) -> bool:
    """A number `dvc metrics diff` can subtract (booleans are not)."""
    return isinstance(value, int | float) and not isinstance(value, bool)


def info_path(metrics_path: str | Path) -> Path:
    """Where the non-numeric part of a metrics file goes: `x.json` -> `x.info.json`."""
    path = Path(metrics_path)
    return path.with_name(f"{path.stem}.info.json")


def _partition(tree: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    numbers: dict[str, Any] = {}
    rest: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, Mapping):
            sub_numbers, sub_rest = _partition(value)
            # An empty mapping (no class has images) stays a metric: readers expect the key.
            if sub_numbers or not value:
                numbers[key] = sub_numbers
            if sub_rest:
                rest[key] = sub_rest
        elif is_metric(value):
            numbers[key] = value
        else:
            rest[key] = value
    return numbers, rest


def write_metrics(path: str | Path, payload: Mapping[str, Any]) -> dict[str, Any]:
    """Write the numbers of `payload` to `path` (a DVC metrics file) and everything else
    (hashes, modes, flags, names) with the same nesting to `info_path(path)`, which is always
    written, `{}` when there is nothing; `dvc metrics show/diff` and `dvc exp show` then list
    only what can be compared. Returns the numbers; `read_metrics` joins the two again."""
    numbers, rest = _partition(payload)
    write_json(path, numbers)
    write_json(info_path(path), rest)
    return numbers


def _merge(a: Mapping[str, Any], b: Mapping[str, Any]) -> dict[str, Any]:
    merged = dict(a)
    for key, value in b.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def read_metrics(path: str | Path) -> dict[str, Any]:
    """A metrics file written by `write_metrics`, with its info part merged back in (a file
    without an info part reads as it is)."""
    data = read_json(path)
    extra = info_path(path)
    return _merge(data, read_json(extra)) if extra.is_file() else data


def write_csv(
    path: str | Path,
    fieldnames: Sequence[str],
    rows: Iterable[Mapping[str, Any]],
    fixed_decimals: Mapping[str, int] | None = None,
) -> None:
    """CSV with a header and Unix line endings, written atomically. The columns of
    `fixed_decimals` are written with that many decimals (4: 0.5 -> "0.5000"), so such a
    column reads (and diffs) evenly."""
    fixed = dict(fixed_decimals or {})
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(fieldnames), lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({**row, **{k: f"{float(row[k]):.{n}f}" for k, n in fixed.items()}})
    atomic_write_bytes(path, buf.getvalue().encode("utf-8"))


def read_csv(path: str | Path) -> list[dict[str, str]]:
    with open(path, encoding="utf-8", newline="") as f:
        return list(csv.DictReader(f))
