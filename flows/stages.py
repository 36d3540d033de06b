"""Every DVC stage as a Prefect flow. `stages/_common.run()` calls `run_stage` when PREFECT_API_URL is set (or
VR_PREFECT=1), so a stage run by `dvc repro` shows up in the Prefect UI as flow `<stage>`, run `<stage>[@<run>]`.

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

from flows.services import ServiceError, check_http, check_prefect_api

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


def run_stage(main: Callable[[list[str]], None], argv: list[str], known: tuple[type[BaseException], ...]) -> None:
    """Run `main(argv)` as the flow of this stage; re-raise a known error as it was raised."""
    try:
        check_prefect_api()  # unset (VR_PREFECT=1 without a server): nothing to check, Prefect starts its own
    except ServiceError as err:
        raise ServiceError(f"{err}; start it (`make prefect-server`) or unset PREFECT_API_URL to run the stage "
                           "without Prefect") from None
    # Under a worker this process inherits the pipeline's flow-run id; the stage is a flow run of its own, tagged
    # with the pipeline run that started it.
    os.environ.pop("PREFECT__FLOW_RUN_ID", None)
    parent = os.environ.get("VR_PIPELINE_FLOW_RUN")
    os.environ.setdefault("PREFECT_LOGGING_EXTRA_LOGGERS", "stages,pipeline")  # their logs reach the UI too
    os.environ.setdefault("PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW", "ignore")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per API call otherwise

    from prefect import flow, tags, task
    from prefect.cache_policies import NO_CACHE
    from prefect.states import Failed

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
    with tags(*run_tags):
        state = stage_flow(argv, return_state=True)
    if caught:
        raise caught[0]
    if not state.is_completed():
        state.result()  # raises the flow's exception (an unexpected error keeps its traceback)
