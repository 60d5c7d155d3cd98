"""The ingest stage's work for a resolved source: collect, build, write, report."""

from __future__ import annotations

from collections.abc import Callable
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
    _refuse_overlap(Path(source.path), images_dir)
    collected = collect(source, options)
    for cand in collected.candidates:  # an export's files may lie anywhere
        _refuse_overlap(cand.path, images_dir)
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
