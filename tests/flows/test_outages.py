"""Servers that go away in the middle of the work, with real servers on 127.0.0.1 that the tests start, stop and start
again on the same data directory and port (flows/services.py):

- SeaweedFS stopped while `dvc push` is sending: DVC fails naming the endpoint, the local cache and outputs are
  intact; once the server is back, `dvc push` completes and a fresh clone pulls every output byte for byte. Through
  the pipeline flow, the `dvc_push` task's bounded retry rides out the same outage when the server comes back.
- The MLflow server stopped while `tune` runs: one error naming the server, exit 2, in bounded time (MLflow's own
  retries bounded by pipeline/tracking.py), none of the stage's outputs; once the server is back the re-run succeeds,
  and the run the cut-off stage left RUNNING is set to KILLED.

The stop lands mid-transfer by construction, not by timing luck: S3 traffic goes through a throttled relay (the
relay and the server are stopped together, as one endpoint), and the tune stage is paused (SIGSTOP) while the MLflow
server stops. Unit checks of the stale-run clean-up and of the outage message are at the end.

Longer than 400 lines on purpose: the relay, the fault schedule and the three outages share one set of server
fixtures.
"""

from __future__ import annotations

import contextlib
import os
import random
import signal
import socket
import struct
import subprocess
import threading
import time
import uuid
from pathlib import Path

import pytest
import yaml

from servers import BUCKET, PY, REPO, S3_KEY, S3_SECRET, base_env, dvc, make_toy_workspace, s3_env, sh, tree_bytes

BIG_FILES, BIG_FILE_BYTES = 8, 1024 * 1024  # 8 MiB to push, at RATE bytes/s: about 4 s of transfer
RATE = 2_000_000
pytestmark = pytest.mark.servers  # every test here starts (and stops) a real SeaweedFS or MLflow server


# ------------------------------------------------------------------------------------------------------ helpers
class Relay:
    """A TCP relay on 127.0.0.1:`port` to 127.0.0.1:`backend_port` whose client-to-server bytes are limited to `rate`
    bytes/s in all (a slow link); `close` drops every connection with a reset, as a stopped server does."""

    def __init__(self, backend_port: int, port: int, rate: float = RATE):
        self.backend, self.rate = ("127.0.0.1", backend_port), rate
        self.sent = 0  # client-to-server bytes relayed so far
        self._lock, self._next, self._conns, self._closed = threading.Lock(), time.monotonic(), [], False
        self._sock = socket.socket()
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind(("127.0.0.1", port))
        self._sock.listen(64)
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._sock.accept()
                server = socket.create_connection(self.backend, timeout=5)
            except OSError:
                if self._closed:
                    return
                with contextlib.suppress(Exception):
                    client.close()
                continue
            server.settimeout(None)
            with self._lock:
                self._conns += [client, server]
            threading.Thread(target=self._pump, args=(client, server, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(server, client, False), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, upstream: bool) -> None:
        try:
            while data := src.recv(16384):
                if upstream:
                    with self._lock:
                        start = max(time.monotonic(), self._next)
                        self._next = start + len(data) / self.rate
                        self.sent += len(data)
                    time.sleep(max(0.0, self._next - time.monotonic()))
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        self._closed = True
        self._sock.close()
        with self._lock:
            conns, self._conns = self._conns, []
        for s in conns:
            with contextlib.suppress(OSError):
                s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # RST, not FIN
                s.close()


class StoppableS3:
    """SeaweedFS on `data_dir` behind a throttled relay; `url` (the relay) is the endpoint clients use. `stop` and
    `start` again keep the data directory and both ports."""

    def __init__(self, data_dir: Path):
        from flows.services import free_port

        self.data_dir, self.port, self.relay_port = data_dir, free_port(), free_port()
        self.url = f"http://127.0.0.1:{self.relay_port}"
        self._cm = self.relay = None

    def start(self) -> float:
        from flows import services

        t0 = time.monotonic()
        self._cm = services.seaweedfs(self.data_dir, port=self.port, buckets=(BUCKET,), access_key=S3_KEY,
                                      secret_key=S3_SECRET)
        self._cm.__enter__()
        self.relay = Relay(self.port, self.relay_port)
        return time.monotonic() - t0

    def stop(self) -> None:
        if self.relay is not None:
            self.relay.close()
            self.relay = None
        if self._cm is not None:
            cm, self._cm = self._cm, None
            cm.__exit__(None, None, None)

    def keys(self, prefix: str) -> list[str]:
        from flows.services import s3_client

        pages = s3_client(f"http://127.0.0.1:{self.port}", S3_KEY, S3_SECRET).get_paginator("list_objects_v2").paginate(
            Bucket=BUCKET, Prefix=prefix)
        return [o["Key"] for page in pages for o in page.get("Contents", [])]


@pytest.fixture
def s3(tmp_path):
    server = StoppableS3(tmp_path / "s3-data")
    server.start()
    yield server
    server.stop()


def big_workspace(tmp: Path, env: dict[str, str], remote: str) -> Path:
    """The toy project, reproduced, plus `big/` (BIG_FILES random files) added to DVC; all committed."""
    ws = make_toy_workspace(tmp / "ws", env, remote)
    dvc(ws, env, "repro")
    rng = random.Random(7)
    (ws / "big").mkdir()
    for i in range(BIG_FILES):
        (ws / "big" / f"part{i:02d}.bin").write_bytes(rng.randbytes(BIG_FILE_BYTES))
    dvc(ws, env, "add", "big")
    sh(["git", "add", "-A"], ws, env)
    sh(["git", "commit", "-qm", "outputs"], ws, env)
    return ws


def wait_for(what: str, ready, timeout: float = 120, proc: subprocess.Popen | None = None, every: float = 0.05) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"the process ended ({proc.returncode}) before {what}")
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout} s")
        time.sleep(every)


def logged_at(line: str):
    """The timestamp of a log line (`2026-01-01 12:00:00,123 LEVEL ...`)."""
    from datetime import datetime

    return datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f")


OUTPUTS = ("out", "big", "metrics/toy.json")


# ------------------------------------------------------------------------------------------------- S3 / dvc push
def test_s3_stopped_mid_push_then_restarted_push_completes_and_a_clone_pulls(s3, tmp_path):
    env = base_env(tmp_path, **s3_env(s3.url))
    prefix = f"dvc-{uuid.uuid4().hex[:8]}"
    ws = big_workspace(tmp_path, env, f"s3://{BUCKET}/{prefix}")
    before = {p: tree_bytes(ws / p) for p in OUTPUTS}

    # two uploads at a time: files complete one after another, so the stop finds some stored and some not
    push = subprocess.Popen([PY, "-m", "dvc", "push", "-j", "2"], cwd=ws, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    wait_for("3/4 of the data sent", lambda: s3.relay.sent >= BIG_FILES * BIG_FILE_BYTES * 3 // 4, proc=push)
    stopped = time.monotonic()
    s3.stop()
    out, err = push.communicate(timeout=300)
    fail_s = time.monotonic() - stopped
    print(f"dvc push exited {push.returncode} {fail_s:.1f} s after the server stopped:\n{err}")
    assert push.returncode != 0
    # per file that failed, or once if the failure came outside the transfers (`unexpected error`, exit 255)
    assert 'ERROR: failed to transfer' in err or "ERROR: unexpected error" in err, err[-3000:]
    assert f'- Could not connect to the endpoint URL: "{s3.url}/{BUCKET}' in err and "Traceback" not in err
    # nothing local changed: the outputs, byte for byte, and the cache (dvc status checks the outputs against it)
    assert {p: tree_bytes(ws / p) for p in OUTPUTS} == before
    assert "Data and pipelines are up to date" in dvc(ws, env, "status").stdout

    restart_s = s3.start()
    partial = s3.keys(prefix)
    missing = dvc(ws, env, "status", "-c").stdout
    assert "new:" in missing  # the remote misses some of what the push was sending ...
    t0 = time.monotonic()
    again = dvc(ws, env, "push")
    push_s = time.monotonic() - t0
    complete = s3.keys(prefix)
    print(f"restart {restart_s:.1f} s; {len(partial)} of {len(complete)} objects were stored before the stop; "
          f"re-push {push_s:.1f} s: {again.stdout.strip()}")
    assert 0 < len(partial) < len(complete), (len(partial), len(complete))  # ... and has the rest: the stop was mid-push
    assert set(partial) < set(complete)
    assert "new:" not in dvc(ws, env, "status", "-c").stdout

    clone = tmp_path / "clone"
    sh(["git", "clone", "-q", str(ws), str(clone)], tmp_path, env)
    dvc(clone, env, "pull")
    assert {p: tree_bytes(clone / p) for p in OUTPUTS} == before


def test_pipeline_flow_push_retry_rides_out_an_s3_restart(s3, tmp_path, prefect_server):
    """`python -m flows.pipeline`: the server stops while the `dvc_push` task sends, attempt 1 fails naming the
    endpoint (a transient error), the server is back before the retry (5 s later), and a retry completes the push."""
    env = base_env(tmp_path, **s3_env(s3.url), PREFECT_API_URL=f"{prefect_server.url}/api", PYTHONPATH=str(REPO))
    prefix = f"flow-{uuid.uuid4().hex[:8]}"
    ws = big_workspace(tmp_path, env, f"s3://{BUCKET}/{prefix}")
    lines: list[str] = []
    flow = subprocess.Popen([PY, "-m", "flows.pipeline", "--workspace", str(ws), "--no-pull"], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    reader = threading.Thread(target=lambda: lines.extend(flow.stdout), daemon=True)
    reader.start()
    try:
        wait_for("the push sending", lambda: s3.relay.sent >= BIG_FILES * BIG_FILE_BYTES // 2, timeout=300, proc=flow)
        stopped = time.monotonic()
        s3.stop()
        wait_for("attempt 1 failing", lambda: any("Retry 1/2 will start" in line for line in lines), timeout=300,
                 proc=flow)
        failed_s = time.monotonic() - stopped
        restart_s = s3.start()
        rc = flow.wait(timeout=300)
    finally:
        if flow.poll() is None:
            flow.kill()
    reader.join(timeout=10)
    text = "".join(lines)
    recovered_s = time.monotonic() - stopped
    print(f"attempt 1 failed {failed_s:.1f} s after the stop; server restarted in {restart_s:.1f} s; "
          f"flow completed {recovered_s:.1f} s after the stop")
    assert rc == 0, text[-5000:]
    retry = next(line for line in lines if "Retry 1/2 will start" in line)
    assert "TransientError" in retry and f"`dvc push` failed in {ws}" in retry
    assert "Could not connect to the endpoint URL: " in text and s3.url in text
    attempts = 1 + sum(f"Retry {n}/2 will start" in text for n in (1, 2))
    print(f"pushed at attempt {attempts} of 3")
    assert "new:" not in dvc(ws, env, "status", "-c").stdout
    assert len(s3.keys(prefix)) == (1 + 1 + 3) + (1 + BIG_FILES)  # out/: manifest, blob, 3 parts; big/: manifest, files


# ------------------------------------------------------------------------------------------------ MLflow / tune
TUNE_PARAMS = {
    "seed": 0,
    "model": {"profile": "micro", "spec": {"lm_layers": 4}},
    "data": {"image_size": 32, "num_captions": 4, "num_instruct": 16, "num_vqa_test": 5, "text_qa_repeats": 1,
             "digits_test_fraction": 0.95},
    "tune": {"runs": {"all": {"strategy": "all"}, "x": {"strategy": "uniform", "budget": 0.5}},
             "train": {"max_steps": 4, "batch_size": 2, "max_length": 48, "save_steps": 2, "logging_steps": 1}},
    "mlflow": {"experiment": "vr-outages"},
}
TUNE_OUTPUTS = ("models/tuned/x", "metrics/tune/x.json", "plots/loss/x.csv")


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Path:
    import pipeline.data

    out = tmp_path_factory.mktemp("prepared") / "prepared"
    pipeline.data.prepare_all(pipeline.data.DataConfig(**TUNE_PARAMS["data"]), out)
    return out


class StoppableMlflow:
    """An MLflow server (sqlite + local artifacts) in `data_dir` on a fixed port; `stop` / `start` keep both."""

    def __init__(self, data_dir: Path):
        from flows.services import free_port

        self.data_dir, self.port = data_dir, free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._cm = None

    def start(self) -> float:
        from flows import services

        t0 = time.monotonic()
        self._cm = services.mlflow_server(self.data_dir, port=self.port,
                                          artifacts_destination=str(self.data_dir / "artifacts"))
        self._cm.__enter__()
        return time.monotonic() - t0

    def stop(self) -> None:
        if self._cm is not None:
            cm, self._cm = self._cm, None
            cm.__exit__(None, None, None)


def tune_runs(url: str) -> list:
    import mlflow

    client = mlflow.MlflowClient(url)
    exp = client.get_experiment_by_name(TUNE_PARAMS["mlflow"]["experiment"])
    if exp is None:
        return []
    return client.search_runs([exp.experiment_id], filter_string="tags.vr_kind = 'tune' and tags.vr_run = 'x'",
                              order_by=["attributes.start_time ASC"])


def test_mlflow_stopped_mid_tune_fails_clearly_and_the_rerun_ends_the_stale_run(tmp_path, prepared, micro4_dir,
                                                                                monkeypatch):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # this process's own queries: no waiting on a down server
    ws = tmp_path / "ws"
    for rel, target in (("data/prepared", prepared), ("models/projector", micro4_dir)):
        (ws / rel).parent.mkdir(parents=True, exist_ok=True)
        (ws / rel).symlink_to(target, target_is_directory=True)
    (ws / "params.yaml").write_text(yaml.safe_dump(TUNE_PARAMS))
    server = StoppableMlflow(tmp_path / "mlflow")
    first_start_s = server.start()
    env = base_env(tmp_path, MLFLOW_TRACKING_URI=server.url, PYTHONPATH=str(REPO), VR_PARAMS=str(ws / "params.yaml"))
    env = {k: v for k, v in env.items() if not k.startswith("MLFLOW_HTTP_REQUEST_")}  # the stage's own bounds apply
    try:
        err_log = tmp_path / "tune-1.err"
        with open(err_log, "w") as err:
            stage = subprocess.Popen([PY, "-m", "stages.tune", "--run", "x"], cwd=ws, env=env,
                                     stdout=subprocess.DEVNULL, stderr=err)
            try:
                # the stage has opened its MLflow run and logged its params: from here it trains, then logs metrics
                wait_for("the tune run's params in MLflow",
                         lambda: any("layers" in r.data.params for r in tune_runs(server.url)),
                         timeout=300, proc=stage, every=0.5)
                os.kill(stage.pid, signal.SIGSTOP)  # the server goes away while the stage is mid-run ...
                server.stop()
                stopped = time.monotonic()
                os.kill(stage.pid, signal.SIGCONT)  # ... and the stage carries on without it
                rc = stage.wait(timeout=300)
                fail_s = time.monotonic() - stopped
            finally:
                if stage.poll() is None:
                    os.kill(stage.pid, signal.SIGCONT)
                    stage.kill()
        stderr = err_log.read_text()
        errors = [line for line in stderr.splitlines() if " ERROR stages: " in line]
        assert rc == 2 and "Traceback" not in stderr, stderr[-5000:]
        assert len(errors) == 1, stderr[-5000:]
        # from the first refused request (after training) to the error: MLflow's retries, bounded
        retrying = [line for line in stderr.splitlines() if "Retrying" in line and "Connection refused" in line]
        bounded_s = (logged_at(errors[0]) - logged_at(retrying[0])).total_seconds()
        print(f"tune exited {rc} {fail_s:.1f} s after the MLflow server stopped; {bounded_s:.1f} s from the first "
              f"refused request ({len(retrying)} retries logged) to the error")
        assert bounded_s < 60  # MLflow's default (7 retries, backoff factor 2) takes about 4 minutes per request
        assert (f"TrackingError: MLflow tracking server {server.url} stopped answering "
                "(at /api/2.0/mlflow/runs/log-metric): connection refused after 3 retries; "
                "run the stage again once the server is back") in errors[0], errors[0]
        for rel in TUNE_OUTPUTS:
            assert not (ws / rel).exists(), f"{rel} written although the stage failed"
        assert not list((ws / "models").glob("tuned/.*")), "a temporary output was left behind"
        assert list((ws / "checkpoints/tune/x").glob("checkpoint-*")), "the checkpoints stay for the re-run"

        restart_s = server.start()
        (stale,) = tune_runs(server.url)
        assert stale.info.status == "RUNNING"  # the cut-off stage could not end its run
        t0 = time.monotonic()
        again = sh([PY, "-m", "stages.tune", "--run", "x"], ws, env, timeout=600)
        rerun_s = time.monotonic() - t0
        print(f"MLflow server: start {first_start_s:.1f} s, restart {restart_s:.1f} s; re-run {rerun_s:.1f} s")
        assert "resuming from the latest checkpoint" in again.stderr
        assert f"MLflow run {stale.info.run_id} (tune x) was left RUNNING" in again.stderr
        old, new = tune_runs(server.url)
        assert old.info.run_id == stale.info.run_id and old.info.status == "KILLED"
        assert new.info.status == "FINISHED" and "train_loss" in new.data.metrics
        record = yaml.safe_load((ws / "runs/tune/x.json").read_text())
        assert record["mlflow_run_id"] == new.info.run_id
        for rel in TUNE_OUTPUTS:
            assert (ws / rel).exists(), rel
    finally:
        server.stop()


# ------------------------------------------------------------------------------------------------------ unit checks
@pytest.fixture
def local_store(tmp_path, monkeypatch):
    """The fluent MLflow API on a sqlite store in tmp_path; the previous tracking URI comes back afterwards."""
    import mlflow
    from mlflow.tracking._tracking_service.utils import _use_tracking_uri

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)  # set below, put back as it was by monkeypatch
    with _use_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}"):
        yield mlflow


def test_end_stale_runs_kills_only_dead_running_children_of_the_same_selection_run(local_store, tmp_path):
    from pipeline import tracking

    mlflow = local_store
    client = mlflow.MlflowClient()
    exp = client.create_experiment("stale", artifact_location=(tmp_path / "artifacts").as_uri())
    parent, other_parent = (client.create_run(exp).info.run_id for _ in range(2))
    dead = subprocess.run([PY, "-c", "import os; print(os.getpid())"], capture_output=True, text=True).stdout.strip()

    def child(parent_id: str, run: str, *, pid: str = dead, kind: str = "tune", status: str | None = None) -> str:
        tags = {**tracking.run_tags(kind, run), "vr_pid": pid, "mlflow.parentRunId": parent_id}
        run_id = client.create_run(exp, tags=tags).info.run_id  # RUNNING, as a killed stage leaves it
        if status:
            client.set_terminated(run_id, status)
        return run_id

    killed = child(parent, "x")
    cases = {
        child(parent, "x", status="FINISHED"): "FINISHED",  # a finished run of the same selection run
        child(parent, "y"): "RUNNING",  # another selection run
        child(other_parent, "x"): "RUNNING",  # another pipeline run
        child(parent, "x", kind="register"): "RUNNING",  # another kind
        child(parent, "x", pid=str(os.getppid())): "RUNNING",  # its process is alive on this host
    }
    with mlflow.start_run(run_id=parent):
        assert tracking.end_stale_runs(mlflow, parent, kind="tune", run="x") == [killed]
    assert client.get_run(killed).info.status == "KILLED"
    assert {r: client.get_run(r).info.status for r in cases} == cases


def test_a_failing_stage_ends_its_mlflow_runs_failed(local_store):
    """mlflow.start_run as a context (stages/tune.py): an exception inside ends the run FAILED, nested runs too."""
    mlflow = local_store
    mlflow.set_experiment("failing")
    ids = []
    with pytest.raises(RuntimeError, match="training diverged"):
        with mlflow.start_run() as parent, mlflow.start_run(nested=True) as child:
            ids = [parent.info.run_id, child.info.run_id]
            raise RuntimeError("training diverged")
    assert [mlflow.get_run(i).info.status for i in ids] == ["FAILED", "FAILED"]
    assert mlflow.active_run() is None


def test_outage_names_the_server_and_ignores_other_errors():
    from mlflow.exceptions import MlflowException

    from pipeline.tracking import outage

    url = "http://127.0.0.1:5999"
    refused = ("API request to http://127.0.0.1:5999/api/2.0/mlflow/runs/log-metric failed with exception "
               "HTTPConnectionPool(host='127.0.0.1', port=5999): Max retries exceeded with url: /api/2.0/mlflow/runs/"
               "log-metric (Caused by NewConnectionError(\"...: Failed to establish a new connection: [Errno 111] "
               "Connection refused\"))")
    try:
        try:
            raise MlflowException(refused)
        except MlflowException:
            raise MlflowException(refused.replace("log-metric", "update"))  # ending the run fails too, last
    except MlflowException as err:
        message = str(outage(err, url))
    assert message.startswith(f"MLflow tracking server {url} stopped answering (at /api/2.0/mlflow/runs/log-metric): "
                              "connection refused after ")
    assert outage(MlflowException(refused), "sqlite:///mlruns.db") is None  # a local store has no server
    assert outage(MlflowException("RESOURCE_DOES_NOT_EXIST: run 'abc' not found"), url) is None
    assert outage(ValueError("Connection refused"), url) is None  # not MLflow's client
    # A local database that refuses writes names itself; its other errors (and other libraries' messages) do not.
    readonly = MlflowException("(sqlite3.OperationalError) attempt to write a readonly database\n[SQL: UPDATE runs]")
    assert str(outage(readonly, "sqlite:////data/mlruns.db")).startswith(
        "the MLflow tracking database sqlite:////data/mlruns.db refused a write: attempt to write a readonly database;")
    assert outage(MlflowException("(sqlite3.OperationalError) no such table: runs"), "sqlite:///mlruns.db") is None
    assert outage(ValueError("attempt to write a readonly database"), "sqlite:///mlruns.db") is None
