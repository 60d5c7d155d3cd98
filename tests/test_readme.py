"""The project's Markdown documents: every in-page link lands on a heading or an anchor, and
every relative link names a file of the repository. (One README link once used a slug GitHub
does not make, `80-20` for `80/20`, and led nowhere.)"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCUMENTS = sorted(
    p.relative_to(ROOT).as_posix() for pattern in ("*.md", "docs/*.md") for p in ROOT.glob(pattern)
)
FENCE = re.compile(r"^```.*?^```", re.M | re.S)
LINK = re.compile(r"\]\(([^)\s]+)\)")


def github_slug(heading: str) -> str:
    """The anchor GitHub gives a heading: lower case, inline code and link marks dropped, every
    character but letters, digits, `_`, `-` and spaces removed, spaces turned into hyphens."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading).lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(markdown: str) -> set[str]:
    """Every anchor a page offers: its headings' slugs (a repeated one gets `-1`, `-2`, as on
    GitHub) and explicit `<a id>`/`<a name>` tags."""
    text = FENCE.sub("", markdown)
    found: set[str] = set()
    for heading in re.findall(r"^#{1,6} +(.+?) *#*$", text, re.M):
        slug, n = github_slug(heading), 1
        while slug in found:
            slug, n = f"{github_slug(heading)}-{n}", n + 1
        found.add(slug)
    return found | set(re.findall(r"<a (?:id|name)=\"([^\"]+)\"", text))


def test_the_slugs_are_githubs():
    assert github_slug("The answer (flower photos, 80/20 split, default recipes)") == (
        "the-answer-flower-photos-8020-split-default-recipes"
    )
    assert github_slug("Activations: the cut's feature maps, every view cached") == (
        "activations-the-cuts-feature-maps-every-view-cached"
    )
    assert github_slug("On the full set: about 94%, short of the 95% target") == (
        "on-the-full-set-about-94-short-of-the-95-target"
    )
    assert anchors("# A\n## A\n```\n# not a heading\n```\n") == {"a", "a-1"}


@pytest.mark.parametrize("document", DOCUMENTS)
def test_every_link_lands(document):
    markdown = (ROOT / document).read_text(encoding="utf-8")
    offered = anchors(markdown)
    broken = []
    for target in LINK.findall(FENCE.sub("", markdown)):
        if re.match(r"[a-z]+:", target):  # http(s), mailto: not checked offline
            continue
        path, _, anchor = target.partition("#")
        linked = (ROOT / document).parent / path
        if path and not linked.exists():
            broken.append(f"{target}: no file {path}")
        elif anchor and not path and anchor not in offered:
            broken.append(f"{target}: no heading or <a id> makes #{anchor}")
        elif anchor and path and anchor not in anchors(linked.read_text("utf-8")):
            broken.append(f"{target}: {path} has no #{anchor}")
    assert not broken, f"{document}: links that lead nowhere:\n" + "\n".join(broken)
