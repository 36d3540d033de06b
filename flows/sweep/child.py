"""The sweep's child flow: one layer selection in a fresh clone, on whichever worker of the pool takes it (the
package docstring, flows/sweep/__init__.py, tells the whole sweep)."""

from __future__ import annotations

import os
import shutil
import socket
import tempfile
import time
from pathlib import Path

import yaml
from prefect import flow, get_run_logger, task
from prefect.artifacts import Artifact
from prefect.runtime import flow_run as current_run

from flows.services import one_line_known_errors
from flows.sweep import exchange
from flows.workspace import (
    RETRY_TRANSIENT, PipelineError, check_endpoints, clone_at, dvc, dvc_pull, dvc_push, dvc_repro, remote_config,
)

one_line_known_errors()  # a known error is one line in the run's log (a worker imports this module to run the flow)

CHILD_FLOW = "visual-region-sweep-child"
RESULT_TYPE = "vr-sweep-result"  # the artifact a child leaves for the parent (JSON metadata; read through the API)
START_FILES = ["params.yaml", "dvc.lock"]  # the parent's, written over the clone's before anything runs


def child_root(child_dir: str | None) -> Path:
    """Where children make their clones: `child_dir`, else $VR_SWEEP_DIR on the worker, else <tmp>/vr-sweep."""
    return Path(child_dir or os.environ.get("VR_SWEEP_DIR") or Path(tempfile.gettempdir()) / "vr-sweep")


def where() -> dict:
    """The worker, host and process a child ran in (for the parent's summary)."""
    return {"host": socket.gethostname(), "pid": os.getpid(), "worker": os.environ.get("PREFECT__WORKER_NAME"),
            "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES")}


@task(**RETRY_TRANSIENT)
def clone(repo_url: str, commit: str, workspace: Path) -> None:
    clone_at(repo_url, commit, workspace)


@flow(name=CHILD_FLOW, log_prints=True)
def sweep_child(selection: str, stages: list[str], repo_url: str, commit: str, sweep_id: str,
                pull: list[str] | None = None, inputs: list[str] | None = None, outputs: list[str] | None = None,
                remote: str | None = None, remote_url: str | None = None, child_dir: str | None = None,
                keep_workspace: bool = False) -> dict:
    """One layer selection in a fresh clone: its start files from the parent, `dvc pull` of what it reads,
    `dvc repro -s` of its stages, `dvc push`, its uncached outputs back to the parent, a result artifact.

    Parameters come from the parent (flows/sweep/parent.py): the repo and commit to clone; `sweep_id`, the parent's
    flow run (its exchange area in the DVC remote); the cached outputs to `pull` and the uncached `inputs` the parent
    sent; the uncached `outputs` to send back; the DVC `remote` (and the parent's `remote_url` for it)."""
    logger = get_run_logger()
    started = time.monotonic()
    run_id = str(current_run.id or os.getpid())
    ws = child_root(child_dir) / f"{sweep_id[:8]}-{selection}-{run_id[:8]}"
    logger.info("selection %s: stages %s in %s (%s)", selection, ", ".join(stages), ws, where())
    uri = os.environ.get("MLFLOW_TRACKING_URI", "")
    if not uri.startswith(("http://", "https://")):
        logger.warning("MLFLOW_TRACKING_URI is %r: this child's MLflow runs stay in its own workspace, not with the "
                       "rest of the sweep; set it to the team's tracking server", uri or "unset")
    clone(repo_url, commit, ws)
    if remote_url:  # the parent's remote may be set in its local config only: the same one here
        name, conf = remote_config(ws, remote)
        if conf.get("url") != remote_url:
            dvc(ws, "remote", "modify", "--local", name, "url", remote_url)
    check_endpoints(ws, remote, needs_remote=True)
    exchange.receive_files(ws, remote, exchange.key(sweep_id, selection, "inputs"), [*START_FILES, *(inputs or [])],
                           "the parent")
    if pull:
        dvc_pull(ws, remote, list(pull))
    dvc_repro(ws, stages, single_item=True)
    dvc_push(ws, remote, stages)

    lock = (yaml.safe_load((ws / "dvc.lock").read_text()) or {}).get("stages", {})
    if missing := [s for s in stages if s not in lock]:
        raise PipelineError(f"selection {selection}: dvc.lock in {ws} has no entries for {missing} after the repro")
    outputs_key = exchange.key(sweep_id, selection, f"outputs-{run_id}")
    # and its stages' run records (timings, MLflow run ids: stages/_records.py), which are not DVC outputs
    records = [exchange.RUN_RECORDS] if (ws / exchange.RUN_RECORDS).is_dir() else []
    exchange.send_files(ws, remote, outputs_key, [*(outputs or []), *records])
    result = {
        "selection": selection, "commit": commit, "stages": stages, "lock": {s: lock[s] for s in stages},
        "outputs_key": outputs_key, "where": where(), "seconds": round(time.monotonic() - started, 1),
    }
    Artifact(type=RESULT_TYPE, description=f"sweep result of {selection}: dvc.lock entries, where its uncached "
             "outputs are in the DVC remote, where it ran", data=result).create()
    if not keep_workspace:
        shutil.rmtree(ws, ignore_errors=True)
    logger.info("selection %s done in %.0f s on %s", selection, result["seconds"], result["where"])
    return {k: v for k, v in result.items() if k != "lock"}
