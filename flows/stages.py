"""Every DVC stage as a Prefect flow. `stages/_common.run()` calls `run_stage` when PREFECT_API_URL is set (or
VR_PREFECT=1), so a stage run by `dvc repro` shows up in the Prefect UI as flow `<stage>`, run `<stage>[@<run>]`; under the
pipeline flow (VR_PIPELINE_FLOW_RUN, set by flows/workspace.dvc_env) as a child run of the pipeline's run.

Without PREFECT_API_URL the stages run plain: an ephemeral Prefect server costs 9-12 s per stage on a 2-core machine
(measured with prefect 3.8.8), more than the micro stages themselves. VR_PREFECT=1 forces it anyway.

One task per flow, `check_endpoints`, retries (a server restarting is transient); the stage's work itself runs once
(a failed training step or a bad input fails the same way again). A known error (`known`: stages/_common.run passes
pipeline.errors.ProjectError, ServiceError included) ends the flow Failed with its one-line message and reaches the
caller unchanged, so the stage still exits 2 without a traceback; anything else keeps its traceback.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable, Mapping
from pathlib import Path

from flows.services import ServiceError, check_http, check_prefect_api, one_line_known_errors

STAGE_TAG = "dvc-stage"


def stage_run_name(argv: list[str], stage: str) -> str:
    """`tune@uniform25` for the per-run stages (as DVC names them), else the stage name."""
    if "--run" in argv and argv.index("--run") + 1 < len(argv):
        return f"{stage}@{argv[argv.index('--run') + 1]}"
    return stage


def endpoints(env: Mapping[str, str] = os.environ) -> dict[str, str]:
    """The HTTP services a stage will talk to: {what: health URL}."""
    out = {}
    mlflow_uri = env.get("MLFLOW_TRACKING_URI", "")
    if mlflow_uri.startswith(("http://", "https://")):
        out[f"MLflow tracking server {mlflow_uri}"] = mlflow_uri.rstrip("/") + "/health"
    return out


def child_flow_run(stage_flow, argv: list[str], parent: str, run_tags: list[str]):
    """A flow run of `stage_flow` created as a child of the pipeline's flow run `parent`, the way Prefect links a
    subflow (prefect/flow_engine.py FlowRunEngine.create_flow_run): a task run in the parent's run stands for the
    stage, and the stage's flow run names it as `parent_task_run_id` (the server then mirrors the stage's state onto
    it). So the UI lists the stage under its pipeline run, and "Hide subflows" hides it. None, with a warning, when
    the parent run is not on this server (a stale VR_PIPELINE_FLOW_RUN): the stage then runs as a run of its own."""
    from uuid import UUID, uuid4

    from prefect import Task, get_client
    from prefect.exceptions import ObjectNotFound
    from prefect.states import Pending

    name = stage_run_name(argv, stage_flow.name)
    with get_client(sync_client=True) as client:
        try:
            parent_run = client.read_flow_run(UUID(parent))
        except (ValueError, ObjectNotFound):
            logging.getLogger("stages").warning("pipeline flow run %s (VR_PIPELINE_FLOW_RUN) is not on the Prefect "
                                                "server: the stage runs as a flow run of its own", parent)
            return None
        tracker = Task(name=stage_flow.name, fn=stage_flow.fn)  # as Prefect's own subflow-tracking task
        task_run = client.create_task_run(task=tracker, flow_run_id=parent_run.id, dynamic_key=uuid4().hex,
                                          name=name, extra_tags=run_tags, state=Pending())
        return client.create_flow_run(flow=stage_flow, name=name, parameters=stage_flow.serialize_parameters(
            {"argv": argv}), parent_task_run_id=task_run.id, tags=run_tags, state=Pending())


def run_stage(main: Callable[[list[str]], None], argv: list[str], known: tuple[type[BaseException], ...]) -> None:
    """Run `main(argv)` as the flow of this stage; re-raise a known error as it was raised."""
    try:
        check_prefect_api()  # unset (VR_PREFECT=1 without a server): nothing to check, Prefect starts its own
    except ServiceError as err:
        raise ServiceError(f"{err}; start it (`make prefect-server`) or unset PREFECT_API_URL to run the stage "
                           "without Prefect") from None
    # Under a worker this process inherits the pipeline's flow-run id (PREFECT__FLOW_RUN_ID): dropped, the stage is
    # a flow run of its own, a child of the pipeline's run (VR_PIPELINE_FLOW_RUN) and tagged with it.
    os.environ.pop("PREFECT__FLOW_RUN_ID", None)
    parent = os.environ.get("VR_PIPELINE_FLOW_RUN")
    os.environ.setdefault("PREFECT_LOGGING_EXTRA_LOGGERS", "stages,pipeline")  # their logs reach the UI too
    os.environ.setdefault("PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW", "ignore")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per API call otherwise

    from prefect import flow, tags, task
    from prefect.cache_policies import NO_CACHE
    from prefect.states import Failed

    one_line_known_errors()

    stage = Path(sys.argv[0]).stem
    caught: list[BaseException] = []

    @task(name="check_endpoints", retries=2, retry_delay_seconds=[2, 5], cache_policy=NO_CACHE)
    def check_endpoints(urls: dict[str, str]) -> None:
        for what, url in urls.items():
            check_http(url, what, attempts=1)

    @flow(name=stage, flow_run_name=stage_run_name(argv, stage), validate_parameters=False, log_prints=True)
    def stage_flow(argv: list[str]):
        try:
            check_endpoints(endpoints())
            main(argv)
        except (*known, ServiceError) as err:
            caught.append(err)
            return Failed(message=f"{type(err).__name__}: {err}")

    run_tags = [STAGE_TAG, f"stage:{stage}"] + ([f"pipeline-run:{parent}"] if parent else [])
    child = child_flow_run(stage_flow, argv, parent, run_tags) if parent else None
    if child is not None:
        from prefect.flow_engine import run_flow

        state = run_flow(stage_flow, flow_run=child, parameters={"argv": argv}, return_type="state")
    else:
        with tags(*run_tags):
            state = stage_flow(argv, return_state=True)
    if caught:
        raise caught[0]
    if not state.is_completed():
        state.result()  # raises the flow's exception (an unexpected error keeps its traceback)
