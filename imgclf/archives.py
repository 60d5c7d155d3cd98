"""Safe, atomic extraction of .tgz/.tar.gz/.tar/.zip archives.

Only regular files and directories are ever written, under names checked to stay inside
the target: absolute names, '..' components, links and device files are refused. Members
go to a temporary sibling of the target, renamed into place at the end, so the target
either does not exist or holds the whole archive.
"""

from __future__ import annotations

import os
import re
import shutil
import stat
import sys
import tarfile
import tempfile
import zipfile
import zlib
from pathlib import Path
from typing import BinaryIO

from tqdm import tqdm

from imgclf.downloads import pid_alive
from imgclf.errors import UserError

_CHUNK = 1 << 20


class UnsafeArchiveError(UserError, ValueError):
    """An archive member would write outside the target, or is a link or device file."""

    def __init__(self, archive: Path, member: str, why: str) -> None:
        self.archive = archive
        self.member = member
        super().__init__(
            f"refusing to extract {archive}: member {member!r} {why}; nothing was extracted"
        )


def archive_format(path: Path) -> str | None:
    """'tar' or 'zip' judged by content (magic bytes), or None."""
    with open(path, "rb") as f:
        head = f.read(512)
    if head.startswith((b"PK\x03\x04", b"PK\x05\x06")):
        return "zip"
    # gzip, bzip2, xz around a tar; or a plain tar's "ustar" magic at offset 257.
    if head.startswith((b"\x1f\x8b", b"BZh", b"\xfd7zXZ\x00")) or head[257:262] == b"ustar":
        return "tar"
    return None


def _safe_parts(archive: Path, name: str) -> list[str]:
    """The path components of member `name`, or UnsafeArchiveError."""
    if "\x00" in name:
        raise UnsafeArchiveError(archive, name, "has a NUL byte in its name")
    # Backslashes are separators in zips made on Windows: check them as such.
    normal = name.replace("\\", "/")
    if normal.startswith("/") or re.match(r"^[A-Za-z]:", normal):
        raise UnsafeArchiveError(archive, name, "has an absolute path")
    parts = [p for p in normal.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise UnsafeArchiveError(archive, name, "escapes the target with '..'")
    return parts


def _write(src: BinaryIO, dest: Path) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    with open(dest, "wb") as out:
        shutil.copyfileobj(src, out, _CHUNK)


def _extract_tar(archive: Path, root: Path, bar: tqdm) -> None:
    # Streaming mode ("r|*"): one pass over a compressed archive, members checked one by one;
    # anything refused midway discards the whole temporary tree.
    with tarfile.open(archive, "r|*") as tar:
        for member in tar:
            parts = _safe_parts(archive, member.name)
            if member.issym() or member.islnk():
                kind = "a symbolic link" if member.issym() else "a hard link"
                raise UnsafeArchiveError(
                    archive, member.name, f"is {kind} (to {member.linkname!r})"
                )
            if member.ischr() or member.isblk() or member.isfifo():
                raise UnsafeArchiveError(archive, member.name, "is a device or FIFO")
            if not parts:
                continue
            dest = root.joinpath(*parts)
            if member.isdir():
                dest.mkdir(parents=True, exist_ok=True)
            elif member.isfile():
                src = tar.extractfile(member)
                assert src is not None
                with src:
                    _write(src, dest)
                bar.update(1)
            else:
                raise UnsafeArchiveError(
                    archive, member.name, f"has unsupported type {member.type!r}"
                )


def _extract_zip(archive: Path, root: Path, bar: tqdm) -> None:
    with zipfile.ZipFile(archive) as zf:
        infos = zf.infolist()
        # A zip has a table of contents: check every member before writing any.
        checked = []
        for info in infos:
            parts = _safe_parts(archive, info.filename)
            mode = info.external_attr >> 16  # Unix mode bits, when made on Unix
            if stat.S_ISLNK(mode):
                raise UnsafeArchiveError(archive, info.filename, "is a symbolic link")
            if (
                stat.S_ISCHR(mode)
                or stat.S_ISBLK(mode)
                or stat.S_ISFIFO(mode)
                or stat.S_ISSOCK(mode)
            ):
                raise UnsafeArchiveError(archive, info.filename, "is a device or FIFO")
            checked.append((info, parts))
        bar.reset(total=sum(not info.is_dir() for info in infos))
        for info, parts in checked:
            if not parts:
                continue
            dest = root.joinpath(*parts)
            if info.is_dir():
                dest.mkdir(parents=True, exist_ok=True)
            else:
                with zf.open(info) as src:
                    _write(src, dest)
                bar.update(1)


def _clean_stale(target: Path) -> None:
    """Remove temporary trees of extractions into `target` that were killed (their process
    is gone); a live one, in a parallel run, is left alone."""
    pattern = re.compile(rf"^\.{re.escape(target.name)}\.(\d+)\.[A-Za-z0-9_]+\.tmp$")
    if not target.parent.is_dir():
        return
    for entry in target.parent.iterdir():
        m = pattern.match(entry.name)
        if m and entry.is_dir() and not pid_alive(int(m.group(1))):
            shutil.rmtree(entry, ignore_errors=True)


def extract_archive(archive: Path, target: Path) -> Path:
    """Extract a .tgz/.tar.gz/.tar/.zip (recognised by content) into `target`, which must
    not exist yet (an empty directory is accepted). Returns `target`. The archive is only
    read. Raises UnsafeArchiveError naming the first unsafe member, ValueError when the
    file is not an archive, FileExistsError when `target` is already populated."""
    archive, target = Path(archive), Path(target)
    if not archive.is_file():
        raise FileNotFoundError(f"archive not found: {archive}")
    fmt = archive_format(archive)
    if fmt is None:
        raise ValueError(
            f"{archive} is not a .tgz/.tar.gz/.tar/.zip archive (unrecognised content)"
        )
    if target.exists():
        if target.is_dir() and not any(target.iterdir()):
            target.rmdir()
        else:
            raise FileExistsError(f"{target} already exists; extract_archive never overwrites")
    _clean_stale(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(
        tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.{os.getpid()}.", suffix=".tmp")
    )
    try:
        with tqdm(
            desc=f"extract {archive.name}", unit="file", file=sys.stderr, mininterval=0.5
        ) as bar:
            try:
                if fmt == "zip":
                    _extract_zip(archive, tmp, bar)
                else:
                    _extract_tar(archive, tmp, bar)
            except (tarfile.TarError, zipfile.BadZipFile, zlib.error, EOFError) as e:
                raise ValueError(f"{archive} is damaged or truncated: {e}") from e
        os.rename(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target
