"""`dvc plots show/diff`: the offline page (imgclf/offline_plots.py) and the project's plot
definitions (dvc.yaml's top-level `plots:` with the templates in .dvc/plots/), rendered by
the real DVC in a small scratch repository."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import re
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import yaml

from imgclf import offline_plots
from imgclf.offline_plots import JsPackage, OfflinePlotsError
from tests.http_server import LoopbackServer

ROOT = Path(__file__).resolve().parents[1]
DVC = [sys.executable, "-m", "dvc"]
CLASSES = ("daisy", "roses", "tulips")


def npm_tarball(member: str, code: str) -> bytes:
    """A registry-style tarball holding one file, `package/...`."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        data = code.encode()
        info = tarfile.TarInfo(member)
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def fake_packages(codes: dict[str, str]) -> tuple[dict[str, bytes], list[JsPackage]]:
    files, packages = {}, []
    for name, code in codes.items():
        blob = npm_tarball(f"package/build/{name}.min.js", code)
        files[f"{name}/-/{name}-1.0.0.tgz"] = blob
        packages.append(
            JsPackage(
                name, "1.0.0", hashlib.sha256(blob).hexdigest(), f"package/build/{name}.min.js"
            )
        )
    return files, packages


def run(cmd: list[str], cwd: Path) -> str:
    done = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    assert done.returncode == 0, f"{' '.join(cmd)} failed:\n{done.stdout}\n{done.stderr}"
    return done.stdout


def scratch_repo(path: Path) -> Path:
    """A git + DVC repo with the project's plot definitions and templates, and small CSVs in
    the formats the pipeline writes."""
    run(["git", "init", "-q"], path)
    run([*DVC, "init", "-q"], path)
    project = yaml.safe_load((ROOT / "dvc.yaml").read_text())
    # The PNG entries need real images; they are not what this checks.
    plots = [p for p in project["plots"] if isinstance(p, dict)]
    (path / "dvc.yaml").write_text(yaml.safe_dump({"plots": plots}, sort_keys=False))
    shutil.copytree(ROOT / ".dvc" / "plots", path / ".dvc" / "plots", dirs_exist_ok=True)
    (path / ".dvc" / "plots" / "offline.html").unlink(missing_ok=True)
    curves = path / "metrics" / "curves"
    curves.mkdir(parents=True)
    columns = ["epoch", "train_loss", "val_loss", "train_accuracy", "val_accuracy"]
    for head, epochs in (("tf", [0.5, 1.0, 1.5]), ("keras", [1.0, 2.0])):
        with open(curves / f"{head}.csv", "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(columns)
            writer.writerows([e, 1 / e, 1.2 / e, 0.5, 0.4] for e in epochs)
    confusion = path / "metrics" / "confusion"
    confusion.mkdir()
    for head in ("tf", "keras", "sklearn"):
        with open(confusion / f"{head}.csv", "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["actual", "predicted"])
            # Every actual class predicted as the first one: a lopsided matrix shows the axes.
            writer.writerows([c, CLASSES[0]] for c in CLASSES)
    return path


def test_fetch_checks_the_pin_and_builds_a_page_without_remote_scripts(tmp_path):
    files, packages = fake_packages({"vega": "var VEGA=1;", "vega-lite": "var VL=2;"})
    with LoopbackServer(files) as srv:
        registry = srv.url("").rstrip("/")
        page = offline_plots.build_template(tmp_path, packages, registry=registry)
    html = page.read_text()
    assert html.index("var VEGA=1;") < html.index("var VL=2;")
    assert "{plot_divs}" in html and "{scripts}" not in html
    assert not re.search(r"<script[^>]*\bsrc=", html)

    # A tarball that is not the pinned one is refused, and removed from the cache.
    wrong = [JsPackage("vega", "1.0.0", "0" * 64, "package/build/vega.min.js")]
    with LoopbackServer(files) as srv, pytest.raises(OfflinePlotsError, match="expected 0000"):
        offline_plots.fetch_js(wrong, registry=srv.url("").rstrip("/"))
    with LoopbackServer(files) as srv:
        assert offline_plots.fetch_js(packages[:1], registry=srv.url("").rstrip("/")) == {
            "vega": "var VEGA=1;"
        }


def test_code_that_would_break_the_page_is_refused():
    with pytest.raises(OfflinePlotsError, match="</script"):
        offline_plots.page_html({"vega": "x = '</script>';"}, "test")
    with pytest.raises(OfflinePlotsError, match="plot_divs"):
        offline_plots.page_html({"vega": "x = '{plot_divs}';"}, "test")


def test_the_pins_are_dvcs_own_library_versions():
    # DVC's Vega-Lite specs are written for the versions its own page loads.
    from dvc_render.vega import VegaRenderer

    for pkg in offline_plots.PACKAGES:
        assert f'npm/{pkg.name}@{pkg.version}"' in VegaRenderer.SCRIPTS


@pytest.mark.slow
def test_dvc_plots_show_with_the_page_loads_nothing_from_the_network(tmp_path):
    repo = scratch_repo(tmp_path)
    page = offline_plots.page_html({"vega": "var INLINE_VEGA = 1;"}, "test")
    (repo / ".dvc" / "plots" / "offline.html").write_text(page)
    # As `python -m imgclf.offline_plots` configures it: plain `dvc plots show` uses the page.
    offline_plots.use_template(repo)
    run([*DVC, "plots", "show", "-o", "out"], repo)
    html = (repo / "out" / "index.html").read_text()
    assert "INLINE_VEGA" in html and "vegaEmbed(" in html
    assert not re.search(r"<script[^>]*\bsrc=", html), "a script is loaded from elsewhere"


@pytest.mark.slow
def test_curves_share_the_epoch_axis_and_confusions_match_the_pngs(tmp_path):
    repo = scratch_repo(tmp_path)
    shown = json.loads(run([*DVC, "plots", "show", "--json"], repo))["data"]

    for name, y_title in (("loss", "loss"), ("accuracy", "accuracy")):
        spec = shown[f"training curves ({name})"][0]["content"]
        enc = spec["encoding"]
        assert enc["x"]["field"] == "epoch" and enc["x"]["title"] == "epoch"
        assert y_title in enc["y"]["title"]
        # One colour per head: the colour field is computed from the file name, not the rev.
        assert enc["color"]["field"] == "head"
        assert any("datum['filename::field']" in t.get("calculate", "") for t in spec["transform"])
        series = {row["filename::field"] for row in spec["data"]["values"]}
        assert {s.split("::")[0] for s in series} == {"tf.csv", "keras.csv"}

    for head in ("tf", "keras", "sklearn"):
        spec = shown[f"confusion ({head})"][0]["content"]["spec"]
        # imgclf/reports.py's PNG: actual on the y axis (rows), predicted on x (columns).
        assert spec["encoding"]["x"]["field"] == "predicted"
        assert spec["encoding"]["y"]["field"] == "actual"
        assert spec["encoding"]["y"]["title"] == "actual"
        text = [layer for layer in spec["layer"] if layer.get("mark") == "text"]
        # The counts are drawn, not hidden behind DVC's "showValues" checkbox.
        assert text and text[0]["encoding"]["text"] == {"field": "xy_count", "type": "quantitative"}
