"""MLflow tracking: one run per layer-selection run, nested under a parent run per pipeline run.

Default store: a local sqlite file in the repo (`sqlite:///mlruns.db`, artifacts in `mlartifacts/`);
`MLFLOW_TRACKING_URI` overrides. The parent run is found by a key (the git commit + the params that shape the
pipeline), so the separate processes of one `dvc repro` share it; `VR_PIPELINE_RUN_ID` names it explicitly.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import subprocess
from pathlib import Path

log = logging.getLogger(__name__)
REPO = Path(__file__).resolve().parent.parent
SECRET_HINTS = ("SECRET", "TOKEN", "PASSWORD", "ACCESS_KEY", "CREDENTIAL")


def setup(experiment: str):
    import mlflow

    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
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
    """What identifies one pipeline run: the code, the data and the params that shape every layer-selection run."""
    return {
        "git_commit": git_commit(), "data_hash": tree_hash("data/prepared"), "seed": params.seed,
        "model": params.model.model_dump_json(), "tune": params.tune.model_dump_json(),
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


def scrub(params: dict) -> dict:
    """Never log anything that looks like a credential."""
    return {k: v for k, v in params.items() if not any(h in k.upper() for h in SECRET_HINTS)}
