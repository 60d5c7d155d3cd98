"""The tables tools/split_seeds.py prints (the whole run is in tests/test_pipeline.py)."""

from __future__ import annotations

from tools.split_seeds import mcnemar_table, summary_table


def test_mcnemar_cells_name_the_counts_and_never_print_p_zero():
    tests = {
        0: {"tf_vs_keras": {"b": 2, "c": 30, "p_value": 0.0}},  # comparison.json's 6 decimals
        1: {"tf_vs_keras": {"b": 5, "c": 9, "p_value": 0.424}},
        2: {},
    }
    table = mcnemar_table(tests)
    assert "| TF vs Keras | 2/30, < 1e-6 * | 5/9, 0.424 | – |" in table
    assert ", 0 *" not in table


def test_summary_keeps_only_models_scored_on_every_seed():
    results = {0: {"tf": 0.9, "keras": 0.8}, 1: {"tf": 0.92}}
    table = summary_table(results)
    assert "| TF | 0.910 ± 0.014 | 0.900 – 0.920 |" in table
    assert "Keras" not in table
