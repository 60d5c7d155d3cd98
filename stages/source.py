"""DVC stage `source`: resolve data.source (download, cache, extract) and fingerprint it.

Writes paths.source_info = {"source", "kind", "fingerprint"}; no machine-specific paths,
so the file (and its hash in dvc.lock) is the same on every machine for the same data, and
ingest reruns exactly when the data changes. Cheap after the first run: it only hashes.
"""

from __future__ import annotations

import sys
from pathlib import Path

from imgclf.archives import ArchiveLimits
from imgclf.config import load_params
from imgclf.fileio import write_json
from imgclf.params import DataParams, IngestParams
from imgclf.registry import pipeline_models
from imgclf.sources import fingerprint_source, resolve_source
from imgclf.stage import stage_main


def write_source_info(
    source: str,
    out: Path,
    *,
    base_dir: Path | None = None,
    timeout_s: float = 60,
    retries: int = 2,
    limits: ArchiveLimits | None = None,
) -> dict:
    """Resolve and fingerprint `source`, write the stage output, and return what was written.
    `timeout_s`, `retries` and `limits` are resolve_source's (params.yaml `ingest:`)."""
    resolved = resolve_source(
        source, base_dir=base_dir, timeout_s=timeout_s, retries=retries, limits=limits
    )
    fingerprint = fingerprint_source(resolved)
    info = {"source": resolved.source, "kind": resolved.kind, "fingerprint": fingerprint}
    write_json(out, info)
    print(
        f"source: {resolved.kind} from {resolved.origin}: {fingerprint['files']} files, "
        f"{fingerprint['bytes'] / 1e6:.1f} MB, sha256 {fingerprint['sha256'][:12]}",
        file=sys.stderr,
    )
    if fingerprint.get("unreadable"):
        print(
            f"source: warning: {fingerprint['unreadable']} files or folders this user cannot "
            "read; ingest names each in its skip report",
            file=sys.stderr,
        )
    return info


@stage_main
def main() -> None:
    params = load_params()
    # The model lists, checked here because this stage runs first, every time: a fine-tune
    # whose head `models:` drops, or an unregistered name, would otherwise stop DVC itself at
    # that stage with a missing-file error.
    pipeline_models(params)
    # The archive a URL names is downloaded here, once; ingest then finds it in the cache.
    ingest = IngestParams.from_params(params)
    write_source_info(
        DataParams.from_params(params).source,
        Path(params["paths"]["source_info"]),
        timeout_s=ingest.download.timeout_s,
        retries=ingest.download.retries,
        limits=ArchiveLimits(ingest.max_extracted_bytes, ingest.max_expansion_ratio),
    )


if __name__ == "__main__":
    main()
