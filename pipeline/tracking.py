"""MLflow tracking: one run per layer-selection run, nested under a parent run per pipeline run.

Default store: a local sqlite file in the repo (`sqlite:///mlruns.db`, artifacts in `mlartifacts/`);
`MLFLOW_TRACKING_URI` overrides. The parent run is found by a key (the git commit + the params that shape the
pipeline), so the separate processes of one `dvc repro` share it; `VR_PIPELINE_RUN_ID` names it explicitly.

A tracking server that goes away is one clear error naming it, in bounded time: `setup` bounds MLflow's own HTTP
retries (`HTTP_RETRIES`; MLflow's default retries a refused connection for about 4 minutes per request) and
`outage` turns MLflow's failure into a `TrackingError` naming the server (stages/_common.py exits 2 on it).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import socket
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from pipeline.errors import ProjectError

log = logging.getLogger(__name__)
REPO = Path(__file__).resolve().parent.parent
SECRET_HINTS = ("SECRET", "TOKEN", "PASSWORD", "ACCESS_KEY", "CREDENTIAL")
# MLflow's HTTP client retries a failed request MLFLOW_HTTP_REQUEST_MAX_RETRIES times (default 7) with a backoff of
# factor * 2^n s (default factor 2: 4, 8, ... 120 s, about 4 minutes in all, and that again for each request still to
# come: ending the run, its parent). 3 retries with factor 1 wait 0 + 2 + 4 s (plus up to 1 s of jitter each): a
# server restart that quick is ridden out, a real outage fails within seconds. Environment values win. The request
# timeout stays MLflow's (MLFLOW_HTTP_REQUEST_TIMEOUT, 120 s): a large checkpoint upload through the artifact proxy
# is answered only once the server has stored it.
HTTP_RETRIES = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "3", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1"}


class TrackingError(ProjectError, RuntimeError):
    """The MLflow tracking store failed a stage: the server stopped answering, or a local database refused a write;
    the message names the server or the database."""


def bound_http_retries() -> None:
    for key, value in HTTP_RETRIES.items():
        os.environ.setdefault(key, value)


def setup(experiment: str):
    import mlflow

    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    bound_http_retries()
    uri = os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{REPO / 'mlruns.db'}"
    from pipeline.registry import ensure_reachable

    ensure_reachable(uri)  # a down server fails fast, naming it, instead of MLflow's minutes of client retries
    mlflow.set_tracking_uri(uri)
    if mlflow.get_experiment_by_name(experiment) is None:
        location = None if "MLFLOW_TRACKING_URI" in os.environ else (REPO / "mlartifacts").as_uri()
        mlflow.create_experiment(experiment, artifact_location=location)
    mlflow.set_experiment(experiment)
    return mlflow


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def tree_hash(path: str | os.PathLike) -> str:
    """sha256 over the relative names and bytes of every file below `path` (a data version id)."""
    digest = hashlib.sha256()
    root = Path(path)
    for f in sorted(p for p in root.rglob("*") if p.is_file()):
        digest.update(str(f.relative_to(root)).encode())
        digest.update(f.read_bytes())
    return digest.hexdigest()[:16]


def pipeline_key(params) -> dict:
    """What identifies one pipeline run: the code, the data (the content hash `prepare` recorded, so the data is
    not re-read) and the params that shape its layer-selection runs' models and scores. An experiment that changes
    only `prune` or `evaluate` is a pipeline run of its own (its scores go to its own runs: `evaluation_run_id`)."""
    from pipeline.data.schema import content_hash

    return {
        "git_commit": git_commit(), "data_hash": content_hash("data/prepared"), "seed": params.seed,
        "model": params.model.model_dump_json(), "tune": params.tune.model_dump_json(),
        "prune": params.prune.model_dump_json(), "evaluate": params.evaluate.model_dump_json(),
    }


def parent_run_id(mlflow, key_data: dict) -> str:
    explicit = os.environ.get("VR_PIPELINE_RUN_ID")
    if explicit:
        return explicit
    key = hashlib.sha256(json.dumps(key_data, sort_keys=True, default=str).encode()).hexdigest()[:16]
    found = mlflow.search_runs(filter_string=f"tags.vr_pipeline_key = '{key}'", max_results=1, output_format="list")
    if found:
        return found[0].info.run_id
    with mlflow.start_run(run_name=f"pipeline-{key[:8]}", tags={"vr_pipeline_key": key, "vr_kind": "pipeline"}) as run:
        mlflow.log_params({k: str(v)[:500] for k, v in key_data.items()})
        return run.info.run_id


def evaluation_run_id(mlflow, key: dict, run: str, tune_run_id: str | None) -> str:
    """The MLflow run that `evaluate@<run>` logs into: the tune run itself when it belongs to this pipeline run
    (`key`), so a selection's params, training and scores are one row; otherwise (an experiment that re-used a
    tuned model trained under another pipeline run) a run of this pipeline run's own, named after the selection,
    carrying the tune run's params and a link to it (tag `vr_tune_run_id`), so the other run's numbers stay its own.
    `tune_run_id`: from the tune's run record (stages/_records.py); None (no record: the tuned model was restored by
    DVC, or trained in another clone) looks the tune run up among this pipeline run's children instead."""
    from mlflow.exceptions import MlflowException

    parent = parent_run_id(mlflow, key)
    client = mlflow.MlflowClient()
    experiment = client.get_run(parent).info.experiment_id
    tune = None
    if tune_run_id is not None:
        try:
            tune = client.get_run(tune_run_id)
        except MlflowException:  # a record from another tracking store
            tune = None
    if tune is None:
        found = client.search_runs(
            [experiment], max_results=1, order_by=["attributes.start_time DESC"],
            filter_string=f"tags.`mlflow.parentRunId` = '{parent}' and tags.vr_kind = 'tune' and tags.vr_run = '{run}' "
                          "and attributes.status = 'FINISHED'",
        )
        tune = found[0] if found else None
    if tune is not None and tune.data.tags.get("mlflow.parentRunId") == parent:
        return tune.info.run_id
    found = client.search_runs(
        [experiment], max_results=1,
        filter_string=f"tags.`mlflow.parentRunId` = '{parent}' and tags.vr_kind = 'evaluate' and tags.vr_run = '{run}'",
    )
    if found:
        return found[0].info.run_id
    with mlflow.start_run(run_id=parent):
        tags = run_tags("evaluate", run) | ({"vr_tune_run_id": tune.info.run_id} if tune is not None else {})
        with mlflow.start_run(run_name=run, nested=True, tags=tags) as active:
            if tune is not None:  # its own params
                mlflow.log_params({k: v for k, v in tune.data.params.items() if not k.startswith("prune.")})
            return active.info.run_id


def prune_params(params) -> dict:
    """The `prune` params behind a run's pruned model and its scores, named by their params.yaml keys."""
    prune = params.prune
    return {"prune.num_layers": prune.num_layers, "prune.metric": prune.metric,
            "prune.calibration_samples": prune.calibration_samples}


def scrub(params: dict) -> dict:
    """Never log anything that looks like a credential."""
    return {k: v for k, v in params.items() if not any(h in k.upper() for h in SECRET_HINTS)}


# ---------------------------------------------------------------------------------------------- stale runs, outages
def run_tags(kind: str, run: str) -> dict[str, str]:
    """Tags of a selection run's MLflow run; host and pid tell a killed writer from a live one (`end_stale_runs`)."""
    return {"vr_kind": kind, "vr_run": run, "vr_host": socket.gethostname(), "vr_pid": str(os.getpid())}


def _alive_here(tags: dict[str, str]) -> bool:
    """Whether the process that started a run is still running on this host (False when unknown)."""
    pid = tags.get("vr_pid", "")
    if tags.get("vr_host") != socket.gethostname() or not pid.isdigit() or int(pid) == os.getpid():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def end_stale_runs(mlflow, parent_id: str, *, kind: str, run: str) -> list[str]:
    """Set to KILLED the RUNNING child runs of `parent_id` for the same selection run (`vr_kind`, `vr_run`): a stage
    killed (kill -9, a lost machine) or cut off from its tracking server never ended its run, and the re-run opens a
    new one. A run whose process still runs on this host is left alone. Returns the ids it ended."""
    client = mlflow.MlflowClient()
    experiment = client.get_run(parent_id).info.experiment_id
    found = client.search_runs(
        [experiment], filter_string=f"tags.`mlflow.parentRunId` = '{parent_id}' and attributes.status = 'RUNNING'",
    )
    ended = []
    for r in found:
        tags = r.data.tags
        if tags.get("vr_kind") != kind or tags.get("vr_run") != run:
            continue
        if _alive_here(tags):
            log.warning("MLflow run %s (%s %s) is RUNNING and its process %s is alive: leaving it", r.info.run_id, kind,
                        run, tags.get("vr_pid"))
            continue
        client.set_terminated(r.info.run_id, "KILLED")
        log.warning("MLflow run %s (%s %s) was left RUNNING by a stage that did not finish (killed, or cut off from "
                    "the server): set to KILLED", r.info.run_id, kind, run)
        ended.append(r.info.run_id)
    return ended


def error_line(err: BaseException) -> str:
    """`<Type>: <first line of the message>`, as a stage logs a project error (at most 1,000 characters)."""
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0] if text else ''}"[:1000]


@contextmanager
def failure_recorded(mlflow) -> Iterator[None]:
    """Around the work of the active MLflow run: when it fails, tag the run `vr_error` with the one-line reason
    (`error_line`); `mlflow.start_run`'s exit then ends it FAILED. Not when the failure is the tracking server going
    away (`outage`): the tag could not be sent, and trying would only add MLflow's retries."""
    try:
        yield
    except BaseException as err:
        if outage(err) is None:
            try:
                mlflow.set_tag("vr_error", error_line(err))
            except Exception as tag_err:  # e.g. a tracking database that became read-only: the run still ends FAILED
                log.warning("could not tag the MLflow run with its error (%s): %s", error_line(err), tag_err)
        raise


_CONNECTION_FAILURES = (
    ("Connection refused", "connection refused"), ("Failed to establish a new connection", "no connection"),
    ("RemoteDisconnected", "the server closed the connection"), ("Connection aborted", "connection aborted"),
    ("Connection reset", "connection reset"), ("timed out", "timed out"), ("Max retries exceeded", "no answer"),
    ("Name or service not known", "unknown host"), ("Temporary failure in name resolution", "unknown host"),
)


# What SQLite says when a local tracking database (sqlite:///...) cannot take a write: the file or its folder turned
# read-only, the disk is full, or the file went away. Not a bug of the stage: the database's place.
_DATABASE_REFUSALS = ("attempt to write a readonly database", "database or disk is full", "disk I/O error",
                      "unable to open database file")


def _chain(err: BaseException) -> Iterator[BaseException]:
    """The exception, then what it was raised from or during: when a request fails inside `with start_run()`, ending
    the run fails too and is raised last, so the original failure is the deepest one found."""
    seen, todo = set(), [err]
    while todo:
        e = todo.pop(0)
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        yield e
        todo += [e.__cause__, e.__context__]


def _database_refusal(err: BaseException, uri: str) -> TrackingError | None:
    for e in _chain(err):
        if type(e).__module__.startswith(("mlflow", "sqlalchemy", "sqlite3")):
            reason = next((r for r in _DATABASE_REFUSALS if r in str(e)), None)
            if reason is not None:
                return TrackingError(f"the MLflow tracking database {uri} refused a write: {reason}; the run could "
                                     "not be ended (the re-run sets it KILLED): make the database writable and run "
                                     "the stage again")
    return None


def outage(err: BaseException, tracking_uri: str | None = None) -> TrackingError | None:
    """A TrackingError naming the store when `err` (or an exception it was raised from or during) is MLflow's client
    failing to reach an HTTP tracking server, or a local sqlite database refusing a write (read-only, disk full);
    None for anything else."""
    uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{REPO / 'mlruns.db'}"
    if uri.startswith("sqlite:"):
        return _database_refusal(err, uri)
    if not uri.startswith(("http://", "https://")):
        return None
    found = []
    for e in _chain(err):
        text = str(e)
        if type(e).__module__.startswith(("mlflow", "requests", "urllib3")):
            reason = next((short for marker, short in _CONNECTION_FAILURES if marker in text), None)
            if reason is not None:
                call = re.search(r"API request to (\S+) failed", text)
                found.append((call.group(1).removeprefix(uri.rstrip("/")) if call else None, reason))
    if not found:
        return None
    where, reason = next((f for f in reversed(found) if f[0]), found[-1])
    retries = os.environ.get("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "7")
    return TrackingError(f"MLflow tracking server {uri} stopped answering{f' (at {where})' if where else ''}: {reason} "
                         f"after {retries} retries; run the stage again once the server is back")
