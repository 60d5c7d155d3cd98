"""The ingest stage's work for a resolved source: collect, build, write, report."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path

from imgclf.ingest.build import build_image_set
from imgclf.ingest.collect import COLLECTORS
from imgclf.ingest.outputs import failure_message, format_summary, write_outputs
from imgclf.ingest.records import IngestError, IngestOptions, IngestResult
from imgclf.sources import ResolvedSource


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
    collect = COLLECTORS[source.kind]  # ResolvedSource holds a kind of sources.FINGERPRINTS
    _refuse_overlap([source.path], images_dir)
    collected = collect(source, options)
    # An export's files may lie anywhere, the output folder included; a tree's lie in the
    # tree just checked (walk_source refuses links out of it).
    elsewhere = [c.path for c in collected.candidates if not c.path.is_relative_to(source.path)]
    _refuse_overlap(elsewhere, images_dir)
    result = build_image_set(collected, options, source=source.source, kind=source.kind)
    write_outputs(result, images_dir=images_dir, manifest=manifest, metrics_dir=metrics_dir)
    log(format_summary(result))
    if not result.usable:
        raise IngestError(failure_message(result, metrics_dir / "ingest_skipped.csv"))
    return result


def _refuse_overlap(paths: Iterable[Path], images_dir: Path) -> None:
    # The output folder is deleted and rebuilt: an input inside it (or containing it) would be
    # destroyed or ingested again.
    out = images_dir.resolve()
    for path in paths:
        src = path.resolve()
        if src == out or out in src.parents or src in out.parents:
            raise IngestError(
                f"the input {path} overlaps the output folder {images_dir} (paths.images), "
                "which ingest replaces: put the data somewhere else, or change paths.images."
            )
