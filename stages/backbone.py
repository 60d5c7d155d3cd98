"""Stage `backbone`: fetch and convert Inception V3's weights into models/backbone/.

Writes `<paths.backbone>/inception_v3.weights.h5` + `backbone.json` and
`<paths.metrics>/backbone.json`. See imgclf/inception.py for the two kinds of weights.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

import imgclf.quiet_tf  # noqa: F401  (first: TensorFlow without its start-up notices)
from imgclf.config import load_params
from imgclf.fileio import write_metrics
from imgclf.inception import WEIGHTS_FILE, build_backbone, save_backbone
from imgclf.params import BackboneParams
from imgclf.stage import stage_main


def run_backbone(
    weights: str, wheel: str, backbone_dir: str | Path, metrics_path: str | Path
) -> dict[str, Any]:
    """Build the backbone for `weights`, save it to `backbone_dir`, write its metrics."""
    print(f"backbone: building Inception V3 ({weights})", file=sys.stderr)
    start = time.perf_counter()
    model, source = build_backbone(weights, wheel)
    build_seconds = time.perf_counter() - start
    info = save_backbone(model, backbone_dir, weights, source)
    metrics = {
        "weights": weights,
        "sha256": info["sha256"],
        "preprocessing": info["preprocessing"],
        "mixed10_pool": info["mixed10_pool"],
        "n_parameters": int(model.count_params()),
        "weights_bytes": (Path(backbone_dir) / WEIGHTS_FILE).stat().st_size,
        "build_seconds": round(build_seconds, 2),
        **{k: v for k, v in source.items() if k.endswith("sha256")},
    }
    write_metrics(metrics_path, metrics)  # the hashes and names: backbone.info.json
    print(
        f"backbone: wrote {backbone_dir}/{WEIGHTS_FILE} (sha256 {info['sha256'][:12]}...)",
        file=sys.stderr,
    )
    return metrics


@stage_main
def main() -> None:
    params = load_params()
    hp = BackboneParams.from_params(params)
    run_backbone(
        weights=hp.weights,
        wheel=hp.wheel,
        backbone_dir=Path(params["paths"]["backbone"]),
        metrics_path=Path(params["paths"]["metrics"]) / "backbone.json",
    )


if __name__ == "__main__":
    main()
