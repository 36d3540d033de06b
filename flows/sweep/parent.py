"""The sweep's parent flow, `visual-region-sweep`: the shared stages here, one child flow run per selection on the
workers, their results gathered here, then the report (the package docstring, flows/sweep/__init__.py, tells the
whole sweep)."""

from __future__ import annotations

import shutil
from pathlib import Path

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact
from prefect.runtime import flow_run as current_run

from flows.services import check_prefect_api, one_line_known_errors
from flows.sweep import exchange
from flows.sweep.child import CHILD_FLOW, START_FILES
from flows.sweep.fanout import COMPLETED, FAILED, IN_PARENT, PENDING, UP_TO_DATE, Child, fan_out
from flows.sweep.gather import gather, sweep_markdown
from flows.sweep.plan import Stage, SweepPlan, plan_sweep
from flows.workspace import (
    REPO, PipelineError, check_endpoints, dvc_pull, dvc_push, dvc_repro, dvc_stages, dvc_status, git,
    refuse_unprepared_workspace, remote_config, start_from_committed_params, workspace_lock,
)
from pipeline import config

one_line_known_errors()  # a known error is one line in the run's log (a worker imports this module to run the flow)

SWEEP_FLOW = "visual-region-sweep"
CHILD_DEPLOYMENT = f"{CHILD_FLOW}/sweep-child"
ARTIFACT_KEY = "visual-region-sweep"
NEEDS_PREFECT = "the sweep submits flow runs to workers"


def use_params_file(workspace: Path, params_file: str) -> None:
    """params.yaml as committed, then `params_file` copied onto it (as flows/pipeline.py does)."""
    start_from_committed_params(workspace)
    source = (workspace / params_file).resolve()
    if not source.is_file():
        raise PipelineError(f"params file {source} does not exist")
    if source != (workspace / "params.yaml").resolve():
        shutil.copyfile(source, workspace / "params.yaml")


def plan_workspace(workspace: Path) -> SweepPlan:
    """The plan from the workspace's dvc.yaml and params.yaml (validated: a bad file fails here, before any work)."""
    params = config.load(workspace / "params.yaml")
    stages = [Stage(name, tuple(deps), tuple(outs)) for name, deps, outs in dvc_stages(workspace)]
    return plan_sweep(stages, params)


def check_committed(workspace: Path, plan: SweepPlan) -> str:
    """The workspace's commit, which the children check out: the files their stages read must be as committed."""
    commit = git(workspace, "rev-parse", "HEAD").strip()
    if dirty := git(workspace, "status", "--porcelain", "--", *plan.sources).strip():
        raise PipelineError(f"workspace {workspace} has changes that are not in commit {commit[:12]}, which the children "
                            f"check out:\n{dirty}\ncommit them (and push them where the workers clone from)")
    return commit


def default_repo_url(workspace: Path) -> str:
    """The workspace's `origin`, else its own path (which only workers on this machine or a shared disk can read)."""
    try:
        return git(workspace, "remote", "get-url", "origin").strip() or str(workspace)
    except PipelineError:
        return str(workspace)


def selections_up_to_date(workspace: Path, plan: SweepPlan) -> set[str]:
    """The children's selections whose stages are all up to date here already (a re-run after a failure)."""
    if not plan.children:
        return set()
    status = dvc_status(workspace, [stage for sel in plan.children.values() for stage in sel.stages])
    return {name for name, sel in plan.children.items() if not any(stage in status for stage in sel.stages)}


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
    check_prefect_api(required_for=NEEDS_PREFECT)
    ws = Path(workspace or REPO).resolve()
    if not (ws / "dvc.yaml").is_file():
        raise PipelineError(f"workspace {ws} has no dvc.yaml")
    refuse_unprepared_workspace(ws)  # a deployment's run: never in someone's checkout
    sweep_id = str(current_run.id)
    with workspace_lock(ws):
        check_endpoints(ws, remote, needs_remote=True)
        if pull:
            dvc_pull(ws, remote, allow_missing=True)
        use_params_file(ws, params_file)
        plan = plan_workspace(ws)
        commit = check_committed(ws, plan)
        repo_url = repo_url or default_repo_url(ws)
        logger.info("sweep of %s: %d selections as child flow runs (%s), %s in this workspace; children clone %s at %s",
                    params_file, len(plan.children), ", ".join(plan.children), ", ".join(plan.in_parent), repo_url,
                    commit[:12])

        dvc_repro(ws, plan.upstream)
        dvc_push(ws, remote)

        children = {name: Child(name) for name in plan.children}
        for name in selections_up_to_date(ws, plan):
            children[name].status, children[name].message = UP_TO_DATE, "already in this workspace"
        todo = {name: child for name, child in children.items() if child.status == PENDING}
        logger.info("up to date here already: %s; to run: %s",
                    ", ".join(n for n in children if n not in todo) or "none", ", ".join(todo) or "none")
        try:
            if todo:
                remote_name, remote_conf = remote_config(ws, remote)
                parameters = {}
                for name in todo:
                    sel = plan.children[name]
                    exchange.send_files(ws, remote, exchange.key(sweep_id, name, "inputs"),
                                        [*START_FILES, *sel.inputs])
                    parameters[name] = {
                        "selection": name, "stages": sel.stages, "repo_url": repo_url, "commit": commit,
                        "sweep_id": sweep_id, "pull": sel.pull, "inputs": sel.inputs, "outputs": sel.outputs,
                        "remote": remote_name, "remote_url": remote_conf.get("url"), "child_dir": child_dir,
                        "keep_workspace": keep_child_workspaces,
                    }
                fan_out(todo, parameters, child_deployment, sweep_id, child_retries, child_timeout_s, poll_s)
            for name, child in todo.items():
                if child.status == COMPLETED:
                    gather(ws, child, plan.children[name], remote)
        finally:
            if todo:
                exchange.remove_area(ws, remote, sweep_id)
        failed = {name: child for name, child in children.items() if child.status == FAILED}
        children = {**{name: Child(name, status=IN_PARENT, message="run by the parent (upstream)")
                       for name in plan.in_parent}, **children}
        if not failed:
            dvc_repro(ws)  # everything else is up to date: pruning_curve, report, register
            dvc_push(ws, remote)
        markdown = sweep_markdown(ws, commit, children, report_ran=not failed)
        create_markdown_artifact(markdown=markdown, key=ARTIFACT_KEY, description="the sweep's selections and report")
    outcome = {
        name: {"status": child.status, "attempts": child.attempt, "flow_run": child.run_id, "message": child.message,
               "where": (child.result or {}).get("where"), "history": child.history}
        for name, child in children.items()
    }
    if failed:
        gathered = [name for name, child in children.items() if child.status in (COMPLETED, UP_TO_DATE)]
        raise PipelineError(
            f"sweep: {len(failed)} of {len(plan.children)} selections failed: "
            + "; ".join(f"{name} ({child.message})" for name, child in failed.items())
            + f". Gathered: {', '.join(gathered) or 'none'} (their outputs are in this workspace and the DVC remote); "
            "no report. Run the sweep again once fixed: only the failed selections run again.")
    return {"workspace": str(ws), "commit": commit, "selections": outcome, "report": str(ws / "reports" / "summary.md")}
