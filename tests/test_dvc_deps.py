"""dvc.yaml deps cover the code each stage runs, so a change reruns exactly what it changes.

A stage's code is the import closure of `stages/<name>.py` (its `cmd` is
`python -m stages.<name>`) inside this repository, computed from the source with `ast`:
every `import` / `from ... import`, also inside functions, plus the packages' `__init__.py`
files that Python runs on the way. A function that loads modules by name
(`importlib.import_module`) counts as importing every module of its package, for the stages
that use that function. The model registry (imgclf/registry.py) resolves each model's
functions by name too: a stage that imports it and calls a loader (`spec.function(...)`,
`spec.load_module()`) runs every registered model's module, except
`python -m stages.train <model>` (the `foreach` stages train@<model>), which runs that model's
only, and a fine-tuned model's own stage (`python -m stages.<model>`), which runs its model's
module and its base head's (the start it loads, or refits). A file is covered by a dep naming
it or a folder above it.
"""

from __future__ import annotations

import ast
import copy
import json
import re
from collections.abc import Iterable, Mapping
from functools import cache
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
CODE_DIRS = ("imgclf", "stages")
_CMD = re.compile(r"^python -m stages\.(\w+)(?: (\w+))?$")
REGISTRY = ROOT / "imgclf" / "registry.py"


def load_dvc_stages(root: Path = ROOT) -> dict[str, dict]:
    """dvc.yaml's stages with `${...}` resolved from params.yaml and each `foreach` expanded
    into its stages (`train@tf`...), as DVC does."""
    params = yaml.safe_load((root / "params.yaml").read_text(encoding="utf-8"))
    text = (root / "dvc.yaml").read_text(encoding="utf-8")

    def substitute(match: re.Match[str]) -> str:
        if match.group(1) == "item":  # filled in per `foreach` item below
            return match.group(0)
        value: object = params
        for part in match.group(1).split("."):
            assert isinstance(value, Mapping) and part in value, f"dvc.yaml: no param {part}"
            value = value[part]
        return json.dumps(value) if isinstance(value, list) else str(value)

    stages = yaml.safe_load(re.sub(r"\$\{([\w.]+)\}", substitute, text))["stages"]
    expanded = {}
    for name, stage in stages.items():
        if "foreach" not in stage:
            expanded[name] = stage
            continue
        body = yaml.safe_dump(stage["do"])
        for item in stage["foreach"]:
            expanded[f"{name}@{item}"] = yaml.safe_load(body.replace("${item}", str(item)))
    return expanded


def registered_modules() -> dict[str, Path]:
    """model name -> its module's file, from the registry."""
    from imgclf.registry import MODELS

    files = {name: _module_file(spec.module) for name, spec in MODELS.items()}
    missing = [name for name, f in files.items() if f is None]
    assert not missing, f"registered models whose module is not in the repo: {missing}"
    return files  # type: ignore[return-value]


def _module_file(name: str) -> Path | None:
    """The repo file of module `name` (a.b.c), or None when it is not ours."""
    if name.split(".")[0] not in CODE_DIRS:
        return None
    base = ROOT.joinpath(*name.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _with_packages(name: str) -> list[Path]:
    """Module `name` and the `__init__.py` of every package above it (Python runs them)."""
    parts = name.split(".")
    files = [_module_file(".".join(parts[:i])) for i in range(1, len(parts) + 1)]
    return [f for f in files if f is not None]


def _module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
    return ".".join(parts)


def _called_names(node: ast.AST) -> frozenset[str]:
    """The names of the functions and methods called under `node` (`f(...)`: f, `x.m(...)`: m),
    TensorFlow's `tf.function` aside (a decorator, not the registry's loader)."""
    return frozenset(
        c.func.id if isinstance(c.func, ast.Name) else c.func.attr
        for c in ast.walk(node)
        if isinstance(c, ast.Call)
        and (
            isinstance(c.func, ast.Name)
            or (isinstance(c.func, ast.Attribute) and ast.unparse(c.func.value) != "tf")
        )
    )


@cache
def _dynamic_loaders(path: Path) -> frozenset[str]:
    """Functions of `path` that (directly or via one another) call importlib.import_module."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    functions = {n.name: n for n in tree.body if isinstance(n, ast.FunctionDef)}
    calls = {name: _called_names(fn) for name, fn in functions.items()}
    loaders = {name for name, called in calls.items() if "import_module" in called}
    while True:
        more = {name for name, called in calls.items() if called & loaders} - loaders
        if not more:
            return frozenset(loaders)
        loaders |= more


def _package_modules(path: Path) -> list[Path]:
    return sorted(path.parent.glob("*.py"))


@cache
def _imports(path: Path) -> frozenset[Path]:
    """The repo files that running `path` may import."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[Path] = set()
    imported_modules: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                found.update(_with_packages(alias.name))
                imported_modules.add(alias.name)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join([*base, node.module] if node.module else base)
            else:
                module = node.module or ""
            found.update(_with_packages(module))
            target = _module_file(module)
            for alias in node.names:
                sub = _module_file(f"{module}.{alias.name}")
                if sub is not None:  # `from pkg import submodule`
                    found.add(sub)
                elif target is not None and alias.name in _dynamic_loaders(target):
                    found.update(_package_modules(target))
        elif isinstance(node, ast.Attribute) and isinstance(node.value, ast.Attribute | ast.Name):
            # `import imgclf.heads` ... `imgclf.heads.head_module(...)`
            owner = ast.unparse(node.value)
            target = _module_file(owner) if owner in imported_modules else None
            if target is not None and node.attr in _dynamic_loaders(target):
                found.update(_package_modules(target))
    return frozenset(found)


def closure(start: Path) -> set[Path]:
    """Every repo file reachable from `start` through imports (start included)."""
    seen: set[Path] = set()
    todo = [start, *_with_packages(_module_name(start))]
    while todo:
        path = todo.pop()
        if path in seen:
            continue
        seen.add(path)
        todo.extend(_imports(path) - seen)
    return seen


# The registry's methods that import a model's module; its data (names, kinds, bases, cuts)
# and params classes (imgclf/params.py) import none.
MODEL_LOADERS = frozenset({"function", "load_module"})


@cache
def _calls(path: Path) -> frozenset[str]:
    """The names of the functions and methods `path` calls."""
    return _called_names(ast.parse(path.read_text(encoding="utf-8")))


def stage_code(stage: Mapping) -> set[str]:
    """The repo files (relative, posix) that the stage's command runs."""
    match = _CMD.match(stage["cmd"].strip())
    assert match, f"unexpected cmd {stage['cmd']!r}: expected `python -m stages.<name>`"
    files = closure(ROOT / "stages" / f"{match.group(1)}.py")
    if REGISTRY in files and any(_calls(f) & MODEL_LOADERS for f in files - {REGISTRY}):
        modules = registered_modules()
        model = match.group(2)
        assert model is None or model in modules, f"{stage['cmd']!r}: {model} is not registered"
        runs = set(modules) if model is None else {model}
        if model is None and match.group(1) in modules:  # a fine-tuned model's own stage
            from imgclf.registry import get_model

            runs = {match.group(1), get_model(match.group(1)).base}
        for name, module in modules.items():
            if name in runs:
                files |= closure(module)
    return {p.relative_to(ROOT).as_posix() for p in files}


def covered(file: str, deps: Iterable[str]) -> bool:
    parents = {file, *(p.as_posix() for p in Path(file).parents)}
    return any(dep.rstrip("/") in parents for dep in deps)


def uncovered(stages: Mapping[str, Mapping]) -> dict[str, list[str]]:
    """Per stage, the files it runs that none of its deps covers."""
    report = {}
    for name, stage in stages.items():
        deps = stage.get("deps", [])
        missing = sorted(f for f in stage_code(stage) if not covered(f, deps))
        if missing:
            report[name] = missing
    return report


def test_every_stage_depends_on_the_code_it_runs():
    missing = uncovered(load_dvc_stages())
    assert not missing, "dvc.yaml deps miss code the stage runs (add them):\n" + "\n".join(
        f"  {stage}: {', '.join(files)}" for stage, files in missing.items()
    )


# Code a stage runs without importing it: MLflow loads the end-to-end models' code from its path.
RUN_AS_FILES = {"imgclf/end_to_end.py": {"imgclf/served_model.py"}}


def unused_code_deps(stages: Mapping[str, Mapping]) -> dict[str, list[str]]:
    """Per stage, the code deps that cover nothing the stage runs."""
    report = {}
    for name, stage in stages.items():
        code = stage_code(stage)
        code |= {f for runner, files in RUN_AS_FILES.items() if runner in code for f in files}
        unused = [
            dep
            for dep in stage.get("deps", [])
            if dep.startswith(("imgclf/", "stages/")) and not any(covered(f, [dep]) for f in code)
        ]
        if unused:
            report[name] = unused
    return report


def test_no_stage_depends_on_code_it_does_not_run():
    # Such a dep reruns the stage for nothing: export@<model> (minutes each) reran for a change
    # to evaluate's report, which it listed and never imported.
    unused = unused_code_deps(load_dvc_stages())
    assert not unused, "dvc.yaml deps name code the stage never runs (remove them):\n" + (
        "\n".join(f"  {stage}: {', '.join(files)}" for stage, files in unused.items())
    )
    stages = load_dvc_stages()
    stages["split"]["deps"].append("imgclf/litert.py")
    assert unused_code_deps(stages) == {"split": ["imgclf/litert.py"]}


def test_a_removed_dep_is_caught():
    stages = load_dvc_stages()
    checked = 0
    for name, stage in stages.items():
        for dep in stage.get("deps", []):
            code = {f for f in stage_code(stage) if covered(f, [dep])}
            if not code:
                continue  # data, or code read rather than run
            broken = copy.deepcopy(stages)
            broken[name]["deps"].remove(dep)
            report = uncovered(broken)
            assert name in report and code <= set(report[name]), (name, dep)
            checked += 1
    assert checked >= 20


def test_closure_follows_the_kinds_of_import_we_use():
    bottlenecks = stage_code(load_dvc_stages()["bottlenecks"])
    # `from imgclf.splitting import SUBSETS`, and inception -> torchscript, two levels down.
    assert {"imgclf/splitting.py", "imgclf/torchscript.py", "imgclf/__init__.py"} <= bottlenecks
    assert "stages/__init__.py" in bottlenecks
    # Heads are loaded by name (importlib) only where a stage uses head_module/load_predictor.
    evaluate = stage_code(load_dvc_stages()["evaluate"])
    assert "imgclf/heads/keras_head.py" in evaluate
    train_tf = stage_code(load_dvc_stages()["train@tf"])
    assert "imgclf/heads/tf_head.py" in train_tf
    assert "imgclf/heads/keras_head.py" not in train_tf
    # A fine-tuned model's stage runs its own module and its base head's, not the other models'.
    finetune_keras = stage_code(load_dvc_stages()["finetune_keras"])
    assert {"imgclf/finetune/finetune_keras.py", "imgclf/heads/keras_head.py"} <= finetune_keras
    assert not {"imgclf/heads/tf_head.py", "imgclf/heads/sklearn_head.py"} & finetune_keras
    assert "imgclf/heads/sklearn_head.py" not in stage_code(load_dvc_stages()["finetune_tf"])


@pytest.mark.parametrize("name", sorted(load_dvc_stages()))
def test_stage_commands_are_stage_modules(name):
    stage = load_dvc_stages()[name]
    assert _CMD.match(stage["cmd"].strip()), stage["cmd"]


def test_a_models_export_depends_on_that_model_alone():
    # export@<model> converts one model: another model's new weights must not rerun it (each
    # export costs minutes), while its own must.
    from imgclf.registry import MODELS

    params = yaml.safe_load((ROOT / "params.yaml").read_text(encoding="utf-8"))
    exports = {n.split("@")[1]: s for n, s in load_dvc_stages().items() if n.startswith("export@")}
    assert set(exports) == set(params["litert"]["models"])
    for model, stage in exports.items():
        reads = {
            m for m in MODELS if covered(f"{params['paths']['models']}/heads/{m}/x", stage["deps"])
        }
        assert reads == {model}, f"export@{model} depends on the model folders of {sorted(reads)}"


def test_the_committed_lock_names_only_the_pipelines_stages():
    # DVC never drops a dvc.lock entry whose stage is gone: a stale entry in the committed lock
    # would sit in every user's lock after their first run (train_tf, train_keras and
    # train_sklearn did, for weeks after the train@<model> stages replaced them).
    lock = yaml.safe_load((ROOT / "dvc.lock").read_text(encoding="utf-8"))["stages"]
    stale = sorted(set(lock) - set(load_dvc_stages()))
    assert not stale, (
        f"dvc.lock has entries for stages dvc.yaml no longer has: {stale}; delete them, or "
        "refresh the lock (`dvc commit -f` in a workspace where the whole pipeline has run)"
    )


def test_a_models_params_rerun_only_its_stages_then_evaluate_and_track():
    # The rule, asked of DVC's own stage graph: changing a model's params block reruns
    # the stages that read it, then only the stages downstream of those (each fine-tune stage
    # also reads its base head's block, for refit_head). `tests/test_pipeline.py` runs one such
    # `make exp` for real.
    import networkx as nx
    from dvc.repo import Repo

    from imgclf.registry import MODELS

    params = yaml.safe_load((ROOT / "params.yaml").read_text(encoding="utf-8"))
    exports = {f"export@{m}" for m in params["litert"]["models"]}
    with Repo(str(ROOT)) as repo:
        graph = repo.index.graph
        by_name = {stage.addressing: stage for stage in graph}

        def readers(block: str) -> set[str]:
            return {
                name
                for name, stage in by_name.items()
                for dep in stage.params
                for key in dep.params
                if key == block or key.startswith(f"{block}.")
            }

        def rerun(block: str) -> set[str]:
            direct = readers(block)
            return direct | {s.addressing for n in direct for s in nx.ancestors(graph, by_name[n])}

        for name in [*params["models"], *params["finetune_models"]]:
            spec = MODELS[name]
            own = name if spec.inputs == "activations" else f"train@{name}"
            block = spec.section
            finetunes = {f for f in params["finetune_models"] if MODELS[f].base == name}
            expected = {own, *finetunes, "evaluate", "track"} | (
                exports & {f"export@{m}" for m in (name, *finetunes)}
            )
            reruns = rerun(block)
            assert reruns == expected, (block, sorted(reruns))
