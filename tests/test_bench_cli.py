"""The benchmarks still start: each bench/*.py parses its arguments and imports what it needs
at the top (bench.common and the project), in a fresh Python, as a user runs it.

A full bench run takes minutes to an hour and needs the shared photos, so the suite does not
run one; this catches the breakage that went unseen once (a bench that no longer started).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCHES = sorted(p for p in (ROOT / "bench").glob("*.py") if p.name != "common.py")


def test_every_bench_is_listed() -> None:
    assert len(BENCHES) >= 5, f"expected the benches under {ROOT / 'bench'}, found {BENCHES}"


@pytest.mark.parametrize("bench", BENCHES, ids=lambda p: p.stem)
def test_bench_prints_its_usage(bench: Path) -> None:
    proc = subprocess.run(
        [sys.executable, str(bench), "--help"], cwd=ROOT, capture_output=True, text=True,
        timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith(f"usage: {bench.name}"), proc.stdout


def test_activations_bench_options_pass_the_stage_check() -> None:
    """The activations bench builds the stage's options from this checkout's params.yaml (it
    once stopped at its first phase, unseen, when the block gained required keys that a copy of
    the block inside the bench lacked); what it overrides must still pass the stage's check."""
    from bench.activations import activations_options
    from imgclf.config import load_params

    block = load_params(ROOT / "params.yaml")["activations"]
    options = activations_options("bfloat16", 399)
    assert (options.cut, options.image_size, options.precision) == (block["cut"], 399, "bfloat16")
    assert options.train_views == ("orig", "flip"), options
