"""MLflow without its INFO lines and artifact progress bars, for the track stage.

Every end-to-end model track logs made MLflow print a "Validating input example" line and two
progress bars over the few files it had just written, and opening the store printed its
database set-up: about 25 lines in a full run that buried track's own summary. MLflow reads
both settings when it is imported, so the track stage imports this module before anything
imports MLflow. A user's own MLFLOW_LOGGING_LEVEL or MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR wins.
"""

from __future__ import annotations

import os

os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
