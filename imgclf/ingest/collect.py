"""Collect: the candidates of a class tree or a Dataturks export (downloading its URLs), and a
skip row for every item that cannot be one."""

from __future__ import annotations

import dataclasses
import os
import urllib.parse
from collections.abc import Callable
from pathlib import Path

from imgclf import dataturks
from imgclf.downloads import ByteLimit, download_many
from imgclf.ingest.records import Candidate, Collected, IngestError, IngestOptions, Skip
from imgclf.labels import ClassNameCollision, class_dirs, normalize_label, readable
from imgclf.sources import (
    BROKEN_LINK,
    DATATURKS,
    IGNORED,
    LINK_OUTSIDE,
    SPECIAL_FILE,
    TREE,
    UNREADABLE,
    UNREADABLE_FOLDER,
    ResolvedSource,
    ignored_name,
    link_outside,
    presplit_folders,
    walk_source,
)


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
    on_bad_line=error, several labels with on_multiple_labels=error, labels that would share
    one class folder, named with the line where each is first used) is raised before anything
    is downloaded. With on_bad_line=skip a malformed line is a skip row whose origin is
    `<export file name>:<line>`.
    """
    items = dataturks.read_export(export, options.on_bad_line)
    if export_url is not None:
        items = [_relative_to(export_url, item) for item in items]
    out = Collected(items=len(items), bad_lines=[])
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
    # Checked here as well as in build: a clash makes the export unusable, so it is refused
    # before any download, and only here are the lines where each spelling is used known.
    first_line: dict[str, int] = {}
    for item, label in chosen:
        first_line.setdefault(label, item.line)
    try:
        class_dirs(out.labels, where={label: f"line {n}" for label, n in first_line.items()})
    except ClassNameCollision as e:
        raise IngestError(f"{export}: {e}") from None
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


def collect_from_tree(source: ResolvedSource, options: IngestOptions) -> Collected:
    return collect_tree(source.path, options.presplit)


def collect_from_export(source: ResolvedSource, options: IngestOptions) -> Collected:
    # An export that came from a URL: its relative paths are relative to that URL.
    url = source.origin if dataturks.is_url(source.origin) else None
    try:
        return collect_dataturks(source.path, options, export_url=url)
    except dataturks.DataturksError as e:
        raise IngestError(str(e)) from None


# How each source kind of imgclf/sources.py (FINGERPRINTS) is read into candidates.
COLLECTORS: dict[str, Callable[[ResolvedSource, IngestOptions], Collected]] = {
    TREE: collect_from_tree,
    DATATURKS: collect_from_export,
}
