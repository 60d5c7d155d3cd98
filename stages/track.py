"""Stage track: record the pipeline result in MLflow (runs, metrics, curves, artifacts, and the
end-to-end models of track.log_models in the registry). See imgclf/tracking/ for what goes where."""

from __future__ import annotations

from pathlib import Path

import imgclf.quiet_tf  # first: TensorFlow without its start-up notices
import imgclf.tracking.quiet  # noqa: F401  (before MLflow: without its INFO lines and bars)
from imgclf.config import load_params
from imgclf.fileio import write_json
from imgclf.stage import stage_main
from imgclf.tracking.pipeline_run import track_pipeline


@stage_main
def main() -> None:
    params = load_params()
    summary = track_pipeline(params)
    write_json(Path(params["paths"]["metrics"]) / "mlflow_run.json", summary)
    versions = ", ".join(
        f"{h['registered_model']} v{h['registered_version']}"
        for h in summary["heads"].values()
        if "registered_model" in h
    )
    print(
        f"track: run {summary['run_name']} ({summary['run_id']}) in {summary['tracking_uri']}"
        + (f"; registered {versions}" if versions else "")
    )
    # The link is relative to the UI's address; `make ui` serves it on 127.0.0.1:5000.
    print(f"track: TF vs Keras curves: http://127.0.0.1:5000/{summary['curves_links']['loss']}")


if __name__ == "__main__":
    main()
