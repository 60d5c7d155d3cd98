"""pyproject.toml in the form setuptools installs without warnings."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_license_is_an_spdx_string_for_a_setuptools_that_reads_it():
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())
    # A `{ text = ... }` table makes setuptools >= 77 print a BuildBackendWarning per build.
    assert meta["project"]["license"] == "Apache-2.0"
    (requirement,) = [r for r in meta["build-system"]["requires"] if r.startswith("setuptools")]
    assert int(re.search(r">=\s*(\d+)", requirement).group(1)) >= 77
