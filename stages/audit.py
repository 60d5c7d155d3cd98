"""Stage audit: the training images whose label looks wrong (imgclf/label_audit.py), as a list
(metrics/label_issues.csv), a contact sheet (.png) and counts (metrics/audit.json). With
heads.drop_label_issues: true the models train without them."""

from __future__ import annotations

import sys

from imgclf.bottleneck_files import load_bottlenecks
from imgclf.config import load_params
from imgclf.contact_sheet import contact_sheet
from imgclf.fileio import atomic_write_bytes, write_metrics
from imgclf.label_audit import (
    audit_summary,
    find_label_issues,
    out_of_fold_probabilities,
    write_label_issues,
)
from imgclf.layout import Layout
from imgclf.params import AuditParams, HeadsParams
from imgclf.splitting import validation_split
from imgclf.stage import stage_main


@stage_main
def main() -> None:
    params = load_params()
    layout = Layout.from_params(params)
    heads, audit = HeadsParams.from_params(params), AuditParams.from_params(params)
    train = load_bottlenecks(layout.bottlenecks, "train")
    fit_idx, _ = validation_split(train.labels, heads.validation_fraction, heads.seed)
    labels = train.labels[fit_idx]
    probabilities = out_of_fold_probabilities(
        train.features[fit_idx], labels, folds=audit.folds, seed=heads.seed, C=audit.C,
        max_iter=audit.max_iter,
    )  # fmt: skip
    rows = find_label_issues(
        train.ids[fit_idx], labels, probabilities, train.classes, filter_by=audit.filter_by
    )
    write_label_issues(layout.label_issues(), rows)
    sheet_rows = [
        {"id": r["id"], "path": (layout.split / r["id"]).as_posix(), "actual": r["label"],
         "predicted": r["suggested"], "confidence": r["p_suggested"]}
        for r in rows
    ]  # fmt: skip
    sheet = contact_sheet(
        sheet_rows, "Label audit (training images)", audit.sheet_max,
        what="labels that look wrong (given -> suggested)", ranked="least likely labels",
        none="no label looks wrong",
    )  # fmt: skip
    atomic_write_bytes(layout.label_issues(".png"), sheet.png)
    if sheet.unreadable:
        print(
            f"audit: {sheet.unreadable} flagged image(s) could not be read from {layout.split} "
            "for the contact sheet (grey placeholders; they are in the list all the same)",
            file=sys.stderr,
        )
    summary = write_metrics(layout.audit_metrics, audit_summary(rows, labels, probabilities,
                                                                train.classes))  # fmt: skip
    use = (
        "the models train without them (heads.drop_label_issues)"
        if heads.drop_label_issues
        else "kept in training (heads.drop_label_issues: false)"
    )
    print(
        f"audit: {summary['label_issues']} of {summary['images_audited']} training images have a "
        f"label that looks wrong ({layout.label_issues()}, .png): {use}; out-of-fold accuracy "
        f"{summary['out_of_fold_accuracy']:.4f}"
    )


if __name__ == "__main__":
    main()
