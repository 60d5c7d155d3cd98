"""A `dvc plots show/diff` page that renders without internet.

DVC's default page loads vega, vega-lite and vega-embed from a CDN, so offline its Vega charts
stay blank and only the PNGs show. This writes `.dvc/plots/offline.html`, DVC's page with the
three libraries inlined, and points DVC at it (`plots.html_template` in `.dvc/config.local`, so
a clone without the file falls back to DVC's own page instead of failing).

The libraries come from the npm registry at the versions DVC itself loads, each tarball checked
against a pinned sha256, and are cached in the user cache (`downloads/`).

    python -m imgclf.offline_plots          # or: make plots (also builds it); make setup
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tarfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from imgclf.downloads import DownloadError, download_file
from imgclf.fileio import atomic_write_bytes, sha256_file

REGISTRY = "https://registry.npmjs.org"
# Relative to .dvc/, as DVC reads `plots.html_template`.
TEMPLATE = Path("plots") / "offline.html"


@dataclass(frozen=True)
class JsPackage:
    name: str
    version: str
    sha256: str  # of the registry tarball
    member: str  # the browser build inside it (the file the CDN serves)

    def url(self, registry: str = REGISTRY) -> str:
        return f"{registry}/{self.name}/-/{self.name}-{self.version}.tgz"


# The versions dvc_render's default page loads (its Vega-Lite specs are written for them).
PACKAGES = (
    JsPackage(
        "vega",
        "5.20.2",
        "d77deab01d6104b1239228720721f93003e60797d2faced7ffdd759fa70f989d",
        "package/build/vega.min.js",
    ),
    JsPackage(
        "vega-lite",
        "5.2.0",
        "f64ca4745f043447ac86b67dc9e9592ec2b85ac8b8dafc35faf970f142463e4b",
        "package/build/vega-lite.min.js",
    ),
    JsPackage(
        "vega-embed",
        "6.18.2",
        "93aeee312e92077b0252ef026c0fe0ec8fa430c19825aeada6cd3a6804e68e1b",
        "package/build/vega-embed.min.js",
    ),
)

# dvc_render's PAGE_HTML without `{scripts}` (where DVC would add the CDN tags).
PAGE = """<!DOCTYPE html>
<html>
<head>
    {refresh_tag}
    <meta charset="utf-8">
    <title>DVC Plot</title>
    <!-- {provenance}: inlined by imgclf/offline_plots.py, no network needed -->
{inline_scripts}
    <style>
        table {
            border-spacing: 15px;
        }
    </style>
</head>
<body>
    {plot_divs}
</body>
</html>
"""


class OfflinePlotsError(RuntimeError):
    """A library could not be fetched or did not match its pin; the message says what to do."""


def fetch_js(
    packages: Sequence[JsPackage] = PACKAGES, *, registry: str = REGISTRY
) -> dict[str, str]:
    """name -> the package's browser build, from the cached or freshly downloaded tarball,
    each checked against its pinned sha256."""
    scripts = {}
    for pkg in packages:
        url = pkg.url(registry)
        try:
            tarball = download_file(url, timeout_s=60, retries=2)
        except DownloadError as e:
            raise OfflinePlotsError(f"{pkg.name}@{pkg.version}: {e}") from None
        found = sha256_file(tarball)
        if found != pkg.sha256:
            tarball.unlink()  # the next run downloads it again instead of failing the same way
            raise OfflinePlotsError(
                f"{url}: sha256 {found}, expected {pkg.sha256} (pinned in "
                f"imgclf/offline_plots.py); the download was removed. Retry; if it persists, "
                "the registry serves other bytes than the pinned release: do not use them."
            )
        with tarfile.open(tarball, "r:gz") as tar:
            try:
                member = tar.extractfile(pkg.member)
            except KeyError:
                member = None
            if member is None:
                raise OfflinePlotsError(f"{url}: no file {pkg.member} in the tarball")
            scripts[pkg.name] = member.read().decode("utf-8")
    return scripts


def page_html(scripts: Mapping[str, str], provenance: str) -> str:
    """DVC's plots page with `scripts` (name -> JavaScript) inlined, in the given order."""
    blocks = []
    for name, code in scripts.items():
        # Either would end the <script> element early, or be filled in by DVC's page templating.
        for bad in ("</script", "{plot_divs}", "{refresh_tag}", "{scripts}"):
            if bad in code:
                raise OfflinePlotsError(f"{name}: its code contains {bad!r}; it cannot be inlined")
        blocks.append(f'    <script type="text/javascript">\n{code}\n    </script>')
    return PAGE.replace("{provenance}", provenance).replace("{inline_scripts}", "\n".join(blocks))


def build_template(
    dvc_dir: str | Path,
    packages: Sequence[JsPackage] = PACKAGES,
    *,
    registry: str = REGISTRY,
) -> Path:
    """Write `<dvc_dir>/plots/offline.html`; returns its path."""
    scripts = fetch_js(packages, registry=registry)
    provenance = ", ".join(f"{p.name} {p.version} (sha256 {p.sha256[:12]}...)" for p in packages)
    path = Path(dvc_dir) / TEMPLATE
    atomic_write_bytes(path, page_html(scripts, provenance).encode("utf-8"))
    return path


def use_template(repo: str | Path) -> None:
    """Point this checkout's DVC at the template (`.dvc/config.local`, not committed)."""
    subprocess.run(
        [sys.executable, "-m", "dvc", "config", "--local", "plots.html_template", str(TEMPLATE)],
        cwd=repo,
        check=True,
    )


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repo", default=".", help="the repository root (default: here)")
    parser.add_argument("--force", action="store_true", help="rebuild an existing template")
    args = parser.parse_args(argv)
    repo = Path(args.repo)
    path = repo / ".dvc" / TEMPLATE
    if args.force or not path.is_file():
        try:
            build_template(repo / ".dvc")
        except OfflinePlotsError as e:
            sys.exit(
                f"offline_plots: {e}\n`dvc plots show` keeps DVC's own page, which loads the "
                "libraries from a CDN (blank Vega charts without internet)."
            )
        print(f"offline_plots: wrote {path} ({path.stat().st_size:,} bytes)")
    use_template(repo)
    print(f"offline_plots: `dvc plots show/diff` use {path} (plots.html_template, config.local)")


if __name__ == "__main__":
    main()
