"""Reading params.yaml and locating the user cache shared by every stage."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml

PARAMS_FILE = Path("params.yaml")


def load_params(path: str | Path = PARAMS_FILE) -> dict[str, Any]:
    """Return params.yaml as a dict (DVC stages run from the repository root)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
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
