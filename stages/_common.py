"""Running a stage: environment defaults, logging, the `--run` argument, Prefect, the error exit. The training stages
start through stages/_launch.py; what the stages read and write is in stages/_paths.py, reading it in stages/_inputs.py."""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

log = logging.getLogger("stages")


def run_name(argv: list[str], prog: str) -> str:
    """The `--run NAME` argument of the per-run stages (tune, prune, evaluate)."""
    import argparse

    parser = argparse.ArgumentParser(prog=prog)
    parser.add_argument("--run", required=True, help="an entry of tune.runs in params.yaml")
    return parser.parse_args(argv).run


def under_prefect() -> bool:
    """Stages run as Prefect flows when PREFECT_API_URL is set; VR_PREFECT=0 turns that off, VR_PREFECT=1 forces it
    (an ephemeral Prefect server without the URL: ~10 s more per stage, so not the default)."""
    mode = os.environ.get("VR_PREFECT", "").strip().lower()
    if mode in ("0", "off", "false"):
        return False
    return mode in ("1", "on", "true") or bool(os.environ.get("PREFECT_API_URL"))


def configure_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    # MLflow's sqlite store logs the traceback of a database error and then raises it: the raised error is reported
    # once, as one line (a project error, e.g. a read-only tracking database) or with its traceback (a bug).
    logging.getLogger("mlflow.store.db.utils").setLevel(logging.CRITICAL)


def run(main: Callable[[list[str]], None], *, outage: Callable[[BaseException], BaseException | None] | None = None,
        as_flow: bool = True) -> None:
    """Run a stage: a pipeline.errors.ProjectError (bad params, data or model, a missing input, a service down) is one
    line and exit code 2; anything else is a bug and keeps its traceback (exit code 1). `outage` (the stages that log
    to MLflow pass pipeline.tracking.outage): the project error an exception stands for, or None. Under Prefect
    (`under_prefect`) the stage is a flow run (flows/stages.py) unless `as_flow` is False (ranks > 0 of a launch:
    stages/_launch.py)."""
    configure_logging()
    from pipeline.errors import ProjectError

    stage = main if outage is None else _naming_outages(outage, main)
    try:
        if as_flow and under_prefect():
            from flows.stages import run_stage

            run_stage(stage, sys.argv[1:], (ProjectError,))
        else:
            stage(sys.argv[1:])
    except ProjectError as err:
        log.error("%s: %s", type(err).__name__, err)
        sys.exit(2)


def _naming_outages(outage: Callable[[BaseException], BaseException | None], main: Callable[[list[str]], None]):
    """`main`, raising what `outage` makes of an exception (e.g. MLflow's client failing to reach the server)."""

    def stage(argv: list[str]) -> None:
        try:
            main(argv)
        except Exception as err:
            clear = outage(err)
            if clear is None:
                raise
            raise clear from err

    return stage
