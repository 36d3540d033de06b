"""What every stage shares: environment defaults, logging, params loading, a clean error exit."""

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


def load_params(path: str = "params.yaml"):
    from pipeline import config

    params = config.load(os.environ.get("VR_PARAMS", path))
    if params.model.profile != "hf":
        os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the offline profiles never touch a hub
    return params


def run_name(argv: list[str], prog: str) -> str:
    """The `--run NAME` argument of the per-run stages (tune, prune, evaluate)."""
    import argparse

    parser = argparse.ArgumentParser(prog=prog)
    parser.add_argument("--run", required=True, help="an entry of tune.runs in params.yaml")
    return parser.parse_args(argv).run


def torch_dtype(name: str):
    import torch

    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def under_prefect() -> bool:
    """Stages run as Prefect flows when PREFECT_API_URL is set; VR_PREFECT=0 turns that off, VR_PREFECT=1 forces it
    (an ephemeral Prefect server without the URL: ~10 s more per stage, so not the default)."""
    mode = os.environ.get("VR_PREFECT", "").strip().lower()
    if mode in ("0", "off", "false"):
        return False
    return mode in ("1", "on", "true") or bool(os.environ.get("PREFECT_API_URL"))


def _naming_tracking_outages(main: Callable[[list[str]], None]) -> Callable[[list[str]], None]:
    """`main`, with MLflow's client failing to reach the tracking server raised as one TrackingError naming it."""

    def stage(argv: list[str]) -> None:
        try:
            main(argv)
        except Exception as err:
            from pipeline.tracking import outage

            clear = outage(err)
            if clear is None:
                raise
            raise clear from err

    return stage


def run(main: Callable[[list[str]], None], *, launchable: str | None = None) -> None:
    """Run a stage: a known error (bad params, bad data, bad model, an unreachable service) is one clear line and
    exit code 2. Under Prefect (see `under_prefect`) the stage is a flow run (flows/stages.py); under a
    multi-process launcher (torchrun / accelerate launch) only rank 0 is, the other ranks run `main` directly.
    `launchable` (the training stages' module name): with $VR_LAUNCHER set, the stage runs under that launcher
    instead (pipeline.distributed.launcher_command) and exits with its exit code."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    from pipeline.config import ParamsError
    from pipeline.data import DataError
    from pipeline.distributed import is_main, launcher_command, relaunch
    from pipeline.model import ModelStructureError
    from pipeline.tracking import TrackingError

    known: tuple[type[BaseException], ...] = (
        ParamsError, DataError, ModelStructureError, FileNotFoundError, ValueError, TrackingError,
    )
    main = _naming_tracking_outages(main)
    try:
        command = launcher_command(launchable, sys.argv[1:]) if launchable else None
        if command:
            log.info("running under %s: %s", "VR_LAUNCHER", " ".join(command))
            sys.exit(relaunch(command))
        if under_prefect() and is_main():
            from flows.services import ServiceError
            from flows.stages import run_stage

            known = (*known, ServiceError)
            run_stage(main, sys.argv[1:], known)
        else:
            main(sys.argv[1:])
    except known as err:
        log.error("%s: %s", type(err).__name__, err)
        sys.exit(2)
