"""MLflow tracking of a pipeline result: one parent run per result, one child run per model,
and an end-to-end model in the registry per servable model.

- `store`: which MLflow store runs go to (the project's mlflow.db, or MLFLOW_TRACKING_URI's),
  checked before use.
- `provenance`: the tags that say where a result came from (git, dvc.lock, data, backbone).
- `contents`: a result's files (`ResultFiles`) and what of them a run holds: params, metrics,
  curves, reports, datasets.
- `registered`: the end-to-end models, their registered names, versions and @champion.
- `pipeline_run`: `track_pipeline`, the track stage's work, which puts those together.
- `servers`: what `make ui` and `make serve` start (`python -m imgclf.tracking.servers`).
- `quiet`: MLflow without its INFO lines and progress bars, imported first by the track stage.
"""
