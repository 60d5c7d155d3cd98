"""Where a result came from, as tags shared by its parent and child runs: the git commit and
dirty flag, the dvc.lock hashes of the data and the backbone, the manifests' sha256, the
backbone's weights, the DVC experiment and the folder the stage ran in."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import yaml

from imgclf.fileio import read_json, sha256_file

# The stages whose dvc.lock output hashes identify the data and the backbone of a result.
PROVENANCE_STAGES = ("ingest", "split", "backbone", "bottlenecks")
MAX_TAG = 5000  # MLflow's tag value limit is 8000; stay well inside it


def _git(root: Path, *args: str) -> str | None:
    try:
        return subprocess.run(
            ["git", *args], cwd=root, capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def git_info(workdir: str | Path, ignore: Iterable[str] = ()) -> dict[str, str]:
    """Commit, branch and dirty flag of the checkout the stage runs in.

    Dirty = a git-tracked file differs from the commit, other than dvc.lock and the `ignore`
    prefixes (the metrics the pipeline itself rewrites): a repro always changes those, and they
    are what this run records anyway. params.yaml changed by `dvc exp run -S` does count.
    """
    workdir = Path(workdir)
    commit = _git(workdir, "rev-parse", "HEAD")
    if commit is None:
        return {"git.commit": "none", "git.dirty": "unknown"}
    # Staged or not, every tracked file that differs from HEAD.
    diff = _git(workdir, "diff", "--name-only", "HEAD") or ""
    skip = ("dvc.lock", *ignore)
    changed = sorted(f for f in diff.splitlines() if f and not f.startswith(skip))
    info = {"git.commit": commit, "git.dirty": str(bool(changed)).lower()}
    if changed:
        info["git.changed_files"] = " ".join(changed)[:MAX_TAG]
    branch = _git(workdir, "rev-parse", "--abbrev-ref", "HEAD")
    if branch and branch != "HEAD":
        info["git.branch"] = branch
    return info


def dvc_lock_hashes(
    lock_path: str | Path, stages: Iterable[str] = PROVENANCE_STAGES
) -> dict[str, str]:
    """`dvc.<stage>.<out path>` -> md5 of every output of `stages` in dvc.lock (DVC writes each
    stage's entry as soon as the stage finishes, so the earlier stages are there when `track`
    runs). Missing lock or stage: no tags, not an error (a partly run pipeline)."""
    lock_path = Path(lock_path)
    if not lock_path.is_file():
        return {}
    lock = yaml.safe_load(lock_path.read_text(encoding="utf-8")) or {}
    tags = {}
    for stage in stages:
        for out in (lock.get("stages", {}).get(stage) or {}).get("outs", []) or []:
            digest = out.get("md5") or out.get("hash") or out.get("etag")
            if out.get("path") and digest:
                tags[f"dvc.{stage}.{out['path'].rstrip('/')}"] = str(digest)
    return tags


def provenance_tags(params: Mapping[str, Any], workdir: str | Path) -> dict[str, str]:
    """Git, DVC and data tags shared by the parent and child runs."""
    workdir = Path(workdir)
    paths = params["paths"]
    tags = git_info(workdir, ignore=(f"{paths['metrics']}/",))
    tags.update(dvc_lock_hashes(workdir / "dvc.lock"))
    for key, path in (
        ("data.manifest_sha256", workdir / paths["manifest"]),
        ("data.split_manifest_sha256", workdir / paths["split"] / "manifest.csv"),
    ):
        if path.is_file():
            tags[key] = sha256_file(path)
    backbone_json = workdir / paths["backbone"] / "backbone.json"
    if backbone_json.is_file():
        info = read_json(backbone_json)
        for key in ("sha256", "weights", "preprocessing"):
            if key in info:
                tags[f"backbone.{key}"] = str(info[key])
    for env, tag in (
        ("DVC_EXP_NAME", "dvc.exp_name"),
        ("DVC_EXP_BASELINE_REV", "dvc.exp_baseline_rev"),
        ("DVC_STAGE", "dvc.stage"),
    ):
        if os.environ.get(env):
            tags[tag] = os.environ[env]
    tags["data.source"] = str(params.get("data", {}).get("source", ""))[:MAX_TAG]
    # Where the stage ran: the repository, or a `dvc exp run --temp/--queue` copy of it.
    tags["imgclf.workdir"] = str(workdir.resolve())[:MAX_TAG]
    return tags
