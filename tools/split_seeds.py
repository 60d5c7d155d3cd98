"""Test accuracy of every head over several split seeds, as mean ± sd.

    make seeds SEEDS='0 1 2 3 4' [SET='train_tf.hidden_units=1024']
    .venv/bin/python tools/split_seeds.py --seeds 0 1 2 3 4 [-S train_tf.hidden_units=1024]

Each seed is one `dvc exp run -S split.seed=N evaluate` in the workspace: a DVC experiment (see
`dvc exp show`) that reruns the split, the models and evaluate; the bottlenecks and activations
come from the feature cache. Besides the test table it prints each model's validation accuracy
and loss at its kept step, pooled over the seeds: the numbers to choose a recipe by (`-S` one
way, then another), read before the test table. The LiteRT export and track (an MLflow run,
registered models) are not part of a seed's run: the table needs evaluate's numbers only, and a
registry version per seed would be a model nobody serves. `--through track` runs them too.
Afterwards, or when a run fails, params.yaml is put back as it was (seed and any -S value), and
after a full pass `dvc repro` brings the workspace outputs back to it (`--no-closing-repro`
skips that, for a pass whose tables are all that is wanted: the outputs stay the last seed's,
and `dvc status` says so). Prints markdown tables (the README quotes them).
"""

from __future__ import annotations

import argparse
import csv
import getpass
import json
import os
import socket
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script: the registry of this checkout
from imgclf.evaluation import ALPHA  # noqa: E402  (evaluate's significance level)
from imgclf.layout import Layout  # noqa: E402
from imgclf.registry import MODELS  # noqa: E402

HEADS = {name: spec.display_name for name, spec in MODELS.items()}


def with_git_identity(env: dict[str, str], repo: Path) -> dict[str, str]:
    """`env` with git's own fallback identity, user@host, where `repo` has none configured:
    `dvc exp run` commits, and stops on a machine without an identity (a CI runner, a fresh
    container). The Makefile gives its targets the same; a configured identity or GIT_*
    variables win."""

    def configured(key: str) -> bool:
        found = subprocess.run(["git", "config", key], cwd=repo, env=env, capture_output=True)
        return bool(found.stdout.strip())

    user = getpass.getuser()
    out = dict(env)
    if not configured("user.name"):
        for var in ("GIT_AUTHOR_NAME", "GIT_COMMITTER_NAME"):
            out.setdefault(var, user)
    if not configured("user.email"):
        for var in ("GIT_AUTHOR_EMAIL", "GIT_COMMITTER_EMAIL"):
            out.setdefault(var, f"{user}@{socket.gethostname()}")
    return out


def dvc(*args: str) -> None:
    """`dvc <args>` in the repository, its stages run by this interpreter: their `python` is
    the first on PATH, so this one's folder goes first (as an activated venv does)."""
    env = with_git_identity(
        {
            **os.environ,
            "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]),
        },
        ROOT,
    )
    print("$ dvc", " ".join(args), flush=True)
    subprocess.run([sys.executable, "-m", "dvc", *args], cwd=ROOT, env=env, check=True)


def exp_run(overrides: list[str], through: str) -> None:
    dvc("exp", "run", *(arg for override in overrides for arg in ("-S", override)), through)


def test_accuracies(layout: Layout) -> dict[str, float]:
    """Test accuracy of every registered model that evaluate scored in this run."""
    files = {head: layout.evaluation(head) for head in HEADS}
    return {
        head: json.loads(path.read_text())["accuracy"] for head, path in files.items()
        if path.is_file()
    }  # fmt: skip


def validation_scores(layout: Layout) -> dict[str, dict[str, Any]]:
    """Each trained model's validation accuracy and loss at the step it kept (its curve's row
    at `model_step`; the final values for a model without a curve, as sklearn's), n_val, and
    for a fine-tuned model the accuracy of every epoch (`by_epoch`: what `epochs` is chosen
    by, free of the kept-epoch rule's pick of each seed's best) and, when its stage could read
    it, the kept epoch's accuracy with test-time flips (`with_flips`: what `test_time_flip` is
    chosen by)."""
    scores = {}
    for head in HEADS:
        path = layout.train_metrics(head)
        if not path.is_file():
            continue
        metrics = json.loads(path.read_text())
        with layout.curve(head).open(newline="") as f:
            curve = list(csv.DictReader(f))
        kept = [row for row in curve if float(row["step"]) == metrics.get("model_step")]
        accuracy, loss = (
            (float(kept[0]["val_accuracy"]), float(kept[0]["val_loss"])) if kept
            else (metrics["final_val_accuracy"], metrics["final_val_loss"])
        )  # fmt: skip
        scores[head] = {"accuracy": accuracy, "loss": loss, "n": metrics["n_val"]}
        if MODELS[head].fine_tuned:
            scores[head]["by_epoch"] = [float(row["val_accuracy"]) for row in curve]
            if "val_accuracy_with_flips" in metrics:
                scores[head]["with_flips"] = float(metrics["val_accuracy_with_flips"])
    return scores


def on_every_seed(per_seed: dict[int, dict[str, Any]]) -> list[str]:
    """The models (in registry order) that every seed's results hold: a table compares only
    those."""
    return [h for h in HEADS if all(h in results for results in per_seed.values())]


def stage_costs(layout: Layout) -> dict[str, dict[str, float]]:
    """Each fine-tuned model's training seconds and its stage's peak RSS (bytes; absent from
    metrics written before the stages recorded it): the issue's cost targets, per seed."""
    costs = {}
    for head in HEADS:
        path = layout.train_metrics(head)
        if MODELS[head].fine_tuned and path.is_file():
            metrics = json.loads(path.read_text())
            costs[head] = {"seconds": metrics["train_seconds"]}
            if "peak_rss_bytes" in metrics:
                costs[head]["peak_rss_bytes"] = metrics["peak_rss_bytes"]
    return costs


def cost_table(costs: dict[int, dict[str, dict[str, float]]]) -> str:
    """One row per fine-tuned model: its training seconds and peak RSS on each seed."""
    seeds = sorted(costs)
    heads = on_every_seed(costs)
    if not heads:
        return ""
    lines = [
        "| Model | training seconds, seeds "
        + " / ".join(map(str, seeds))
        + " | peak RSS GiB, the same seeds |",
        "|---|---|---|",
    ]
    for head in heads:
        rows = [costs[s][head] for s in seeds]
        seconds = " / ".join(f"{r['seconds']:.0f}" for r in rows)
        rss = " / ".join(
            f"{r['peak_rss_bytes'] / 2**30:.2f}" if "peak_rss_bytes" in r else "–" for r in rows
        )
        lines.append(f"| {HEADS[head]} | {seconds} | {rss} |")
    return "\n".join(lines)


def paired_tests(layout: Layout) -> dict[str, dict]:
    """comparison.json: "<a>_vs_<b>" -> McNemar's b, c, n_discordant, p_value, mid_p, p_holm."""
    path = layout.comparison_json
    return json.loads(path.read_text()) if path.is_file() else {}


def _p_value(p: float) -> str:
    # comparison.json rounds p to 6 decimals: a 0 there is below 1e-6, not zero.
    return f"{p:.3g}" if p >= 1e-6 else "< 1e-6"


def _cell(test: dict[str, Any]) -> str:
    """ "b/c, p" with Holm's adjusted p over the seed's pairs and a star when it is < 0.05 (a
    comparison.json from before Holm has no p_holm: its exact p alone, no star)."""
    cell = f"{test['b']}/{test['c']}, {_p_value(test['p_value'])}"
    if "p_holm" not in test:
        return cell
    return f"{cell} (Holm {_p_value(test['p_holm'])}){' *' if test['p_holm'] < ALPHA else ''}"


def mcnemar_table(tests: dict[int, dict[str, dict]]) -> str:
    """One row per pair, one column per seed: "b/c, p (Holm p)" and a star when significant
    (Holm's adjusted p over the seed's pairs < 0.05)."""
    seeds = sorted(tests)
    pairs = sorted({pair for per_seed in tests.values() for pair in per_seed})
    if not pairs:
        return ""
    lines = [
        "| Pair (a vs b) | " + " | ".join(f"seed {s}: a only/b only, p" for s in seeds) + " |",
        "|---|" + "---|" * len(seeds),
    ]
    for pair in pairs:
        cells = []
        for seed in seeds:
            t = tests[seed].get(pair)
            cells.append("–" if t is None else _cell(t))
        a, _, b = pair.partition("_vs_")
        lines.append(f"| {HEADS.get(a, a)} vs {HEADS.get(b, b)} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + (
        "\n\n(exact McNemar p, then Holm's adjusted p over the seed's pairs; * significant: "
        "Holm's p < 0.05)"
    )


def pooled_right(accuracies: list[float], rows: list[dict[str, Any]]) -> int:
    """Right answers over the seeds, from each seed's accuracy and its number evaluated."""
    return sum(round(a * r["n"]) for a, r in zip(accuracies, rows, strict=True))


def validation_table(scores: dict[int, dict[str, dict[str, Any]]]) -> str:
    """Validation accuracy at the kept step, pooled over the seeds (right / evaluated), the
    mean validation loss, and for the fine-tuned models the pooled accuracy of each epoch and
    the kept epoch's with test-time flips. The seeds' slices overlap (each is 10% of a different
    train split), so the pooled count is of evaluations, not of distinct photos."""
    lines = [
        f"| Model | Validation accuracy, pooled over {len(scores)} seeds | per seed "
        "| validation loss, mean | by epoch, pooled | with test-time flips, pooled |",
        "|---|---|---|---|---|---|",
    ]
    heads = on_every_seed(scores)
    for head in heads:
        rows = [scores[seed][head] for seed in sorted(scores)]
        right = pooled_right([r["accuracy"] for r in rows], rows)
        total = sum(r["n"] for r in rows)
        per_seed = "/".join(f"{r['accuracy']:.3f}" for r in rows)
        loss = statistics.mean(r["loss"] for r in rows)
        curves = [r.get("by_epoch") for r in rows]
        by_epoch = ""
        if all(curves) and len({len(c) for c in curves}) == 1:
            pooled = [pooled_right([c[e] for c in curves], rows) / total
                      for e in range(len(curves[0]))]  # fmt: skip
            by_epoch = ", ".join(f"{v:.4f}" for v in pooled)
        flips = ""
        if all("with_flips" in r for r in rows):
            flipped = pooled_right([r["with_flips"] for r in rows], rows)
            flips = f"{flipped / total:.4f} ({flipped}/{total})"
        lines.append(f"| {HEADS[head]} | {right / total:.4f} ({right}/{total}) | {per_seed} "
                     f"| {loss:.4f} | {by_epoch} | {flips} |")  # fmt: skip
    return "\n".join(lines)


def summary_table(results: dict[int, dict[str, float]]) -> str:
    lines = [
        f"| Head | Test accuracy, mean ± sd over {len(results)} split seeds | min – max |",
        "|---|---|---|",
    ]
    heads = {h: HEADS[h] for h in on_every_seed(results)}
    for head, name in heads.items():
        values = [results[seed][head] for seed in sorted(results)]
        sd = statistics.stdev(values) if len(values) > 1 else 0.0
        lines.append(
            f"| {name} | {statistics.mean(values):.3f} ± {sd:.3f} "
            f"| {min(values):.3f} – {max(values):.3f} |"
        )
    per_seed = ", ".join(
        f"seed {seed}: " + "/".join(f"{results[seed][h]:.3f}" for h in heads) for seed in results
    )
    return "\n".join(lines) + f"\n\nPer seed ({'/'.join(heads)}): {per_seed}."


def seed_number(text: str) -> int:
    """A --seeds value: split.seed's own range, an integer >= 0."""
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"a split seed is an integer >= 0, not {text!r}")
    return int(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=seed_number, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("-S", "--set-param", action="append", default=[],
                        help="extra params for every run, as for dvc exp run -S")  # fmt: skip
    parser.add_argument(
        "--through",
        default="evaluate",
        help="the last stage of each seed's run (default: evaluate; track: also an MLflow run "
        "and registered models per seed)",
    )
    parser.add_argument(
        "--no-closing-repro",
        action="store_true",
        help="leave the workspace's outputs as the last seed's run left them (params.yaml is "
        "restored either way); saves the closing `dvc repro`",
    )
    args = parser.parse_args()

    params_file = ROOT / "params.yaml"
    saved = params_file.read_bytes()
    layout = Layout.from_params(yaml.safe_load(saved), ROOT)
    results, tests, validation, costs = {}, {}, {}, {}
    try:
        for seed in args.seeds:
            exp_run([f"split.seed={seed}", *args.set_param], args.through)
            validation[seed] = validation_scores(layout)
            costs[seed] = stage_costs(layout)
            results[seed] = test_accuracies(layout)
            tests[seed] = paired_tests(layout)
    except subprocess.CalledProcessError:
        # DVC has printed the failing stage's own error above.
        raise SystemExit(
            f"split_seeds: error: seed {seed}'s run failed (see the stage's error above); "
            f"seeds done: {', '.join(map(str, results)) or 'none'}"
        ) from None
    finally:
        # `dvc exp run -S` wrote the last seed (and the -S values) into params.yaml, also when
        # it failed.
        if params_file.read_bytes() != saved:
            params_file.write_bytes(saved)
            print(f"split_seeds: restored {params_file.name}", file=sys.stderr)
    # The outputs are the last run's. The stages write uncached metrics, so DVC's run cache
    # cannot restore them: this reruns the seeded stages once more, and the export and track
    # only if their inputs came out different.
    if not args.no_closing_repro:
        dvc("repro")
    print(validation_table(validation))
    print()
    if table := cost_table(costs):
        print(table + "\n")
    print(summary_table(results))
    print()
    print(mcnemar_table(tests))


if __name__ == "__main__":
    main()
