"""Prefect orchestration against real servers on 127.0.0.1: stages as flow runs, the pipeline flow (lock, S3
preflight, `dvc exp run -S`, push, summary artifact), and `prefect deploy --all` + a process worker running the
micro-profile pipeline end to end (S3 remote, MLflow server with S3 artifacts, registry), then a fresh clone +
`dvc pull` that restores every stage output byte for byte."""

import json
import os
import shutil
import signal
import subprocess
import time
import uuid
import warnings
from pathlib import Path

import httpx
import psutil
import pytest

from servers import (
    BUCKET, PY, REPO, S3_KEY, S3_SECRET, base_env, dvc, lock_outputs, make_project_workspace, make_toy_workspace,
    prefect_api, s3_env, sh, tree_bytes,
)

TERMINAL = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}
RUN_OVERRIDES = ["~tune.runs.lora_bottom1", "~tune.importance_runs.bi1"]


def flow_runs(api: str, **flow_run_filter) -> list[dict]:
    return prefect_api(api, "flow_runs/filter", {"flow_runs": flow_run_filter, "limit": 200})


def flow_names(api: str, runs: list[dict]) -> dict[str, str]:
    ids = sorted({r["flow_id"] for r in runs})
    return {f["id"]: f["name"] for f in prefect_api(api, "flows/filter", {"flows": {"id": {"any_": ids}}})}


def code_copy(tmp: Path) -> Path:
    """The project's code without data: enough to run a stage that fails early or writes a small file."""
    ws = tmp / "code"
    for name in ("flows", "pipeline", "stages", "params"):
        shutil.copytree(REPO / name, ws / name, ignore=shutil.ignore_patterns("__pycache__"))
    return ws


# ---------------------------------------------------------------------------------------------------- stages
def test_stage_with_the_prefect_api_down_is_a_clear_error_and_runs_plain_without_it(tmp_path):
    from flows.services import free_port

    ws = code_copy(tmp_path)
    bad = tmp_path / "bad.yaml"
    bad.write_text((REPO / "params" / "micro.yaml").read_text().replace("budget: 0.5", "budget: 1.5"))
    api = f"http://127.0.0.1:{free_port()}/api"
    env = base_env(tmp_path, PREFECT_API_URL=api, VR_PARAMS=str(bad))
    down = sh([PY, "-m", "stages.tune", "--run", "uniform50"], ws, env, check=False, timeout=120)
    assert down.returncode == 2 and "Traceback" not in down.stderr
    assert f"Prefect API (PREFECT_API_URL) at {api}/health is unreachable after 3 attempts" in down.stderr
    assert "unset PREFECT_API_URL" in down.stderr
    # VR_PREFECT=0: the same stage runs plain and fails on what it should, the bad params
    plain = sh([PY, "-m", "stages.tune", "--run", "uniform50"], ws, {**env, "VR_PREFECT": "0"}, check=False, timeout=120)
    assert plain.returncode == 2 and "tune.runs.uniform50.budget" in plain.stderr and "Prefect API" not in plain.stderr


def test_stages_are_flow_runs_and_known_errors_still_exit_2(tmp_path, prefect_server):
    api = f"{prefect_server.url}/api"
    ws = code_copy(tmp_path)
    params = (REPO / "params" / "micro.yaml").read_text().replace("registry: {enabled: true,", "registry: {enabled: false,")
    (ws / "params.yaml").write_text(params)
    env = base_env(tmp_path, PREFECT_API_URL=api)
    ok = sh([PY, "-m", "stages.register"], ws, env, timeout=180)
    assert json.loads((ws / "metrics" / "registry.json").read_text()) == {"enabled": False}
    assert "Finished in state Completed()" in ok.stderr

    (ws / "params.yaml").write_text(params.replace("budget: 0.5", "budget: 1.5"))
    bad = sh([PY, "-m", "stages.tune", "--run", "uniform50"], ws, env, check=False, timeout=180)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr and "tune.runs.uniform50.budget" in bad.stderr

    runs = flow_runs(api, name={"any_": ["register", "tune@uniform50"]})
    names = flow_names(api, runs)
    got = {(names[r["flow_id"]], r["name"]): r for r in runs}
    assert got[("register", "register")]["state_type"] == "COMPLETED"
    failed = got[("tune", "tune@uniform50")]
    assert failed["state_type"] == "FAILED" and "tune.runs.uniform50.budget" in failed["state"]["message"]
    assert "dvc-stage" in failed["tags"] and "stage:tune" in failed["tags"]


def test_a_stage_under_a_pipeline_run_is_its_child_run(tmp_path, prefect_server):
    """What the UI's "Hide subflows" relies on: the stage's flow run has a parent task run, in the pipeline's run."""
    from prefect import flow
    from prefect.client.orchestration import SyncPrefectClient

    api = f"{prefect_server.url}/api"
    with SyncPrefectClient(api) as client:  # a pipeline flow run, as a worker would have started it
        parent = client.create_flow_run(flow(name="visual-region-pipeline")(lambda: None), name=f"p-{uuid.uuid4().hex[:6]}")
    ws = code_copy(tmp_path)
    params = (REPO / "params" / "micro.yaml").read_text().replace("registry: {enabled: true,", "registry: {enabled: false,")
    (ws / "params.yaml").write_text(params)
    sh([PY, "-m", "stages.register"], ws, base_env(tmp_path, PREFECT_API_URL=api, VR_PIPELINE_FLOW_RUN=str(parent.id)),
       timeout=180)

    (child,) = flow_runs(api, tags={"all_": [f"pipeline-run:{parent.id}"]})
    assert child["name"] == "register" and child["state_type"] == "COMPLETED"
    tracker = prefect_api(api, f"task_runs/{child['parent_task_run_id']}")
    assert tracker["flow_run_id"] == str(parent.id)
    assert tracker["state_type"] == "COMPLETED" and tracker["state"]["state_details"]["child_flow_run_id"] == child["id"]
    # the UI's "Hide subflows": runs without a parent task run, which lists the pipeline run and not the stage
    top = {r["id"] for r in flow_runs(api, parent_task_run_id={"is_null_": True})}
    assert str(parent.id) in top and child["id"] not in top


# ---------------------------------------------------------------------------------------------------- pipeline flow
def test_workspace_lock_admits_one_run(tmp_path):
    from flows.workspace import WorkspaceBusy, workspace_lock

    with workspace_lock(tmp_path):
        with pytest.raises(WorkspaceBusy, match=rf"workspace {tmp_path} is busy: another pipeline run holds .*pid {os.getpid()}"):
            with workspace_lock(tmp_path):
                pass
    with workspace_lock(tmp_path):  # released on exit
        pass


def test_only_transient_failures_are_retried():
    from prefect.states import Failed

    from flows.sweep import exchange
    from flows.sweep.child import clone
    from flows.workspace import PipelineError, TransientError, check_endpoints, dvc_pull, dvc_push, retry_if_transient

    assert retry_if_transient(None, None, Failed(data=TransientError("S3 endpoint http://x is unreachable")))
    assert not retry_if_transient(None, None, Failed(data=PipelineError("bucket 'b' does not exist")))
    for t in (check_endpoints, dvc_pull, dvc_push, exchange.send_files, exchange.receive_files, clone):
        assert t.retries == 2 and t.retry_condition_fn is retry_if_transient, t.name


@pytest.fixture(scope="module")
def toy_env(tmp_path_factory, prefect_server, s3_server):
    tmp = tmp_path_factory.mktemp("flowtoy")
    return tmp, base_env(tmp, **s3_env(s3_server.url), PREFECT_API_URL=f"{prefect_server.url}/api", PYTHONPATH=str(REPO))


def test_pipeline_flow_exp_run_with_overrides_push_and_summary(toy_env, s3_server, prefect_server):
    from flows.pipeline import ARTIFACT_KEY
    from flows.services import s3_client

    tmp, env = toy_env
    prefix = f"toy-{uuid.uuid4().hex[:8]}"
    ws = make_toy_workspace(tmp / "ws", env, f"s3://{BUCKET}/{prefix}")
    proc = sh([PY, "-m", "flows.pipeline", "--workspace", str(ws), "-S", "nbytes=2000", "--experiment", "nbytes2000"],
              tmp, env, timeout=600)
    assert "dvc exp run --name nbytes2000 -S nbytes=2000" in proc.stderr + proc.stdout
    assert json.loads((ws / "metrics" / "toy.json").read_text()) == {"nbytes": 2000}
    assert len((ws / "out" / "blob.bin").read_bytes()) == 2000
    assert "nbytes2000" in dvc(ws, env, "exp", "list", "--name-only").stdout
    keys = [o["Key"] for o in s3_client(s3_server.url, S3_KEY, S3_SECRET).list_objects_v2(Bucket=BUCKET, Prefix=prefix)["Contents"]]
    assert len(keys) == 5  # the directory's manifest + 4 files
    api = f"{prefect_server.url}/api"
    art = prefect_api(api, "artifacts/filter", {"artifacts": {"key": {"any_": [ARTIFACT_KEY]}}, "sort": "CREATED_DESC"})[0]
    assert art["type"] == "markdown" and f"`{ws}`" in art["data"] and "nbytes=2000" in art["data"]

    # the next run starts from the committed params again, not from the experiment's
    sh([PY, "-m", "flows.pipeline", "--workspace", str(ws), "--no-pull", "--no-push"], tmp, env, timeout=600)
    assert json.loads((ws / "metrics" / "toy.json").read_text()) == {"nbytes": 4096}
    (kept,) = (ws / ".dvc" / "tmp").glob("params.yaml.*")
    assert "nbytes: 2000" in kept.read_text()


def last_pipeline_run(api: str) -> tuple[dict, str]:
    """The newest run of the pipeline flow and the text of its log."""
    run = prefect_api(api, "flow_runs/filter", {"flows": {"name": {"any_": ["visual-region-pipeline"]}},
                                                "sort": "EXPECTED_START_TIME_DESC", "limit": 1})[0]
    logs = prefect_api(api, "logs/filter", {"logs": {"flow_run_id": {"any_": [run["id"]]}}, "limit": 200})
    return run, "\n".join(entry["message"] for entry in logs)


def test_pipeline_flow_refuses_a_busy_workspace_and_a_missing_bucket(toy_env, prefect_server):
    from flows.workspace import workspace_lock

    tmp, env = toy_env
    api = f"{prefect_server.url}/api"
    ws = make_toy_workspace(tmp / "ws-faults", env, "s3://vr-no-such-bucket/dvc")
    with workspace_lock(ws):
        busy = sh([PY, "-m", "flows.pipeline", "--workspace", str(ws)], tmp, env, check=False, timeout=300)
    assert busy.returncode == 2 and f"error: workspace {ws} is busy" in busy.stderr
    t0 = time.monotonic()
    missing = sh([PY, "-m", "flows.pipeline", "--workspace", str(ws)], tmp, env, check=False, timeout=300)
    assert missing.returncode == 2 and "bucket 'vr-no-such-bucket' does not exist" in missing.stderr
    assert env["AWS_ENDPOINT_URL_S3"] in missing.stderr and S3_SECRET not in missing.stderr + missing.stdout
    assert time.monotonic() - t0 < 60  # a missing bucket is not retried
    assert not (ws / "out").exists()  # nothing ran
    # the flow run ends Failed with that one line; neither its log nor the command's output has a traceback
    run, log = last_pipeline_run(api)
    assert run["state_type"] == "FAILED" and "bucket 'vr-no-such-bucket' does not exist" in run["state"]["message"]
    assert "\n" not in run["state"]["message"] and "bucket 'vr-no-such-bucket' does not exist" in log
    assert "Traceback" not in log + missing.stderr + missing.stdout

    # no endpoint set (neither the remote's endpointurl nor AWS_ENDPOINT_URL_S3): one line saying what to set
    no_endpoint = {k: v for k, v in env.items() if k != "AWS_ENDPOINT_URL_S3"}
    unset = sh([PY, "-m", "flows.pipeline", "--workspace", str(ws)], tmp, no_endpoint, check=False, timeout=300)
    assert unset.returncode == 2 and "Traceback" not in unset.stderr + unset.stdout
    assert ("set AWS_ENDPOINT_URL_S3 or run: dvc remote modify --local s3 endpointurl http://127.0.0.1:8333"
            in unset.stderr)
    run, log = last_pipeline_run(api)
    assert run["state_type"] == "FAILED" and "set AWS_ENDPOINT_URL_S3" in run["state"]["message"]
    assert "Traceback" not in log


# ---------------------------------------------------------------------------------------------------- deployments
def ensure_gpu_pool(api: str, cwd: Path, env: dict[str, str]) -> None:
    """The process work pool `gpu`, created unless an earlier test of the session did (as `make deploy` does)."""
    try:
        prefect_api(api, "work_pools/gpu")
    except httpx.HTTPStatusError:  # 404: not there yet
        sh([PY, "-m", "prefect", "work-pool", "create", "gpu", "--type", "process"], cwd, env, timeout=120)


def worker_hang_report(worker: subprocess.Popen, worker_log: Path) -> dict:
    """What a worker that ignored one SIGINT was doing: its process tree (pid, status, command) and, from a SIGABRT
    with PYTHONFAULTHANDLER set, the stack of each of its threads, which it prints to its log after `log_offset`."""
    processes = []
    for proc in [psutil.Process(worker.pid), *psutil.Process(worker.pid).children(recursive=True)]:
        try:
            processes.append((proc.pid, proc.status(), " ".join(proc.cmdline())[:200]))
        except psutil.Error:
            pass
    log_offset = len(worker_log.read_text())
    os.kill(worker.pid, signal.SIGABRT)
    try:
        worker.wait(timeout=10)
    except subprocess.TimeoutExpired:
        pass
    return {"processes": processes, "log_offset": log_offset}


def test_deployment_runs_refuse_an_unprepared_workspace_in_one_line(
        tmp_path, prefect_server):
    """The deployments pointed at a user's checkout (`VR_WORKSPACE=<checkout>`, not a workspace `make deploy`
    prepared): a worker's runs of `micro-smoke` (flows/pipeline.py) and `sweep` (flows/sweep/parent.py) refuse it
    before any work, each ending Failed with the one line that says what to run; neither the run's log (the UI) nor
    the worker's output (its terminal) holds a traceback (flows/services.OneLineKnownErrors on the real engine's
    loggers). Then one interrupt, as Ctrl-C sends it, to the idle worker (how long it took is printed)."""
    api = f"{prefect_server.url}/api"
    env = base_env(tmp_path, PREFECT_API_URL=api, PREFECT_CLI_PROMPT="false", PREFECT_WORKER_QUERY_SECONDS="2")
    checkout = make_project_workspace(tmp_path / "checkout", env, f"s3://{BUCKET}/never-reached")
    ensure_gpu_pool(api, checkout, env)
    sh([PY, "-m", "prefect", "deploy", "-n", "micro-smoke", "-n", "sweep"], checkout,
       {**env, "VR_WORKSPACE": str(checkout)}, timeout=300)
    runs = {}
    for name in ("visual-region-pipeline/micro-smoke", "visual-region-sweep/sweep"):
        dep = prefect_api(api, f"deployments/name/{name}")
        runs[name] = prefect_api(api, f"deployments/{dep['id']}/create_flow_run", {})

    worker_log = tmp_path / "worker.log"
    with worker_log.open("w") as log:
        # PYTHONFAULTHANDLER: a SIGABRT makes the worker print every thread's stack (used below if it hangs)
        worker = subprocess.Popen([PY, "-m", "prefect", "worker", "start", "--pool", "gpu", "--type", "process"],
                                  cwd=tmp_path, env={**env, "PYTHONFAULTHANDLER": "1"}, stdout=log,
                                  stderr=subprocess.STDOUT, start_new_session=True)
    hang = None
    try:
        deadline = time.monotonic() + 300
        for name, run in runs.items():
            while (run := prefect_api(api, f"flow_runs/{run['id']}"))["state_type"] not in TERMINAL:
                assert worker.poll() is None, worker_log.read_text()[-5000:]
                assert time.monotonic() < deadline, f"{name} did not end in 5 minutes\n{worker_log.read_text()[-5000:]}"
                time.sleep(2)
            runs[name] = run
        # The flow runs' processes print their last lines after the state is set. A worker's first SIGINT waits
        # for the flow runs it started (Prefect's design; a second one kills them): wait for them to exit, then
        # interrupt once. Not asserted: alone (loaded or not) it stopped in under a second, but in two loaded
        # full-suite runs it had not stopped 60 s after one SIGINT, which is not understood yet
        # (docs/orchestration.md). If it hangs, the warning this test emits carries what would explain it: the
        # worker's processes and every thread's stack.
        idle_by = time.monotonic() + 120
        while psutil.Process(worker.pid).children(recursive=True) and time.monotonic() < idle_by:
            time.sleep(0.5)
        interrupted = time.monotonic()
        os.killpg(worker.pid, signal.SIGINT)  # what Ctrl-C in the worker's terminal sends
        try:
            worker.wait(timeout=60)
            print(f"\nthe worker stopped {time.monotonic() - interrupted:.1f} s after one SIGINT")
        except subprocess.TimeoutExpired:
            hang = worker_hang_report(worker, worker_log)
    finally:
        if worker.poll() is None:
            os.killpg(worker.pid, signal.SIGKILL)
            worker.wait(timeout=30)
    output = worker_log.read_text()
    if hang:
        output, stacks = output[:hang["log_offset"]], output[hang["log_offset"]:]
        warnings.warn(f"the worker had not stopped 60 s after one SIGINT; its processes: {hang['processes']}; "
                      f"its last lines before SIGABRT:\n{output[-1500:]}\nits threads after SIGABRT:\n"
                      f"{stacks[-6000:]}", stacklevel=1)
    refusal = f"workspace {checkout} is not a deployment workspace"
    for name, run in runs.items():
        message = run["state"]["message"]
        assert run["state_type"] == "FAILED" and refusal in message and "run `make deploy`" in message, (name, message)
        assert "\n" not in message, message
        log = "\n".join(entry["message"] for entry in prefect_api(
            api, "logs/filter", {"logs": {"flow_run_id": {"any_": [run["id"]]}}, "limit": 200}))
        assert refusal in log and "Traceback" not in log, (name, log)
    assert output.count(refusal) >= len(runs) and "Traceback" not in output, output[-8000:]
    assert sh(["git", "status", "--porcelain"], checkout, env).stdout == ""  # params.yaml and the rest untouched


@pytest.fixture(scope="module")
def deployed(tmp_path_factory, prefect_server, s3_server, mlflow_server):
    """`prefect deploy --all` from a project clone, a process worker on pool `gpu`, one run of `micro-smoke`."""
    tmp = tmp_path_factory.mktemp("deploy")
    api = f"{prefect_server.url}/api"
    prefix = f"micro-{uuid.uuid4().hex[:8]}"
    env = base_env(tmp, **s3_env(s3_server.url), PREFECT_API_URL=api, MLFLOW_TRACKING_URI=mlflow_server.url,
                   PREFECT_CLI_PROMPT="false", PREFECT_WORKER_QUERY_SECONDS="2")
    # a user's checkout; `make deploy` prepares the deployments' own workspace under it and deploys from it
    checkout = make_project_workspace(tmp / "checkout", env, f"s3://{BUCKET}/{prefix}")
    (checkout / ".gitignore").write_text((checkout / ".gitignore").read_text() + "/.services/\n")
    sh(["git", "commit", "-qam", "ignore .services"], checkout, env)
    ws = checkout / ".services" / "workspace"
    sh([PY, "-m", "flows.workspace", "prepare", str(ws)], checkout, env, timeout=120)
    ensure_gpu_pool(api, checkout, env)
    sh([PY, "-m", "prefect", "deploy", "--all"], checkout, {**env, "VR_WORKSPACE": str(ws)}, timeout=300)
    before = {str(f.relative_to(checkout)): f.read_bytes() for f in sorted(checkout.rglob("*"))
              if f.is_file() and ".services" not in f.relative_to(checkout).parts}

    log = (tmp / "worker.log").open("w")
    worker = subprocess.Popen([PY, "-m", "prefect", "worker", "start", "--pool", "gpu", "--type", "process", "--limit", "1"],
                              cwd=tmp, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        dep = prefect_api(api, "deployments/name/visual-region-pipeline/micro-smoke")
        # parameters given at trigger time, as from the UI: two of the micro profile's four runs keep it short
        run = prefect_api(api, f"deployments/{dep['id']}/create_flow_run", {"parameters": {"overrides": RUN_OVERRIDES}})
        deadline = time.monotonic() + 1500
        while (run := prefect_api(api, f"flow_runs/{run['id']}"))["state_type"] not in TERMINAL:
            assert worker.poll() is None, (tmp / "worker.log").read_text()[-5000:]
            assert time.monotonic() < deadline, "the micro pipeline did not finish in 25 minutes"
            time.sleep(3)
    finally:
        os.killpg(worker.pid, signal.SIGTERM)
        try:
            worker.wait(timeout=60)
        except subprocess.TimeoutExpired:  # a loaded machine can make the graceful shutdown slow
            os.killpg(worker.pid, signal.SIGKILL)
            worker.wait(timeout=30)
        log.close()
    assert run["state_type"] == "COMPLETED", (run["state"], (tmp / "worker.log").read_text()[-8000:])
    after = {str(f.relative_to(checkout)): f.read_bytes() for f in sorted(checkout.rglob("*"))
             if f.is_file() and ".services" not in f.relative_to(checkout).parts}
    return {"ws": ws, "env": env, "api": api, "run": run, "checkout": checkout, "before": before, "after": after}


def test_the_smoke_run_ran_in_its_own_workspace_and_left_the_checkout_untouched(deployed):
    assert deployed["after"] == deployed["before"]  # byte for byte, .git included
    assert (deployed["ws"] / "metrics" / "registry.json").is_file()  # the run's outputs are in the workspace
    assert not (deployed["checkout"] / "models").exists()


def test_a_deployment_refuses_a_workspace_make_deploy_did_not_prepare(deployed, tmp_path):
    from flows.workspace import PipelineError, is_deployment_workspace, prepare_workspace, require_deployment_workspace

    assert is_deployment_workspace(deployed["ws"]) and not is_deployment_workspace(deployed["checkout"])
    with pytest.raises(PipelineError, match="is not a deployment workspace .* run `make deploy`"):
        require_deployment_workspace(deployed["checkout"])
    with pytest.raises(PipelineError, match="did not make"):  # nor does prepare take over someone's clone
        prepare_workspace(deployed["ws"], deployed["checkout"])


def test_deploy_all_registers_the_deployments_on_the_gpu_pool(deployed):
    api, ws = deployed["api"], deployed["ws"]
    deps = {d["name"]: d for d in prefect_api(api, "deployments/filter", {})}
    assert {"nightly", "experiment", "micro-smoke"} <= set(deps)
    nightly = deps["nightly"]
    assert nightly["work_pool_name"] == "gpu" and nightly["entrypoint"] == "flows.pipeline:pipeline"
    assert [s["schedule"]["cron"] for s in nightly["schedules"]] == ["0 2 * * *"]
    assert nightly["job_variables"]["env"]["CUDA_VISIBLE_DEVICES"] == "0"
    assert nightly["parameters"]["params_file"] == "params.yaml"
    assert nightly["pull_steps"] == [{"prefect.deployments.steps.set_working_directory": {"directory": str(ws)}}]
    assert deps["experiment"]["parameters"]["overrides"]
    assert prefect_api(api, "work_pools/gpu")["type"] == "process"


def test_worker_ran_every_stage_as_a_flow_run_of_the_pipeline_run(deployed):
    api, run = deployed["api"], deployed["run"]
    stages = flow_runs(api, tags={"all_": [f"pipeline-run:{run['id']}"]})
    names = flow_names(api, stages)
    done = {(names[r["flow_id"]], r["name"]) for r in stages if r["state_type"] == "COMPLETED"}
    assert len(done) == len(stages), [(r["name"], r["state_type"]) for r in stages]
    for expected in [("prepare", "prepare"), ("tune", "tune@uniform50"), ("prune", "prune@all"), ("register", "register")]:
        assert expected in done, sorted(done)
    # each a child run of the pipeline run (the UI's "Hide subflows" hides them)
    for stage in stages:
        assert prefect_api(api, f"task_runs/{stage['parent_task_run_id']}")["flow_run_id"] == run["id"], stage["name"]


def test_summary_artifact_links_mlflow_and_lists_the_registry(deployed):
    from flows.pipeline import ARTIFACT_KEY

    api, run = deployed["api"], deployed["run"]
    arts = prefect_api(api, "artifacts/filter", {"artifacts": {"flow_run_id": {"any_": [run["id"]]}}})
    (art,) = [a for a in arts if a["key"] == ARTIFACT_KEY]
    md = art["data"]
    assert "`dvc exp run -S ~tune.runs.lora_bottom1 -S ~tune.importance_runs.bi1`" in md
    assert "outputs pushed to the DVC remote: yes" in md
    assert "## MLflow runs" in md and f"{deployed['env']['MLFLOW_TRACKING_URI']}/#/experiments/" in md
    assert "## Model registry" in md and "visual-region-micro-uniform50" in md


def test_registered_versions_live_on_the_mlflow_server_with_s3_artifacts(deployed, s3_server):
    import mlflow

    from flows.services import s3_client

    client = mlflow.MlflowClient(deployed["env"]["MLFLOW_TRACKING_URI"])
    registry = json.loads((deployed["ws"] / "metrics" / "registry.json").read_text())
    assert registry["enabled"] and set(registry["models"]) == {"all.pruned", "uniform50.pruned"}
    for entry in registry["models"].values():
        assert client.get_model_version_by_alias(entry["model"], "challenger").version == str(entry["version"])
    keys = [o["Key"] for page in s3_client(s3_server.url, S3_KEY, S3_SECRET).get_paginator("list_objects_v2").paginate(
        Bucket=BUCKET, Prefix="mlflow/") for o in page.get("Contents", [])]
    assert sum(k.endswith(".safetensors") for k in keys) >= 2


def test_fresh_clone_and_dvc_pull_restore_every_stage_output(deployed, tmp_path):
    ws, env = deployed["ws"], deployed["env"]
    sh(["git", "add", "-A"], ws, env)
    sh(["git", "commit", "-qm", "micro-smoke results"], ws, env)
    clone = tmp_path / "clone"
    sh(["git", "clone", "-q", str(ws), str(clone)], tmp_path, env)
    dvc(clone, env, "pull")
    outputs = lock_outputs(clone)
    assert {"data/prepared", "models/base", "models/projector", "models/pruned/uniform50", "metrics/registry.json"} <= set(outputs)
    for path in outputs:
        assert tree_bytes(clone / path) == tree_bytes(ws / path), path
    assert "up to date" in dvc(clone, env, "status").stdout
