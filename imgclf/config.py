"""Reading params.yaml and locating the user cache shared by every stage."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Any

import yaml

from imgclf.errors import MissingInput, ParamsError, UserError

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
    try:
        # Bytes, so that PyYAML reads the encoding (UTF-8, or UTF-16 with a BOM) and reports
        # bytes that are neither as a YAMLError, with the rest.
        params = yaml.safe_load(path.read_bytes())
    except yaml.YAMLError as e:
        raise UserError(f"{path}: not valid YAML ({_yaml_problem(e)}). {_FIX_PARAMS}") from None
    if params is None:
        return Params()
    if not isinstance(params, dict):
        raise UserError(
            f"{path}: expected a mapping of sections (data:, split:, train_tf: ...), found a "
            f"{type(params).__name__}. {_FIX_PARAMS}"
        )
    return Params(params)


class MissingSection(ParamsError, KeyError):
    """A top-level section that params.yaml lacks; a KeyError too, for `except KeyError`."""


class Params(dict):
    """params.yaml's sections; one that is missing is a user error naming it, not a KeyError
    traceback from wherever the stage first read it."""

    def __missing__(self, key: str) -> Any:
        raise MissingSection(
            str(key),
            expected="a section of params.yaml",
            found="none",
            todo=f"Put it back (the repository's params.yaml has it); {_FIX_PARAMS}",
        )


# A Params dumps as the mapping it is: yaml.safe_dump refuses a dict subclass it has no
# representer for, and a bench that wrote its scratch params.yaml from load_params once stopped
# on that before its first phase, unseen.
yaml.SafeDumper.add_representer(Params, yaml.SafeDumper.represent_dict)


_FIX_PARAMS = "`git diff params.yaml` shows what changed since the last commit."


def _yaml_problem(error: yaml.YAMLError) -> str:
    """Where and what, as one line: "line 2, column 1: found character '\\t' that cannot
    start any token"; a tab gets the reminder that YAML indents with spaces."""
    if isinstance(error, yaml.reader.ReaderError):
        return f"byte {error.position + 1} is not UTF-8 text ({error.reason}); save it as UTF-8"
    mark = getattr(error, "problem_mark", None)
    problem = getattr(error, "problem", None)
    if mark is None or problem is None:
        return " ".join(str(error).split())
    text = f"line {mark.line + 1}, column {mark.column + 1}: {' '.join(problem.split())}"
    context, start = getattr(error, "context", None), getattr(error, "context_mark", None)
    if context and start is not None and start.line != mark.line:
        text += f" ({' '.join(context.split())} that starts at line {start.line + 1})"
    if "'\\t'" in problem:
        text += "; YAML indents with spaces, never tabs"
    return text


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
