"""DVC stage commands (`python -m stages.<name>`, see dvc.yaml).

DVC runs `python` from PATH. A shell without the project's environment (the venv not
activated) gives some other interpreter, which would fail on its first third-party import with
a bare ModuleNotFoundError; stop first and say what to do instead.
"""

from __future__ import annotations

import sys
from importlib import metadata

try:
    metadata.distribution("tf-or-keras")
except metadata.PackageNotFoundError:
    sys.exit(
        f"stages: {sys.executable} runs this stage, but the project (tf-or-keras) is not "
        "installed for it: DVC ran the first `python` on PATH, not the project's. Run the "
        "command through make (`make exp SET=key=value`, `make run`, see the README), or "
        "activate the environment first (`source .venv/bin/activate`), then rerun it."
    )
