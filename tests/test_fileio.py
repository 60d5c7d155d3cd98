"""write_metrics/read_metrics: numbers for DVC's metrics, the rest beside them."""

from __future__ import annotations

from imgclf.fileio import info_path, read_json, read_metrics, write_metrics


def test_metrics_keep_the_numbers_and_the_info_file_the_rest(tmp_path):
    payload = {
        "accuracy": 0.9,
        "n": 3,
        "ci_method": "wilson-95",
        "significant": False,  # a flag is not a number to diff
        "per_class": {"a": {"f1": 1.0}},
        "pair": {"b": 2, "mode": "drop"},
        "modes": {"x": "y"},
    }
    path = tmp_path / "evaluate" / "tf.json"
    numbers = write_metrics(path, payload)
    assert (
        read_json(path)
        == numbers
        == {
            "accuracy": 0.9,
            "n": 3,
            "per_class": {"a": {"f1": 1.0}},
            "pair": {"b": 2},
        }
    )
    assert info_path(path) == tmp_path / "evaluate" / "tf.info.json"
    assert read_json(info_path(path)) == {
        "ci_method": "wilson-95",
        "significant": False,
        "pair": {"mode": "drop"},
        "modes": {"x": "y"},
    }
    assert read_metrics(path) == payload

    # Nothing but numbers: the info file is still written (DVC declares it as an output).
    write_metrics(path, {"n": 1})
    assert read_json(info_path(path)) == {}
