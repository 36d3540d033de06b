"""A workspace, as the flows use it: a git clone of this repo with its DVC remote set up. The one place that runs
`dvc` and `git` there (with the project's interpreter first on PATH), knows which failures are transient (worth
another try: an endpoint may come back) and retries those for the pulls, pushes and endpoint checks, reads the DVC
remote's config and checks it, and locks the workspace so that one run at a time pulls, reproduces and pushes in it.

Used by flows/pipeline.py (the scheduled pipeline), flows/queue.py (the experiment queue) and flows/sweep/."""

from __future__ import annotations

import collections
import contextlib
import json
import logging
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.context import FlowRunContext
from prefect.exceptions import MissingContextError
from prefect.runtime import flow_run

from flows.services import ServiceError, check_http, s3_client
from pipeline.errors import ProjectError
from pipeline.storage import exclusive_lock

REPO = Path(__file__).resolve().parent.parent
LOCK = Path(".dvc/tmp/vr-pipeline.lock")
# Text in a failed command's output (or an exception) that says an endpoint was unreachable or busy, not wrong.
TRANSIENT_MARKERS = ("Could not connect to the endpoint", "Connection refused", "Connection reset", "timed out",
                     "Read timeout", "Temporary failure in name resolution", "ServiceUnavailable", "SlowDown", "503")


class PipelineError(ProjectError, RuntimeError):
    """A flow cannot go on; the message names the workspace, command or endpoint."""


class TransientError(PipelineError):
    """Worth another try: the endpoint may come back."""


class WorkspaceBusy(PipelineError):
    """Another pipeline run holds the workspace."""


def retry_if_transient(task, task_run, state) -> bool:
    """A task's retry condition: only a TransientError is retried (a missing bucket fails the same way again)."""
    return isinstance(state.result(raise_on_failure=False), TransientError)


# Task options for a step that talks to an endpoint: two more attempts, 5 s and 20 s later, for a transient failure.
RETRY_TRANSIENT = {"retries": 2, "retry_delay_seconds": [5, 20], "retry_condition_fn": retry_if_transient,
                   "cache_policy": NO_CACHE}

_CLI_LOGGER = logging.getLogger("flows.workspace")


def run_logger() -> logging.Logger | logging.LoggerAdapter:
    """The Prefect run logger inside a flow or task run; outside one (the queue's command line), a plain logger that
    prints to stdout."""
    try:
        return get_run_logger()
    except MissingContextError:
        if not _CLI_LOGGER.handlers:
            handler = logging.StreamHandler(sys.stdout)
            handler.setFormatter(logging.Formatter("%(message)s"))
            _CLI_LOGGER.addHandler(handler)
            _CLI_LOGGER.setLevel(logging.INFO)
            _CLI_LOGGER.propagate = False
        return _CLI_LOGGER


# ------------------------------------------------------------------------------------------------- the lock
@contextlib.contextmanager
def workspace_lock(workspace: Path) -> Iterator[None]:
    """An exclusive, non-blocking lock on `<workspace>/.dvc/tmp/vr-pipeline.lock` (pipeline.storage.exclusive_lock);
    released when the holder exits, even if it crashes, so a stale file never blocks."""
    path = workspace / LOCK

    def busy(holder: str) -> WorkspaceBusy:
        return WorkspaceBusy(f"workspace {workspace} is busy: another pipeline run holds {path} ({holder}); "
                             "wait for it to finish, or use another clone")

    with exclusive_lock(path, f"workspace {workspace}", busy):
        yield


# ------------------------------------------------------------------------------------------------- commands
def dvc_env() -> dict[str, str]:
    """The stages' `python` is this interpreter (the project venv), whatever PATH the worker was started with; a
    stage started inside a flow run knows that run (flows/stages.py tags its own flow run with it)."""
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    if flow_run.id:
        env["VR_PIPELINE_FLOW_RUN"] = str(flow_run.id)
    return env


def is_transient(text: str) -> bool:
    return any(marker in text for marker in TRANSIENT_MARKERS)


def dvc(workspace: Path, *args: str, env: dict[str, str] | None = None) -> None:
    """Run `dvc <args>` in the workspace (environment: `env`, default dvc_env()), its output streamed line by line
    into the run's log (a repro can take hours); failure raises a PipelineError with the command and the end of its
    output (a TransientError when that output says an endpoint was unreachable)."""
    logger = run_logger()
    logger.info("$ dvc %s  (in %s)", " ".join(args), workspace)
    tail: collections.deque[str] = collections.deque(maxlen=60)
    with subprocess.Popen([sys.executable, "-m", "dvc", *args], cwd=workspace, env=env or dvc_env(),
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, text=True,
                          bufsize=1) as proc:
        for line in proc.stdout:
            if line := line.rstrip():
                logger.info("%s", line)
                tail.append(line)
    if proc.returncode != 0:
        text = "\n".join(tail)
        kind = TransientError if is_transient(text) else PipelineError
        raise kind(f"`dvc {' '.join(args)}` failed in {workspace} (exit {proc.returncode}):\n{text[-3000:]}")


def dvc_output(workspace: Path, *args: str) -> str:
    """The standard output of a short `dvc <args>` (a query: status, remote list)."""
    proc = subprocess.run([sys.executable, "-m", "dvc", *args], cwd=workspace, env=dvc_env(), capture_output=True,
                          text=True, stdin=subprocess.DEVNULL)
    if proc.returncode != 0:
        raise PipelineError(f"`dvc {' '.join(args)}` failed in {workspace}: {proc.stderr.strip()[-2000:]}")
    return proc.stdout


def dvc_status(workspace: Path, stages: list[str]) -> dict:
    """`dvc status --json <stages>`: {} when every one of them is up to date."""
    return json.loads(dvc_output(workspace, "status", "--json", *stages) or "{}")


def git(workspace: Path, *args: str) -> str:
    """The standard output of `git <args>` in the workspace."""
    proc = subprocess.run(["git", *args], cwd=workspace, capture_output=True, text=True, stdin=subprocess.DEVNULL)
    if proc.returncode != 0:
        raise PipelineError(f"`git {' '.join(args)}` failed in {workspace}: {proc.stderr.strip()[-2000:]}")
    return proc.stdout


def clone_at(repo_url: str, commit: str, dest: Path) -> None:
    """A fresh clone of `repo_url` in `dest` (whatever was there goes), checked out at `commit` (detached)."""
    if dest.exists():
        shutil.rmtree(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(["git", "clone", "--quiet", "--no-checkout", repo_url, str(dest)], capture_output=True,
                          text=True, stdin=subprocess.DEVNULL)
    if proc.returncode != 0:
        transient = any(m in proc.stderr for m in ("timed out", "Could not resolve host", "Connection"))
        kind = TransientError if transient else PipelineError
        raise kind(f"`git clone {repo_url}` failed: {proc.stderr.strip()[-2000:]}")
    proc = subprocess.run(["git", "checkout", "--quiet", "--detach", commit], cwd=dest, capture_output=True, text=True,
                          stdin=subprocess.DEVNULL)
    if proc.returncode != 0:
        raise PipelineError(f"commit {commit} is not in {repo_url} (push it where the workers clone from): "
                            f"{proc.stderr.strip()[-1000:]}")


# ------------------------------------------------------------------------------------------------- deployment workspace
# The deployments run in a clone of their own, never in someone's checkout: a run resets params.yaml, rewrites the
# outputs and dvc.lock, and `dvc exp run` leaves its params behind. `make deploy` prepares this one (a clone of the
# checkout's HEAD) and points VR_WORKSPACE at it; a deployment run refuses a workspace without the mark.
DEPLOYMENT_WORKSPACE = Path(".services/workspace")  # relative to the checkout; /.services/ is git- and dvc-ignored
ROLE_KEY = "visual-region.workspace"  # git config key of a prepared workspace (its .git/config, never committed)
ROLE = "deployment"


def is_deployment_workspace(workspace: Path) -> bool:
    """True when `workspace` was made by `prepare_workspace` (git config visual-region.workspace=deployment)."""
    proc = subprocess.run(["git", "config", "--local", "--get", ROLE_KEY], cwd=workspace, capture_output=True,
                          text=True, stdin=subprocess.DEVNULL)
    return proc.returncode == 0 and proc.stdout.strip() == ROLE


def require_deployment_workspace(workspace: Path) -> None:
    """A deployment run goes only where `prepare_workspace` made a workspace for it: anywhere else may be a person's
    own checkout, whose params.yaml, outputs and dvc.lock the run would change."""
    if not is_deployment_workspace(workspace):
        raise PipelineError(f"workspace {workspace} is not a deployment workspace (it may be someone's own checkout, "
                            "and a run would change its params.yaml and outputs): run `make deploy`, which prepares "
                            f"{DEPLOYMENT_WORKSPACE}, or `python -m flows.workspace prepare <dir>` and set "
                            "VR_WORKSPACE=<dir> for the worker")


def refuse_unprepared_workspace(workspace: Path) -> None:
    """In a flow run of a deployment, require_deployment_workspace(workspace); a run started by hand
    (`python -m flows.pipeline`, `python -m flows.sweep`, `make study`) goes where its caller says, their own
    checkout included. The one check for every flow that a deployment runs in VR_WORKSPACE (flows/pipeline.py,
    flows/sweep/parent.py)."""
    context = FlowRunContext.get()
    run = context.flow_run if context is not None else None
    if run is not None and run.deployment_id is not None:
        require_deployment_workspace(workspace)


def prepare_workspace(source: Path, dest: Path) -> str:
    """Make `dest` the deployments' workspace: a clone of `source` (a checkout) at `source`'s HEAD commit, or, when
    `dest` is one already, moved to that commit (tracked files reset to it; outputs, the DVC cache and experiments
    kept), with `source`'s .dvc/config.local (the remote's endpoint) copied or, when `source` has none, removed.
    `source` is only read. Returns the commit."""
    source, dest = source.resolve(), dest.resolve()
    if dest == source:
        raise PipelineError(f"the deployment workspace {dest} cannot be the checkout itself")
    commit = git(source, "rev-parse", "HEAD").strip()
    if (dest / ".git").exists():
        if not is_deployment_workspace(dest):
            raise PipelineError(f"{dest} is a git repository that `python -m flows.workspace prepare` did not make "
                                "(maybe someone's clone): move it away or choose another directory")
        git(dest, "fetch", "--quiet", str(source), "HEAD")
        git(dest, "checkout", "--quiet", "--force", "--detach", commit)
    elif dest.exists() and any(dest.iterdir()):
        raise PipelineError(f"{dest} exists and is not empty: move it away or choose another directory")
    else:
        clone_at(str(source), commit, dest)
        git(dest, "config", "--local", ROLE_KEY, ROLE)
    local, copy = source / ".dvc" / "config.local", dest / ".dvc" / "config.local"
    if local.is_file():
        tmp = copy.with_name(f".{copy.name}.{os.getpid()}.tmp")
        shutil.copy2(local, tmp)  # keeps its mode: it may hold credentials
        os.replace(tmp, copy)
    elif copy.exists():
        copy.unlink()
    return commit


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
        run_logger().warning("params.yaml differed from HEAD's (an earlier experiment or a local edit): kept as %s; "
                             "running from HEAD's", kept)
    current.write_text(proc.stdout)


def dvc_stages(workspace: Path) -> list[tuple[str, list[str], list[tuple[str, bool]]]]:
    """The stages of the workspace's dvc.yaml as `dvc repro` names them there (foreach stages as `<group>@<key>`),
    in dvc.yaml's order: (name, file deps (no params), outputs as (path, cached))."""
    from dvc.dependency.param import ParamsDependency
    from dvc.exceptions import DvcException
    from dvc.repo import Repo

    dvc_yaml = (workspace / "dvc.yaml").resolve()
    try:
        with Repo(str(workspace)) as repo:
            return [(s.name, [d.def_path for d in s.deps if not isinstance(d, ParamsDependency)],
                     [(o.def_path, bool(o.use_cache)) for o in s.outs])
                    for s in repo.index.stages if Path(s.path).resolve() == dvc_yaml]
    except DvcException as err:
        raise PipelineError(f"cannot read the stages of {dvc_yaml}: {err}") from None


# ------------------------------------------------------------------------------------------------- the remote
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
        raise PipelineError(f"{where}: no AWS credentials found: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY "
                            "(or AWS_PROFILE) in the environment of the run (for a deployment: the worker's)") from None
    except (EndpointConnectionError, BotoCoreError) as err:  # BotoCoreError: timeouts, other connection failures
        if endpoint is None:  # most likely a store that is not AWS, its endpoint not given: a setting, not an outage
            raise PipelineError(f"no S3 endpoint is set for DVC remote {name!r} ({url}) and AWS S3 is unreachable "
                                f"({type(err).__name__}): set AWS_ENDPOINT_URL_S3 or run: dvc remote modify --local "
                                f"{name} endpointurl http://127.0.0.1:8333") from None
        raise TransientError(f"{where} is unreachable: {err}") from None
    except ClientError as err:
        code = str(err.response.get("Error", {}).get("Code", ""))
        status = err.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
        if code in ("404", "NoSuchBucket"):
            raise PipelineError(f"{where}: bucket {bucket!r} does not exist (create it, or point the remote at "
                                f"another: dvc remote modify {name} url s3://<bucket>/{prefix})") from None
        if code in ("403", "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "InvalidToken", "ExpiredToken"):
            raise PipelineError(f"{where} refused the credentials for bucket {bucket!r} ({code or status}): check "
                                "AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY or AWS_PROFILE") from None
        kind = TransientError if status >= 500 else PipelineError
        raise kind(f"{where}: {code or status}: {err}") from None


# ------------------------------------------------------------------------------------------------- tasks
@task(**{**RETRY_TRANSIENT, "retry_delay_seconds": [3, 10]})
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


def _remote_args(remote: str | None) -> list[str]:
    return ["-r", remote] if remote else []


@task(**RETRY_TRANSIENT)
def dvc_pull(workspace: Path, remote: str | None, targets: list[str] | None = None,
             allow_missing: bool = False) -> None:
    """`dvc pull` of `targets` (stages or paths; none: everything), `--allow-missing`: what the remote lacks is
    left to compute."""
    dvc(workspace, "pull", *(["--allow-missing"] if allow_missing else []), *_remote_args(remote), *(targets or []))


@task(**RETRY_TRANSIENT)
def dvc_push(workspace: Path, remote: str | None, targets: list[str] | None = None) -> None:
    """`dvc push` of the outputs of `targets` (stages; none: every stage's)."""
    dvc(workspace, "push", *_remote_args(remote), *(targets or []))


@task(cache_policy=NO_CACHE)
def dvc_repro(workspace: Path, targets: list[str] | None = None, single_item: bool = False) -> None:
    """`dvc repro` of `targets` (none: the whole pipeline) with what they depend on, or with `single_item` each
    target alone, one at a time, in the given order (its inputs are already there; the upstream is not checked).
    Not retried: a failed stage fails the same way again."""
    if single_item:
        for target in targets or []:
            dvc(workspace, "repro", "--single-item", target)
    else:
        dvc(workspace, "repro", *(targets or []))


# ------------------------------------------------------------------------------------------------- CLI
def main(argv: list[str] | None = None) -> None:
    """`python -m flows.workspace prepare [DIR]`: the deployments' workspace (`make deploy` runs it)."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m flows.workspace")
    sub = parser.add_subparsers(dest="command", required=True)
    prep = sub.add_parser("prepare", help="clone this checkout's HEAD into DIR (or move DIR to it) for the deployments")
    prep.add_argument("dir", nargs="?", default=str(REPO / DEPLOYMENT_WORKSPACE))
    prep.add_argument("--source", default=str(REPO), help="the checkout to clone (default: this one)")
    args = parser.parse_args(argv)
    try:
        source, dest = Path(args.source), Path(args.dir)
        commit = prepare_workspace(source, dest)
        print(f"deployment workspace {dest.resolve()} at commit {commit[:12]} of {source.resolve()}")
        if git(source, "status", "--porcelain", "--untracked-files=no").strip():
            print(f"note: {source.resolve()} has uncommitted changes; the deployments run the commit, not them")
    except ProjectError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
