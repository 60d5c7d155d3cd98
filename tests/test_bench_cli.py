"""The benchmarks and the tools still start: each bench/*.py and each command-line script in
tools/ parses its arguments and imports what it needs at the top (bench.common, tools.probe_runs
and the project), in a fresh Python, as a user runs it.

A full bench run takes minutes to an hour and needs the shared photos, and a tool's pass hours
of a workspace on the full set, so the suite runs neither in full (the tools' own tests run them
on a tiny result); this catches the breakage that went unseen once (a bench that no longer
started).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCHES = sorted(p for p in (ROOT / "bench").glob("*.py") if p.name != "common.py")
TOOLS = sorted(
    p for p in (ROOT / "tools").glob("*.py") if 'if __name__ == "__main__":' in p.read_text()
)


def test_every_bench_and_tool_is_listed() -> None:
    assert len(BENCHES) >= 5, f"expected the benches under {ROOT / 'bench'}, found {BENCHES}"
    assert len(TOOLS) >= 5, f"expected the tools under {ROOT / 'tools'}, found {TOOLS}"
    assert ROOT / "tools" / "probe_runs.py" not in TOOLS  # a module the probes share


@pytest.mark.parametrize("script", BENCHES + TOOLS, ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_script_prints_its_usage(script: Path) -> None:
    proc = subprocess.run(
        [sys.executable, str(script), "--help"], cwd=ROOT, capture_output=True, text=True,
        timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith(f"usage: {script.name}"), proc.stdout


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


def test_finetune_bench_writes_a_workspace_params_file_the_stages_read() -> None:
    """The fine-tune bench writes its scratch workspace's params.yaml from this checkout's (it
    once stopped before its first phase, unseen, when load_params began to return a dict
    subclass that yaml.safe_dump refuses); the file must hold the repo's recipes, with only the
    bench's paths, head trainings and epochs changed."""
    import yaml

    from bench.finetune import HEAD_OVERRIDES, bench_params
    from imgclf.config import load_params

    repo = load_params(ROOT / "params.yaml")
    written = yaml.safe_load(yaml.safe_dump(bench_params(2), sort_keys=False))
    assert written["finetune_tf"] == {**repo["finetune_tf"], "epochs": 2}
    assert written["finetune_keras"] == {**repo["finetune_keras"], "epochs": 2}
    assert written["train_tf"] == {**repo["train_tf"], **HEAD_OVERRIDES["train_tf"]}
    assert written["activations"] == repo["activations"]
    assert written["paths"]["models"] == "models"


def test_depth_bench_projects_the_stages_rows() -> None:
    """The depth bench projected every train view of every image an epoch after the default
    became one view an image (10x the stage's rows, unseen); it now counts as the stage does."""
    from bench.finetune import FULL_TRAIN_IMAGES
    from bench.finetune_depth import projected_rows
    from imgclf.config import load_params

    repo = load_params(ROOT / "params.yaml")
    views, sampling, epochs, rows = projected_rows()
    assert (views, sampling, epochs) == (
        repo["activations"]["train_views"],
        repo["finetune_keras"]["view_sampling"],
        repo["finetune_keras"]["epochs"],
    )
    per_epoch = FULL_TRAIN_IMAGES * (1 if sampling == "one_per_image" else len(views))
    assert rows == per_epoch * epochs
