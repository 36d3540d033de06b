"""The scheduled pipeline as one Prefect flow, in a workspace (a git clone of this repo with its DVC remote set up):

1. lock the workspace (one pipeline run at a time: DVC itself refuses a second repro, but pull, repro and push must
   not interleave with another run's either);
2. check the endpoints it will need (the DVC remote's S3 bucket, an HTTP MLflow server): a clear error naming the
   endpoint, retried only when the failure is transient (unreachable), never for a missing bucket or refused keys;
3. `dvc pull --allow-missing` (what the remote already has is not recomputed);
4. `dvc repro`, or `dvc exp run -S key=value ...` when overrides or another params file are given;
5. `dvc push`;
6. a markdown artifact: the report, the MLflow run links and the registry's model versions.

The stages themselves become flow runs of their own when PREFECT_API_URL is set (flows/stages.py).
"""

from __future__ import annotations

import collections
import contextlib
import fcntl
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE
from prefect.runtime import flow_run

from flows.services import ServiceError, check_http, s3_client

REPO = Path(__file__).resolve().parent.parent
LOCK = Path(".dvc/tmp/vr-pipeline.lock")
ARTIFACT_KEY = "visual-region-summary"
TRANSIENT_MARKERS = ("Could not connect to the endpoint", "Connection refused", "Connection reset", "timed out",
                     "Read timeout", "Temporary failure in name resolution", "ServiceUnavailable", "SlowDown", "503")


class PipelineError(RuntimeError):
    """The pipeline cannot go on; the message names the workspace, command or endpoint."""


class TransientError(PipelineError):
    """Worth another try: the endpoint may come back."""


class WorkspaceBusy(PipelineError):
    """Another pipeline run holds the workspace."""


def _retry_if_transient(task, task_run, state) -> bool:
    return isinstance(state.result(raise_on_failure=False), TransientError)


@contextlib.contextmanager
def workspace_lock(workspace: Path) -> Iterator[None]:
    """An exclusive, non-blocking lock on `<workspace>/.dvc/tmp/vr-pipeline.lock`; released when the holder exits,
    even if it crashes (flock), so a stale file never blocks."""
    path = workspace / LOCK
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 512, 0).decode(errors="replace").strip() or "unknown holder"
            raise WorkspaceBusy(f"workspace {workspace} is busy: another pipeline run holds {path} ({holder}); "
                                "wait for it to finish, or use another clone") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}".encode(), 0)
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the lock


def dvc_env() -> dict[str, str]:
    """The stages' `python` is this interpreter (the project venv), whatever PATH the worker was started with."""
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    if flow_run.id:
        env["VR_PIPELINE_FLOW_RUN"] = str(flow_run.id)
    return env


def dvc(workspace: Path, *args: str) -> None:
    """Run `dvc <args>` in the workspace, its output streamed line by line into the flow's log (a repro can take
    hours); failure raises a PipelineError with the command and the end of its output (a TransientError when that
    output says an endpoint was unreachable)."""
    logger = get_run_logger()
    logger.info("$ dvc %s  (in %s)", " ".join(args), workspace)
    tail: collections.deque[str] = collections.deque(maxlen=60)
    with subprocess.Popen([sys.executable, "-m", "dvc", *args], cwd=workspace, env=dvc_env(), stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, text=True, bufsize=1) as proc:
        for line in proc.stdout:
            if line := line.rstrip():
                logger.info("%s", line)
                tail.append(line)
    if proc.returncode != 0:
        text = "\n".join(tail)
        kind = TransientError if any(m in text for m in TRANSIENT_MARKERS) else PipelineError
        raise kind(f"`dvc {' '.join(args)}` failed in {workspace} (exit {proc.returncode}):\n{text[-3000:]}")


# ------------------------------------------------------------------------------------------------- endpoints
def remote_config(workspace: Path, name: str | None = None) -> tuple[str, dict]:
    """(name, config) of the DVC remote `name` or the workspace's default remote (local config included)."""
    from dvc.repo import Repo

    with Repo(str(workspace)) as repo:
        conf = repo.config
    name = name or conf["core"].get("remote")
    if not name:
        raise PipelineError(f"workspace {workspace} has no default DVC remote: `dvc remote add -d s3 s3://<bucket>/dvc`")
    if name not in conf["remote"]:
        raise PipelineError(f"workspace {workspace} has no DVC remote {name!r} (have {sorted(conf['remote'])})")
    return name, dict(conf["remote"][name])


def s3_endpoint(remote: dict) -> str | None:
    """The remote's `endpointurl`, else the standard AWS variables (None: AWS itself)."""
    return remote.get("endpointurl") or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")


def check_s3_remote(name: str, remote: dict) -> None:
    """List (at most one key of) the remote's prefix with the standard AWS credential chain, as DVC will, and
    classify what went wrong. (Not HEAD bucket: some stores answer it without checking the signature.)"""
    from botocore.exceptions import BotoCoreError, ClientError, EndpointConnectionError, NoCredentialsError

    url = remote["url"]
    if not url.startswith("s3://"):
        return
    bucket, _, prefix = url.removeprefix("s3://").partition("/")
    endpoint = s3_endpoint(remote)
    where = f"S3 endpoint {endpoint or '(AWS)'} (DVC remote {name!r}: {url})"
    try:
        s3_client(endpoint).list_objects_v2(Bucket=bucket, Prefix=prefix, MaxKeys=1)
    except NoCredentialsError:
        raise PipelineError(f"{where}: no AWS credentials found (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, "
                            "AWS_PROFILE or another source of the standard chain)") from None
    except EndpointConnectionError as err:
        raise TransientError(f"{where} is unreachable: {err}") from None
    except ClientError as err:
        code = str(err.response.get("Error", {}).get("Code", ""))
        status = err.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
        if code in ("404", "NoSuchBucket"):
            raise PipelineError(f"{where}: bucket {bucket!r} does not exist") from None
        if code in ("403", "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "InvalidToken", "ExpiredToken"):
            raise PipelineError(f"{where} refused the credentials for bucket {bucket!r} ({code or status}): check "
                                "AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY or AWS_PROFILE") from None
        kind = TransientError if status >= 500 else PipelineError
        raise kind(f"{where}: {code or status}: {err}") from None
    except BotoCoreError as err:  # timeouts and other connection-level failures
        raise TransientError(f"{where} is unreachable: {err}") from None


@task(retries=2, retry_delay_seconds=[3, 10], retry_condition_fn=_retry_if_transient, cache_policy=NO_CACHE)
def check_endpoints(workspace: Path, remote: str | None, needs_remote: bool) -> None:
    """Fail before any long work when a service the run needs is down or misconfigured."""
    if needs_remote:
        name, conf = remote_config(workspace, remote)
        check_s3_remote(name, conf)
    mlflow_uri = os.environ.get("MLFLOW_TRACKING_URI", "")
    if mlflow_uri.startswith(("http://", "https://")):
        try:
            check_http(mlflow_uri.rstrip("/") + "/health", "MLflow tracking server", attempts=1)
        except ServiceError as err:
            raise TransientError(str(err)) from None


# ------------------------------------------------------------------------------------------------- DVC steps
@task(retries=2, retry_delay_seconds=[5, 20], retry_condition_fn=_retry_if_transient, cache_policy=NO_CACHE)
def dvc_pull(workspace: Path, remote: str | None) -> None:
    dvc(workspace, "pull", "--allow-missing", *(["-r", remote] if remote else []))


@task(retries=2, retry_delay_seconds=[5, 20], retry_condition_fn=_retry_if_transient, cache_policy=NO_CACHE)
def dvc_push(workspace: Path, remote: str | None) -> None:
    dvc(workspace, "push", *(["-r", remote] if remote else []))


def start_from_committed_params(workspace: Path) -> None:
    """The same flow parameters mean the same run: params.yaml starts as committed (HEAD), not as an earlier
    experiment left it (`dvc exp run` leaves its params in the workspace). A differing file is kept aside first."""
    proc = subprocess.run(["git", "show", "HEAD:params.yaml"], cwd=workspace, capture_output=True, text=True)
    if proc.returncode != 0:
        raise PipelineError(f"workspace {workspace}: cannot read the committed params.yaml: {proc.stderr.strip()}")
    current = workspace / "params.yaml"
    if current.exists() and current.read_text() != proc.stdout:
        kept = workspace / ".dvc" / "tmp" / f"params.yaml.{time.strftime('%Y%m%d-%H%M%S')}"
        shutil.copyfile(current, kept)
        get_run_logger().warning("params.yaml differed from HEAD's (an earlier experiment or a local edit): kept as %s; "
                                 "running from HEAD's", kept)
    current.write_text(proc.stdout)


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
    for sel in sorted((workspace / "models" / "tuned").glob("*/selection.json")):
        run_id = json.loads(sel.read_text()).get("mlflow_run_id")
        try:
            exp = client.get_run(run_id).info.experiment_id
        except Exception:  # noqa: BLE001 (a link is a convenience; the summary goes on without it)
            continue
        links.append((sel.parent.name, f"{uri.rstrip('/')}/#/experiments/{exp}/runs/{run_id}"))
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
    if not (ws / "dvc.yaml").is_file():
        raise PipelineError(f"workspace {ws} has no dvc.yaml")
    with workspace_lock(ws):
        check_endpoints(ws, remote, needs_remote=pull or push)
        if pull:
            dvc_pull(ws, remote)
        command = reproduce(ws, params_file, list(overrides or []), experiment)
        if push:
            dvc_push(ws, remote)
        publish_summary(ws, command, push)
    return {"workspace": str(ws), "command": command, "pushed": push}


def main(argv: list[str] | None = None) -> None:
    """`python -m flows.pipeline`: one run now, without a deployment (cron, a shell, CI)."""
    import argparse

    from flows.stages import check_prefect_api

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
        if os.environ.get("PREFECT_API_URL"):
            check_prefect_api(os.environ["PREFECT_API_URL"])
        pipeline(workspace=args.workspace, params_file=args.params_file, overrides=args.overrides,
                 pull=not args.no_pull, push=not args.no_push, remote=args.remote, experiment=args.experiment)
    except (PipelineError, ServiceError) as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
