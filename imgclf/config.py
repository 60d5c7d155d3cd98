"""Reading params.yaml and locating the user cache shared by every stage."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Any

import yaml

from imgclf.errors import MissingInput

PARAMS_FILE = Path("params.yaml")
# DVC puts the repository copy of a --temp/--queue experiment here.
_EXP_TMP_PARTS = (".dvc", "tmp", "exps")


def load_params(path: str | Path = PARAMS_FILE) -> dict[str, Any]:
    """Return params.yaml as a dict (DVC stages run from the repository root)."""
    path = Path(path)
    if not path.is_file():
        raise MissingInput(
            f"{path} not found: run stages from the repository root (dvc repro does)."
        )
    with path.open(encoding="utf-8") as f:
        return yaml.safe_load(f) or {}


def cache_dir(*parts: str) -> Path:
    """The user cache (downloads, extracted archives, bottlenecks), created on demand.

    It lives outside the repository so that `dvc exp run --temp/--queue`, which run in a
    copy of the repo, reuse it. Override with IMGCLF_CACHE_DIR.
    """
    root = os.environ.get("IMGCLF_CACHE_DIR")
    if root:
        base = Path(root)
    else:
        xdg = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
        base = Path(xdg) / "imgclf"
    path = base.joinpath(*parts)
    path.mkdir(parents=True, exist_ok=True)
    return path


def repo_root(start: str | Path | None = None) -> Path:
    """The root of the ORIGINAL repository, also from inside a `dvc exp run --temp` copy.

    Order: DVC_ROOT (set by DVC for every stage command; for --temp/--queue it is overridden to
    the original repo's root), then a path under `.dvc/tmp/exps/` (a stage command run by hand in
    an executor copy), then `git rev-parse --show-toplevel`, then `start` itself.
    """
    env_root = os.environ.get("DVC_ROOT")
    if env_root:
        return Path(env_root).resolve()
    here = Path(start or Path.cwd()).resolve()
    parts = here.parts
    for i in range(len(parts) - len(_EXP_TMP_PARTS)):
        if parts[i : i + len(_EXP_TMP_PARTS)] == _EXP_TMP_PARTS:
            return Path(*parts[:i])
    try:
        top = subprocess.run(
            ["git", "rev-parse", "--show-toplevel"],
            cwd=here,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        if top:
            return Path(top).resolve()
    except (OSError, subprocess.CalledProcessError):
        pass
    return here
