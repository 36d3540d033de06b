"""The sweep's plan, from dvc.yaml's stages and the params (both given as data: no I/O here): which stages each
selection runs, the shared upstream the parent runs first, and what each child reads and writes.

A selection is one entry of `tune.runs` / `tune.importance_runs`; its stages are dvc.yaml's foreach stages named
`<group>@<selection>` (`tune@uniform25`, `prune@uniform25`, `evaluate@uniform25`, or the `*_importance` ones). The
baseline `all` and every run an importance run is scored on are run by the parent (the children read their outputs);
every other selection is one child."""

from __future__ import annotations

from dataclasses import dataclass, field

from pipeline.config import Params
from pipeline.errors import ProjectError

BASELINE = "all"


class PlanError(ProjectError, ValueError):
    """dvc.yaml and the params do not make a sweep (a selection without stages, children that read each other)."""


@dataclass(frozen=True)
class Stage:
    """A stage of dvc.yaml as `dvc repro` names it, with its file dependencies and its outputs."""

    name: str
    deps: tuple[str, ...] = ()
    outs: tuple[tuple[str, bool], ...] = ()  # (path, cached by DVC)


@dataclass
class Selection:
    """One layer-selection run as a child sees it; paths are relative to the workspace."""

    name: str
    stages: list[str]  # its DVC stages, in dependency order
    pull: list[str] = field(default_factory=list)  # cached outputs of other stages its stages read (from the remote)
    inputs: list[str] = field(default_factory=list)  # uncached outputs of other stages they read (sent by the parent)
    outputs: list[str] = field(default_factory=list)  # its stages' uncached outputs (sent back to the parent)
    cached: list[str] = field(default_factory=list)  # its stages' cached outputs (pushed to the remote)


@dataclass
class SweepPlan:
    upstream: list[str]  # stages the parent runs before the fan-out, in dvc.yaml's order
    children: dict[str, Selection]  # one child flow run each
    in_parent: list[str]  # selections run by the parent (the baseline, runs scored for importance selection)
    sources: list[str]  # files the children's stages read that no stage writes: they come from the git commit


def overlaps(a: str, b: str) -> bool:
    """Whether two workspace paths are the same or one is inside the other."""
    a, b = a.rstrip("/"), b.rstrip("/")
    return a == b or a.startswith(b + "/") or b.startswith(a + "/")


def plan_sweep(stages: list[Stage], params: Params, baseline: str = BASELINE) -> SweepPlan:
    """The plan of a sweep over every selection of `params` with dvc.yaml's `stages` (in dvc.yaml's order)."""
    runs = params.tune.all_runs()
    if baseline not in runs:
        raise PlanError(f"tune.runs has no {baseline!r} run: the sweep's baseline (retention is measured against it)")
    scored = {run.importance_from for run in params.tune.importance_runs.values()}
    in_parent = [baseline] + sorted(scored - {baseline, None})

    order = [stage.name for stage in stages]
    by_name = {stage.name: stage for stage in stages}
    by_run: dict[str, list[str]] = {}
    for name in order:
        run = name.partition("@")[2]
        if run in runs:
            by_run.setdefault(run, []).append(name)
    if missing := sorted(set(runs) - set(by_run)):
        raise PlanError(f"dvc.yaml has no stages for the runs {missing} (expected foreach stages named "
                        "`<stage>@<run>`)")
    outputs = [(stage.name, path, cached) for stage in stages for path, cached in stage.outs]

    def producers(name: str) -> set[str]:
        """The other stages whose outputs `name` reads."""
        deps = by_name[name].deps
        return {other for other, path, _ in outputs if other != name and any(overlaps(d, path) for d in deps)}

    child_runs = [run for run in runs if run not in in_parent]
    owner = {stage: run for run in child_runs for stage in by_run[run]}

    # The upstream: the parent's own selections, every stage the children read, and what those read in turn.
    needed: set[str] = set()
    todo = [stage for run in in_parent for stage in by_run[run]]
    todo += [p for run in child_runs for stage in by_run[run] for p in producers(stage)]
    while todo:
        stage = todo.pop()
        if stage in needed or stage in owner:
            continue
        needed.add(stage)
        todo.extend(producers(stage))
    upstream = [name for name in order if name in needed]

    children, sources = {}, set()
    for run in child_runs:
        own = by_run[run]
        for stage in own:
            for other in producers(stage) - set(own):
                if other in owner:
                    raise PlanError(f"stage {stage} (run {run}) reads the outputs of {other} (run {owner[other]}): "
                                    "two sweep children cannot depend on each other")
        deps = [d for stage in own for d in by_name[stage].deps]
        read = [(path, cached) for stage, path, cached in outputs
                if stage not in own and any(overlaps(d, path) for d in deps)]
        sources.update(d for d in deps if not any(overlaps(d, path) for _, path, _ in outputs))
        children[run] = Selection(
            name=run,
            stages=dependency_order(own, {stage: producers(stage) & set(own) for stage in own}),
            pull=sorted({path for path, cached in read if cached}),
            inputs=sorted({path for path, cached in read if not cached}),
            outputs=sorted(path for stage, path, cached in outputs if stage in own and not cached),
            cached=sorted(path for stage, path, cached in outputs if stage in own and cached),
        )
    return SweepPlan(upstream=upstream, children=children, in_parent=in_parent, sources=sorted(sources))


def dependency_order(names: list[str], before: dict[str, set[str]]) -> list[str]:
    """`names` ordered so that every stage comes after the ones it reads (ties keep the given order)."""
    done: list[str] = []
    while len(done) < len(names):
        ready = [n for n in names if n not in done and before[n] <= set(done)]
        if not ready:
            raise PlanError(f"the stages {sorted(set(names) - set(done))} depend on each other in a cycle")
        done.append(ready[0])
    return done
