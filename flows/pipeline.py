"""The scheduled pipeline as one Prefect flow, in a workspace (a git clone of this repo with its DVC remote set up):

1. lock the workspace (one pipeline run at a time: DVC itself refuses a second repro, but pull, repro and push must
   not interleave with another run's either);
2. check the endpoints it will need (the DVC remote's S3 bucket, an HTTP MLflow server): a clear error naming the
   endpoint, retried only when the failure is transient (unreachable), never for a missing bucket or refused keys;
3. `dvc pull --allow-missing` (what the remote already has is not recomputed);
4. `dvc repro`, or `dvc exp run -S key=value ...` when overrides or another params file are given;
5. `dvc push`;
6. a markdown artifact: the report, the MLflow run links and the registry's model versions.

The stages themselves become flow runs of their own when PREFECT_API_URL is set, each a child of this flow's run
(flows/stages.py); the workspace steps (the lock, `dvc` commands, their retries, the remote's check, the deployments'
own workspace) are flows/workspace.py's. A deployment's run refuses a workspace that `make deploy` did not prepare
(it may be someone's checkout). A known error (pipeline.errors.ProjectError) ends the run Failed with its one-line
message, without a traceback; anything else, a bug, keeps its traceback.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
from pathlib import Path

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE
from prefect.exceptions import FailedRun
from prefect.states import Failed

from flows.services import check_prefect_api, one_line_known_errors
from flows.workspace import (
    REPO, PipelineError, check_endpoints, dvc, dvc_pull, dvc_push, refuse_unprepared_workspace,
    start_from_committed_params, workspace_lock,
)
from pipeline.errors import ProjectError

one_line_known_errors()  # a known error is one line in the run's log (a worker imports this module to run the flow)

ARTIFACT_KEY = "visual-region-summary"


@task(cache_policy=NO_CACHE)
def reproduce(workspace: Path, params_file: str | None, overrides: list[str], experiment: str | None) -> str:
    """`dvc repro`, or `dvc exp run` (recorded as an experiment) when the params differ from the committed ones."""
    for o in overrides:
        if "=" not in o and not o.startswith("~"):
            raise PipelineError(f"override {o!r} is neither key=value (e.g. prune.num_layers=3) nor ~key (a deletion)")
    start_from_committed_params(workspace)
    source = (workspace / params_file).resolve() if params_file else None
    other_params = source is not None and source != (workspace / "params.yaml").resolve()
    if other_params:
        if not source.is_file():
            raise PipelineError(f"params file {source} does not exist")
        shutil.copyfile(source, workspace / "params.yaml")
    if overrides or other_params:
        args = ["exp", "run", *(["--name", experiment] if experiment else [])]
        for o in overrides:
            args += ["-S", o]
    else:
        args = ["repro"]
    dvc(workspace, *args)
    return "dvc " + " ".join(args)


# ------------------------------------------------------------------------------------------------- summary
def mlflow_links(workspace: Path) -> list[tuple[str, str]]:
    """(tune run, link) per tuned model, where the tracking server is an HTTP one that knows the run."""
    uri = os.environ.get("MLFLOW_TRACKING_URI", "")
    if not uri.startswith(("http://", "https://")):
        return []
    import mlflow

    client = mlflow.MlflowClient(uri)
    links = []
    for record in sorted((workspace / "runs" / "tune").glob("*.json")):  # the tune runs' records (stages/_records.py)
        run_id = json.loads(record.read_text()).get("mlflow_run_id")
        try:
            exp = client.get_run(run_id).info.experiment_id
        except Exception:  # noqa: BLE001 (a link is a convenience; the summary goes on without it)
            continue
        links.append((record.stem, f"{uri.rstrip('/')}/#/experiments/{exp}/runs/{run_id}"))
    return links


def summary_markdown(workspace: Path, command: str, pushed: bool) -> str:
    lines = ["# visual-region pipeline", "", f"- workspace: `{workspace}`", f"- command: `{command}`",
             f"- outputs pushed to the DVC remote: {'yes' if pushed else 'no'}", ""]
    report = workspace / "reports" / "summary.md"
    if report.exists():
        # one heading level down (this summary has the title); images are files in the workspace, not in Prefect
        text = re.sub(r"^#", "##", report.read_text().strip(), flags=re.M)
        lines += [re.sub(r"!\[([^\]]*)\]\(([^)]+)\)", rf"- \1: `{report.parent.name}/\2`", text), ""]
    links = mlflow_links(workspace)
    if links:
        lines += ["## MLflow runs", ""] + [f"- [{name}]({link})" for name, link in links] + [""]
    registry = workspace / "metrics" / "registry.json"
    if registry.exists():
        reg = json.loads(registry.read_text())
        if reg.get("enabled"):
            lines += ["## Model registry", "", "| model | version | champion | gate |", "|---|---|---|---|"]
            lines += [f"| {m['model']} | {m['version']} | {m['champion'] or '-'} | {m['gate']} |"
                      for m in reg.get("models", {}).values()]
    return "\n".join(lines) + "\n"


@task(cache_policy=NO_CACHE)
def publish_summary(workspace: Path, command: str, pushed: bool) -> str:
    markdown = summary_markdown(workspace, command, pushed)
    create_markdown_artifact(markdown=markdown, key=ARTIFACT_KEY, description="metrics, MLflow runs and registry")
    return markdown


# ------------------------------------------------------------------------------------------------- the flow
@flow(name="visual-region-pipeline", log_prints=True)
def pipeline(workspace: str | None = None, params_file: str | None = None, overrides: list[str] | None = None,
             pull: bool = True, push: bool = True, remote: str | None = None, experiment: str | None = None) -> dict:
    """Pull, reproduce (with `overrides` as `dvc exp run -S`, or another `params_file`), push, summarize.

    workspace: the repo clone to run in (default: the one holding this code, i.e. the deployment's working directory);
    params_file: a params file in the workspace to run with (e.g. params/micro.yaml), copied onto params.yaml;
    overrides: `dvc exp run -S` (Hydra) syntax, e.g. ["prune.num_layers=3", "tune.runs.top25={strategy: top,
        budget: 0.25}", "~tune.runs.uniform25"] (`~key` deletes);
    remote: the DVC remote (default: the workspace's default remote); experiment: a name for `dvc exp run`."""
    ws = Path(workspace or REPO).resolve()
    try:
        if not (ws / "dvc.yaml").is_file():
            raise PipelineError(f"workspace {ws} has no dvc.yaml")
        refuse_unprepared_workspace(ws)  # a deployment's run: never in someone's checkout
        with workspace_lock(ws):
            check_endpoints(ws, remote, needs_remote=pull or push)
            if pull:
                dvc_pull(ws, remote, allow_missing=True)
            command = reproduce(ws, params_file, list(overrides or []), experiment)
            if push:
                dvc_push(ws, remote)
            publish_summary(ws, command, push)
    except ProjectError as err:
        # a known error (a setting, a busy workspace, a failed stage): the run ends Failed with its one line
        get_run_logger().error("%s: %s", type(err).__name__, err)
        return Failed(message=str(err))
    return {"workspace": str(ws), "command": command, "pushed": push}


def main(argv: list[str] | None = None) -> None:
    """`python -m flows.pipeline`: one run now, without a deployment (cron, a shell, CI)."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m flows.pipeline", description=pipeline.__doc__.split("\n")[0])
    parser.add_argument("--workspace", help="the repo clone to run in (default: this one)")
    parser.add_argument("--params-file", help="a params file in the workspace, copied onto params.yaml")
    parser.add_argument("-S", "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="a params override for `dvc exp run -S`: key=value, or ~key to delete (repeatable)")
    parser.add_argument("--no-pull", action="store_true")
    parser.add_argument("--no-push", action="store_true")
    parser.add_argument("--remote", help="the DVC remote (default: the workspace's default remote)")
    parser.add_argument("--experiment", help="a name for `dvc exp run`")
    args = parser.parse_args(argv)
    try:
        check_prefect_api()
        state = pipeline(workspace=args.workspace, params_file=args.params_file, overrides=args.overrides,
                         pull=not args.no_pull, push=not args.no_push, remote=args.remote,
                         experiment=args.experiment, return_state=True)
    except ProjectError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    try:
        state.result()  # a bug re-raises here with its traceback
    except FailedRun:  # the flow ended itself Failed with a known error's one line
        print(f"error: {state.message}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
