"""The ingest stage: a class tree or a Dataturks export -> a validated, canonical image set.

    collect (tree | Dataturks + downloads) -> validate (decode every distinct file once)
      -> de-duplicate -> name -> check usable -> write (images, manifest, reports)

Nothing is ever dropped silently: every item that does not end up in data/images is one row of
metrics/ingest_skipped.csv with a reason code:
  - from images.inspect_image: not_an_image, unsupported_format, corrupt, truncated,
    empty_file, too_large (decompression bomb), unreadable;
  - from the source: ignored (hidden files and OS litter), link_outside (a symbolic link out
    of the source tree: never opened), broken_link, special_file (a FIFO, socket or device:
    never opened), unreadable (a file or folder this user cannot read: one row per folder),
    linked_class (a class folder linking to another class folder),
    missing_file, download_failed, unlabelled, skipped (by the annotator), bad_item,
    bad_label, bad_line (a malformed export line), multiple_labels, local_file_refused (a
    file of this machine named by an export that was downloaded);
  - duplicate: same bytes twice in one class; the copy with the smallest name is kept;
  - cross_class_duplicate: same bytes under several classes; dropped from all of them unless
    ingest.cross_class_duplicates is "keep" (then kept once in each).

A class folder (or label) left without any usable image is not a class: it is listed in
`stats["empty_classes"]`, not failed on. Images found in sub-folders of a class folder are
counted per class (`stats["from_subfolders"]`). `items` = images + skipped, always.

Output names are the original base names made safe (labels.safe_file_name); when different
files of one class would get the same name (ignoring case), each of them gets "_<sha256[:10]>"
before its extension, so the result does not depend on the order of the input.

`origin` (manifest and skip report) is where an item came from, as the user gave it: the
path relative to the class tree, or the Dataturks `content` (URL or path). No absolute paths,
so that the outputs are identical on every machine and in `dvc exp run --temp` copies.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import urllib.parse
from collections import Counter, defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm import tqdm

from imgclf import dataturks
from imgclf.archives import ArchiveLimits
from imgclf.downloads import ByteLimit, download_many, web_page
from imgclf.errors import UserError
from imgclf.fileio import sha256_file, write_csv, write_metrics
from imgclf.images import DEFAULT_MAX_PIXELS, FORMAT_EXTENSIONS, BadImage, inspect_image
from imgclf.labels import (
    ClassNameCollision,
    class_dirs,
    normalize_label,
    readable,
    safe_file_name,
)
from imgclf.params import (
    BAD_LINE_MODES,
    CROSS_CLASS_MODES,
    MULTIPLE_LABEL_MODES,
    PRESPLIT_MODES,
    IngestParams,
)
from imgclf.sources import (
    BROKEN_LINK,
    IGNORED,
    LINK_OUTSIDE,
    SPECIAL_FILE,
    UNREADABLE,
    UNREADABLE_FOLDER,
    ResolvedSource,
    ignored_name,
    link_outside,
    presplit_folders,
    walk_source,
)

MANIFEST_FIELDS = ("class", "label", "file", "sha256", "width", "height", "format", "origin")
# Written only for a pre-split tree kept as given (ingest.presplit=keep): "train" or "test",
# the subset the user's folders put the image in. Other manifests keep MANIFEST_FIELDS only.
GIVEN_SUBSET_FIELD = "given_subset"
SKIPPED_FIELDS = ("origin", "reason", "detail")
CLASSES_FIELDS = ("class", "images")


class IngestError(UserError, RuntimeError):
    """The input cannot make a usable image set; the message says why and what to do."""


@dataclass(frozen=True)
class IngestOptions:
    on_multiple_labels: str = "error"
    cross_class_duplicates: str = "drop"
    min_images_per_class: int = 20
    max_image_pixels: int = DEFAULT_MAX_PIXELS
    download_workers: int = 8
    download_timeout_s: float = 20
    download_retries: int = 2
    presplit: str = "keep"
    on_bad_line: str = "skip"
    max_extracted_bytes: int = ArchiveLimits.max_bytes
    max_expansion_ratio: float = ArchiveLimits.max_ratio

    def __post_init__(self) -> None:
        for key, value, modes in (
            ("presplit", self.presplit, PRESPLIT_MODES),
            ("on_bad_line", self.on_bad_line, BAD_LINE_MODES),
        ):
            if value not in modes:
                raise IngestError(
                    f"ingest.{key} must be one of {', '.join(modes)}, not {value!r} "
                    f"(params.yaml, or dvc exp run -S ingest.{key}={modes[0]})"
                )
        if self.on_multiple_labels not in MULTIPLE_LABEL_MODES:
            raise IngestError(
                f"ingest.on_multiple_labels must be one of {', '.join(MULTIPLE_LABEL_MODES)}, "
                f"not {self.on_multiple_labels!r}"
            )
        if self.cross_class_duplicates not in CROSS_CLASS_MODES:
            raise IngestError(
                f"ingest.cross_class_duplicates must be one of {', '.join(CROSS_CLASS_MODES)}, "
                f"not {self.cross_class_duplicates!r}"
            )

    @classmethod
    def from_params(cls, params: Mapping[str, Any]) -> IngestOptions:
        """From params.yaml's `ingest:` block, parsed strictly (imgclf/params.py: IngestParams):
        a missing or misspelt key is an error, not a default."""
        p = IngestParams.from_params(params)
        return cls(
            on_multiple_labels=p.on_multiple_labels,
            cross_class_duplicates=p.cross_class_duplicates,
            min_images_per_class=p.min_images_per_class,
            max_image_pixels=p.max_image_pixels,
            download_workers=p.download.workers,
            download_timeout_s=p.download.timeout_s,
            download_retries=p.download.retries,
            presplit=p.presplit,
            on_bad_line=p.on_bad_line,
            max_extracted_bytes=p.max_extracted_bytes,
            max_expansion_ratio=p.max_expansion_ratio,
        )

    @property
    def archive_limits(self) -> ArchiveLimits:
        try:
            return ArchiveLimits(self.max_extracted_bytes, self.max_expansion_ratio)
        except ValueError as e:
            raise IngestError(str(e)) from None


@dataclass(frozen=True)
class Candidate:
    """An item with a label and a local file, not yet validated."""

    label: str  # normalised original label
    path: Path  # the file to read (in the source, or the download cache)
    origin: str
    name: str  # original base name
    line: int | None = None  # line of the Dataturks export, for reports
    subset: str = ""  # "train" | "test" given by a kept pre-split tree, else ""
    nested: bool = False  # found in a sub-folder of its class folder (flattened)


@dataclass(frozen=True)
class Skip:
    origin: str
    reason: str
    detail: str

    def __post_init__(self) -> None:
        # A name that is not UTF-8 reaches here raw, in a path or an error message (OSError,
        # Pillow): the report must still be writable.
        object.__setattr__(self, "origin", readable(self.origin))
        object.__setattr__(self, "detail", readable(self.detail))


@dataclass(frozen=True)
class IngestedImage:
    class_dir: str
    label: str
    file: str  # class_dir/name
    sha256: str
    width: int
    height: int
    format: str
    origin: str
    path: Path  # where the bytes are read from
    subset: str = ""
    nested: bool = False


@dataclass
class Collected:
    candidates: list[Candidate] = field(default_factory=list)
    skipped: list[Skip] = field(default_factory=list)
    labels: set[str] = field(default_factory=set)  # every class seen, even if all items fail
    items: int = 0
    downloads_requested: int = 0
    downloads_failed: int = 0
    multiple_labels: int = 0
    bad_lines: list[int] = field(default_factory=list)
    presplit: dict[str, Any] | None = None  # {"mode", "folders": {folder: subset}} if detected
    not_utf8: list[str] = field(default_factory=list)  # files whose path is not UTF-8 (readable)


@dataclass
class IngestResult:
    source: str
    kind: str
    images: list[IngestedImage]
    skipped: list[Skip]
    class_counts: dict[str, int]  # class_dir -> images (every class seen, zero included)
    labels: dict[str, str]  # class_dir -> label
    stats: dict[str, Any]
    problems: list[str]  # why the set is unusable; empty when usable

    @property
    def usable(self) -> bool:
        return not self.problems

    @property
    def classes_with_images(self) -> int:
        return sum(1 for n in self.class_counts.values() if n > 0)


# --------------------------------------------------------------------------- collect


def collect_tree(root: Path, presplit: str = "keep") -> Collected:
    """Every file under `root/<class>/` (recursively) is a candidate of that class.

    Files directly in `root` (LICENSE.txt...) are validated too and reported: as not_an_image,
    or, if they are images, as unlabelled. Hidden files and folders and OS litter (.git,
    .DS_Store, __MACOSX, Thumbs.db: `sources.ignored_name`, which the source fingerprint
    leaves out too) are not read: each is reported once, reason `ignored`.

    Symbolic links: one whose target is inside the source tree is followed (loops are cut);
    one whose target is outside it is reported as `link_outside` and neither opened nor
    entered; a broken one is `broken_link`. A class folder that is a link to another class
    folder is read once, as the class it links to (`linked_class`), not as a second class
    holding the same files, which would make every one of them a cross-class duplicate.

    A pre-split tree (`sources.presplit_folders`: <root>/train/<class>/*, <root>/val/... or
    test/...) takes its classes from the inner folders. With presplit="keep" the user's
    held-out folder is the test set: test/ (or testing/, eval/) when there is one, and then
    val/ is pooled into train (the heads carve their own validation slice out of train);
    otherwise val/. With presplit="pool" every folder is pooled and split as any tree.
    """
    out = Collected()
    inside = Path(os.path.realpath(root))
    roles = presplit_folders(root)
    if roles is None:
        _collect_level(root, root, inside, out, "")
    else:
        has_test = "test" in roles.values()
        folders = {}
        for name, role in roles.items():
            held_out = role == "test" or (role == "val" and not has_test)
            folders[name] = "" if presplit == "pool" else "test" if held_out else "train"
        out.presplit = {
            "mode": presplit,
            "folders": {name: folders[name] or "pooled" for name in sorted(folders)},
        }
        for entry in sorted(os.scandir(root), key=lambda e: e.name):
            path = Path(entry.path)
            if entry.name in folders and not link_outside(path, inside):
                _collect_level(path, root, inside, out, folders[entry.name])
            else:
                _collect_entry(path, root, inside, out, "", classes=False)
    out.items = len(out.candidates) + len(out.skipped)
    return out


def _collect_level(folder: Path, root: Path, inside: Path, out: Collected, subset: str) -> None:
    """The class folders (and stray files) directly in `folder`."""
    try:
        entries = sorted(os.scandir(folder), key=lambda e: e.name)
    except OSError:  # a subset folder of a pre-split tree that this user cannot list
        out.skipped.append(_unreadable(_readable_rel(folder, root, out), UNREADABLE_FOLDER))
        return
    for entry in entries:
        _collect_entry(Path(entry.path), root, inside, out, subset, classes=True)


def _collect_entry(
    path: Path, root: Path, inside: Path, out: Collected, subset: str, *, classes: bool
) -> None:
    rel = _readable_rel(path, root, out)
    try:
        path.lstat()
    except OSError:  # listed, but `root` cannot be entered by this user
        out.skipped.append(_unreadable(rel, UNREADABLE))
        return
    if ignored_name(path.name):
        out.skipped.append(_ignored(path, root))
    elif link_outside(path, inside):
        out.skipped.append(_link_skip(path, rel, LINK_OUTSIDE))
    elif path.is_dir() and classes:
        alias = _linked_class(path)
        if alias is not None:
            out.skipped.append(
                Skip(
                    rel + "/",
                    "linked_class",
                    f"a link to the class folder {alias}/: its images are read once, as {alias}",
                )
            )
            return
        label = normalize_label(path.name)
        out.labels.add(label)
        for file, reason in walk_source(path, inside):
            file_rel = _readable_rel(file, root, out)
            if reason == IGNORED:
                out.skipped.append(_ignored(file, root))
            elif reason == SPECIAL_FILE:
                out.skipped.append(_special(file_rel))
            elif reason in (UNREADABLE, UNREADABLE_FOLDER):
                out.skipped.append(_unreadable(file_rel, reason))
            elif reason is not None:
                out.skipped.append(_link_skip(file, file_rel, reason))
            else:
                nested = len(file.relative_to(path).parts) > 1
                out.candidates.append(
                    Candidate(label, file, file_rel, file.name, subset=subset, nested=nested)
                )
    elif path.is_file():
        out.candidates.append(Candidate("", path, rel, path.name))
    elif path.is_dir():  # a folder next to the subset folders of a pre-split tree
        out.skipped.append(
            Skip(rel + "/", "ignored", "not a subset folder of the pre-split tree: not read")
        )
    elif path.exists():
        out.skipped.append(_special(rel))
    elif path.is_symlink():
        out.skipped.append(_link_skip(path, rel, BROKEN_LINK))


def _special(rel: str, where: str = "") -> Skip:
    detail = "a FIFO, socket or device, not a regular file: not read"
    return Skip(rel, SPECIAL_FILE, f"{where}: {detail}" if where else detail)


def _unreadable(rel: str, reason: str) -> Skip:
    """The report row of an entry this user cannot read (`sources.walk_source`'s reasons);
    the skip reason is `unreadable`, as for a file whose bytes cannot be read."""
    if reason == UNREADABLE_FOLDER:
        what = "a folder this user cannot list or enter: none of its files were read"
        return Skip(rel + "/", "unreadable", f"{what}; fix its permissions and rerun")
    what = "listed, but this user cannot open it (its folder lacks execute permission)"
    return Skip(rel, "unreadable", f"{what}; fix the permissions and rerun")


def _readable_rel(path: Path, root: Path, out: Collected) -> str:
    """`path` relative to `root`, as text every report can hold (`labels.readable`); a file
    whose path needed escapes is counted."""
    raw = path.relative_to(root).as_posix()
    rel = readable(raw)
    if rel != raw and not path.is_dir():
        out.not_utf8.append(rel)
    return rel


def _linked_class(path: Path) -> str | None:
    """The sibling class folder that the link `path` points to, if it is one."""
    if not path.is_symlink():
        return None
    target = Path(os.path.realpath(path))
    for sibling in sorted(path.parent.iterdir()):
        if sibling != path and not sibling.is_symlink() and sibling.resolve() == target:
            return sibling.name
    return None


def _link_skip(path: Path, rel: str, reason: str) -> Skip:
    # os.readlink reads the link itself: the target is never opened.
    link = os.readlink(path)
    if reason == BROKEN_LINK:
        return Skip(rel, reason, f"a symbolic link to {link}, which does not exist")
    what = "a folder" if path.is_dir() else "a file"
    return Skip(
        rel + ("/" if path.is_dir() else ""),
        reason,
        f"a symbolic link to {what} outside the source tree ({link}): not read",
    )


def _ignored(path: Path, root: Path) -> Skip:
    """The report row of a hidden or system file or folder (`sources.ignored_name`)."""
    rel = path.relative_to(root).as_posix()
    if path.is_dir():
        return Skip(rel + "/", "ignored", "hidden or system folder: not read")
    return Skip(rel, "ignored", "hidden or system file: not data")


def collect_dataturks(
    export: Path, options: IngestOptions, *, export_url: str | None = None
) -> Collected:
    """Items of a Dataturks export with their files (downloaded when they are URLs).

    An export downloaded from `export_url` names its images by URL, or by a path relative to
    that URL (resolved as a browser resolves a link); it may not name a file of this machine
    (file:, or a path with any other scheme), which is skipped as `local_file_refused`.

    Everything that makes the whole export unusable (wrong task type, a malformed line with
    on_bad_line=error, several labels with on_multiple_labels=error) is raised before anything
    is downloaded. With on_bad_line=skip a malformed line is a skip row whose origin is
    `<export file name>:<line>`.
    """
    items = dataturks.read_export(export, options.on_bad_line)
    if export_url is not None:
        items = [_relative_to(export_url, item) for item in items]
    out = Collected(items=len(items))
    chosen: list[tuple[dataturks.DataturksItem, str]] = []
    multi = [item for item in items if len(item.labels) > 1]
    if multi and options.on_multiple_labels == "error":
        first = multi[0]
        raise IngestError(
            f"{export}:{first.line}: the item has {len(first.labels)} labels "
            f"({', '.join(map(repr, first.labels))}) and ingest.on_multiple_labels is 'error' "
            f"({len(multi)} item(s) have several labels; lines "
            f"{', '.join(str(i.line) for i in multi[:10])}{' ...' if len(multi) > 10 else ''})."
            " An image-classification set needs one label per image: fix the export, or set "
            "ingest.on_multiple_labels to 'first' (keep the first label) or 'skip' (leave "
            "these items out), e.g. dvc exp run -S ingest.on_multiple_labels=skip"
        )
    for item in items:
        where = f"line {item.line}"
        if item.problem == "bad_line":
            out.bad_lines.append(item.line)
            out.skipped.append(Skip(f"{export.name}:{item.line}", item.problem, item.detail))
            continue
        if item.problem:
            out.skipped.append(Skip(item.content, item.problem, f"{where}: {item.detail}"))
            continue
        if len(item.labels) > 1 and options.on_multiple_labels == "skip":
            out.skipped.append(
                Skip(item.content, "multiple_labels", f"{where}: {', '.join(item.labels)}")
            )
            continue
        # Only labels that some item is filed under are classes: "first" and "skip" must not
        # create empty classes from the labels they drop.
        out.labels.add(item.labels[0])
        chosen.append((item, item.labels[0]))
    out.multiple_labels = len(multi)
    urls = sorted({item.content for item, _ in chosen if dataturks.is_url(item.content)})
    results = {}
    if urls:
        results = download_many(
            urls,
            workers=options.download_workers,
            timeout_s=options.download_timeout_s,
            retries=options.download_retries,
            desc="ingest: download",
            limit=image_byte_limit(options.max_image_pixels),
        )
    out.downloads_requested = len(urls)
    out.downloads_failed = sum(1 for url in urls if results[url].path is None)
    for item, label in chosen:
        where = f"line {item.line}"
        name = dataturks.original_name(item.content)
        if dataturks.is_url(item.content):
            result = results[item.content]
            if result.path is None:
                out.skipped.append(
                    Skip(item.content, "download_failed", f"{where}: {result.error}")
                )
                continue
            path = Path(result.path)
        else:
            path = dataturks.local_path(item.content, export.parent)
            try:
                found = path.is_file()
            except OSError as e:  # pathlib lets EACCES through: a folder this user cannot enter
                detail = f"{where}: {type(e).__name__}: {e}"
                out.skipped.append(Skip(item.content, "unreadable", detail))
                continue
            if not found and path.is_dir():
                detail = f"{where}: {path} is a folder; an item names one image file"
                out.skipped.append(Skip(item.content, "missing_file", detail))
                continue
            if not found and path.exists():  # never opened: a FIFO would wait forever
                out.skipped.append(_special(item.content, where))
                continue
            if not found:
                out.skipped.append(Skip(item.content, "missing_file", f"{where}: no file {path}"))
                continue
        out.candidates.append(Candidate(label, path, item.content, name, item.line))
    return out


def _relative_to(export_url: str, item: dataturks.DataturksItem) -> dataturks.DataturksItem:
    """`item` of an export downloaded from `export_url`, its content made an absolute URL."""
    if item.problem:
        return item
    url = urllib.parse.urljoin(export_url, item.content)
    if dataturks.is_url(url):
        return dataclasses.replace(item, content=url)
    return dataclasses.replace(
        item,
        problem="local_file_refused",
        detail=f"an export downloaded from {export_url} names images by URL, or by a path "
        "relative to its own URL, never a file of this machine: not read",
    )


def image_byte_limit(max_image_pixels: int) -> ByteLimit:
    """The largest download that can still be an image within `max_image_pixels`: 8 bytes a
    pixel (16-bit RGBA, uncompressed) and 1 MiB of headers and metadata. Anything larger is
    no photo (a video, a server that never stops sending) and would only fill the disk."""
    return ByteLimit(
        8 * max_image_pixels + 2**20,
        f"8 bytes a pixel of ingest.max_image_pixels={max_image_pixels:,}",
    )


# --------------------------------------------------------------------------- build


# One candidate on its way through build_image_set: (candidate, sha256, ImageInfo, or BadImage
# until _into_classes sorts those out), then also its safe file name.
Checked = tuple[Candidate, str, Any]
Named = tuple[Candidate, str, Any, str]


def build_image_set(
    collected: Collected, options: IngestOptions, *, source: str = "", kind: str = ""
) -> IngestResult:
    """Validate, de-duplicate and name the candidates; pure apart from reading the files and
    deleting from the download cache the downloads that are no usable image. Every candidate
    left out is one `Skip` in the result, with its reason."""
    skipped = list(collected.skipped)
    try:
        folders = class_dirs(collected.labels)
    except ClassNameCollision as e:
        raise IngestError(str(e)) from None
    hashed = _hash_and_inspect(collected.candidates, options.max_image_pixels, skipped)
    hashed = _forget_bad_downloads(hashed)
    by_class = _into_classes(hashed, folders, skipped)
    kept, duplicates = _drop_duplicates(by_class, skipped)
    cross, cross_files = _cross_class_duplicates(kept, options.cross_class_duplicates, skipped)
    images, renamed = _name_images(kept)
    skipped.sort(key=lambda s: (s.origin, s.reason, s.detail))

    counts = Counter(im.class_dir for im in images)
    # A folder (or label) without a single usable image is not a class: reported, left out.
    every_class = sorted(set(folders.values()))
    empty = [folder for folder in every_class if not counts.get(folder)]
    class_counts = {folder: counts[folder] for folder in every_class if counts.get(folder)}
    labels = {folder: label for label, folder in folders.items()}
    problems = usability_problems(class_counts, options.min_images_per_class, empty)
    nested = Counter(im.class_dir for im in images if im.nested)
    stats = {
        "items": collected.items,
        "empty_classes": empty,
        "from_subfolders": {
            "images": sum(nested.values()),
            "per_class": dict(sorted(nested.items())),
        },
        "links_refused": sum(1 for s in skipped if s.reason == LINK_OUTSIDE),
        "downloads": {
            "requested": collected.downloads_requested,
            "failed": collected.downloads_failed,
        },
        "duplicates_dropped": duplicates,
        "cross_class_duplicates": {
            "mode": options.cross_class_duplicates,
            "contents": len(cross),
            "files_dropped": cross_files,
        },
        "multiple_labels": {
            "mode": options.on_multiple_labels,
            "items": collected.multiple_labels,
        },
        "renamed": renamed,
        "not_utf8": {"files": len(collected.not_utf8), "examples": collected.not_utf8[:3]},
        "formats": dict(sorted(Counter(im.format for im in images).items())),
    }
    if collected.bad_lines or kind == "dataturks":
        stats["bad_lines"] = {"mode": options.on_bad_line, "lines": collected.bad_lines}
    if collected.presplit is not None:
        given = Counter(im.subset for im in images if im.subset)
        stats["presplit"] = {
            **collected.presplit,
            "images": {subset: given.get(subset, 0) for subset in ("train", "test")},
        }
    return IngestResult(
        source=source,
        kind=kind,
        images=images,
        skipped=skipped,
        class_counts=class_counts,
        labels=labels,
        stats=stats,
        problems=problems,
    )


def _hash_and_inspect(
    candidates: list[Candidate], max_image_pixels: int, skipped: list[Skip]
) -> list[Checked]:
    """(candidate, sha256, ImageInfo or BadImage) of every readable file, each distinct
    content decoded once; an unreadable file is a Skip."""
    infos: dict[str, Any] = {}  # sha -> ImageInfo | BadImage
    hashed: list[Checked] = []
    for cand in tqdm(candidates, desc="ingest: validate", unit="file", leave=False):
        try:
            sha = sha256_file(cand.path)
        except OSError as e:
            skipped.append(Skip(cand.origin, "unreadable", f"{type(e).__name__}: {e}"))
            continue
        if sha not in infos:
            try:
                infos[sha] = inspect_image(cand.path, max_image_pixels)
            except BadImage as e:
                infos[sha] = e
        hashed.append((cand, sha, infos[sha]))
    return hashed


def _forget_bad_downloads(hashed: list[Checked]) -> list[Checked]:
    """A download that is no usable image (often a dead host's "not found" page, sent with
    200) is deleted from the download cache, so that the next run fetches the URL again
    instead of reading the same page. Too large an image is kept: it will not change."""
    forgotten: dict[Path, BadImage] = {}
    out: list[Checked] = []
    for cand, sha, info in hashed:
        downloaded = dataturks.is_url(cand.origin)  # its path is then in the download cache
        if downloaded and isinstance(info, BadImage) and info.reason != "too_large":
            if cand.path not in forgotten:
                page = web_page(cand.path)
                hint = f": the URL answered with a web page{page}" if page is not None else ""
                forgotten[cand.path] = BadImage(
                    info.reason,
                    f"{info.detail}{hint}. The download was not kept: the next run fetches "
                    "the URL again",
                )
            info = forgotten[cand.path]
        out.append((cand, sha, info))
    for path in forgotten:  # after the loop: the same URL twice is one cached file
        path.unlink(missing_ok=True)
    return out


def _into_classes(
    hashed: list[Checked], folders: dict[str, str], skipped: list[Skip]
) -> dict[str, list[Checked]]:
    """The valid, labelled candidates by class folder; a bad image, a candidate without a
    label, or a label without a safe folder name is a Skip."""
    by_class: dict[str, list[Checked]] = defaultdict(list)
    for cand, sha, info in hashed:
        if isinstance(info, BadImage):
            skipped.append(Skip(cand.origin, info.reason, _where(cand) + info.detail))
        elif not cand.label:
            skipped.append(Skip(cand.origin, "unlabelled", "an image outside any class folder"))
        elif cand.label not in folders:
            skipped.append(
                Skip(
                    cand.origin,
                    "bad_label",
                    f"{_where(cand)}no safe folder name for label {cand.label!r}",
                )
            )
        else:
            by_class[folders[cand.label]].append((cand, sha, info))
    return by_class


def _drop_duplicates(
    by_class: dict[str, list[Checked]], skipped: list[Skip]
) -> tuple[dict[str, list[Named]], int]:
    """Same bytes twice in one class: keep the copy with the smallest (safe name, origin).
    Returns each class's kept candidates with their safe names, and how many were dropped."""
    kept: dict[str, list[Named]] = {}
    duplicates = 0
    for folder, entries in by_class.items():
        named = sorted(
            (
                (cand, sha, info, safe_file_name(cand.name, FORMAT_EXTENSIONS[info.format]))
                for cand, sha, info in entries
            ),
            key=lambda e: (e[3], e[0].origin),
        )
        first_of: dict[str, str] = {}
        kept[folder] = []
        for cand, sha, info, name in named:
            if sha in first_of:
                duplicates += 1
                skipped.append(
                    Skip(
                        cand.origin,
                        "duplicate",
                        f"{_where(cand)}same bytes as {first_of[sha]}, kept once",
                    )
                )
                continue
            first_of[sha] = f"{_where(cand)}{cand.origin}"
            kept[folder].append((cand, sha, info, name))
    return kept, duplicates


def _cross_class_duplicates(
    kept: dict[str, list[Named]], mode: str, skipped: list[Skip]
) -> tuple[dict[str, list[str]], int]:
    """Same bytes under several classes: {sha256: its classes}, and with mode `drop` every
    copy is taken out of `kept` (in place) as a Skip. Returns those and the files dropped."""
    classes_of: dict[str, set[str]] = defaultdict(set)
    for folder, entries in kept.items():
        for _, sha, _, _ in entries:
            classes_of[sha].add(folder)
    cross = {sha: sorted(f) for sha, f in classes_of.items() if len(f) > 1}
    dropped = 0
    if not cross or mode != "drop":
        return cross, dropped
    for folder, entries in kept.items():
        remaining = []
        for entry in entries:
            cand, sha = entry[0], entry[1]
            if sha in cross:
                dropped += 1
                skipped.append(
                    Skip(
                        cand.origin,
                        "cross_class_duplicate",
                        f"{_where(cand)}the same bytes are filed under "
                        f"{', '.join(cross[sha])}: dropped from every class "
                        "(ingest.cross_class_duplicates=keep keeps them)",
                    )
                )
            else:
                remaining.append(entry)
        kept[folder] = remaining
    return cross, dropped


def _name_images(kept: dict[str, list[Named]]) -> tuple[list[IngestedImage], int]:
    """The kept candidates as images with unique file names in their class folder, sorted by
    (class, file); and how many names had to change to be unique."""
    images: list[IngestedImage] = []
    renamed = 0
    for folder, entries in kept.items():
        names = _unique_names([(name, sha) for _, sha, _, name in entries])
        for (cand, sha, info, name), final in zip(entries, names, strict=True):
            renamed += final != name
            images.append(
                IngestedImage(
                    class_dir=folder,
                    label=cand.label,
                    file=f"{folder}/{final}",
                    sha256=sha,
                    width=info.width,
                    height=info.height,
                    format=info.format,
                    origin=cand.origin,
                    path=cand.path,
                    subset=cand.subset,
                    nested=cand.nested,
                )
            )
    images.sort(key=lambda im: (im.class_dir, im.file))
    return images, renamed


def _where(cand: Candidate) -> str:
    return f"line {cand.line}: " if cand.line is not None else ""


def _unique_names(entries: list[tuple[str, str]]) -> list[str]:
    """Names unique ignoring case: every name shared by several files gets a content tag."""
    groups = Counter(name.casefold() for name, _ in entries)
    taken = {name.casefold() for name, _ in entries if groups[name.casefold()] == 1}
    result = []
    for name, sha in entries:
        if groups[name.casefold()] == 1:
            result.append(name)
            continue
        stem, dot, ext = name.rpartition(".")
        if not dot:
            stem, ext = name, ""
        for length in range(10, 65, 6):
            candidate = f"{stem}_{sha[:length]}{dot}{ext}"
            if candidate.casefold() not in taken:
                break
        taken.add(candidate.casefold())
        result.append(candidate)
    return result


def usability_problems(
    class_counts: Mapping[str, int], min_per_class: int, empty: Sequence[str] = ()
) -> list[str]:
    problems = []
    usable = [c for c, n in class_counts.items() if n > 0]
    if len(usable) < 2:
        without = f"; without any usable image: {', '.join(empty)}" if empty else ""
        problems.append(
            f"{len(usable)} class(es) with images ({', '.join(usable) or 'none'}{without}): "
            "a classifier needs at least 2"
        )
    small = {c: n for c, n in class_counts.items() if n < min_per_class}
    if small:
        listed = ", ".join(f"{c}: {n}" for c, n in sorted(small.items()))
        problems.append(
            f"{len(small)} class(es) with fewer than ingest.min_images_per_class="
            f"{min_per_class} images ({listed})"
        )
    return problems


# --------------------------------------------------------------------------- write


def write_outputs(
    result: IngestResult, *, images_dir: Path, manifest: Path, metrics_dir: Path
) -> None:
    """Write the reports and, when the set is usable, replace `images_dir` and `manifest`.

    The image folder is built next to its final place and swapped in, so an interrupted run
    leaves the old set or the new one. Bytes are copied, never re-encoded.
    """
    # The source, its kind and the modes go to ingest.info.json: metrics hold numbers only.
    write_metrics(metrics_dir / "ingest.json", ingest_metrics(result))
    write_csv(
        metrics_dir / "ingest_classes.csv",
        CLASSES_FIELDS,
        ({"class": c, "images": n} for c, n in result.class_counts.items()),
    )
    write_csv(
        metrics_dir / "ingest_skipped.csv",
        SKIPPED_FIELDS,
        ({"origin": s.origin, "reason": s.reason, "detail": s.detail} for s in result.skipped),
    )
    if not result.usable:
        return
    staging = images_dir.parent / f".{images_dir.name}.tmp"
    _remove(staging)
    for im in tqdm(result.images, desc="ingest: copy", unit="file", leave=False):
        target = staging / im.file
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(im.path, target)
    staging.mkdir(parents=True, exist_ok=True)
    _remove(images_dir)
    staging.rename(images_dir)
    given = any(im.subset for im in result.images)
    write_csv(
        manifest,
        (*MANIFEST_FIELDS, GIVEN_SUBSET_FIELD) if given else MANIFEST_FIELDS,
        (
            {
                "class": im.class_dir,
                "label": im.label,
                "file": im.file,
                "sha256": im.sha256,
                "width": im.width,
                "height": im.height,
                "format": im.format,
                "origin": im.origin,
                **({GIVEN_SUBSET_FIELD: im.subset} if given else {}),
            }
            for im in result.images
        ),
    )


def _remove(path: Path) -> None:
    if path.is_symlink() or path.is_file():
        path.unlink()
    elif path.exists():
        shutil.rmtree(path)


def ingest_metrics(result: IngestResult) -> dict[str, Any]:
    return {
        "source": result.source,
        "kind": result.kind,
        "usable": result.usable,
        "images": len(result.images),
        "classes": result.classes_with_images,
        "per_class": dict(result.class_counts),
        "skipped": dict(sorted(Counter(s.reason for s in result.skipped).items())),
        "skipped_total": len(result.skipped),
        **result.stats,
    }


# --------------------------------------------------------------------------- run


def run_ingest(
    source: ResolvedSource,
    options: IngestOptions,
    *,
    images_dir: str | Path,
    manifest: str | Path,
    metrics_dir: str | Path,
    log: Callable[[str], None] = print,
) -> IngestResult:
    """The whole stage for a resolved source; raises `IngestError` when the result is
    unusable (after writing the reports, which list every skipped item)."""
    images_dir, manifest, metrics_dir = Path(images_dir), Path(manifest), Path(metrics_dir)
    if source.kind == "tree":
        _refuse_overlap(Path(source.path), images_dir)
        collected = collect_tree(Path(source.path), options.presplit)
    elif source.kind == "dataturks":
        try:
            # An export that came from a URL: its relative paths are relative to that URL.
            url = source.origin if dataturks.is_url(source.origin) else None
            collected = collect_dataturks(Path(source.path), options, export_url=url)
        except dataturks.DataturksError as e:
            raise IngestError(str(e)) from None
        for cand in collected.candidates:
            _refuse_overlap(cand.path, images_dir)
    else:
        raise IngestError(f"unknown source kind {source.kind!r} for {source.source}")
    result = build_image_set(collected, options, source=source.source, kind=source.kind)
    write_outputs(result, images_dir=images_dir, manifest=manifest, metrics_dir=metrics_dir)
    log(format_summary(result))
    if not result.usable:
        raise IngestError(failure_message(result, metrics_dir / "ingest_skipped.csv"))
    return result


def _refuse_overlap(path: Path, images_dir: Path) -> None:
    # The output folder is deleted and rebuilt: an input inside it (or containing it) would be
    # destroyed or ingested again.
    src, out = path.resolve(), images_dir.resolve()
    if src == out or out in src.parents or src in out.parents:
        raise IngestError(
            f"the input {path} overlaps the output folder {images_dir} (paths.images), which "
            "ingest replaces: put the data somewhere else, or change paths.images."
        )


def format_summary(result: IngestResult) -> str:
    """Counts per class and skipped items by reason, for the end of the stage's output."""
    width = max([len(c) for c in result.class_counts] + [len("class")])
    lines = [
        f"ingest: {len(result.images)} images in "
        f"{result.classes_with_images} classes from "
        f"{result.source} ({result.kind}); {result.stats['items']} items read, "
        f"{len(result.skipped)} skipped",
        f"  {'class'.ljust(width)}  images",
    ]
    lines += [f"  {c.ljust(width)}  {n:6d}" for c, n in result.class_counts.items()]
    reasons = Counter(s.reason for s in result.skipped)
    if reasons:
        rwidth = max(len(r) for r in reasons)
        lines.append("  skipped, by reason:")
        lines += [f"    {r.ljust(rwidth)}  {n:6d}" for r, n in sorted(reasons.items())]
    downloads = result.stats["downloads"]
    if downloads["requested"]:
        lines.append(f"  downloads: {downloads['requested']} URLs, {downloads['failed']} failed")
    lines += _notes(result)
    return "\n".join(lines)


def _notes(result: IngestResult) -> list[str]:
    """What changed the shape of the input: said at the end of every summary."""
    stats, lines = result.stats, []
    presplit = stats.get("presplit")
    if presplit:
        folders = ", ".join(f"{f}/ -> {s}" for f, s in presplit["folders"].items())
        if presplit["mode"] == "keep":
            images = presplit["images"]
            lines.append(
                f"  pre-split tree ({folders}): classes from the inner folders; your split is "
                f"kept ({images['train']} train, {images['test']} test; "
                "ingest.presplit=pool re-splits)"
            )
        else:
            lines.append(
                f"  pre-split tree ({folders}): classes from the inner folders, pooled and "
                "re-split (ingest.presplit=pool)"
            )
    nested = stats["from_subfolders"]
    if nested["images"]:
        listed = ", ".join(f"{c} {n}" for c, n in nested["per_class"].items())
        lines.append(
            f"  from sub-folders of class folders (flattened into their class): "
            f"{nested['images']} images ({listed})"
        )
    if stats["empty_classes"]:
        lines.append(
            f"  folders without any usable image, not classes: {', '.join(stats['empty_classes'])}"
        )
    if stats["links_refused"]:
        lines.append(
            f"  symbolic links to outside the source tree, not read: {stats['links_refused']}"
        )
    not_utf8 = stats["not_utf8"]
    if not_utf8["files"]:
        lines.append(
            f"  file paths that are not UTF-8, read with each such byte as \\xNN: "
            f"{not_utf8['files']} (e.g. {', '.join(not_utf8['examples'])}); rename them to "
            "choose how their classes and files are named"
        )
    bad = stats.get("bad_lines")
    if bad and bad["lines"]:
        shown = ", ".join(map(str, bad["lines"][:20])) + (" ..." if len(bad["lines"]) > 20 else "")
        lines.append(
            f"  malformed export lines skipped: {len(bad['lines'])} (line {shown}; "
            "ingest.on_bad_line=error refuses the export)"
        )
    return lines


def failure_message(result: IngestResult, skipped_csv: Path, examples: int = 5) -> str:
    reasons = Counter(s.reason for s in result.skipped)
    lines = ["the ingested image set is unusable:"]
    lines += [f"  - {p}" for p in result.problems]
    lines.append(
        f"{len(result.images)} usable images; {len(result.skipped)} of "
        f"{result.stats['items']} items skipped: "
        + (", ".join(f"{r} {n}" for r, n in reasons.most_common()) or "none")
    )
    failing = [s for s in result.skipped if s.reason != "duplicate"]
    if failing:
        lines.append("first failures:")
        lines += [f"  {s.origin}: {s.reason}: {s.detail}" for s in failing[:examples]]
    lines.append(f"every skipped item is listed in {skipped_csv}.")
    if reasons.get("download_failed"):
        lines.append(
            "Downloads failed: check the network and the URLs, raise ingest.download.timeout_s "
            "or ingest.download.retries, or point data.source at a local copy."
        )
    lines.append(
        "Fix or add the data, remove the classes that are too small, or lower "
        "ingest.min_images_per_class (dvc exp run -S ingest.min_images_per_class=N)."
    )
    return "\n".join(lines)
