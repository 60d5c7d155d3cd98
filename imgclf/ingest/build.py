"""Build: validate every candidate (each distinct file decoded once), de-duplicate, name, and
check that the result is a usable image set."""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from tqdm import tqdm

from imgclf import dataturks
from imgclf.downloads import web_page
from imgclf.fileio import sha256_file
from imgclf.images import FORMAT_EXTENSIONS, BadImage, inspect_image
from imgclf.ingest.records import (
    Candidate,
    Collected,
    IngestedImage,
    IngestError,
    IngestOptions,
    IngestResult,
    Skip,
)
from imgclf.labels import ClassNameCollision, class_dirs, safe_file_name
from imgclf.sources import LINK_OUTSIDE

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
    if collected.bad_lines is not None:
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
