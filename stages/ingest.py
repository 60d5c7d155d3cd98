"""Stage `ingest`: data.source -> data/images/<class>/<file> + data/manifest.csv + reports.

See imgclf/ingest/ for what is validated, de-duplicated and reported.
"""

from __future__ import annotations

from pathlib import Path

from imgclf.config import load_params
from imgclf.ingest.records import IngestOptions
from imgclf.ingest.run import run_ingest
from imgclf.params import DataParams
from imgclf.sources import resolve_source
from imgclf.stage import stage_main


@stage_main
def main() -> None:
    params = load_params()
    paths = params["paths"]
    options = IngestOptions.from_params(params)
    source = resolve_source(
        DataParams.from_params(params).source,
        timeout_s=options.download_timeout_s,
        retries=options.download_retries,
        limits=options.archive_limits,
    )
    run_ingest(
        source,
        options,
        images_dir=Path(paths["images"]),
        manifest=Path(paths["manifest"]),
        metrics_dir=Path(paths["metrics"]),
    )


if __name__ == "__main__":
    main()
