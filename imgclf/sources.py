"""Where the images come from: `data.source` resolved to a class-folder tree or a
Dataturks export on local disk, downloading and extracting into the user cache as needed.

data.source may be
- a folder `<class>/<image files>` (a lone wrapper folder, as in flower_photos.tgz, is
  unwrapped), or a pre-split one, `<train|val|test>/<class>/<image files>`
  (`presplit_folders`);
- a .tgz/.tar.gz/.tar/.zip of such a folder, as a path or an http(s) URL: downloaded once
  into cache_dir("downloads"), extracted once into cache_dir("extracted", <sha256>);
- a Dataturks image-classification export (JSON Lines whose first line has "content"),
  as a path or a URL.
Relative paths are taken from `base_dir` (the repo root), `~` is expanded, file:// works.
For the official flower_photos.tgz, Keras' own cache (~/.keras/datasets) is used first.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import unicodedata
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from imgclf.archives import ArchiveLimits, ArchiveTooLarge, archive_format, extract_archive
from imgclf.config import cache_dir, repo_root
from imgclf.dataturks import export_lines, is_url, local_path, not_utf8, parse_json, read_export
from imgclf.downloads import ByteLimit, DownloadError, download_file, url_file_name, web_page
from imgclf.errors import UserError
from imgclf.fileio import sha256_file

DEFAULT_SOURCE = (
    "https://storage.googleapis.com/download.tensorflow.org/example_images/flower_photos.tgz"
)
FLOWERS_ARCHIVE = "flower_photos.tgz"
# The kinds a data.source resolves to: each has its fingerprint here (FINGERPRINTS) and its
# reader in imgclf/ingest/collect.py (COLLECTORS).
TREE = "tree"
DATATURKS = "dataturks"
EXPORT_SUFFIXES = (".json", ".jsonl", ".txt")
# Written into an extraction folder once it is complete; also never fingerprinted.
COMPLETE_MARKER = ".imgclf-complete"
_EXPECTED = (
    "a folder of <class>/<image files> (like flower_photos/daisy/*.jpg), a .tgz/.tar.gz/.zip "
    "archive of one, or a Dataturks image-classification export (JSON Lines)"
)
_HOW = (
    "run `make run DATA=/path/to/flower_photos` or "
    "`dvc exp run -S data.source=/path/to/flower_photos`"
)


class SourceUnavailable(UserError, RuntimeError):
    """data.source cannot be downloaded, found or understood; the message is one paragraph
    saying what to do."""


@dataclass(frozen=True)
class ResolvedSource:
    source: str  # what the user wrote in params.yaml data.source
    kind: str  # a key of FINGERPRINTS: TREE or DATATURKS
    path: Path  # the class-tree root directory, or the export file
    origin: str  # human-readable provenance (URL, archive path + member root, ...)

    def __post_init__(self) -> None:
        if self.kind not in FINGERPRINTS:
            raise ValueError(f"unknown source kind {self.kind!r}: one of {', '.join(FINGERPRINTS)}")


def ignored_name(name: str) -> bool:
    """Hidden files and OS litter are not data (a .DS_Store must not change a fingerprint)."""
    return name.startswith(".") or name in ("__MACOSX", "Thumbs.db", "desktop.ini")


# -- pre-split trees ------------------------------------------------------------------------
# Top-level folder names that mean "a subset" rather than "a class" (Keras' and torchvision's
# tutorials lay data out as <root>/train/<class>/* and <root>/val/<class>/*).
TRAIN_NAMES = frozenset({"train", "training"})
VAL_NAMES = frozenset({"val", "valid", "validation", "dev"})
TEST_NAMES = frozenset({"test", "testing", "eval", "evaluation"})
SPLIT_NAMES = TRAIN_NAMES | VAL_NAMES | TEST_NAMES


def presplit_folders(root: Path) -> dict[str, str] | None:
    """{top-level folder: "train" | "val" | "test"} when `root` is a pre-split tree, else None.

    A pre-split tree: every top-level folder that holds a file is named like a subset (case
    ignored), one of them like train and at least one other like val or test, each holds
    class folders, and they share at least one class name. A class folder literally named
    `train` holding images is not mistaken for one: it has no sub-folders. A folder without
    any file (an empty `checkpoints/`) is not a class either, so it does not hide the split.
    """
    dirs = _subset_named_folders(root)
    return None if dirs is None else _presplit_roles(dirs)


def _subset_named_folders(root: Path) -> list[Path] | None:
    """The top-level folders that hold a file, when there are two or more and every one is
    named like a subset; else None (an ordinary class tree)."""
    dirs = [d for d in _subdirs(root) if _holds_a_file(d)]
    if len(dirs) < 2 or any(d.name.lower() not in SPLIT_NAMES for d in dirs):
        return None
    return dirs


def _presplit_roles(dirs: list[Path]) -> dict[str, str] | None:
    """presplit_folders' answer for subset-named folders: their roles, or None when they do
    not make a pre-split tree."""
    roles = {}
    for d in dirs:
        name = d.name.lower()
        roles[d.name] = "train" if name in TRAIN_NAMES else "val" if name in VAL_NAMES else "test"
    if "train" not in roles.values() or set(roles.values()) == {"train"}:
        return None
    classes = [{c.name for c in _subdirs(d)} for d in dirs]
    if not all(classes) or not set.intersection(*classes):
        return None
    return roles


# -- trees ----------------------------------------------------------------------------------
def _subdirs(path: Path) -> list[Path]:
    return sorted(p for p in path.iterdir() if p.is_dir() and not ignored_name(p.name))


def _holds_a_file(folder: Path) -> bool:
    """Whether any file lies under `folder` (it stops at the first one)."""
    return any(files for _, _, files in os.walk(folder))


def _unlabelled_split(dirs: list[Path]) -> str | None:
    """The message for subset-named folders that are not a pre-split tree (Kaggle's
    train/<class>/ beside a test/ of unlabelled images): read as a class tree they would train
    a classifier of the folder names, train vs test."""
    flat = [d.name for d in dirs if not _subdirs(d)]
    if len(flat) == len(dirs):  # classes that happen to be called train and test: a tree
        return None
    labelled = [d for d in dirs if d.name not in flat]
    return (
        f"its folders {', '.join(d.name for d in dirs)} are named like a split's subsets, but "
        + (f"{', '.join(flat)} holds no class folders (unlabelled images?)" if flat else
           "they are no pre-split tree: a train folder and a val or test folder, with the same "
           "class folders")
        + f". Point data.source at a folder of class folders (e.g. {labelled[0]}), "
        "or give every subset folder the same class folders"
    )  # fmt: skip


def _unwrap(path: Path) -> Path:
    """flower_photos.tgz holds flower_photos/<class>/...: step into a lone wrapper folder."""
    while True:
        dirs = _subdirs(path)
        if len(dirs) == 1 and _subdirs(dirs[0]):
            path = dirs[0]
        else:
            return path


def _tree(source: str, path: Path, origin: str) -> ResolvedSource:
    root = _unwrap(path)
    if not _subdirs(root):
        files = sum(1 for p in root.iterdir() if p.is_file())
        raise SourceUnavailable(
            f"data.source {source!r}: {origin} holds no class folders ({files} files, no "
            f"sub-folders). Expected {_EXPECTED}."
        )
    dirs = _subset_named_folders(root)
    if dirs is not None and _presplit_roles(dirs) is None and (problem := _unlabelled_split(dirs)):
        raise SourceUnavailable(f"data.source {source!r}: {origin}: {problem}.")
    if root != path:
        origin += f" (inside {root.relative_to(path).as_posix()}/)"
    return ResolvedSource(source, TREE, root, origin)


# -- Dataturks exports ----------------------------------------------------------------------
def _first_line(path: Path) -> str | UnicodeDecodeError | None:
    """The first non-empty line of the file's first 4 MiB, decoded as read_export decodes it
    (its UnicodeDecodeError when it is not text), or None when there is none."""
    try:
        with open(path, "rb") as f:
            head = f.read(1 << 22)
    except OSError:
        return None
    for line in export_lines(head):
        if not isinstance(line, str):
            return line
        if line.strip():
            return line.strip()
    return None


def _is_export_line(line: str | UnicodeDecodeError | None) -> bool:
    """A Dataturks export is JSON Lines whose first non-empty line (`_first_line`) is an
    object with a "content" key. A first line that is not UTF-8 but is such an object
    otherwise is a bad line of an export (read_export skips it), not a refusal."""
    if isinstance(line, UnicodeDecodeError):
        line = line.object.decode("utf-8", "replace").strip()
    if line is None or not line.startswith("{"):
        return False
    try:
        item = parse_json(line)
    except json.JSONDecodeError:
        return False
    return isinstance(item, dict) and "content" in item


# -- archives -------------------------------------------------------------------------------
def _extracted(archive: Path, limits: ArchiveLimits | None = None) -> Path:
    """Extract once per archive content into the user cache; reuse a complete extraction."""
    digest = sha256_file(archive)
    target = cache_dir("extracted") / digest
    marker = target / COMPLETE_MARKER
    if marker.is_file():
        return target
    if target.exists():  # ours, and incomplete (killed between rename and marker): redo
        shutil.rmtree(target)
    try:
        extract_archive(archive, target, limits)
    except (FileExistsError, OSError):
        if marker.is_file():  # a parallel run extracted it first
            return target
        raise
    marker.write_text(f"{digest}  {archive.name}\n", encoding="utf-8")
    return target


def _resolve_file(
    source: str, file: Path, origin: str, name: str, limits: ArchiveLimits | None = None
) -> ResolvedSource:
    if archive_format(file) is not None:
        try:
            root = _extracted(file, limits)
        except ArchiveTooLarge as e:
            raise SourceUnavailable(f"data.source {source!r}: {e}.") from None
        except ValueError as e:  # includes UnsafeArchiveError
            raise SourceUnavailable(f"data.source {source!r}: {e}. Expected {_EXPECTED}.") from e
        return _tree(source, root, f"{origin} (extracted)")
    line = _first_line(file)
    if _is_export_line(line):
        return ResolvedSource(source, DATATURKS, file, origin)
    if file.stat().st_size == 0:
        raise SourceUnavailable(
            f"data.source {source!r}: {origin} is an empty file (0 bytes). Expected {_EXPECTED}."
        )
    if name.lower().endswith(EXPORT_SUFFIXES) and isinstance(line, UnicodeDecodeError):
        raise SourceUnavailable(
            f"data.source {source!r}: {origin} is not a Dataturks image-classification export: "
            f"its first line is {not_utf8(line)}. Exports are UTF-8 (or UTF-16 with a "
            "byte-order mark): re-save it as UTF-8, or re-export the data set. "
            f"Expected {_EXPECTED}."
        )
    if name.lower().endswith(EXPORT_SUFFIXES) and isinstance(line, str):
        hint = " (a JSON array: export as JSON Lines, one item per line)" if line[:1] == "[" else ""
        raise SourceUnavailable(
            f"data.source {source!r}: {origin} is not a Dataturks image-classification export: "
            f'its first line {line[:80]!r} is not a JSON object with a "content" key{hint}. '
            f"Expected {_EXPECTED}."
        )
    raise SourceUnavailable(
        f"data.source {source!r}: {origin} is neither a folder, an archive nor a Dataturks "
        f"export. Expected {_EXPECTED}."
    )


def _resolve_local(
    source: str, path: Path, relative_to: Path | None, limits: ArchiveLimits | None = None
) -> ResolvedSource:
    if not path.exists():
        where = f" (relative to {relative_to})" if relative_to is not None else ""
        raise SourceUnavailable(
            f"data.source {source!r} points to {path}{where}, which does not exist. Expected "
            f"{_EXPECTED}. Fix data.source in params.yaml, or {_HOW}."
        )
    is_dir = path.is_dir()
    if not is_dir and not path.is_file():
        raise SourceUnavailable(
            f"data.source {source!r}: {path} is a FIFO, socket or device, not a file or a "
            f"folder (it is not read: a FIFO would wait forever). Expected {_EXPECTED}."
        )
    if not os.access(path, os.R_OK | (os.X_OK if is_dir else 0)):
        what = "folder cannot be listed" if is_dir else "file cannot be read"
        raise SourceUnavailable(
            f"data.source {source!r}: the {what} by this user ({_user()}): {path}. Fix its "
            "permissions, or point data.source at a readable copy."
        )
    if is_dir:
        return _tree(source, path, str(path))
    return _resolve_file(source, path, str(path), path.name, limits)


def _user() -> str:
    import pwd

    try:
        return pwd.getpwuid(os.geteuid()).pw_name
    except KeyError:
        return f"uid {os.geteuid()}"


# -- URLs -----------------------------------------------------------------------------------
def keras_datasets_dir() -> Path:
    """Keras' download cache: $KERAS_HOME/datasets, else ~/.keras/datasets."""
    home = os.environ.get("KERAS_HOME")
    return (Path(home).expanduser() if home else Path.home() / ".keras") / "datasets"


def _display(path: Path) -> str:
    try:
        return "~/" + path.relative_to(Path.home()).as_posix()
    except ValueError:
        return str(path)


def keras_cached_flowers(source: str, limits: ArchiveLimits | None = None) -> ResolvedSource | None:
    """flower_photos as keras.utils.get_file left it, in any of its layouts (Keras 2 and 3,
    untar= or extract=), or None."""
    datasets = keras_datasets_dir()
    for name in ("flower_photos", "flower_photos_extracted", "flower_photos.tgz"):
        folder = datasets / name
        if folder.is_dir():
            try:
                return _tree(source, folder, f"Keras cache {_display(folder)}")
            except SourceUnavailable:
                continue  # an empty or half-made folder: try the next layout
    for name in ("flower_photos.tgz", "flower_photos.tar.gz", "flower_photos_archive"):
        archive = datasets / name
        if archive.is_file() and archive_format(archive) is not None:
            try:
                root = _extracted(archive, limits)
                return _tree(source, root, f"Keras cache {_display(archive)}")
            except (ValueError, SourceUnavailable) as e:  # a truncated Keras download
                print(f"warning: ignoring {archive}: {e}", file=sys.stderr)
    return None


def offline_message(url: str, reason: str, network: bool = True) -> str:
    """The one paragraph shown when data.source cannot be downloaded."""
    keras = _display(keras_datasets_dir())
    why = (
        "this machine looks offline, or the host is unreachable"
        if network
        else "check the URL in data.source"
    )
    return (
        f"Could not download {url} ({reason}); {why}. The pipeline works just as well from a "
        f"local copy of the data: {_HOW}, where the path is {_EXPECTED}. A copy of "
        f"{FLOWERS_ARCHIVE} (or its extracted flower_photos/ folder) in {keras}/ is picked up "
        f"automatically."
    )


def _resolve_url(
    source: str, url: str, timeout_s: float, retries: int, limits: ArchiveLimits | None
) -> ResolvedSource:
    name = url_file_name(url)
    if name == FLOWERS_ARCHIVE:
        cached = keras_cached_flowers(source, limits)
        if cached is not None:
            return cached
    # An archive larger than what it may write cannot be extracted, and a Dataturks export is
    # far smaller: the extraction cap bounds the download too (a wrong URL that streams a
    # video, or never stops, is cut off there instead of filling the disk).
    max_bytes = (limits or ArchiveLimits()).max_bytes
    limit = ByteLimit(
        max_bytes,
        "ingest.max_extracted_bytes, what one source may write; if the file is genuine, "
        "raise it with dvc exp run -S ingest.max_extracted_bytes=N",
    )
    try:
        file = download_file(url, timeout_s=timeout_s, retries=retries, limit=limit)
    except DownloadError as e:
        raise SourceUnavailable(offline_message(url, e.reason, e.network)) from None
    try:
        return _resolve_file(source, file, url, name, limits)
    except SourceUnavailable as e:
        if archive_format(file) is not None:
            raise  # an archive, kept: what is wrong is inside it, not the download
        # Not what the URL should give (often a sharing or login page): not kept, so that the
        # next run fetches the URL again instead of reading this from the download cache.
        page = web_page(file)
        file.unlink(missing_ok=True)
        hint = (
            f" The URL answered with a web page{page}, not the file: a sharing link (Google "
            "Drive, Dropbox) or a login leads to one; give the file's direct download link."
            if page is not None
            else ""
        )
        raise SourceUnavailable(
            f"{e}{hint} The download was not kept: the next run fetches the URL again."
        ) from None


# -- public API -----------------------------------------------------------------------------
def resolve_source(
    source: str,
    *,
    base_dir: Path | None = None,
    timeout_s: float = 60,
    retries: int = 2,
    limits: ArchiveLimits | None = None,
) -> ResolvedSource:
    """Make data.source available locally and say what it is; raises SourceUnavailable.
    An archive is extracted within `limits` (default `ArchiveLimits()`)."""
    text = str(source).strip() if source is not None else ""
    if not text:
        raise SourceUnavailable(
            f"data.source is empty. Set it in params.yaml to {_EXPECTED}, or {_HOW}."
        )
    parts = urllib.parse.urlsplit(text)
    scheme = parts.scheme.lower()
    if scheme in ("http", "https"):
        return _resolve_url(text, text, timeout_s, retries, limits)
    if scheme == "file":
        return _resolve_local(text, Path(urllib.request.url2pathname(parts.path)), None, limits)
    if "://" in text:  # ftp://, s3://...: else read as a relative path that does not exist
        raise SourceUnavailable(
            f"data.source {text!r}: a {scheme}:// URL, which the source stage cannot fetch; "
            "expected an http(s):// or file:// URL, or a path. Download it first and point "
            "data.source at the local copy."
        )
    path = Path(text).expanduser()
    if path.is_absolute():
        return _resolve_local(text, path, None, limits)
    # Relative to the ORIGINAL repo root, so `dvc exp run --temp/--queue` (which run in a copy
    # under .dvc/tmp/exps) read the same folder as `dvc repro`.
    base = Path(base_dir) if base_dir is not None else repo_root()
    return _resolve_local(text, base / path, base, limits)


# Why walk_source did not yield a file as data (ingest reports these; they are never read).
IGNORED = "ignored"  # hidden file or OS litter (`ignored_name`)
LINK_OUTSIDE = "link_outside"  # a symbolic link whose target is outside the source tree
BROKEN_LINK = "broken_link"  # a symbolic link to nothing
SPECIAL_FILE = "special_file"  # a FIFO, socket or device: reading one can block forever
UNREADABLE = "unreadable"  # an entry this user cannot stat (its folder lacks execute permission)
UNREADABLE_FOLDER = "unreadable_folder"  # a folder this user cannot list or enter


def link_outside(path: Path, within: Path) -> bool:
    """True when `path` is a symbolic link whose existing target (all links resolved) is not
    under `within`, which must be resolved already. Only links are read, never the target; a
    broken link is not "outside" (walk_source reports it as BROKEN_LINK)."""
    if not path.is_symlink():
        return False
    target = Path(os.path.realpath(path))
    return os.path.lexists(target) and target != within and within not in target.parents


def walk_source(root: Path, within: Path | None = None) -> Iterator[tuple[Path, str | None]]:
    """Every file under `root` in sorted order as (path, None), and what is not data as
    (path, reason): hidden or system files and folders (IGNORED, not entered), FIFOs, sockets
    and devices (SPECIAL_FILE, never opened), folders this user cannot list
    (UNREADABLE_FOLDER) and entries it cannot stat (UNREADABLE), broken links (BROKEN_LINK),
    and, when `within` is given, links whose target leaves `within` (LINK_OUTSIDE: neither
    opened nor entered).

    Symlinked folders inside `within` are followed; loops are cut.
    """
    inside = Path(os.path.realpath(within)) if within is not None else None
    seen: set[tuple[int, int]] = set()
    # os.walk passes a folder it cannot list to onerror and goes on without it: kept here and
    # yielded, so that nothing in the tree is left out without a word.
    unlisted: list[OSError] = []
    for dirpath, dirnames, filenames in os.walk(root, onerror=unlisted.append, followlinks=True):
        yield from _unlisted(unlisted)
        st = os.stat(dirpath)
        if (st.st_dev, st.st_ino) in seen:
            dirnames[:] = []
            continue
        seen.add((st.st_dev, st.st_ino))
        base = Path(dirpath)
        kept_dirs = []
        for name in sorted(dirnames):
            reason = _reason(base / name, inside, folder=True)
            if reason is None:
                kept_dirs.append(name)
            else:
                yield base / name, reason
        dirnames[:] = kept_dirs
        for name in sorted(filenames):
            yield base / name, _reason(base / name, inside, folder=False)
    yield from _unlisted(unlisted)


def _reason(path: Path, inside: Path | None, *, folder: bool) -> str | None:
    """None for a folder walk_source enters or a data file, else why not (see walk_source)."""
    if ignored_name(path.name):
        return IGNORED
    try:
        if inside is not None and link_outside(path, inside):
            return LINK_OUTSIDE
        if folder or path.is_file():
            return None
        if path.exists():
            return SPECIAL_FILE
        if path.is_symlink():
            return BROKEN_LINK
    except OSError:  # stat refused (pathlib lets EACCES through): the folder cannot be entered
        return UNREADABLE_FOLDER if folder else UNREADABLE
    return UNREADABLE  # listed a moment ago, gone now


def _unlisted(errors: list[OSError]) -> Iterator[tuple[Path, str]]:
    while errors:
        yield Path(errors.pop(0).filename), UNREADABLE_FOLDER


def _tree_entries(root: Path) -> list[tuple[str, Path, str | None]]:
    """(relative POSIX path, path, None) for every data file under root, and (..., reason)
    for every entry this user cannot read, sorted by path."""
    # NFC: macOS spells accented names decomposed; the same data must hash the same.
    return sorted(
        (unicodedata.normalize("NFC", path.relative_to(root).as_posix()), path, reason)
        for path, reason in walk_source(root, root)
        if reason in (None, UNREADABLE, UNREADABLE_FOLDER)
    )


def _digest(path: Path) -> str | None:
    try:
        return sha256_file(path)
    except OSError:  # listed but not readable by this user: ingest reports it
        return None


def fingerprint_source(resolved: ResolvedSource) -> dict:
    """{"sha256", "files", "bytes"} of the content only: the same data gives the same
    fingerprint wherever it lives (a folder, its archive, Keras' cache, another machine)."""
    return FINGERPRINTS[resolved.kind](resolved.path)


class _ContentHash:
    """A fingerprint's running hash: one line per file, `name\0size\0sha256`, or
    `name\0<why it was not read>` for one without a digest (so that reading it later changes
    the data); the files read and their bytes counted."""

    def __init__(self, first_line: str = "") -> None:
        self._sha = hashlib.sha256(first_line.encode())
        self.files = self.bytes = self.not_read = 0

    def add(self, name: str, path: Path, digest: str | None, why_not: str) -> None:
        if digest is None:
            self.not_read += 1
            line = f"{name}\0{why_not}\n"
        else:
            size = path.stat().st_size
            self.files += 1
            self.bytes += size
            line = f"{name}\0{size}\0{digest}\n"
        # surrogateescape: a name that is not UTF-8 hashes as its own bytes.
        self._sha.update(line.encode("utf-8", "surrogateescape"))

    def hexdigest(self) -> str:
        return self._sha.hexdigest()


def _fingerprint_export(path: Path) -> dict:
    """The export's bytes and the content of every local file it names (a path or file://
    URL), or "missing": an image added, replaced or removed beside the export is a change
    of data, as in a tree. Its URLs are in the export's bytes; what they serve is ingest's
    to fetch (downloads are cached by URL)."""
    export_sha = sha256_file(path)
    content = _ContentHash(f"{export_sha}\n")
    try:
        items = read_export(path, on_bad_line="skip")
    except UserError:
        items = []  # not an export ingest can read: it says why, with the file's hash above
    for item in items:
        if item.problem is None and not is_url(item.content):
            local = local_path(item.content, path.parent)
            content.add(item.content, local, _digest(local) if local.is_file() else None, "missing")
    local_items = content.files + content.not_read
    return {
        # An export of URLs only is its own bytes, as it always was.
        "sha256": content.hexdigest() if local_items else export_sha,
        "files": 1 + content.files,
        "bytes": path.stat().st_size + content.bytes,
    }


def _fingerprint_tree(root: Path) -> dict:
    """Files and folders this user cannot read are counted in "unreadable" (only when there
    are any) and hashed by name: ingest reports each, and making one readable changes the
    data."""
    entries = _tree_entries(root)
    # hashlib releases the GIL on large buffers: a few threads overlap disk reads and hashing.
    with ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1)) as pool:
        digests = list(pool.map(lambda e: _digest(e[1]) if e[2] is None else None, entries))
    content = _ContentHash()
    for (rel, path, reason), digest in zip(entries, digests, strict=True):
        content.add(rel, path, digest, reason or UNREADABLE)
    fingerprint = {"sha256": content.hexdigest(), "files": content.files, "bytes": content.bytes}
    if content.not_read:
        fingerprint["unreadable"] = content.not_read
    return fingerprint


# Every source kind, with how its content is fingerprinted. A new kind is resolved to in
# resolve_source and read by its entry in imgclf/ingest/collect.py: COLLECTORS
# (tests/test_sources.py holds the two registries to the same kinds).
FINGERPRINTS: dict[str, Callable[[Path], dict]] = {
    TREE: _fingerprint_tree,
    DATATURKS: _fingerprint_export,
}
