"""The evaluate stage's reports: metrics JSON, confusion CSV/PNG, misclassified CSV and contact
sheet, and the markdown comparison table the README shows.

Every writer is deterministic (sorted rows, rounded floats, no timestamps in the PNGs), so a
rerun on the same predictions gives byte-identical files and `dvc status` stays clean.
"""

from __future__ import annotations

import ast
import io
import sys
import tokenize
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from imgclf.contact_sheet import contact_sheet
from imgclf.evaluation import ALPHA, HeadResult, PairedTest, metrics_dict
from imgclf.fileio import atomic_write_bytes, read_json, write_csv, write_metrics
from imgclf.layout import Layout
from imgclf.registry import display_name as _registered_display_name

MISCLASSIFIED_COLUMNS = ("id", "path", "actual", "predicted", "confidence", "p_actual")


def display_name(head: str) -> str:
    """The registry's display name (imgclf/registry.py); an unregistered name as it is."""
    return _registered_display_name(head)


# ---------------------------------------------------------------------------------------------
# Confusion matrix


def _by_id(result: HeadResult) -> np.ndarray:
    # Reports list images in id order, whatever order the bottlenecks stored them in.
    return np.argsort(result.ids, kind="stable")


def write_confusion_csv(path: str | Path, result: HeadResult) -> None:
    """One `actual,predicted` row (class names) per test image, in image-id order: the input of
    DVC's `confusion` template."""
    names = result.classes
    rows = [
        {"actual": names[result.labels[i]], "predicted": names[result.predicted[i]]}
        for i in _by_id(result)
    ]
    write_csv(path, ("actual", "predicted"), rows)


def confusion_png(result: HeadResult) -> bytes:
    """A confusion-matrix heat map (rows: actual, columns: predicted) with counts in the cells."""
    import matplotlib

    matplotlib.use("Agg")  # no display on CI or inside `dvc repro`
    import matplotlib.pyplot as plt

    n = len(result.classes)
    side = max(4.0, 1.0 + 0.75 * n)
    fig, ax = plt.subplots(figsize=(side + 1.0, side), dpi=100)
    try:
        matrix = result.matrix
        ax.imshow(matrix, cmap="Blues", vmin=0, vmax=max(1, int(matrix.max())))
        ax.set_xticks(range(n), labels=result.classes, rotation=45, ha="right")
        ax.set_yticks(range(n), labels=result.classes)
        ax.set_xlabel("predicted")
        ax.set_ylabel("actual")
        threshold = matrix.max() / 2 if matrix.max() else 1
        for i in range(n):
            for j in range(n):
                ax.text(
                    j,
                    i,
                    str(int(matrix[i, j])),
                    ha="center",
                    va="center",
                    color="white" if matrix[i, j] > threshold else "black",
                    fontsize=9,
                )
        ax.set_title(
            f"{display_name(result.head)}: accuracy {result.accuracy:.3f} "
            f"[{result.ci_low:.3f}, {result.ci_high:.3f}], n = {result.n_test}"
        )
        fig.tight_layout()
        buf = io.BytesIO()
        # No "Software" chunk: the bytes then depend on the picture only.
        fig.savefig(buf, format="png", metadata={"Software": None})
        return buf.getvalue()
    finally:
        plt.close(fig)


# ---------------------------------------------------------------------------------------------
# Misclassified images


def misclassified_rows(result: HeadResult, split_dir: str | Path) -> list[dict[str, Any]]:
    """The test images the head gets wrong, most confident mistakes first (ties: by id).

    `path` is where the image lives (the split tree); `confidence` is the probability of the
    predicted class, `p_actual` the probability the head gave the true class.
    """
    names = result.classes
    rows = [
        {
            "id": str(result.ids[i]),
            "path": (Path(split_dir) / str(result.ids[i])).as_posix(),
            "actual": names[result.labels[i]],
            "predicted": names[result.predicted[i]],
            "confidence": round(float(result.confidence[i]), 4),
            "p_actual": round(float(result.probabilities[i, result.labels[i]]), 4),
        }
        for i in np.flatnonzero(~result.correct)
    ]
    rows.sort(key=lambda r: (-r["confidence"], r["id"]))
    return rows


def write_misclassified_csv(path: str | Path, rows: Sequence[Mapping[str, Any]]) -> None:
    write_csv(path, MISCLASSIFIED_COLUMNS, rows, fixed_decimals={"confidence": 4, "p_actual": 4})


# ---------------------------------------------------------------------------------------------
# Comparison table


def lines_of_code(path: str | Path) -> int | None:
    """Lines holding code in a Python file: blank lines, comments and docstrings do not count.
    None when the file is missing or does not parse."""
    path = Path(path)
    try:
        source = path.read_text(encoding="utf-8")
        tree = ast.parse(source)
    except (OSError, SyntaxError, UnicodeDecodeError):
        return None
    docstring_lines: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
            body = node.body
            if (
                body
                and isinstance(body[0], ast.Expr)
                and isinstance(body[0].value, ast.Constant)
                and isinstance(body[0].value.value, str)
            ):
                end = body[0].end_lineno or body[0].lineno
                docstring_lines.update(range(body[0].lineno, end + 1))
    skip = {tokenize.COMMENT, tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT,
            tokenize.ENCODING, tokenize.ENDMARKER}  # fmt: skip
    code_lines: set[int] = set()
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type in skip:
            continue
        # A token may span lines (a multi-line string): every line it covers holds code.
        code_lines.update(range(tok.start[0], tok.end[0] + 1))
    return len(code_lines - docstring_lines)


def training_length(train: Mapping[str, Any]) -> str:
    """How long the head trained, in its own unit (from metrics/train/<head>.json)."""
    if "epochs" in train:
        epochs = int(train["epochs"])
        text = f"{epochs:,} epoch{'s' if epochs != 1 else ''}"
        if "steps" in train:
            text += f" ({int(train['steps']):,} steps)"
        return text
    if "steps" in train:
        return f"{int(train['steps']):,} steps"
    if "iterations" in train:
        return f"{int(train['iterations']):,} iterations"
    return "–"


def read_train_metrics(path: str | Path) -> dict[str, Any]:
    """metrics/train/<head>.json, or {} (the table then shows dashes) when it is missing."""
    path = Path(path)
    if not path.is_file():
        print(f"evaluate: {path} not found; the comparison table shows '–'", file=sys.stderr)
        return {}
    data = read_json(path)
    return data if isinstance(data, dict) else {}


def paired_sentence(test: PairedTest) -> str:
    """'TF vs Keras: 7 vs 5 discordant, p = 0.77 (Holm: p = 1.00): not significant.'"""
    a, b = display_name(test.a), display_name(test.b)
    verdict = "not significant"
    if test.significant:
        better = a if test.a_only > test.b_only else b
        verdict = f"significant, {better} is better"
    return (
        f"{a} vs {b}: {test.a_only} vs {test.b_only} discordant, "
        f"{_format_p(test.p_value)} (Holm: {_format_p(test.p_holm)}): {verdict}."
    )


def _format_p(p: float) -> str:
    """'p = 0.77', 'p = 0.029', 'p = 0.0039', 'p < 0.001': two significant digits below 0.1,
    more where two would round across ALPHA (0.0496 is 'p = 0.0496', not 'p = 0.05')."""
    if p < 0.001:
        return "p < 0.001"
    if p >= 0.1:
        return f"p = {p:.2f}"
    digits = 2
    while (float(f"{p:.{digits}g}") < ALPHA) != (p < ALPHA):
        digits += 1
    return f"p = {p:.{digits}g}"


def comparison_markdown(
    results: Sequence[HeadResult],
    tests: Sequence[PairedTest],
    train_metrics: Mapping[str, Mapping[str, Any]],
    loc: Mapping[str, int | None],
) -> str:
    """metrics/comparison.md: one row per head, then the paired tests in words."""
    n_test = results[0].n_test if results else 0
    lines = [
        "| Head | Test accuracy [95% CI] | Macro-F1 | Log loss | Training time | Parameters "
        "| Steps / epochs | Lines of code |",
        "|---|---|---|---|---:|---:|---|---:|",
    ]
    dash = "–"
    for r in results:
        train = train_metrics.get(r.head, {})
        seconds = train.get("train_seconds")
        params = train.get("n_parameters")
        n_loc = loc.get(r.head)
        lines.append(
            f"| {display_name(r.head)} "
            f"| {r.accuracy:.3f} [{r.ci_low:.3f}, {r.ci_high:.3f}] "
            f"| {r.macro_f1:.3f} "
            f"| {r.log_loss:.3f} "
            f"| {f'{float(seconds):.1f} s' if seconds is not None else dash} "
            f"| {f'{int(params):,}' if params is not None else dash} "
            f"| {training_length(train)} "
            f"| {n_loc if n_loc is not None else dash} |"
        )
    lines += [
        "",
        f"Test set: {n_test} images, the same for every head; accuracy intervals are 95% Wilson "
        "score intervals. Training length and time come from `metrics/train/<head>.json`; "
        "lines of code count the non-blank lines of the model's module "
        "(`imgclf/heads/<head>_head.py`, `imgclf/finetune/<model>.py` for a fine-tuned one) "
        "that are neither comments nor docstrings.",
        "",
        "Paired comparisons on the same test images (exact McNemar test: a two-sided binomial "
        "test on the images exactly one of the two heads gets right, “7 vs 5” = right only "
        "by the first vs right only by the second; significant when Holm's adjusted p over "
        f"the {len(tests)} pairs below is < {ALPHA}, which keeps the chance of any false call "
        f"at {ALPHA:.0%}):",
        "",
        *[f"- {paired_sentence(t)}" for t in tests],
    ]
    return "\n".join(lines) + "\n"


def write_comparison_json(path: str | Path, tests: Sequence[PairedTest]) -> None:
    """metrics/evaluate/comparison.json: one entry per pair, keyed "<a>_vs_<b>"."""
    write_metrics(path, {f"{t.a}_vs_{t.b}": t.as_dict() for t in tests})


@dataclass(frozen=True)
class ReportSummary:
    misclassified: dict[str, int]
    unreadable_thumbnails: int


def write_reports(
    results: Sequence[HeadResult],
    tests: Sequence[PairedTest],
    *,
    metrics_dir: str | Path,
    split_dir: str | Path,
    train_metrics: Mapping[str, Mapping[str, Any]],
    loc: Mapping[str, int | None],
    sheet_max: int,
) -> ReportSummary:
    """Every evaluate output under `metrics_dir` (see the module doc and dvc.yaml)."""
    layout = Layout.of(metrics=metrics_dir)
    misclassified: dict[str, int] = {}
    unreadable = 0
    for r in results:
        write_metrics(layout.evaluation(r.head), metrics_dict(r))
        write_confusion_csv(layout.confusion(r.head), r)
        atomic_write_bytes(layout.confusion(r.head, ".png"), confusion_png(r))
        rows = misclassified_rows(r, split_dir)
        write_misclassified_csv(layout.misclassified(r.head), rows)
        sheet = contact_sheet(rows, display_name(r.head), sheet_max)
        atomic_write_bytes(layout.misclassified(r.head, ".png"), sheet.png)
        misclassified[r.head] = len(rows)
        unreadable += sheet.unreadable
    write_comparison_json(layout.comparison_json, tests)
    markdown = comparison_markdown(results, tests, train_metrics, loc)
    atomic_write_bytes(layout.comparison_md, markdown.encode("utf-8"))
    return ReportSummary(misclassified=misclassified, unreadable_thumbnails=unreadable)
