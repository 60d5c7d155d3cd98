"""The wrapper every DVC stage's `main` runs under (see imgclf/errors.py).

    @stage_main
    def main() -> None: ...

A UserError becomes `<stage>: error: <message>` on stderr and exit status 1, with no
traceback: the message already says what to do, and a traceback would bury it. So does a full
disk (or quota), wherever the write was: the machine's state, not a bug. Any other exception
is a bug: its traceback is printed, then the same one-line summary, exit 1.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import os
import resource
import shutil
import sys
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from imgclf.errors import UserError

R = TypeVar("R")


def stage_name(module: str) -> str:
    """`stages.split` -> `split`; under `python -m stages.x`, the module is __main__. A stage run
    for one item (`python -m stages.train tf`) is named as DVC names it: `train@tf`."""
    item: list[str] = []
    if module == "__main__":
        spec = getattr(sys.modules.get("__main__"), "__spec__", None)
        module = spec.name if spec is not None else module
        item = sys.argv[1:]
    name = module.rsplit(".", 1)[-1]
    return f"{name}@{item[0]}" if len(item) == 1 and item[0].isidentifier() else name


def stage_main(main: Callable[..., R]) -> Callable[..., R]:
    """Run `main` with the one error path; SystemExit (and Ctrl-C) pass through unchanged."""

    @functools.wraps(main)
    def wrapped(*args: Any, **kwargs: Any) -> R:
        name = stage_name(main.__module__)
        try:
            return main(*args, **kwargs)
        except UserError as e:
            # SystemExit with a message: Python prints it to stderr and exits with status 1.
            raise SystemExit(f"{name}: error: {e}") from None
        except Exception as e:
            full = disk_full(e)
            if full is not None:
                raise SystemExit(f"{name}: error: {disk_full_message(full)}") from None
            traceback.print_exc()
            summary = " ".join(f"{type(e).__name__}: {e}".split())
            raise SystemExit(
                f"{name}: error: {summary} (an unexpected error, a bug: the traceback above "
                "shows where; please report it)"
            ) from None

    return wrapped


DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


def disk_full(error: BaseException) -> OSError | None:
    """The no-space (or over-quota) OSError behind `error`, however a library wrapped it."""
    seen: set[int] = set()
    cause: BaseException | None = error
    while cause is not None and id(cause) not in seen:
        if isinstance(cause, OSError) and cause.errno in DISK_FULL:
            return cause
        seen.add(id(cause))
        cause = cause.__cause__ or cause.__context__
    return None


def disk_full_message(error: OSError) -> str:
    """What was being written, the space left where the stages write, and what to do."""
    from imgclf.config import cache_dir

    writing = f" writing {os.fsdecode(error.filename)}" if error.filename else ""
    places = [("the repository", Path.cwd())]
    # If not even the cache's folder can be made, the repository's figure says enough.
    with contextlib.suppress(OSError):
        places.append(("the cache", cache_dir()))
    free = ", ".join(f"{shutil.disk_usage(p).free / 2**20:,.0f} MiB free in {what} ({p})"
                     for what, p in places)  # fmt: skip
    return (
        f"the disk is full ({os.strerror(error.errno)}{writing}); {free}. Free some space and "
        "rerun (the feature caches resume where they stopped); the caches (downloads, "
        "features, activations) can move to a larger disk with IMGCLF_CACHE_DIR."
    )


def peak_rss_bytes() -> int:
    """This process's peak resident memory so far, for a stage's metrics (the issue's memory
    targets are per stage, and a stage is one process under `dvc repro`)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
