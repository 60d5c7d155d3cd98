"""DVC stage commands (`python -m stages.<name>`, see dvc.yaml).

DVC runs `python` from PATH. A shell without the project's environment (the venv not
activated) gives some other interpreter, which would fail on its first third-party import with
a bare ModuleNotFoundError; stop first and say what to do instead.
"""

from __future__ import annotations

import sys
from importlib import metadata
from pathlib import Path

_REPO = Path(__file__).resolve().parents[1]
# `python -m` puts the working directory, the repository, first on sys.path, and
# `pip install -e .` leaves tf_or_keras.egg-info there: searched, it would make any interpreter
# look as if it had the project installed.
_PATH = [entry for entry in sys.path if Path(entry or ".").resolve() != _REPO]
if not any(True for _ in metadata.distributions(name="tf-or-keras", path=_PATH)):
    sys.exit(
        f"stages: {sys.executable} runs this stage, but the project (tf-or-keras) is not "
        "installed for it: DVC ran the first `python` on PATH, not the project's. Run the "
        "command through make (`make exp SET=key=value`, `make run`, see the README), or "
        "activate the environment first (`source .venv/bin/activate`), then rerun it."
    )
