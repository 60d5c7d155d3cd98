"""Safe, atomic extraction of .tgz/.tar.gz/.tar/.zip archives.

Only regular files and directories are ever written, under names checked to stay inside
the target: absolute names, '..' components, links and device files are refused, and the
refusal names every such member (the first MAX_NAMED, then a count). Members go to a
temporary sibling of the target, renamed into place at the end, so the target either does not
exist or holds the whole archive.

What an archive may write is capped (`ArchiveLimits`: total bytes, and bytes per byte of
archive): the member whose size crosses a cap is named and nothing stays on disk. The sizes
checked are the members' declared ones (tar headers, the zip directory), known before a byte
of the member is written; neither reader writes more than the declared size.
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
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from tqdm import tqdm

from imgclf.downloads import pid_alive
from imgclf.errors import UserError, first_few
from imgclf.labels import NAME_MAX, fit_name

_CHUNK = 1 << 20
MAX_NAMED = 10  # unsafe members named in a refusal; the rest are counted


@dataclass(frozen=True)
class ArchiveLimits:
    """Caps on what one archive may write (params.yaml ingest.max_extracted_bytes and
    ingest.max_expansion_ratio). JPEGs do not compress: a .tgz of the shared flower photos
    is 229 MB and writes 233 MB (1.02 times)."""

    max_bytes: int = 20_000_000_000
    max_ratio: float = 100.0

    def __post_init__(self) -> None:
        if self.max_bytes <= 0 or self.max_ratio <= 0:
            raise ValueError(
                "ingest.max_extracted_bytes and ingest.max_expansion_ratio must be positive, "
                f"not {self.max_bytes} and {self.max_ratio}"
            )


class UnsafeArchiveError(UserError, ValueError):
    """Archive members would write outside the target, are links or device files, or would
    be a file and a folder of one path."""

    def __init__(self, archive: Path, problems: list[tuple[str, str]]) -> None:
        self.archive = archive
        self.members = [member for member, _ in problems]
        self.member = self.members[0]
        named = first_few([f"{member!r} {why}" for member, why in problems], MAX_NAMED, "; ")
        many = len(problems) > 1
        what = f"{len(problems)} unsafe members: {named}" if many else f"member {named}"
        super().__init__(f"refusing to extract {archive}: {what}; nothing was extracted")


class ArchiveTooLarge(UserError, ValueError):
    """Extracting the archive would write more than `ArchiveLimits` allows."""

    def __init__(self, archive: Path, member: str, total: int, cap: str) -> None:
        self.archive = archive
        self.member = member
        super().__init__(
            f"refusing to extract {archive}: member {member!r} takes what it would write to "
            f"{total:,} bytes, above {cap}. It looks like a decompression bomb; the partial "
            "extraction was removed. If the archive is genuine, raise the cap in params.yaml "
            "(dvc exp run -S ingest.max_extracted_bytes=N or ingest.max_expansion_ratio=R), "
            "or extract it yourself and point data.source at the folder"
        )


class _Budget:
    """The bytes an extraction may still write; `take` raises before a cap is crossed."""

    def __init__(self, archive: Path, limits: ArchiveLimits) -> None:
        self.archive = archive
        self.size = archive.stat().st_size
        self.limits = limits
        self.total = 0

    def take(self, member: str, size: int) -> None:
        self.total += size
        ratio_cap = self.limits.max_ratio * max(self.size, 1)
        if self.total > self.limits.max_bytes:
            cap = f"ingest.max_extracted_bytes={self.limits.max_bytes:,}"
        elif self.total > ratio_cap:
            cap = (
                f"ingest.max_expansion_ratio={self.limits.max_ratio:g} times the archive's "
                f"{self.size:,} bytes"
            )
        else:
            return
        raise ArchiveTooLarge(self.archive, member, self.total, cap)


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


def _name_problem(name: str) -> tuple[list[str], str | None]:
    """The path components of member `name`, and why it is unsafe (None when it is not)."""
    if "\x00" in name:
        return [], "has a NUL byte in its name"
    # Backslashes are separators in zips made on Windows: check them as such.
    normal = name.replace("\\", "/")
    if normal.startswith("/") or re.match(r"^[A-Za-z]:", normal):
        return [], "has an absolute path"
    parts = [p for p in normal.split("/") if p not in ("", ".")]
    if ".." in parts:
        return [], "escapes the target with '..'"
    return parts, None


class _Tree:
    """Where the members checked so far go. A name longer than a file system holds (NAME_MAX
    bytes: a macOS name of 100 CJK characters is 300) is shortened, its extension and a hash of
    it kept, rather than the photo lost. A member that would be a file where another is a
    folder (or the reverse) cannot be extracted to one tree. The same file twice is fine (in a
    tar the later one wins, as tar itself does)."""

    def __init__(self) -> None:
        self.files: set[tuple[str, ...]] = set()
        self.folders: set[tuple[str, ...]] = set()
        self.shortened: list[str] = []  # members whose path was shortened

    def place(self, member: str, parts: list[str], is_dir: bool) -> tuple[list[str], str | None]:
        """The path components `member` is written at, and why it cannot be (None: it can)."""
        fitted = [fit_name(part) for part in parts]
        path = tuple(fitted)
        parents = [path[:i] for i in range(1, len(path))]
        if clash := next((parent for parent in parents if parent in self.files), None):
            return [], f"is inside {'/'.join(clash)!r}, which the archive also holds as a file"
        if path in (self.files if is_dir else self.folders):
            this, other = ("folder", "file") if is_dir else ("file", "folder")
            return [], f"is a {this} where the archive also holds a {other} of that name"
        self.folders.update(parents)
        (self.folders if is_dir else self.files).add(path)
        if fitted != parts:
            self.shortened.append(member)
        return fitted, None

    def report(self, archive: Path) -> None:
        if self.shortened:
            print(
                f"extract {archive.name}: {len(self.shortened)} member name(s) longer than "
                f"{NAME_MAX} bytes, too long for a file name, were shortened (extension and a "
                f"hash of the name kept), e.g. {self.shortened[0]!r}",
                file=sys.stderr,
            )


def _tar_problem(member: tarfile.TarInfo) -> str | None:
    if member.issym() or member.islnk():
        kind = "a symbolic link" if member.issym() else "a hard link"
        return f"is {kind} (to {member.linkname!r})"
    if member.ischr() or member.isblk() or member.isfifo():
        return "is a device or FIFO"
    if not (member.isdir() or member.isfile()):
        return f"has unsupported type {member.type!r}"
    return None


def _write(src: BinaryIO, dest: Path) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    with open(dest, "wb") as out:
        shutil.copyfileobj(src, out, _CHUNK)


def _extract_tar(archive: Path, root: Path, bar: tqdm, budget: _Budget) -> _Tree:
    # Streaming mode ("r|*"): one pass over a compressed archive, members checked one by one.
    # After the first unsafe member nothing more is written, but the rest is still read so
    # that the refusal names every unsafe member; the temporary tree is then discarded.
    problems: list[tuple[str, str]] = []
    tree = _Tree()
    with tarfile.open(archive, "r|*") as tar:
        for member in tar:
            parts, why = _name_problem(member.name)
            why = why or _tar_problem(member)
            if not why and parts:
                parts, why = tree.place(member.name, parts, member.isdir())
            if why:
                problems.append((member.name, why))
            if problems or not parts:
                continue
            dest = root.joinpath(*parts)
            if member.isdir():
                dest.mkdir(parents=True, exist_ok=True)
            else:
                budget.take(member.name, member.size)
                src = tar.extractfile(member)
                assert src is not None
                with src:
                    _write(src, dest)
                bar.update(1)
    if problems:
        raise UnsafeArchiveError(archive, problems)
    return tree


def _extract_zip(archive: Path, root: Path, bar: tqdm, budget: _Budget) -> _Tree:
    with zipfile.ZipFile(archive) as zf:
        infos = zf.infolist()
        # A zip has a table of contents: check every member (names, types, declared sizes)
        # before writing any. ZipExtFile never returns more than the declared file_size.
        checked, problems = [], []
        tree = _Tree()
        for info in infos:
            parts, why = _name_problem(info.filename)
            mode = info.external_attr >> 16  # Unix mode bits, when made on Unix
            if why:
                pass
            elif stat.S_ISLNK(mode):
                why = "is a symbolic link"
            elif (
                stat.S_ISCHR(mode)
                or stat.S_ISBLK(mode)
                or stat.S_ISFIFO(mode)
                or stat.S_ISSOCK(mode)
            ):
                why = "is a device or FIFO"
            elif parts:
                parts, why = tree.place(info.filename, parts, info.is_dir())
            if why:
                problems.append((info.filename, why))
            checked.append((info, parts))
        if problems:
            raise UnsafeArchiveError(archive, problems)
        _refuse_unreadable_zip(archive, infos)
        for info, parts in checked:
            if parts and not info.is_dir():
                budget.take(info.filename, info.file_size)
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
    return tree


# What Python's zipfile can decompress; a member in any other method (Deflate64 from Windows'
# Explorer, zstd...) raises NotImplementedError on open.
_ZIP_METHODS = {zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED, zipfile.ZIP_BZIP2, zipfile.ZIP_LZMA}


def _refuse_unreadable_zip(archive: Path, infos: list[zipfile.ZipInfo]) -> None:
    """Before anything is written: members that are password-protected or compressed in a way
    zipfile cannot read, named with what to do instead."""
    files = [info for info in infos if not info.is_dir()]
    encrypted = [info.filename for info in files if info.flag_bits & 0x1]
    methods = sorted({info.compress_type for info in files} - _ZIP_METHODS)
    if not encrypted and not methods:
        return
    if encrypted:
        what = f"{len(encrypted)} of its {len(files)} files are password-protected"
        example, how = encrypted[0], "with its password"
    else:
        unread = [info.filename for info in files if info.compress_type in methods]
        what = (
            f"{len(unread)} of its {len(files)} files use a compression method Python cannot "
            f"read (zip method {', '.join(map(str, methods))})"
        )
        example, how = unread[0], "with a tool that reads it (7-Zip, unzip)"
    raise ValueError(
        f"cannot extract {archive}: {what}, e.g. {example!r}; nothing was extracted. Extract "
        f"it yourself {how}, and point data.source at the folder"
    )


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


def extract_archive(archive: Path, target: Path, limits: ArchiveLimits | None = None) -> Path:
    """Extract a .tgz/.tar.gz/.tar/.zip (recognised by content) into `target`, which must
    not exist yet (an empty directory is accepted). Returns `target`. The archive is only
    read. Raises UnsafeArchiveError naming the unsafe members, ArchiveTooLarge when `limits`
    (default: `ArchiveLimits()`) would be crossed, ValueError when the file is not an
    archive, FileExistsError when `target` is already populated."""
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
                budget = _Budget(archive, limits or ArchiveLimits())
                if fmt == "zip":
                    tree = _extract_zip(archive, tmp, bar, budget)
                else:
                    tree = _extract_tar(archive, tmp, bar, budget)
            except (tarfile.TarError, zipfile.BadZipFile, zlib.error, EOFError) as e:
                raise ValueError(f"{archive} is damaged or truncated: {e}") from e
        os.rename(tmp, target)
        tree.report(archive)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target
