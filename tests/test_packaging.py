"""pyproject.toml in the form setuptools installs without warnings."""

from __future__ import annotations

import re
import subprocess
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_license_is_an_spdx_string_for_a_setuptools_that_reads_it():
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())
    # A `{ text = ... }` table makes setuptools >= 77 print a BuildBackendWarning per build.
    assert meta["project"]["license"] == "Apache-2.0"
    (requirement,) = [r for r in meta["build-system"]["requires"] if r.startswith("setuptools")]
    assert int(re.search(r">=\s*(\d+)", requirement).group(1)) >= 77


def test_make_installs_the_openvino_extra_the_fidelity_tests_need():
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())
    extra = meta["project"]["optional-dependencies"]["openvino"]
    assert {re.match(r"[\w-]+", r).group(0) for r in extra} == {"openvino", "nncf"}
    # `make test` (and so CI) must run tests/test_runtimes.py rather than skip it.
    assert '-e ".[dev,openvino]"' in (ROOT / "Makefile").read_text()


def test_make_test_starts_the_longest_files_first():
    # pytest-xdist >= 3.8 reorders --dist loadfile's files by their number of tests unless told
    # not to, which silently undid tests/conftest.py's order (the pipeline file, 10 tests and
    # minutes long, then started near the end and ran alone).
    from tests.conftest import LONGEST_FIRST

    make_args = re.search(r"^TEST_ARGS \?= (.*)$", (ROOT / "Makefile").read_text(), re.M)
    args = make_args.group(1).split()
    assert "loadfile" in args and "--no-loadscope-reorder" in args, args
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())
    (xdist,) = [r for r in meta["project"]["optional-dependencies"]["dev"] if "xdist" in r]
    assert re.search(r">=\s*3\.([89]|\d\d)", xdist), xdist
    missing = [name for name in LONGEST_FIRST if not (ROOT / "tests" / name).is_file()]
    assert not missing, f"tests/conftest.py LONGEST_FIRST names files that do not exist: {missing}"


def test_plain_make_lists_every_target():
    # A newcomer's first `make` printed nothing and only installed; now it says what there is.
    make = ["make", "--no-print-directory"]
    done = subprocess.run(make, cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    phony = re.search(r"^\.PHONY: (.*)$", (ROOT / "Makefile").read_text(), re.M).group(1).split()
    listed = re.findall(r"^  make (\S+) +\S", done.stdout, re.M)
    assert sorted(listed) == sorted(phony), "every .PHONY target needs a `## what it does` comment"


@pytest.mark.parametrize(
    "data",
    ["../shared/datasets/flower_photos", "/photos/flowers (copy)", "/photos/flowers, v2",
     "/photos/data[2024]", "/photos/ünï", "/photos/nathan's photos", "2024", "a=b",
     "/photos/ends in a backslash\\", "/photos/b\\'c"],
)  # fmt: skip
def test_make_run_data_reaches_dvc_as_the_string_given(data):
    # `make run DATA=...` used to paste DATA into -S 'data.source=...': a space and brackets
    # were DVC syntax errors, a comma a sweep, a quote a shell error, a number a number.
    import os
    import sys

    from hydra.core.override_parser.overrides_parser import OverridesParser  # DVC's -S parser

    override = subprocess.run(
        [sys.executable, "-m", "imgclf.overrides", "data.source"],
        env={**os.environ, "IMGCLF_VALUE": data}, cwd=ROOT, capture_output=True, text=True,
        check=True,
    ).stdout.rstrip("\n")  # fmt: skip
    parsed = OverridesParser.create().parse_overrides([override])[0]
    assert parsed.key_or_group == "data.source" and parsed.value() == data
    makefile = (ROOT / "Makefile").read_text()
    assert '-S "$$($(BIN)/python -m imgclf.overrides data.source)"' in makefile
    assert "run: export IMGCLF_VALUE = $(DATA)" in makefile


def test_a_disk_without_room_for_the_suite_is_named_before_any_test(tmp_path):
    """CI once ran out of disk at 11% of the suite: 565 errors, then an OSError from pytest's
    own reporting. The suite now checks first (tests/conftest.py) and says where, how much,
    and what to do."""
    from tests.helpers import SUITE_TEMP_BYTES, lack_of_space

    assert lack_of_space(tmp_path, 1) is None
    not_yet = tmp_path / "pytest-of-someone" / "pytest-0"  # measured at its existing parent
    problem = lack_of_space(not_yet, SUITE_TEMP_BYTES * 10**9)
    assert problem is not None
    assert problem.startswith(
        f"the test suite writes up to 3000000000.0 GB of temporary files under {not_yet}, "
        "and its disk has "
    ), problem
    assert problem.endswith("TMPDIR=/big/disk/tmp make test"), problem
