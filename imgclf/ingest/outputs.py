"""Write: the image folder, the manifest and the reports (metrics, classes, skipped items),
and the summary and failure message the stage prints."""

from __future__ import annotations

import shutil
from collections import Counter
from pathlib import Path
from typing import Any

from tqdm import tqdm

from imgclf.errors import first_few
from imgclf.fileio import write_csv, write_metrics
from imgclf.ingest.records import IngestResult
from imgclf.sources import LINK_OUTSIDE

MANIFEST_FIELDS = ("class", "label", "file", "sha256", "width", "height", "format", "origin")
# Written only for a pre-split tree kept as given (ingest.presplit=keep): "train" or "test",
# the subset the user's folders put the image in. Other manifests keep MANIFEST_FIELDS only.
GIVEN_SUBSET_FIELD = "given_subset"
SKIPPED_FIELDS = ("origin", "reason", "detail")
CLASSES_FIELDS = ("class", "images")


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
        links = [s.origin for s in result.skipped if s.reason == LINK_OUTSIDE]
        # A linked class folder (origin "<name>/") leaves out a whole class: named first.
        links.sort(key=lambda origin: not origin.endswith("/"))
        lines.append(
            f"  symbolic links to outside the source tree, not read: {stats['links_refused']} "
            f"({first_few(links, 3)})"
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
        shown = first_few([str(line) for line in bad["lines"]], 20)
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
