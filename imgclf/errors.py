"""The one error path: errors the user can fix, as opposed to bugs.

Every exception a user can cause (bad params, bad input data, an upstream stage not run yet,
an unreachable host) derives from `UserError`. A stage's `main` runs under
`imgclf.stage.stage_main`, which prints a UserError as one `<stage>: error: ...` paragraph
without a traceback and exits 1; anything else is a bug and keeps its traceback.

A message says what was found, what was expected and what to do. Most classes build that
sentence themselves; the keywords are for the ones that have the three parts separately:

    raise ParamsError("train_tf.steps", found="'abc'", expected="a positive integer")
    -> "train_tf.steps: expected a positive integer, found 'abc'."
"""

from __future__ import annotations

from collections.abc import Sequence


def first_few(items: Sequence[str], shown: int, sep: str = ", ") -> str:
    """The first `shown` of `items` joined by `sep`, then how many more ("a, b and 3 more"): a
    message that named every one of 10,000 bad files would bury what it says."""
    more = f" and {len(items) - shown} more" if len(items) > shown else ""
    return sep.join(items[:shown]) + more


class UserError(Exception):
    """Something the user can fix; str() is the whole message shown to them."""

    def __init__(
        self,
        what: str = "",
        *args: object,
        found: str | None = None,
        expected: str | None = None,
        todo: str | None = None,
    ) -> None:
        super().__init__(what, *args)
        self.what = what
        self.found = found
        self.expected = expected
        self.todo = todo

    def __str__(self) -> str:
        if self.found is None and self.expected is None and self.todo is None:
            return super().__str__()
        details = [
            part
            for part in (
                f"expected {self.expected}" if self.expected is not None else None,
                f"found {self.found}" if self.found is not None else None,
            )
            if part
        ]
        text = self.what + (": " + ", ".join(details) if details else "")
        text += "."
        return f"{text} {self.todo}" if self.todo else text


class ParamsError(UserError, ValueError):
    """A params.yaml value that cannot be used; `what` names the key (`train_tf.steps`)."""

    def __init__(
        self,
        key: str,
        *,
        found: str | None = None,
        expected: str | None = None,
        todo: str | None = None,
        file: str = "params.yaml",
    ) -> None:
        super().__init__(f"{file}: {key}", found=found, expected=expected, todo=todo)
        self.key = key


class MissingInput(UserError, FileNotFoundError):
    """A file an earlier stage (or the user) should have made is not there; the message
    names the stage to run."""


class StageFailed(UserError):
    """A stage ran to the end but its result fails a check the user set (e.g. the accuracy
    gate); its outputs are written so that one can see why."""
