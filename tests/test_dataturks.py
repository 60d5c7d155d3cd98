"""Reading Dataturks exports: schema variants, malformed lines, other task types, real exports."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from imgclf.dataturks import (
    DataturksError,
    DataturksItem,
    is_url,
    local_path,
    original_name,
    read_export,
)
from imgclf.ingest.collect import collect_dataturks
from imgclf.ingest.records import IngestError, IngestOptions


def write_export(path: Path, records: list) -> Path:
    lines = [r if isinstance(r, str) else json.dumps(r) for r in records]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def record(content: str, annotation, status: str | None = "done") -> dict:
    metadata = None if status is None else {"status": status, "evaluation": "NONE"}
    return {"content": content, "annotation": annotation, "extras": None, "metadata": metadata}


def test_label_variants(tmp_path):
    export = write_export(
        tmp_path / "e.json",
        [
            record("a.jpg", {"labels": ["cat"], "note": ""}),
            record("b.jpg", {"label": ["dog"], "notes": "pre-labelled"}),
            record("c.jpg", {"labels": "cat"}),
            record("d.jpg", {"label": " Rosé "}, status=None),  # NFD input below
            record("e.jpg", {"labels": ["cat", "dog", "cat"]}),
            {"content": "f.jpg", "annotation": {"labels": ["cat"]}},  # no metadata at all
            "",  # blank lines are ignored
        ],
    )
    text = export.read_text(encoding="utf-8").replace("Rosé", "Rose\u0301")
    export.write_text(text, encoding="utf-8")
    items = read_export(export)
    assert [(i.line, i.content, i.labels, i.problem) for i in items] == [
        (1, "a.jpg", ("cat",), None),
        (2, "b.jpg", ("dog",), None),
        (3, "c.jpg", ("cat",), None),
        (4, "d.jpg", ("Rosé",), None),
        (5, "e.jpg", ("cat", "dog"), None),
        (6, "f.jpg", ("cat",), None),
    ]
    assert items[3].labels[0] == "Ros\u00e9"  # NFC
    assert items[0].status == "done" and items[3].status is None


@pytest.mark.parametrize("encoding", ["utf-8", "utf-8-sig", "utf-16", "utf-32"])
def test_utf8_or_a_byte_order_mark_and_only_newlines_end_a_line(tmp_path, encoding):
    # Windows PowerShell's `>` writes UTF-16 with a BOM; a JSON string may hold U+2028 and
    # U+0085 unescaped, which are no line ends of JSON Lines.
    records = [
        record("a.jpg", {"labels": ["cat\u2028dog"]}),
        record("b\u0085.jpg", {"labels": ["x"]}),
    ]
    text = "\r\n".join(json.dumps(r, ensure_ascii=False) for r in records) + "\r\n"
    export = tmp_path / "e.json"
    export.write_bytes(text.encode(encoding))  # Python's utf-16 and utf-32 write a BOM
    items = read_export(export)
    assert [(i.line, i.content, i.labels, i.problem) for i in items] == [
        (1, "a.jpg", ("cat\u2028dog",), None),
        (2, "b\u0085.jpg", ("x",), None),
    ]


def test_a_line_that_is_not_utf8_is_one_bad_line(tmp_path):
    good, latin1 = record("a.jpg", {"labels": ["cat"]}), record("café.jpg", {"labels": ["cat"]})
    export = tmp_path / "e.json"
    export.write_bytes(
        (json.dumps(good) + "\n").encode()
        + json.dumps(latin1, ensure_ascii=False).encode("latin-1")
    )
    items = read_export(export)
    assert [(i.line, i.content, i.problem) for i in items] == [
        (1, "a.jpg", None),
        (2, "", "bad_line"),
    ]
    assert items[1].detail.startswith("not UTF-8 text (byte 0xe9 at column 17): ")
    assert "caf\\\\xe9.jpg" in items[1].detail  # the byte shown escaped, in the line's repr
    with pytest.raises(
        DataturksError, match=r"e\.json:2: not UTF-8 text \(byte 0xe9 at column 17\)"
    ):
        read_export(export, on_bad_line="error")


def test_unusable_items_are_reported_not_fatal(tmp_path):
    export = write_export(
        tmp_path / "e.json",
        [
            record("a.jpg", None, status="skipped"),
            record("b.jpg", {"labels": ["cat"]}, status="skipped"),
            record("c.jpg", None, status="NOT_DONE"),
            record("d.jpg", {"labels": []}),
            record("e.jpg", {"labels": ["  "], "note": ""}),
            record("f.jpg", {"labels": [{"x": 1}]}),
            {"annotation": {"labels": ["cat"]}},
        ],
    )
    items = read_export(export)
    assert [(i.line, i.problem) for i in items] == [
        (1, "skipped"),
        (2, "skipped"),
        (3, "unlabelled"),
        (4, "unlabelled"),
        (5, "unlabelled"),
        (6, "bad_label"),
        (7, "bad_item"),
    ]
    assert "NOT_DONE" in items[2].detail


def test_malformed_line_is_reported_with_its_number(tmp_path):
    export = write_export(
        tmp_path / "e.json",
        [
            record("a.jpg", {"labels": ["cat"]}),
            record("b.jpg", {"labels": ["dog"]}),
            '{"content": "c.jpg", "annot',
        ],
    )
    with pytest.raises(DataturksError, match=r"e\.json:3: invalid JSON .*fix or delete that line"):
        read_export(export, on_bad_line="error")
    items = read_export(export)  # skip, the default: the good lines are kept
    assert [(i.line, i.problem) for i in items] == [(1, None), (2, None), (3, "bad_line")]
    assert items[2].detail.startswith("invalid JSON (") and "annot" in items[2].detail
    write_export(export, [record("a.jpg", {"labels": ["cat"]}), '["not", "an", "object"]'])
    with pytest.raises(DataturksError, match=r"e\.json:2: expected a JSON object"):
        read_export(export, on_bad_line="error")
    assert read_export(export)[1].problem == "bad_line"


def test_labels_that_share_a_class_folder_name_their_first_lines_before_any_download(tmp_path):
    # Nothing listens on port 9 of the loopback: had the URLs been fetched, the export would
    # have come back as skipped downloads instead of this error.
    url = "http://127.0.0.1:9/{}.jpg".format
    export = write_export(
        tmp_path / "e.json",
        [
            record(url("a"), {"labels": ["rose"]}),
            record(url("b"), None, status="skipped"),
            record(url("c"), {"labels": ["Daisy"]}),
            record(url("d"), {"labels": ["rose"]}),
            record(url("e"), {"labels": [" daisy"]}),
            record(url("f"), {"labels": ["Daisy"]}),
            record(url("g"), {"labels": ["daisy"]}),
        ],
    )
    with pytest.raises(IngestError) as info:
        collect_dataturks(export, IngestOptions())
    text = str(info.value)
    assert text.startswith(f"{export}: different labels would share one class folder"), text
    assert "'Daisy' -> 'Daisy' (first on line 3), 'daisy' -> 'daisy' (first on line 5)" in text
    assert "Rename the labels (in the export" in text
    assert "rose" not in text


def test_json_array_export(tmp_path):
    path = tmp_path / "e.json"
    path.write_text(json.dumps([record("a.jpg", {"labels": ["cat"]})]), encoding="utf-8")
    assert read_export(path) == [DataturksItem(1, "a.jpg", ("cat",), "done")]


def test_bounding_box_export_is_refused(tmp_path):
    boxes = [
        {
            "label": ["Face"],
            "notes": "",
            "points": [{"x": 0.1, "y": 0.2}, {"x": 0.3, "y": 0.4}],
            "imageWidth": 100,
            "imageHeight": 80,
        }
    ]
    export = write_export(
        tmp_path / "boxes.json",
        [record("a.jpg", None), record("b.jpg", boxes), record("c.jpg", [])],
    )
    with pytest.raises(DataturksError) as info:
        read_export(export)
    message = str(info.value)
    assert "boxes.json:2: not an image-classification export" in message
    assert "bounding boxes" in message and "IMAGE_BOUNDING_BOX" in message


def test_real_bbox_export_is_refused(shared_datasets):
    export = shared_datasets / "dataturks" / "tcs_face_recognition_bbox.json"
    with pytest.raises(DataturksError, match=r"bbox\.json:1: not an image-classification export"):
        read_export(export)


def test_real_classification_export(shared_datasets):
    items = read_export(shared_datasets / "dataturks" / "gaa_county_classification.json")
    assert len(items) == 277
    assert all(len(i.labels) == 1 and i.problem is None for i in items)
    assert len({i.labels[0] for i in items}) == 4
    assert all(is_url(i.content) for i in items)
    assert original_name(items[0].content) == "county_player_1.jpg"


def test_original_names_and_locations(tmp_path):
    url = (
        "http://com.dataturks.a96-i23.open.s3.amazonaws.com/2c9fafb06477f4cb0164895548a600a3/"
        "66127d05-93eb-498f-bac3-85a19bcbbbc7___2538464.main_image.jpg.jpeg"
    )
    assert original_name(url) == "2538464.main_image.jpg.jpeg"
    assert original_name("https://h/x/my%20photo.png?sig=1") == "my photo.png"
    assert original_name("https://h/x/plain___name.png") == "plain___name.png"
    assert original_name("sub/dir/a.jpg") == "a.jpg"
    assert original_name("file:///tmp/x/b.gif") == "b.gif"
    assert is_url("HTTPS://h/a.jpg") and not is_url("file:///a.jpg") and not is_url("a.jpg")
    assert local_path("sub/a.jpg", tmp_path) == tmp_path / "sub" / "a.jpg"
    assert local_path((tmp_path / "a b.jpg").as_uri(), Path("/elsewhere")) == tmp_path / "a b.jpg"
    assert local_path(str(tmp_path / "abs.jpg"), Path("/elsewhere")) == tmp_path / "abs.jpg"
