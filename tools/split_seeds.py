"""Test accuracy of every head over several split seeds, as mean ± sd.

    .venv/bin/python tools/split_seeds.py --seeds 0 1 2 3 4 [-S data.source=...]

Each seed is one `dvc exp run -S split.seed=N` in the workspace: a DVC experiment (see
`dvc exp show`) and an MLflow run. Only split, the heads, evaluate and track rerun; the
bottlenecks come from the feature cache. The workspace's own seed is restored at the end.
Prints a markdown table (the README quotes it).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
HEADS = {"tf": "TF", "keras": "Keras", "sklearn": "scikit-learn"}


def exp_run(overrides: list[str]) -> None:
    cmd = [sys.executable, "-m", "dvc", "exp", "run"]
    for override in overrides:
        cmd += ["-S", override]
    print("$", " ".join(cmd[2:]), flush=True)
    subprocess.run(cmd, cwd=ROOT, check=True)


def test_accuracies(metrics_dir: Path) -> dict[str, float]:
    return {
        head: json.loads((metrics_dir / "evaluate" / f"{head}.json").read_text())["accuracy"]
        for head in HEADS
    }


def summary_table(results: dict[int, dict[str, float]]) -> str:
    lines = [
        f"| Head | Test accuracy, mean ± sd over {len(results)} split seeds | min – max |",
        "|---|---|---|",
    ]
    for head, name in HEADS.items():
        values = [results[seed][head] for seed in sorted(results)]
        sd = statistics.stdev(values) if len(values) > 1 else 0.0
        lines.append(
            f"| {name} | {statistics.mean(values):.3f} ± {sd:.3f} "
            f"| {min(values):.3f} – {max(values):.3f} |"
        )
    per_seed = ", ".join(
        f"seed {seed}: " + "/".join(f"{results[seed][h]:.3f}" for h in HEADS) for seed in results
    )
    return "\n".join(lines) + f"\n\nPer seed (tf/keras/sklearn): {per_seed}."


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("-S", "--set-param", action="append", default=[],
                        help="extra params for every run, as for dvc exp run -S")  # fmt: skip
    args = parser.parse_args()

    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    original_seed = params["split"]["seed"]
    metrics_dir = ROOT / params["paths"]["metrics"]
    results = {}
    for seed in args.seeds:
        exp_run([f"split.seed={seed}", *args.set_param])
        results[seed] = test_accuracies(metrics_dir)
    if args.seeds[-1] != original_seed:
        exp_run([f"split.seed={original_seed}", *args.set_param])
    print(summary_table(results))


if __name__ == "__main__":
    main()
