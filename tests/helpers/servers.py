"""Helpers for the tests that talk to real servers (SeaweedFS S3, MLflow, Prefect) on 127.0.0.1: isolated
environments, throw-away git + DVC workspaces, and small API queries. The servers themselves are session fixtures
in conftest.py, started by flows/services.py."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PY = sys.executable
S3_KEY, S3_SECRET = "vr-test-access-key", "vr-test-secret-key"  # the throw-away store's only identity
BUCKET = "visual-region"
OUTER = ("PREFECT_API_URL", "PREFECT_HOME", "MLFLOW_TRACKING_URI", "VR_PARAMS", "VR_PIPELINE_RUN_ID", "VR_PREFECT",
         "VR_WORKSPACE", "PREFECT__FLOW_RUN_ID", "MLFLOW_S3_ENDPOINT_URL", "VR_PIPELINE_FLOW_RUN")


def base_env(tmp: Path, **extra: str) -> dict[str, str]:
    """The machine's environment minus anything that would reach outside the test (a real AWS profile, a real
    tracking server, a real Prefect API), telemetry off, the venv first on PATH."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_") and k not in OUTER}
    env.update({
        "PATH": f"{Path(PY).parent}{os.pathsep}{os.environ['PATH']}", "HF_HUB_OFFLINE": "1",
        "HF_HUB_DISABLE_PROGRESS_BARS": "1", "TOKENIZERS_PARALLELISM": "false", "DO_NOT_TRACK": "1",
        "MLFLOW_DISABLE_TELEMETRY": "true", "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "AWS_CONFIG_FILE": str(tmp / "no-aws-config"), "AWS_SHARED_CREDENTIALS_FILE": str(tmp / "no-aws-credentials"),
        "AWS_DEFAULT_REGION": "us-east-1", "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t",
        "GIT_COMMITTER_EMAIL": "t@t", "PREFECT_HOME": str(tmp / "prefect-client"),
    })
    env.update(extra)
    return env


def s3_env(endpoint: str) -> dict[str, str]:
    return {"AWS_ACCESS_KEY_ID": S3_KEY, "AWS_SECRET_ACCESS_KEY": S3_SECRET, "AWS_ENDPOINT_URL_S3": endpoint}


def sh(args: list[str], cwd: Path, env: dict[str, str], *, check: bool = True, timeout: float = 900) -> subprocess.CompletedProcess:
    proc = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{args} failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}")
    return proc


def dvc(ws: Path, env: dict[str, str], *args: str, check: bool = True, timeout: float = 900) -> subprocess.CompletedProcess:
    return sh([PY, "-m", "dvc", *args], ws, env, check=check, timeout=timeout)


def init_repo(ws: Path, env: dict[str, str], remote_url: str | None = None) -> None:
    """git + DVC in `ws` (analytics off), the S3 remote as default, everything committed."""
    sh(["git", "init", "-q"], ws, env)
    dvc(ws, env, "init", "-q")
    dvc(ws, env, "config", "core.analytics", "false")
    if remote_url:
        dvc(ws, env, "remote", "add", "-d", "s3", remote_url)
    sh(["git", "add", "-A"], ws, env)
    sh(["git", "commit", "-qm", "init"], ws, env)


TOY_STAGE = """\
import json, os, random, sys
import yaml
p = yaml.safe_load(open("params.yaml"))
rng = random.Random(p["seed"])
os.makedirs("out/dir/sub", exist_ok=True)
open("out/blob.bin", "wb").write(bytes(rng.randrange(256) for _ in range(p["nbytes"])))
for i in range(3):
    open(f"out/dir/sub/part{i}.txt", "w").write(f"part {i} of {p['nbytes']} bytes\\n")
os.makedirs("metrics", exist_ok=True)
json.dump({"nbytes": p["nbytes"]}, open("metrics/toy.json", "w"))
"""


def make_toy_workspace(ws: Path, env: dict[str, str], remote_url: str | None) -> Path:
    """A one-stage DVC project (a random blob + a directory of files, a metric): fast push/pull round trips."""
    ws.mkdir(parents=True)
    (ws / "toy.py").write_text(TOY_STAGE)
    (ws / "params.yaml").write_text("nbytes: 4096\nseed: 0\n")
    (ws / "dvc.yaml").write_text(
        "stages:\n  toy:\n    cmd: python toy.py\n    deps: [toy.py]\n    params: [nbytes, seed]\n"
        "    outs: [out]\n    metrics: [{metrics/toy.json: {cache: false}}]\n"
    )
    init_repo(ws, env, remote_url)
    return ws


def make_project_workspace(ws: Path, env: dict[str, str], remote_url: str, params: str = "params/micro.yaml") -> Path:
    """A clone-like copy of this project's code (what a worker machine checks out), with `params` as params.yaml."""
    ws.mkdir(parents=True)
    for name in ("flows", "pipeline", "stages", "params", "dvc.yaml", ".dvcignore", "prefect.yaml"):
        src = REPO / name
        if src.is_dir():
            shutil.copytree(src, ws / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(src, ws / name)
    shutil.copy(REPO / params, ws / "params.yaml")
    (ws / ".gitignore").write_text("__pycache__/\n/mlruns.db\n/mlartifacts/\n/checkpoints/\n")
    init_repo(ws, env, remote_url)
    return ws


def lock_outputs(ws: Path) -> dict[str, str]:
    """{path: md5} of every stage output in dvc.lock (directories as their .dir manifest hash)."""
    import yaml

    lock = yaml.safe_load((ws / "dvc.lock").read_text())
    return {o["path"]: o["md5"] for stage in lock["stages"].values() for o in stage.get("outs", [])}


def tree_bytes(path: Path) -> dict[str, bytes]:
    if path.is_file():
        return {"": path.read_bytes()}
    return {str(f.relative_to(path)): f.read_bytes() for f in sorted(path.rglob("*")) if f.is_file()}


def prefect_api(api_url: str, path: str, payload: dict | None = None) -> object:
    """GET `<api_url>/<path>`, or POST `payload` there, as JSON, through the Prefect client: it retries what a busy
    server answers (429, 502, 503, a timeout, a dropped connection: PREFECT_CLIENT_MAX_RETRIES times, default 5, with
    backoff); an error status raises httpx.HTTPStatusError."""
    from prefect.client.orchestration import SyncPrefectClient

    with SyncPrefectClient(api_url) as client:
        response = client.request("POST" if payload is not None else "GET", "/" + path.lstrip("/"), json=payload)
    return response.json()
