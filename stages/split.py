"""Stage split: the ingested images -> stratified train/ and test/ trees + a split manifest."""

from __future__ import annotations

from pathlib import Path

from imgclf.config import load_params
from imgclf.fileio import read_csv, write_csv, write_metrics
from imgclf.params import SplitParams
from imgclf.splitting import (
    SplitError,
    assign_subsets,
    check_training_images,
    given_subsets,
    split_summary,
    write_split_trees,
)
from imgclf.stage import stage_main


@stage_main
def main() -> None:
    params = load_params()
    paths, cfg = params["paths"], SplitParams.from_params(params)
    rows = read_csv(paths["manifest"])
    if not rows:
        raise SplitError(f"{paths['manifest']} lists no images; run the ingest stage first.")
    subsets = given_subsets(rows, min_per_class=cfg.min_per_class)
    given = subsets is not None
    if subsets is None:
        subsets = assign_subsets(
            rows,
            test_fraction=cfg.test_fraction,
            seed=cfg.seed,
            min_per_class=cfg.min_per_class,
        )
    check_training_images(rows, subsets, given=given)
    split_dir = Path(paths["split"])
    split_rows = write_split_trees(rows, subsets, Path(paths["images"]), split_dir)
    write_csv(split_dir / "manifest.csv", [*rows[0].keys(), "subset"], split_rows)
    summary = split_summary(split_rows, cfg.test_fraction, given=given)
    write_metrics(Path(paths["metrics"]) / "split.json", summary)
    how = ""
    if given:
        sources = {
            s: ", ".join(f"{f}/" for f in folders) for s, folders in summary["given_from"].items()
        }
        how = (
            f"; your pre-split tree's split, kept (train from {sources['train']}, test from "
            f"{sources['test']}; split.test_fraction and split.seed unused)"
        )
        if summary["classes_without_test"]:
            how += f"; no test image for {', '.join(summary['classes_without_test'])}"
    print(
        f"split: {summary['train']} train, {summary['test']} test images "
        f"in {summary['classes']} classes (test share {summary['test_fraction']:.3f}){how}"
    )


if __name__ == "__main__":
    main()
