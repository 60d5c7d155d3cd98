"""A `dvc exp run -S` override whose value is taken literally, whatever it holds.

DVC parses `-S key=value` with Hydra's override grammar, where a bare value with a space,
a comma, brackets, a quote or a non-ASCII letter is a syntax error or, worse, a sweep or a
list. A single-quoted value is a string as written, once its quotes are escaped (and the
backslashes before them, or at its end, doubled). `make run DATA=<path>` goes through here:

    dvc exp run -S "$(python -m imgclf.overrides data.source)"   # value from $IMGCLF_VALUE
"""

from __future__ import annotations

import os
import re
import sys


def literal_override(key: str, value: str) -> str:
    """`key='value'` in Hydra's grammar, `value` kept as the string it is."""
    escaped = re.sub(r"(\\+)(?='|$)", lambda m: m.group(1) * 2, value).replace("'", "\\'")
    return f"{key}='{escaped}'"


if __name__ == "__main__":
    # The value comes from the environment, never through a shell's quoting.
    print(literal_override(sys.argv[1], os.environ["IMGCLF_VALUE"]))
