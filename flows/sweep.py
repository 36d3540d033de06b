"""A layer-selection sweep spread across Prefect workers: one flow run per entry of `tune.runs` /
`tune.importance_runs`, each in a workspace of its own, gathered into one study report.

The parent flow `visual-region-sweep`, in its workspace (a git clone with the DVC remote set up):

1. locks the workspace, checks the endpoints, `dvc pull`s what the remote already has, and starts from the committed
   params.yaml with `params_file` copied onto it (as flows/pipeline.py does);
2. plans from dvc.yaml: the stages of each selection (`tune@X`, `prune@X`, `evaluate@X`, or the `*_importance`
   ones), and the shared upstream the selections read: prepare, build_base, pretrain_projector and the baseline
   `all` (and any run an importance run is scored on);
3. runs that upstream itself (`dvc repro <those stages>`) and `dvc push`es it: the children pull it from the remote;
4. submits one flow run of the `sweep-child` deployment per selection whose stages are not already up to date here
   (a re-run after a failure only redoes what failed), and waits for them;
5. gathers: each child's dvc.lock entries are merged into this workspace's dvc.lock, the small uncached outputs it
   sent back (metrics, plots: DVC does not push them) are written, its cached outputs are `dvc pull`ed, and
   `dvc status` must then call its stages up to date (else its code or inputs differed from this workspace's);
6. with every selection gathered, `dvc repro` (only pruning_curve, report and register are left to run), `dvc push`,
   and the markdown artifact `visual-region-sweep`: per selection its worker, host, attempts and scores, then the
   report. A failed selection is named in that artifact and in the flow's error; the others are still gathered.

A child, `visual-region-sweep-child`, on whichever worker of the pool takes it: `git clone` of the repo at the
parent's commit into a fresh directory (under $VR_SWEEP_DIR, default <tmp>/vr-sweep), the parent's params.yaml and
dvc.lock written on top, `dvc pull` of just the outputs its stages read, `dvc repro --single-item` of each of its
stages in order, `dvc push` of their outputs, and a result artifact (type `vr-sweep-result`: its dvc.lock entries,
uncached outputs, where it ran) that the parent reads through the Prefect API. Stages log to MLflow as always
(MLFLOW_TRACKING_URI from the worker's environment), under the same parent run as the rest of the sweep.

Retries: the DVC pulls and pushes and the endpoint checks retry transient failures (flows/pipeline.py); a child
that crashed (its process or worker died) or failed with a TransientError is submitted again, at most
`child_retries` times. A child that failed on anything else (a bad layer list, a training error) is not retried.

    python -m flows.sweep --params-file params/study.yaml          # the parent here, the children on the workers
    prefect deployment run visual-region-sweep/sweep                # the parent on a worker too (queue `sweep`)
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from prefect import flow, get_run_logger, task
from prefect.artifacts import Artifact, create_markdown_artifact
from prefect.cache_policies import NO_CACHE
from prefect.runtime import flow_run as current_run

from flows.pipeline import (
    REPO, PipelineError, TransientError, _retry_if_transient, check_endpoints, dvc, dvc_env, dvc_pull, dvc_push,
    remote_config, start_from_committed_params, summary_markdown, workspace_lock,
)
from flows.services import ServiceError

SWEEP_FLOW = "visual-region-sweep"
CHILD_FLOW = "visual-region-sweep-child"
CHILD_DEPLOYMENT = f"{CHILD_FLOW}/sweep-child"
RESULT_TYPE = "vr-sweep-result"  # the artifact a child leaves for the parent (JSON; read through the Prefect API)
ARTIFACT_KEY = "visual-region-sweep"
BASELINE = "all"


# ------------------------------------------------------------------------------------------------- the plan
@dataclass
class Selection:
    """One layer-selection run as a child sees it; paths are relative to the workspace."""

    name: str
    stages: list[str]  # its DVC stages, in dependency order
    pull: list[str] = field(default_factory=list)  # cached outputs of other stages its stages read (from the remote)
    inputs: list[str] = field(default_factory=list)  # uncached outputs of other stages they read (sent as files)
    outputs: list[str] = field(default_factory=list)  # its stages' uncached outputs (sent back as files)
    cached: list[str] = field(default_factory=list)  # its stages' cached outputs (pushed to the remote)


@dataclass
class SweepPlan:
    upstream: list[str]  # stages the parent runs before the fan-out
    children: dict[str, Selection]  # one child flow run each
    in_parent: list[str]  # selections run by the parent (the baseline, runs scored for importance selection)
    sources: list[str]  # files the children's stages read that no stage writes: they come from the git commit


def _overlaps(a: str, b: str) -> bool:
    a, b = a.rstrip("/"), b.rstrip("/")
    return a == b or a.startswith(b + "/") or b.startswith(a + "/")


def sweep_plan(ws: Path, baseline: str = BASELINE) -> SweepPlan:
    """Which stages belong to which selection, what the parent must run first, and what each child reads and
    writes, from dvc.yaml (foreach stages are named `<group>@<run>`) and params.yaml (the workspace's)."""
    import yaml
    from dvc.repo import Repo

    tune = (yaml.safe_load((ws / "params.yaml").read_text()) or {}).get("tune") or {}
    runs = {**(tune.get("runs") or {}), **(tune.get("importance_runs") or {})}
    if baseline not in runs:
        raise PipelineError(f"tune.runs has no {baseline!r} run: the sweep's baseline (retention is measured against it)")
    importance = (tune.get("importance_runs") or {}).values()
    scored = {spec.get("importance_from") for spec in importance if isinstance(spec, dict)}
    in_parent = [baseline] + sorted(s for s in scored if s and s != baseline and s in runs)

    from dvc.dependency.param import ParamsDependency

    with Repo(str(ws)) as repo:  # the stages of the workspace's dvc.yaml, named as `dvc repro` takes them there
        stages = [s for s in repo.index.stages if Path(s.path).resolve() == (ws / "dvc.yaml").resolve()]
    order = [s.name for s in stages]
    deps = {s.name: [d.def_path for d in s.deps if not isinstance(d, ParamsDependency)] for s in stages}
    outs = [(s.name, o.def_path, bool(o.use_cache)) for s in stages for o in s.outs]
    by_run: dict[str, list[str]] = {}
    for name in order:
        run = name.partition("@")[2]
        if run in runs:
            by_run.setdefault(run, []).append(name)
    if missing := sorted(set(runs) - set(by_run)):
        raise PipelineError(f"dvc.yaml in {ws} has no stages for the runs {missing} "
                            "(expected foreach stages named `<stage>@<run>`)")

    def producers(name: str) -> set[str]:
        return {stage for stage, path, _ in outs if stage != name and any(_overlaps(d, path) for d in deps[name])}

    children_names = [r for r in runs if r not in in_parent]
    owner = {stage: run for run in children_names for stage in by_run[run]}
    needed: set[str] = set()
    todo = [p for run in children_names for stage in by_run[run] for p in producers(stage)]
    while todo:
        stage = todo.pop()
        if stage in needed or stage in owner:
            continue
        needed.add(stage)
        todo.extend(producers(stage))
    upstream = [s for s in order if s in needed or s in {x for run in in_parent for x in by_run[run]}]

    children, sources = {}, set()
    for run in children_names:
        own = by_run[run]
        for stage in own:
            for other in producers(stage) - set(own):
                if other in owner:
                    raise PipelineError(f"stage {stage} (run {run}) reads the outputs of {other} (run {owner[other]}): "
                                        "two sweep children cannot depend on each other")
        read = [(stage, path, cached) for stage, path, cached in outs
                if stage not in own and any(_overlaps(d, path) for s in own for d in deps[s])]
        sources.update(d for s in own for d in deps[s] if not any(_overlaps(d, path) for _, path, _ in outs))
        children[run] = Selection(
            name=run, stages=_topological(own, {s: producers(s) & set(own) for s in own}),
            pull=sorted({path for _, path, cached in read if cached}),
            inputs=sorted({path for _, path, cached in read if not cached}),
            outputs=sorted(path for stage, path, cached in outs if stage in own and not cached),
            cached=sorted(path for stage, path, cached in outs if stage in own and cached),
        )
    return SweepPlan(upstream=upstream, children=children, in_parent=in_parent, sources=sorted(sources))


def _topological(names: list[str], before: dict[str, set[str]]) -> list[str]:
    """`names` ordered so that every stage comes after the ones it reads (ties keep dvc.yaml's order)."""
    done: list[str] = []
    while len(done) < len(names):
        ready = [n for n in names if n not in done and before[n] <= set(done)]
        if not ready:
            raise PipelineError(f"the stages {sorted(set(names) - set(done))} depend on each other in a cycle")
        done.append(ready[0])
    return done


# ------------------------------------------------------------------------------------------------- helpers
def git(ws: Path, *args: str) -> str:
    proc = subprocess.run(["git", *args], cwd=ws, capture_output=True, text=True, stdin=subprocess.DEVNULL)
    if proc.returncode != 0:
        raise PipelineError(f"`git {' '.join(args)}` failed in {ws}: {proc.stderr.strip()[-2000:]}")
    return proc.stdout.strip()


def dvc_status(ws: Path, stages: list[str]) -> dict:
    """`dvc status --json <stages>`: {} when every one of them is up to date."""
    proc = subprocess.run([sys.executable, "-m", "dvc", "status", "--json", *stages], cwd=ws, env=dvc_env(),
                          capture_output=True, text=True, stdin=subprocess.DEVNULL)
    if proc.returncode != 0:
        raise PipelineError(f"`dvc status {' '.join(stages)}` failed in {ws}: {proc.stderr.strip()[-2000:]}")
    return json.loads(proc.stdout or "{}")


def pack_files(ws: Path, paths: list[str]) -> dict[str, dict[str, str]]:
    """{relative path: {"text": ...} or {"base64": ...}} of every file at or under `paths` (all must exist)."""
    out = {}
    for rel in paths:
        p = ws / rel
        files = [p] if p.is_file() else sorted(f for f in p.rglob("*") if f.is_file()) if p.is_dir() else None
        if files is None:
            raise PipelineError(f"{p} is missing: a stage should have written it")
        for f in files:
            data = f.read_bytes()
            try:
                out[f.relative_to(ws).as_posix()] = {"text": data.decode("utf-8")}
            except UnicodeDecodeError:
                out[f.relative_to(ws).as_posix()] = {"base64": base64.b64encode(data).decode("ascii")}
    return out


def unpack_files(ws: Path, files: dict[str, dict[str, str]], allowed: list[str], source: str) -> None:
    """Write files sent by another flow run, byte for byte; only at or under the `allowed` paths."""
    for rel, spec in files.items():
        parts = PurePosixPath(rel).parts
        if rel.startswith("/") or ".." in parts or not any(_overlaps(rel, a) and len(parts) >= len(PurePosixPath(a).parts)
                                                           for a in allowed):
            raise PipelineError(f"{source} sent {rel!r}, which is not one of its outputs {allowed}")
        data = spec["text"].encode("utf-8") if "text" in spec else base64.b64decode(spec["base64"])
        dest = ws / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(f".{dest.name}.sweep-tmp")
        tmp.write_bytes(data)
        os.replace(tmp, dest)


def merge_lock(ws: Path, entries: dict[str, dict]) -> None:
    """Put stage entries (as another workspace's dvc.lock has them) into this workspace's dvc.lock."""
    import yaml

    path = ws / "dvc.lock"
    lock = (yaml.safe_load(path.read_text()) if path.exists() else None) or {"schema": "2.0", "stages": {}}
    lock.setdefault("stages", {}).update(entries)
    tmp = path.with_name(".dvc.lock.sweep-tmp")
    tmp.write_text(yaml.safe_dump(lock, sort_keys=False, allow_unicode=True))
    os.replace(tmp, path)


def git_ignore(ws: Path, paths: list[str]) -> None:
    """What `dvc repro` would have added to .gitignore for these outputs (`dvc pull` does not): `/<name>` in the
    .gitignore next to each, so that a `git add -A` of the results never takes in a model."""
    if not (ws / ".git").exists():
        return
    for rel in paths:
        p = PurePosixPath(rel)
        gi, entry = ws / p.parent / ".gitignore", f"/{p.name}"
        lines = gi.read_text().splitlines() if gi.exists() else []
        if entry not in lines:
            gi.parent.mkdir(parents=True, exist_ok=True)
            gi.write_text("\n".join([*lines, entry]) + "\n")


def child_root(child_dir: str | None) -> Path:
    return Path(child_dir or os.environ.get("VR_SWEEP_DIR") or Path(tempfile.gettempdir()) / "vr-sweep")


# ------------------------------------------------------------------------------------------------- the child
@task(retries=2, retry_delay_seconds=[5, 20], retry_condition_fn=_retry_if_transient, cache_policy=NO_CACHE)
def clone_at(repo_url: str, commit: str, ws: Path) -> None:
    if ws.exists():
        shutil.rmtree(ws)
    ws.parent.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(["git", "clone", "--quiet", "--no-checkout", repo_url, str(ws)], capture_output=True, text=True,
                          stdin=subprocess.DEVNULL)
    if proc.returncode != 0:
        transient = any(m in proc.stderr for m in ("timed out", "Could not resolve host", "Connection"))
        kind = TransientError if transient else PipelineError
        raise kind(f"`git clone {repo_url}` failed: {proc.stderr.strip()[-2000:]}")
    proc = subprocess.run(["git", "checkout", "--quiet", "--detach", commit], cwd=ws, capture_output=True, text=True)
    if proc.returncode != 0:
        raise PipelineError(f"commit {commit} is not in {repo_url} (push it where the workers clone from): "
                            f"{proc.stderr.strip()[-1000:]}")


@task(retries=2, retry_delay_seconds=[5, 20], retry_condition_fn=_retry_if_transient, cache_policy=NO_CACHE)
def dvc_pull_paths(ws: Path, paths: list[str], remote: str | None) -> None:
    if paths:
        dvc(ws, "pull", *(["-r", remote] if remote else []), *paths)


@task(retries=2, retry_delay_seconds=[5, 20], retry_condition_fn=_retry_if_transient, cache_policy=NO_CACHE)
def dvc_push_stages(ws: Path, stages: list[str], remote: str | None) -> None:
    dvc(ws, "push", *(["-r", remote] if remote else []), *stages)


@task(cache_policy=NO_CACHE)
def repro_stages(ws: Path, stages: list[str], single_item: bool) -> None:
    """`dvc repro --single-item` one stage at a time (a child: its inputs were pulled, the upstream is not checked),
    or one `dvc repro` of all of them with what they depend on (the parent)."""
    if single_item:
        for stage in stages:
            dvc(ws, "repro", "--single-item", stage)
    else:
        dvc(ws, "repro", *stages)


def where() -> dict:
    return {"host": socket.gethostname(), "pid": os.getpid(), "worker": os.environ.get("PREFECT__WORKER_NAME"),
            "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES")}


@flow(name=CHILD_FLOW, log_prints=True)
def sweep_child(selection: str, stages: list[str], repo_url: str, commit: str, params_text: str, lock_text: str,
                pull: list[str] | None = None, files: dict[str, dict[str, str]] | None = None,
                outputs: list[str] | None = None, remote: str | None = None, remote_url: str | None = None,
                sweep_id: str | None = None, child_dir: str | None = None, keep_workspace: bool = False) -> dict:
    """One layer selection in a fresh clone: pull its inputs, `dvc repro -s` its stages, push, report back.

    Parameters come from the parent (flows/sweep.py: sweep): the commit and repo to clone, the parent's params.yaml
    and dvc.lock, the outputs to pull (`pull`) and to write (`files`), the uncached `outputs` to send back."""
    logger = get_run_logger()
    started = time.monotonic()
    ws = child_root(child_dir) / f"{(sweep_id or 'sweep')[:8]}-{selection}-{str(current_run.id or os.getpid())[:8]}"
    logger.info("selection %s: stages %s in %s (%s)", selection, ", ".join(stages), ws, where())
    uri = os.environ.get("MLFLOW_TRACKING_URI", "")
    if not uri.startswith(("http://", "https://")):
        logger.warning("MLFLOW_TRACKING_URI is %r: this child's MLflow runs stay in its own workspace, not with the "
                       "rest of the sweep; set it to the team's tracking server", uri or "unset")
    clone_at(repo_url, commit, ws)
    (ws / "params.yaml").write_text(params_text)
    (ws / "dvc.lock").write_text(lock_text)
    unpack_files(ws, files or {}, [p for p in (files or {})], "the parent")
    if remote_url:
        name, conf = remote_config(ws, remote)
        if conf.get("url") != remote_url:
            dvc(ws, "remote", "modify", "--local", name, "url", remote_url)
    check_endpoints(ws, remote, needs_remote=True)
    dvc_pull_paths(ws, list(pull or []), remote)
    repro_stages(ws, stages, single_item=True)
    dvc_push_stages(ws, stages, remote)

    import yaml

    lock = yaml.safe_load((ws / "dvc.lock").read_text()).get("stages", {})
    missing = [s for s in stages if s not in lock]
    if missing:
        raise PipelineError(f"selection {selection}: dvc.lock in {ws} has no entries for {missing} after the repro")
    result = {
        "selection": selection, "commit": commit, "stages": stages, "lock": {s: lock[s] for s in stages},
        "files": pack_files(ws, list(outputs or [])), "where": where(), "seconds": round(time.monotonic() - started, 1),
    }
    Artifact(type=RESULT_TYPE, description=f"sweep result of {selection}: dvc.lock entries, uncached outputs, host",
             data=result).create()
    if not keep_workspace:
        shutil.rmtree(ws, ignore_errors=True)
    logger.info("selection %s done in %.0f s on %s", selection, result["seconds"], result["where"])
    return {k: v for k, v in result.items() if k not in ("lock", "files")}


# ------------------------------------------------------------------------------------------------- fan-out
@dataclass
class Child:
    selection: str
    attempt: int = 0
    run_id: str | None = None
    run_name: str | None = None
    submitted: float = 0.0
    state: str = ""
    status: str = "pending"  # pending | running | completed | failed | up to date
    message: str = ""
    result: dict | None = None
    history: list[str] = field(default_factory=list)


def classify(state_type: str, message: str | None) -> str:
    """What a final child state means: `completed`, `retry` (worth another attempt) or `failed`."""
    if state_type == "COMPLETED":
        return "completed"
    exc = (message or "").removeprefix("Flow run encountered an exception: ")
    if state_type == "CRASHED" or (state_type == "FAILED" and exc.startswith("TransientError:")):
        return "retry"
    return "failed"


def submit(child: Child, deployment: str, parameters: dict, sweep_id: str) -> None:
    from prefect.deployments import run_deployment
    from prefect.exceptions import ObjectNotFound

    child.attempt += 1
    name = child.selection if child.attempt == 1 else f"{child.selection} (attempt {child.attempt})"
    try:
        run = run_deployment(deployment, parameters=parameters, timeout=0, flow_run_name=name,
                             tags=["visual-region", "sweep", f"sweep:{sweep_id}", f"selection:{child.selection}"],
                             idempotency_key=f"{sweep_id}:{child.selection}:{child.attempt}")
    except ObjectNotFound:
        raise PipelineError(f"deployment {deployment!r} not found on the Prefect server: register it with `make deploy` "
                            "(prefect deploy --all)") from None
    child.run_id, child.run_name, child.submitted = str(run.id), name, time.monotonic()
    child.state, child.status = "SCHEDULED", "running"


def read_result(client, run_id: str) -> dict | None:
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, ArtifactFilterType

    arts = client.read_artifacts(artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[run_id]),
                                                                type=ArtifactFilterType(any_=[RESULT_TYPE])))
    if not arts:
        return None
    data = arts[-1].data
    return json.loads(data) if isinstance(data, str) else data


def fan_out(children: dict[str, Child], parameters: dict[str, dict], deployment: str, sweep_id: str, retries: int,
            timeout_s: float | None, poll_s: float) -> None:
    """Submit every child, then wait: each final state is gathered, retried (crashed / transient, at most `retries`
    more attempts) or recorded as failed; a child past `timeout_s` is cancelled and recorded as failed."""
    from prefect import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
    from prefect.states import Cancelled, Cancelling

    logger = get_run_logger()
    for child in children.values():
        submit(child, deployment, parameters[child.selection], sweep_id)
        logger.info("submitted %s: flow run %s (%s)", child.selection, child.run_name, child.run_id)
    last_hint = time.monotonic()
    with get_client(sync_client=True) as client:
        while running := [c for c in children.values() if c.status == "running"]:
            time.sleep(poll_s)
            runs = {str(r.id): r for r in client.read_flow_runs(
                flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[c.run_id for c in running])))}
            for child in running:
                run = runs.get(child.run_id)
                if run is None or run.state is None:
                    continue
                state = run.state.type.value
                message = (run.state.message or "").removeprefix("Flow run encountered an exception: ")
                if state != child.state:
                    logger.info("%s: %s%s", child.run_name, run.state.name, f" ({message})" if message else "")
                    child.state = state
                if run.state.is_final():
                    verdict = classify(state, message)
                    child.history.append(f"attempt {child.attempt}: {run.state.name}{': ' + message if message else ''}")
                    if verdict == "completed":
                        child.result = read_result(client, child.run_id)
                        if child.result is None:
                            child.status = "failed"
                            child.message = f"flow run {child.run_id} completed without a {RESULT_TYPE} artifact"
                        else:
                            child.status = "completed"
                            logger.info("%s: done on worker %s (host %s) in %s s", child.run_name,
                                        child.result["where"].get("worker"), child.result["where"].get("host"),
                                        child.result.get("seconds"))
                    elif verdict == "retry" and child.attempt <= retries:
                        logger.warning("%s: %s; submitting it again (attempt %d of %d)", child.run_name,
                                       message or run.state.name, child.attempt + 1, retries + 1)
                        submit(child, deployment, parameters[child.selection], sweep_id)
                    else:
                        child.status, child.message = "failed", f"{run.state.name}: {message}".rstrip(": ")
                elif timeout_s is not None and time.monotonic() - child.submitted > timeout_s:
                    queued = state in ("SCHEDULED", "PENDING")  # never started: nothing for a worker to stop
                    why = "the sweep's child_timeout_s ran out"
                    client.set_flow_run_state(run.id, Cancelled(message=why) if queued else Cancelling(message=why),
                                              force=True)
                    child.status = "failed"
                    child.message = (f"did not finish within {timeout_s:.0f} s (it was {run.state.name}"
                                     f"{'; is a worker polling its work pool and queue?' if queued else ''}); cancelled")
                    child.history.append(f"attempt {child.attempt}: {child.message}")
            if time.monotonic() - last_hint > 120:
                waiting = [c.run_name for c in children.values()
                           if c.status == "running" and c.state in ("SCHEDULED", "PENDING")]
                if waiting:
                    logger.info("waiting for a worker to take %s (the work pool and queue of deployment %s)",
                                ", ".join(waiting), deployment)
                last_hint = time.monotonic()


# ------------------------------------------------------------------------------------------------- gathering
@task(retries=2, retry_delay_seconds=[5, 20], retry_condition_fn=_retry_if_transient, cache_policy=NO_CACHE)
def pull_stages(ws: Path, stages: list[str], remote: str | None) -> None:
    dvc(ws, "pull", *(["-r", remote] if remote else []), *stages)


def gather(ws: Path, child: Child, sel: Selection, remote: str | None) -> None:
    """Merge a completed child into this workspace; on a mismatch, the child is recorded as failed."""
    result = child.result or {}
    try:
        if sorted(result.get("lock", {})) != sorted(sel.stages):
            raise PipelineError(f"its result has dvc.lock entries for {sorted(result.get('lock', {}))}, "
                                f"expected {sel.stages}")
        merge_lock(ws, result["lock"])
        unpack_files(ws, result.get("files", {}), sel.outputs, f"child {child.selection}")
        pull_stages(ws, sel.stages, remote)
        changed = dvc_status(ws, sel.stages)
        if changed:
            raise PipelineError(f"after merging, DVC still calls its stages changed here: {json.dumps(changed)[:1500]} "
                                f"(did the child run other code or inputs than this workspace's?)")
        git_ignore(ws, sel.cached)
    except PipelineError as err:
        child.status, child.message = "failed", f"gathering its results: {err}"


def selection_rows(ws: Path, children: dict[str, Child]) -> list[str]:
    lines = ["| selection | status | worker | host | attempts | child flow run | visual | text QA | note |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name, c in children.items():
        ev = ws / "metrics" / "eval" / f"{name}.json"
        done = c.status in ("completed", "up to date", "in parent") and ev.exists()
        tuned = json.loads(ev.read_text()).get("tuned", {}) if done else {}
        w = (c.result or {}).get("where", {})

        def num(v):
            return "n/a" if not isinstance(v, (int, float)) else f"{v:.3f}"

        note = c.message.replace("|", "/").replace("\n", " ")[:300]
        lines.append(f"| {name} | {c.status} | {w.get('worker') or '-'} | {w.get('host') or '-'} | {c.attempt} | "
                     f"{c.run_name or '-'} | {num(tuned.get('visual_score'))} | {num(tuned.get('text_qa_accuracy'))} "
                     f"| {note} |")
    return lines


def sweep_markdown(ws: Path, commit: str, children: dict[str, Child], report_ran: bool) -> str:
    failed = [n for n, c in children.items() if c.status == "failed"]
    head = ["# visual-region sweep", "", f"- workspace: `{ws}`, commit `{commit[:12]}`",
            f"- selections: {len(children)}; failed: {', '.join(failed) if failed else 'none'}",
            f"- report: {'written (below)' if report_ran else 'not written: every selection must finish first'}", "",
            "## Selections", "", *selection_rows(ws, children), ""]
    # the pipeline flow's summary without its title: the report, MLflow links, the registry (only once written)
    body = ""
    if report_ran:
        body = summary_markdown(ws, "dvc repro (the sweep's last step)", pushed=True).split("\n", 1)[1]
    return "\n".join(head) + "\n" + body


# ------------------------------------------------------------------------------------------------- the parent
@flow(name=SWEEP_FLOW, log_prints=True)
def sweep(workspace: str | None = None, params_file: str = "params/study.yaml", pull: bool = True,
          remote: str | None = None, repo_url: str | None = None, child_deployment: str = CHILD_DEPLOYMENT,
          child_dir: str | None = None, child_retries: int = 1, child_timeout_s: float | None = None,
          poll_s: float = 10.0, keep_child_workspaces: bool = False) -> dict:
    """The layer-selection sweep: the shared stages here, one child flow run per selection on the workers, then the
    report here.

    workspace: the repo clone the parent runs in (default: the one holding this code); params_file: the params to
    sweep (copied onto params.yaml, e.g. params/study.yaml); repo_url: where children `git clone` from (default: the
    workspace's `origin`, else the workspace path, which only workers on this machine or a shared disk can read);
    child_deployment: `<flow>/<deployment>` of the child flow; child_dir: where children make their clones (default
    $VR_SWEEP_DIR on the worker, else <tmp>/vr-sweep); child_retries: more attempts for a child that crashed or failed
    on a transient error; child_timeout_s: cancel a child (and count it failed) after this long."""
    logger = get_run_logger()
    if not os.environ.get("PREFECT_API_URL"):
        raise PipelineError("the sweep submits flow runs to workers: set PREFECT_API_URL to the Prefect server")
    ws = Path(workspace or REPO).resolve()
    if not (ws / "dvc.yaml").is_file():
        raise PipelineError(f"workspace {ws} has no dvc.yaml")
    sweep_id = str(current_run.id)
    with workspace_lock(ws):
        check_endpoints(ws, remote, needs_remote=True)
        if pull:
            dvc_pull(ws, remote)
        start_from_committed_params(ws)
        source = (ws / params_file).resolve()
        if not source.is_file():
            raise PipelineError(f"params file {source} does not exist")
        if source != (ws / "params.yaml").resolve():
            shutil.copyfile(source, ws / "params.yaml")
        plan = sweep_plan(ws)  # (the params themselves are validated by the first stage that runs, in one line)
        commit = git(ws, "rev-parse", "HEAD")
        if dirty := git(ws, "status", "--porcelain", "--", *plan.sources):
            raise PipelineError(f"workspace {ws} has changes that are not in commit {commit[:12]}, which the children "
                                f"check out:\n{dirty}\ncommit them (and push them where the workers clone from)")
        if not repo_url:
            origin = subprocess.run(["git", "remote", "get-url", "origin"], cwd=ws, capture_output=True, text=True)
            repo_url = origin.stdout.strip() if origin.returncode == 0 and origin.stdout.strip() else str(ws)
        logger.info("sweep of %s: %d selections as child flow runs (%s), %s in this workspace; children clone %s at %s",
                    params_file, len(plan.children), ", ".join(plan.children), ", ".join(plan.in_parent), repo_url,
                    commit[:12])

        repro_stages(ws, plan.upstream, single_item=False)
        dvc_push(ws, remote)

        children = {name: Child(name) for name in plan.children}
        if plan.children:
            status = dvc_status(ws, [s for sel in plan.children.values() for s in sel.stages])
            for name, sel in plan.children.items():
                if not any(s in status for s in sel.stages):
                    children[name].status, children[name].message = "up to date", "already in this workspace"
        todo = {n: c for n, c in children.items() if c.status == "pending"}
        logger.info("up to date here already: %s; to run: %s",
                    ", ".join(n for n in children if n not in todo) or "none", ", ".join(todo) or "none")
        remote_name, remote_conf = remote_config(ws, remote)
        lock_text = (ws / "dvc.lock").read_text()
        params_text = (ws / "params.yaml").read_text()
        parameters = {
            name: {"selection": name, "stages": sel.stages, "repo_url": repo_url, "commit": commit,
                   "params_text": params_text, "lock_text": lock_text, "pull": sel.pull,
                   "files": pack_files(ws, sel.inputs), "outputs": sel.outputs, "remote": remote_name,
                   "remote_url": remote_conf.get("url"), "sweep_id": sweep_id, "child_dir": child_dir,
                   "keep_workspace": keep_child_workspaces}
            for name, sel in plan.children.items() if name in todo
        }
        if todo:
            fan_out(todo, parameters, child_deployment, sweep_id, child_retries, child_timeout_s, poll_s)
        for name, child in todo.items():
            if child.status == "completed":
                gather(ws, child, plan.children[name], remote)
        failed = {n: c for n, c in children.items() if c.status == "failed"}
        children = {**{n: Child(n, status="in parent", message="run by the parent (upstream)") for n in plan.in_parent},
                    **children}
        if not failed:
            repro_stages(ws, [], single_item=False)  # everything else is up to date: pruning_curve, report, register
            dvc_push(ws, remote)
        markdown = sweep_markdown(ws, commit, children, report_ran=not failed)
        create_markdown_artifact(markdown=markdown, key=ARTIFACT_KEY, description="the sweep's selections and report")
    outcome = {
        name: {"status": c.status, "attempts": c.attempt, "flow_run": c.run_id, "message": c.message,
               "where": (c.result or {}).get("where"), "history": c.history}
        for name, c in children.items()
    }
    if failed:
        gathered = [n for n, c in children.items() if c.status in ("completed", "up to date")]
        raise PipelineError(
            f"sweep: {len(failed)} of {len(plan.children)} selections failed: "
            + "; ".join(f"{n} ({c.message})" for n, c in failed.items())
            + f". Gathered: {', '.join(gathered) or 'none'} (their outputs are in this workspace and the DVC remote); "
            "no report. Run the sweep again once fixed: only the failed selections run again.")
    return {"workspace": str(ws), "commit": commit, "selections": outcome, "report": str(ws / "reports" / "summary.md")}


def main(argv: list[str] | None = None) -> None:
    """`python -m flows.sweep`: the parent in this process, the children on the workers of the child deployment."""
    import argparse

    from flows.stages import check_prefect_api

    parser = argparse.ArgumentParser(prog="python -m flows.sweep", description=sweep.__doc__.split("\n")[0])
    parser.add_argument("--workspace", help="the repo clone to run in (default: this one)")
    parser.add_argument("--params-file", default="params/study.yaml", help="the params to sweep (default: %(default)s)")
    parser.add_argument("--no-pull", action="store_true", help="do not `dvc pull` first")
    parser.add_argument("--remote", help="the DVC remote (default: the workspace's default remote)")
    parser.add_argument("--repo-url", help="where children clone from (default: origin, else this workspace's path)")
    parser.add_argument("--child-deployment", default=CHILD_DEPLOYMENT)
    parser.add_argument("--child-retries", type=int, default=1)
    parser.add_argument("--child-timeout", type=float, help="seconds before a child is cancelled and counted failed")
    parser.add_argument("--poll", type=float, default=10.0, help="seconds between looks at the children's states")
    args = parser.parse_args(argv)
    try:
        if not os.environ.get("PREFECT_API_URL"):
            raise PipelineError("the sweep submits flow runs to workers: set PREFECT_API_URL to the Prefect server")
        check_prefect_api(os.environ["PREFECT_API_URL"])
        sweep(workspace=args.workspace, params_file=args.params_file, pull=not args.no_pull, remote=args.remote,
              repo_url=args.repo_url, child_deployment=args.child_deployment, child_retries=args.child_retries,
              child_timeout_s=args.child_timeout, poll_s=args.poll)
    except (PipelineError, ServiceError) as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
