"""The ingest stage: a class tree or a Dataturks export -> a validated, canonical image set.

    collect (tree | Dataturks + downloads) -> validate (decode every distinct file once)
      -> de-duplicate -> name -> check usable -> write (images, manifest, reports)

Nothing is ever dropped silently: every item that does not end up in data/images is one row of
metrics/ingest_skipped.csv with a reason code:
  - from images.inspect_image: not_an_image, unsupported_format, corrupt, truncated,
    empty_file, too_large (decompression bomb), unreadable;
  - from the source: ignored (hidden files and OS litter), missing_file, download_failed,
    unlabelled, skipped (by the annotator), bad_item, bad_label, multiple_labels;
  - duplicate: same bytes twice in one class; the copy with the smallest name is kept;
  - cross_class_duplicate: same bytes under several classes; dropped from all of them unless
    ingest.cross_class_duplicates is "keep" (then kept once in each).

Output names are the original base names made safe (labels.safe_file_name); when different
files of one class would get the same name (ignoring case), each of them gets "_<sha256[:10]>"
before its extension, so the result does not depend on the order of the input.

`origin` (manifest and skip report) is where an item came from, as the user gave it: the
path relative to the class tree, or the Dataturks `content` (URL or path). No absolute paths,
so that the outputs are identical on every machine and in `dvc exp run --temp` copies.
"""

from __future__ import annotations

import os
import shutil
from collections import Counter, defaultdict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm import tqdm

from imgclf import dataturks
from imgclf.downloads import download_many
from imgclf.fileio import sha256_file, write_csv, write_metrics
from imgclf.images import DEFAULT_MAX_PIXELS, FORMAT_EXTENSIONS, BadImage, inspect_image
from imgclf.labels import ClassNameCollision, class_dirs, normalize_label, safe_file_name
from imgclf.sources import ResolvedSource, ignored_name, walk_tree

MANIFEST_FIELDS = ("class", "label", "file", "sha256", "width", "height", "format", "origin")
SKIPPED_FIELDS = ("origin", "reason", "detail")
CLASSES_FIELDS = ("class", "images")
MULTIPLE_LABEL_MODES = ("error", "first", "skip")
CROSS_CLASS_MODES = ("drop", "keep")


class IngestError(RuntimeError):
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

    def __post_init__(self) -> None:
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
    def from_params(cls, ingest: Mapping[str, Any]) -> IngestOptions:
        """From the `ingest:` block of params.yaml (missing keys take the defaults)."""
        download = ingest.get("download") or {}
        defaults = cls()
        return cls(
            on_multiple_labels=str(ingest.get("on_multiple_labels", defaults.on_multiple_labels)),
            cross_class_duplicates=str(
                ingest.get("cross_class_duplicates", defaults.cross_class_duplicates)
            ),
            min_images_per_class=int(
                ingest.get("min_images_per_class", defaults.min_images_per_class)
            ),
            max_image_pixels=int(ingest.get("max_image_pixels", defaults.max_image_pixels)),
            download_workers=int(download.get("workers", defaults.download_workers)),
            download_timeout_s=float(download.get("timeout_s", defaults.download_timeout_s)),
            download_retries=int(download.get("retries", defaults.download_retries)),
        )


@dataclass(frozen=True)
class Candidate:
    """An item with a label and a local file, not yet validated."""

    label: str  # normalised original label
    path: Path  # the file to read (in the source, or the download cache)
    origin: str
    name: str  # original base name
    line: int | None = None  # line of the Dataturks export, for reports


@dataclass(frozen=True)
class Skip:
    origin: str
    reason: str
    detail: str


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


@dataclass
class Collected:
    candidates: list[Candidate] = field(default_factory=list)
    skipped: list[Skip] = field(default_factory=list)
    labels: set[str] = field(default_factory=set)  # every class seen, even if all items fail
    items: int = 0
    downloads_requested: int = 0
    downloads_failed: int = 0
    multiple_labels: int = 0


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


def collect_tree(root: Path) -> Collected:
    """Every file under `root/<class>/` (recursively) is a candidate of that class.

    Files directly in `root` (LICENSE.txt...) are validated too and reported: as not_an_image,
    or, if they are images, as unlabelled. Hidden files and folders and OS litter (.git,
    .DS_Store, __MACOSX, Thumbs.db: `sources.ignored_name`, which the source fingerprint
    leaves out too) are not read: each is reported once, reason `ignored`. Symlinked folders
    are followed (loops are cut), as the source stage does.
    """
    out = Collected()
    for entry in sorted(os.scandir(root), key=lambda e: e.name):
        if ignored_name(entry.name):
            out.skipped.append(_ignored(Path(entry.path), root))
        elif entry.is_dir():
            label = normalize_label(entry.name)
            out.labels.add(label)
            for path in _walk_files(Path(entry.path), out.skipped, root):
                rel = path.relative_to(root).as_posix()
                out.candidates.append(Candidate(label, path, rel, path.name))
        elif entry.is_file():
            out.candidates.append(Candidate("", Path(entry.path), entry.name, entry.name))
    out.items = len(out.candidates) + len(out.skipped)
    return out


def _ignored(path: Path, root: Path) -> Skip:
    """The report row of a hidden or system file or folder (`sources.ignored_name`)."""
    rel = path.relative_to(root).as_posix()
    if path.is_dir():
        return Skip(rel + "/", "ignored", "hidden or system folder: not read")
    return Skip(rel, "ignored", "hidden or system file: not data")


def _walk_files(folder: Path, skipped: list[Skip], root: Path) -> list[Path]:
    files: list[Path] = []
    for path, ignored in walk_tree(folder):
        if ignored:
            skipped.append(_ignored(path, root))
        else:
            files.append(path)
    return sorted(files)


def collect_dataturks(export: Path, options: IngestOptions) -> Collected:
    """Items of a Dataturks export with their files (downloaded when they are URLs).

    Everything that makes the whole export unusable (malformed line, wrong task type,
    several labels with on_multiple_labels=error) is raised before anything is downloaded.
    """
    items = dataturks.read_export(export)
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
            if not path.is_file():
                out.skipped.append(Skip(item.content, "missing_file", f"{where}: no file {path}"))
                continue
        out.candidates.append(Candidate(label, path, item.content, name, item.line))
    return out


# --------------------------------------------------------------------------- build


def build_image_set(
    collected: Collected, options: IngestOptions, *, source: str = "", kind: str = ""
) -> IngestResult:
    """Validate, de-duplicate and name the candidates; pure apart from reading the files."""
    skipped = list(collected.skipped)
    try:
        folders = class_dirs(collected.labels)
    except ClassNameCollision as e:
        raise IngestError(str(e)) from None

    # Hash every file, decode each distinct content once.
    infos: dict[str, Any] = {}  # sha -> ImageInfo | BadImage
    hashed: list[tuple[Candidate, str]] = []
    for cand in tqdm(collected.candidates, desc="ingest: validate", unit="file", leave=False):
        try:
            sha = sha256_file(cand.path)
        except OSError as e:
            skipped.append(Skip(cand.origin, "unreadable", f"{type(e).__name__}: {e}"))
            continue
        if sha not in infos:
            try:
                infos[sha] = inspect_image(cand.path, options.max_image_pixels)
            except BadImage as e:
                infos[sha] = e
        hashed.append((cand, sha))

    by_class: dict[str, list[tuple[Candidate, str, Any]]] = defaultdict(list)
    for cand, sha in hashed:
        info = infos[sha]
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

    # Same bytes twice in one class: keep the copy with the smallest (safe name, origin).
    kept: dict[str, list[tuple[Candidate, str, Any, str]]] = {}
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

    # Same bytes under several classes.
    classes_of: dict[str, set[str]] = defaultdict(set)
    for folder, entries in kept.items():
        for _, sha, _, _ in entries:
            classes_of[sha].add(folder)
    cross = {sha: sorted(f) for sha, f in classes_of.items() if len(f) > 1}
    cross_files = 0
    if cross and options.cross_class_duplicates == "drop":
        for folder, entries in kept.items():
            remaining = []
            for entry in entries:
                cand, sha = entry[0], entry[1]
                if sha in cross:
                    cross_files += 1
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
                )
            )
    images.sort(key=lambda im: (im.class_dir, im.file))
    skipped.sort(key=lambda s: (s.origin, s.reason, s.detail))

    counts = Counter(im.class_dir for im in images)
    class_counts = {folder: counts.get(folder, 0) for folder in sorted(set(folders.values()))}
    labels = {folder: label for label, folder in folders.items()}
    problems = usability_problems(class_counts, options.min_images_per_class)
    stats = {
        "items": collected.items,
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
        "formats": dict(sorted(Counter(im.format for im in images).items())),
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


def usability_problems(class_counts: Mapping[str, int], min_per_class: int) -> list[str]:
    problems = []
    usable = [c for c, n in class_counts.items() if n > 0]
    if len(usable) < 2:
        problems.append(
            f"{len(usable)} class(es) with images ({', '.join(usable) or 'none'}): "
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
    write_csv(
        manifest,
        MANIFEST_FIELDS,
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
        collected = collect_tree(Path(source.path))
    elif source.kind == "dataturks":
        try:
            collected = collect_dataturks(Path(source.path), options)
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
    return "\n".join(lines)


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
