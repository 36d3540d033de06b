"""dvc.yaml's code deps cannot go stale: each stage lists exactly the project modules (pipeline/, stages/, flows/) its
entry point imports, directly or transitively, imports inside functions included, so that `dvc status` after an
edit of any module names exactly the stages that import it. And every data path a stage tracks is one that
stages/_paths.py names, the one place stage code takes such paths from.

The import closure is read from the code (an AST walk over `import` / `from ... import`), starting at the module the
stage's `cmd` runs (`python -m stages.X`). A package's `__init__.py` counts once it has code: an empty one (or one
with only a docstring) changes nothing its importers run. Data deps (data/prepared, models/..., metrics/..., plots/...)
are not code and are checked against stages/_paths.py instead."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
PACKAGES = ("pipeline", "stages", "flows")  # the project's own code
PLACEHOLDER = re.compile(r"\$\{[^}]+\}")  # ${key}, ${item.importance_from}, ...


# ------------------------------------------------------------------------------------------- the import closure
def module_file(module: str) -> Path | None:
    """The file of a project module (`pipeline.data` -> pipeline/data/__init__.py), or None if it is not one."""
    if module.split(".")[0] not in PACKAGES:
        return None
    base = REPO.joinpath(*module.split("."))
    for path in (base.with_suffix(".py"), base / "__init__.py"):
        if path.is_file():
            return path
    return None


def has_code(path: Path) -> bool:
    body = ast.parse(path.read_text()).body
    if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
        body = body[1:]  # the docstring
    return bool(body)


def imported_modules(path: Path, module: str) -> set[str]:
    """Every module `path` (module `module`) imports anywhere in its code, with the packages above each (importing
    a.b.c runs a/__init__.py and a/b/__init__.py first)."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: from the package `level` - 1 steps above this module's package
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1])
                source = f"{base}.{node.module}" if node.module else base
            else:
                source = node.module
            found.add(source)
            found |= {f"{source}.{alias.name}" for alias in node.names}  # `from pkg import submodule`
    with_parents = set()
    for name in found:
        parts = name.split(".")
        with_parents |= {".".join(parts[:i]) for i in range(1, len(parts) + 1)}
    return {name for name in with_parents if module_file(name)}


def import_closure(entry: str) -> set[str]:
    """The repository-relative .py files module `entry` runs when imported, transitively."""
    seen: set[str] = set()
    parts = entry.split(".")
    todo = [entry, *(".".join(parts[:i]) for i in range(1, len(parts)))]  # `python -m a.b` imports package a first
    while todo:
        module = todo.pop()
        if module in seen:
            continue
        seen.add(module)
        todo += sorted(imported_modules(module_file(module), module) - seen)
    files = {module_file(m) for m in seen}
    return {str(f.relative_to(REPO)) for f in files if f.name != "__init__.py" or has_code(f)}


# ------------------------------------------------------------------------------------------------ dvc.yaml
def dvc_stages() -> dict[str, dict]:
    """dvc.yaml's stages, a `foreach` stage by its `do` body (YAML merge keys resolved by the loader)."""
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    return {name: stage.get("do", stage) for name, stage in stages.items()}


def entry_module(cmd: str) -> str:
    match = re.search(r"python -m (stages\.\w+)", cmd)
    assert match, f"cmd {cmd!r} does not run `python -m stages.<module>`"
    return match.group(1)


def is_code(dep: str) -> bool:
    return dep.split("/")[0] in PACKAGES


def listed_code(deps: list[str]) -> set[str]:
    """The .py files a stage's code deps cover: a file, or every .py file under a directory."""
    files: set[str] = set()
    for dep in deps:
        path = REPO / dep
        if path.is_dir():
            files |= {str(p.relative_to(REPO)) for p in path.rglob("*.py") if "__pycache__" not in p.parts}
        else:
            files.add(dep)
    return files


def data_paths(body: dict) -> list[str]:
    """The non-code paths a stage tracks: its data deps, outs, metrics and plots."""
    out = [d for d in body.get("deps", []) if not is_code(d)]
    for key in ("outs", "metrics", "plots"):
        for entry in body.get(key, []):
            out += list(entry) if isinstance(entry, dict) else [entry]
    return out


STAGES = dvc_stages()


def test_the_closure_walk_follows_function_level_imports_and_packages():
    closure = import_closure("stages.prepare")
    assert {"stages/prepare.py", "stages/_common.py", "pipeline/errors.py", "pipeline/storage.py"} <= closure
    assert "flows/stages.py" in closure  # imported inside _common.run, only under Prefect: still run by this stage
    assert "stages/__init__.py" not in closure  # empty
    assert "pipeline/data/__init__.py" in closure  # it has code: the package's API


# Code a library loads by file path, not by import (lm-eval's task YAMLs and their utils.py): a folder dep as a whole.
LOADED_BY_PATH = {"pipeline/benchmarks/tasks"}


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_code_deps_are_exactly_the_modules_the_stage_imports(stage):
    body = STAGES[stage]
    deps = body.get("deps", [])
    code = [d for d in deps if is_code(d)]
    closure = import_closure(entry_module(body["cmd"]))
    for folder in sorted(LOADED_BY_PATH & set(code)):  # the files lm-eval loads run what they import too
        for file in sorted((REPO / folder).glob("*.py")):  # a folder, not a package: from the file's own imports
            for module in imported_modules(file, ".".join(file.relative_to(REPO).with_suffix("").parts)):
                closure |= import_closure(module)
    listed = listed_code(code)
    problems = [f"add `{path}` to deps (imported)" for path in sorted(closure - listed)]
    for dep in code:
        path = REPO / dep
        if not path.exists():
            problems.append(f"remove `{dep}` from deps (no such file or directory)")
        elif dep in LOADED_BY_PATH:
            continue
        elif path.is_dir():
            unused = sorted(listed_code([dep]) - closure)
            if unused:
                problems.append(f"replace the directory `{dep}` in deps by the files the stage imports "
                                f"({sorted(listed_code([dep]) & closure)}): it does not import {unused}")
        elif dep not in closure:
            problems.append(f"remove `{dep}` from deps (not imported)")
    duplicated = sorted({d for d in code if code.count(d) > 1})
    problems += [f"`{d}` is listed twice" for d in duplicated]
    assert not problems, f"dvc.yaml stage {stage!r} ({body['cmd']}):\n  " + "\n  ".join(problems)


# --------------------------------------------------------------------------------------------- the data paths
def layout_patterns() -> list[list[re.Pattern]]:
    """stages/_paths.py's paths as patterns, one per path segment: its Path constants, and its functions of run or
    stage names (called with a placeholder that matches any one segment)."""
    import importlib
    import inspect

    layout = importlib.import_module("stages._paths")
    marker = "PLACEHOLDER"
    paths = []
    for name, value in vars(layout).items():
        if isinstance(value, Path) and not name.startswith("_"):
            paths.append(str(value))
        elif inspect.isfunction(value) and value.__module__ == layout.__name__:
            arity = len(inspect.signature(value).parameters)
            paths += [str(value(*[marker] * n)) for n in range(1, arity + 1)]
    return [[re.compile(re.escape(part).replace(marker, "[^/]+")) for part in path.split("/")] for path in paths]


def named_by_layout(path: str, patterns: list[list[re.Pattern]]) -> bool:
    """`path` (placeholders such as ${key} standing for one segment) is a layout path, or a folder of one."""
    parts = PLACEHOLDER.sub("placeholder", path).split("/")
    return any(len(parts) <= len(pattern) and all(p.fullmatch(part) for p, part in zip(pattern, parts))
               for pattern in patterns)


def test_every_data_path_a_stage_tracks_is_named_by_stages_paths():
    patterns = layout_patterns()
    unnamed = [f"stage {stage}: {path}" for stage, body in STAGES.items() for path in data_paths(body)
               if not named_by_layout(path, patterns)]
    plots = yaml.safe_load((REPO / "dvc.yaml").read_text())["plots"]
    unnamed += [f"plots: {p}" for p in (next(iter(p)) if isinstance(p, dict) else p for p in plots)
                if not named_by_layout(p, patterns)]
    assert not unnamed, "dvc.yaml paths that stages/_paths.py does not name:\n  " + "\n  ".join(unnamed)


def test_the_layout_check_catches_a_path_stages_paths_does_not_name():
    patterns = layout_patterns()
    assert named_by_layout("models/tuned/${key}", patterns) and named_by_layout("metrics/eval", patterns)
    assert named_by_layout("plots/importance/${item.importance_from}.json", patterns)
    assert not named_by_layout("models/other/${key}", patterns) and not named_by_layout("data/raw", patterns)


def test_no_stage_imports_another_stage():
    helpers = {f"stages.{p.stem}" for p in (REPO / "stages").glob("_*.py")}  # the shared helpers, not stages
    for path in sorted((REPO / "stages").glob("*.py")):
        module = f"stages.{path.stem}"
        others = {m for m in imported_modules(path, module) if m.startswith("stages.")} - helpers - {module}
        assert not others, f"{path.name} imports the stage(s) {sorted(others)}: move the shared code into pipeline/"


def test_stages_are_thin():
    long = {p.name: n for p in sorted((REPO / "stages").glob("*.py")) if (n := len(p.read_text().splitlines())) > 80}
    assert not long, f"stage files over 80 lines (move the logic into pipeline/): {long}"
