"""The layer-selection sweep (flows/sweep/) across Prefect process workers, against real servers on 127.0.0.1:
a Prefect server, SeaweedFS S3 (the DVC remote) and an MLflow server with S3 artifacts. `prefect deploy --all` from a
workspace prepared as `make deploy` prepares it; one worker on queue `sweep` takes the parent, two workers on queue
`default` (`--limit 1`, like one GPU each) take the children. The sweep runs the micro model, shrunk further, over `all` (in the parent),
`uniform50` and the importance run `bi1` (children); then a second sweep adds a selection that fails in its child:
it is named in the parent's error, not retried, and the two finished selections are not run again. The plan and the
other pure parts: tests/unit/test_sweep_plan.py. Every Prefect API call of these tests goes through the Prefect client
(servers.prefect_api), which retries a busy server's 503s."""

import contextlib
import json
import os
import signal
import subprocess
import time
import uuid
from pathlib import Path

import httpx
import pytest

from servers import (
    BUCKET, PY, S3_KEY, S3_SECRET, base_env, dvc, lock_outputs, make_project_workspace, prefect_api, s3_env, sh, tree_bytes,
)

TERMINAL = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}
CHILDREN = {"uniform50", "bi1"}
CHILD_WORKERS = ("sweep-worker-a", "sweep-worker-b")

# params/micro.yaml with fewer steps and samples, no registry: the sweep, not the model, is under test.
SWEEP_PARAMS = """\
seed: 0
model: {profile: micro, dtype: float32, spec: {lm_layers: 4}}
data: {seed: 0, image_size: 32, num_captions: 32, num_instruct: 48, num_vqa_test: 12, text_qa_repeats: 1}
vision_pretrain: {train: {max_steps: 0}}   # the micro tower stays random here
lm_pretrain:
  lr: 0.003
  seq_len: 32
  train: {max_steps: 2, batch_size: 8, save_steps: 2, logging_steps: 1}
pretrain_projector:
  lr: 0.001
  train: {max_steps: 2, batch_size: 8, max_length: 48, save_steps: 2, logging_steps: 1}
tune:
  projector_lr: 0.0002
  lm_lr: 0.001
  embeddings: false
  lm_head: false
  lora: {r: 4, alpha: 8, dropout: 0.0}
  train: {max_steps: 3, batch_size: 8, max_length: 48, save_steps: 3, logging_steps: 1}
  runs:
    all: {strategy: all, language_model: full}
    uniform50: {strategy: uniform, budget: 0.5, language_model: full}
  importance_runs:
    bi1: {strategy: importance, budget: 1, importance_metric: bi, importance_from: all}
prune: {num_layers: 1, metric: angular, calibration_samples: 4, batch_size: 4, curve: {runs: [all, uniform50], max_layers: 1}}
evaluate: {max_new_tokens: 2, batch_size: 16, vqa_samples: 6, digits_samples: 4, text_qa_samples: 4, text_ppl_chunks: 4}
mlflow: {experiment: visual-region-sweep-test}
registry: {enabled: false}
"""
# the same plus a run whose explicit layer list is past the 4-layer model: valid params, fails in its child's tune
BROKEN_PARAMS = SWEEP_PARAMS.replace(
    "    uniform50: {strategy: uniform, budget: 0.5, language_model: full}\n",
    "    uniform50: {strategy: uniform, budget: 0.5, language_model: full}\n"
    "    broken: {strategy: [0, 9], language_model: full}\n")


# ---------------------------------------------------------------------------------------------------- no servers
def test_the_sweep_needs_a_prefect_api(tmp_path):
    env = base_env(tmp_path)
    proc = sh([PY, "-m", "flows.sweep", "--params-file", "params/micro.yaml"], Path(__file__).resolve().parents[2],
              env, check=False, timeout=120)
    assert proc.returncode == 2 and "error: the sweep submits flow runs to workers: set PREFECT_API_URL" in proc.stderr


# ---------------------------------------------------------------------------------------------------- servers, workers
def _stop(proc: subprocess.Popen) -> None:
    """Stop a worker and whatever it started: flow runs get process groups of their own, so a run still going (a
    test that failed mid-sweep) is killed by pid after the worker is gone."""
    import psutil

    if proc.poll() is not None:
        return
    started: list = []
    with contextlib.suppress(psutil.Error):
        started = psutil.Process(proc.pid).children(recursive=True)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:  # a loaded machine can make the graceful shutdown slow
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    for child in started:
        with contextlib.suppress(psutil.Error):
            child.kill()


class Cluster:
    """The workspace the deployments point at, and three process workers on pool `gpu`."""

    def __init__(self, tmp: Path, ws: Path, env: dict, api: str, remote: str):
        self.tmp, self.ws, self.env, self.api, self.remote = tmp, ws, env, api, remote
        self.workers: dict[str, subprocess.Popen] = {}

    def start_worker(self, name: str, *args: str) -> None:
        log = (self.tmp / f"{name}.log").open("w")
        self.workers[name] = subprocess.Popen(
            [PY, "-m", "prefect", "worker", "start", "--pool", "gpu", "--type", "process", "--name", name, *args],
            cwd=self.tmp, env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        log.close()

    def logs(self, chars: int = 6000) -> str:
        out = []
        for name in self.workers:
            text = (self.tmp / f"{name}.log").read_text(errors="replace")
            out.append(f"----- worker {name} (last {chars} chars) -----\n{text[-chars:]}")
        return "\n".join(out)

    def flow_runs(self, **flow_run_filter) -> list[dict]:
        return prefect_api(self.api, "flow_runs/filter", {"flow_runs": flow_run_filter, "limit": 200})

    def children_of(self, sweep_run_id: str) -> list[dict]:
        return self.flow_runs(tags={"all_": [f"sweep:{sweep_run_id}"]})

    def read_run(self, run: dict) -> dict:
        """The flow run now; no answer even after the client's retries (the 2 cores are busy training) is asked again
        at the next look, not a failure."""
        try:
            return prefect_api(self.api, f"flow_runs/{run['id']}")
        except httpx.TransportError:
            return run

    def run_sweep(self, params_file: str, timeout_s: float = 540) -> dict:
        """Trigger the `sweep` deployment and wait for its flow run to end; a hang fails with the workers' logs."""
        dep = prefect_api(self.api, "deployments/name/visual-region-sweep/sweep")
        # children clone the workspace itself: its origin (the checkout) lacks the commit of the first sweep's results
        run = prefect_api(self.api, f"deployments/{dep['id']}/create_flow_run", {"parameters": {
            "params_file": params_file, "child_timeout_s": 400, "poll_s": 2, "repo_url": str(self.ws)}})
        deadline = time.monotonic() + timeout_s
        while (run := self.read_run(run))["state_type"] not in TERMINAL:
            dead = [n for n, p in self.workers.items() if p.poll() is not None]
            assert not dead, f"workers {dead} exited\n{self.logs()}"
            if time.monotonic() > deadline:
                children = [(c["name"], c["state_type"]) for c in self.children_of(run["id"])]
                pytest.fail(f"the sweep ({params_file}) did not end in {timeout_s:.0f} s: parent {run['state_type']}, "
                            f"children {children}\n{self.logs()}")
            time.sleep(2)
        return run


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, prefect_server, s3_server, mlflow_server):
    tmp = tmp_path_factory.mktemp("sweep")
    api = f"{prefect_server.url}/api"
    env = base_env(tmp, **s3_env(s3_server.url), PREFECT_API_URL=api, MLFLOW_TRACKING_URI=mlflow_server.url,
                   PREFECT_CLI_PROMPT="false", PREFECT_WORKER_QUERY_SECONDS="2", VR_SWEEP_DIR=str(tmp / "children"),
                   VR_PREFECT="0", OMP_NUM_THREADS="1")  # stages run plain: ~5 s less each than as flow runs of their own
    remote = f"s3://{BUCKET}/sweep-{uuid.uuid4().hex[:8]}"
    checkout = make_project_workspace(tmp / "checkout", env, remote)
    (checkout / "params" / "sweep-test.yaml").write_text(SWEEP_PARAMS)
    (checkout / "params" / "sweep-broken.yaml").write_text(BROKEN_PARAMS)
    sh(["git", "add", "-A"], checkout, env)
    sh(["git", "commit", "-qm", "sweep test params"], checkout, env)
    ws = tmp / "ws"  # the deployments' own workspace, as `make deploy` prepares it: a sweep deployment refuses others
    sh([PY, "-m", "flows.workspace", "prepare", str(ws)], checkout, env, timeout=120)
    try:
        prefect_api(api, "work_pools/gpu")
    except httpx.HTTPStatusError:  # 404: not created yet (another test module may have)
        sh([PY, "-m", "prefect", "work-pool", "create", "gpu", "--type", "process"], ws, env, timeout=120)
    sh([PY, "-m", "prefect", "deploy", "--all"], ws, {**env, "VR_WORKSPACE": str(ws)}, timeout=300)

    c = Cluster(tmp, ws, env, api, remote)
    try:
        c.start_worker("sweep-parent-worker", "--work-queue", "sweep")
        for name in CHILD_WORKERS:  # one run at a time each, like a worker per GPU
            c.start_worker(name, "--work-queue", "default", "--limit", "1")
        yield c
    finally:
        for proc in c.workers.values():
            _stop(proc)


@pytest.fixture(scope="module")
def swept(cluster):
    t0 = time.monotonic()
    run = cluster.run_sweep("params/sweep-test.yaml")
    assert run["state_type"] == "COMPLETED", f"sweep {run['state_type']}: {run['state']['message']}\n{cluster.logs(12000)}"
    seconds = time.monotonic() - t0
    print(f"\nsweep of {sorted(CHILDREN)} + all: {seconds:.0f} s")
    # the sweep's results as a commit, as a team would keep them (the fresh-clone test clones it)
    sh(["git", "add", "-A"], cluster.ws, cluster.env)
    sh(["git", "commit", "-qm", "sweep results"], cluster.ws, cluster.env)
    return {"run": run, "seconds": seconds}


def _results(cluster, run_id: str) -> dict[str, dict]:
    """The result artifact of each completed child of the sweep, by selection."""
    out = {}
    for child in cluster.children_of(run_id):
        for art in prefect_api(cluster.api, "artifacts/filter", {"artifacts": {"flow_run_id": {"any_": [child["id"]]},
                                                                                "type": {"any_": ["vr-sweep-result"]}}}):
            data = json.loads(art["data"]) if isinstance(art["data"], str) else art["data"]
            out[data["selection"]] = data
    return out


def test_one_completed_child_flow_run_per_selection(cluster, swept):
    children = cluster.children_of(swept["run"]["id"])
    assert sorted(c["parameters"]["selection"] for c in children) == sorted(CHILDREN), [(c["name"], c["state_type"]) for c in children]
    assert all(c["state_type"] == "COMPLETED" for c in children), [(c["name"], c["state"]) for c in children]
    dep = prefect_api(cluster.api, "deployments/name/visual-region-sweep-child/sweep-child")
    assert {c["deployment_id"] for c in children} == {dep["id"]} and {c["work_queue_name"] for c in children} == {"default"}
    assert dep["entrypoint"] == "flows.sweep.child:sweep_child"
    assert {tuple(c["parameters"]["stages"]) for c in children} == {
        ("tune@uniform50", "prune@uniform50", "evaluate@uniform50"),
        ("tune_importance@bi1", "prune_importance@bi1", "evaluate_importance@bi1")}


def test_children_ran_on_both_workers(cluster, swept):
    results = _results(cluster, swept["run"]["id"])
    assert set(results) == CHILDREN
    assert {r["where"]["worker"] for r in results.values()} == set(CHILD_WORKERS), {k: r["where"] for k, r in results.items()}
    assert len({r["where"]["pid"] for r in results.values()}) == 2
    # the parent's summary names where each selection ran
    arts = prefect_api(cluster.api, "artifacts/filter", {"artifacts": {"flow_run_id": {"any_": [swept["run"]["id"]]}}})
    (md,) = [a["data"] for a in arts if a["key"] == "visual-region-sweep"]
    for name in CHILDREN:
        row = next(line for line in md.splitlines() if line.startswith(f"| {name} |"))
        assert "| completed |" in row and any(w in row for w in CHILD_WORKERS), row
    assert "| all | in parent |" in md
    assert "## Layer-selection report" in md.splitlines()  # the report, one heading level down


CHILD_PARAMETERS = {"selection", "stages", "repo_url", "commit", "sweep_id", "pull", "inputs", "outputs", "remote",
                    "remote_url", "child_dir", "keep_workspace"}


def test_prefect_carries_only_metadata_and_the_exchange_area_is_removed(cluster, swept, s3_server):
    """Files travel through the DVC remote (models by `dvc push`, the small uncached files through the sweep's exchange
    area); a child's parameters and result artifact are names, paths, hashes and where it ran."""
    from flows.services import s3_client

    sweep_id = swept["run"]["id"]
    for child in cluster.children_of(sweep_id):
        assert set(child["parameters"]) == CHILD_PARAMETERS, sorted(child["parameters"])
        assert len(json.dumps(child["parameters"])) < 4000
    results = _results(cluster, sweep_id)
    for name, result in results.items():
        assert set(result) == {"selection", "commit", "stages", "lock", "outputs_key", "where", "seconds"}, sorted(result)
        assert result["outputs_key"].startswith(f"sweeps/{sweep_id}/{name}/outputs-")
        assert sorted(result["lock"]) == sorted(result["stages"])
        assert len(json.dumps(result)) < 30_000, len(json.dumps(result))
    prefix = cluster.remote.removeprefix(f"s3://{BUCKET}/") + "/sweeps/"
    left = s3_client(s3_server.url, S3_KEY, S3_SECRET).list_objects_v2(Bucket=BUCKET, Prefix=prefix).get("Contents", [])
    assert left == [], [o["Key"] for o in left]


def test_the_report_holds_every_selection_with_numbers(cluster, swept):
    summary = json.loads((cluster.ws / "metrics" / "summary.json").read_text())
    for name in CHILDREN | {"all"}:
        row = summary[name]
        assert isinstance(row["visual_score"], float) and isinstance(row["text_ppl"], float), row
        assert isinstance(row["tuned_layers"], int) and row["tuned_layers"] >= 1
    assert summary["all"]["tuned_layers"] == 4 and summary["uniform50"]["tuned_layers"] == 2 and summary["bi1"]["tuned_layers"] == 1
    report = (cluster.ws / "reports" / "summary.md").read_text()
    for name in CHILDREN | {"all"}:
        assert f"| {name} |" in report
    # the parent ran the baseline and the gather step, never a child's stages
    status = dvc(cluster.ws, cluster.env, "status").stdout
    assert "up to date" in status, status


def test_children_log_under_the_sweeps_mlflow_parent_run(cluster, swept):
    import mlflow

    client = mlflow.MlflowClient(cluster.env["MLFLOW_TRACKING_URI"])
    parents = set()
    for name in CHILDREN | {"all"}:
        record = json.loads((cluster.ws / "runs" / "tune" / f"{name}.json").read_text())
        run = client.get_run(record["mlflow_run_id"])
        assert run.data.params["run"] == name and "visual_score" in json.dumps(run.data.metrics), run.data.metrics
        parents.add(run.data.tags.get("mlflow.parentRunId"))
    assert len(parents) == 1 and None not in parents


def test_fresh_clone_pulls_every_selections_outputs_from_s3(cluster, swept, tmp_path):
    clone = tmp_path / "clone"
    sh(["git", "clone", "-q", str(cluster.ws), str(clone)], tmp_path, cluster.env)
    dvc(clone, cluster.env, "pull")
    outputs = lock_outputs(clone)
    for name in CHILDREN:
        for path in (f"models/tuned/{name}", f"models/pruned/{name}"):
            assert path in outputs, sorted(outputs)
            assert tree_bytes(clone / path) == tree_bytes(cluster.ws / path), path
            assert (clone / path / "model.safetensors").exists() or list((clone / path).glob("*.safetensors")), path
    assert "up to date" in dvc(clone, cluster.env, "status").stdout
    # the gathered models went to S3, not into git
    tracked = sh(["git", "ls-files", "models"], cluster.ws, cluster.env).stdout.split()
    assert all(p.endswith(".gitignore") for p in tracked), tracked


def test_a_failing_selection_is_named_not_retried_and_the_rest_are_not_rerun(cluster, swept):
    t0 = time.monotonic()
    run = cluster.run_sweep("params/sweep-broken.yaml", timeout_s=400)
    print(f"\nsweep with a failing selection: {time.monotonic() - t0:.0f} s")
    assert run["state_type"] == "FAILED", f"sweep {run['state_type']}: {run['state']['message']}\n{cluster.logs()}"
    message = run["state"]["message"]
    assert "1 of 3 selections failed: broken" in message and "tune.runs.broken" in message, message
    assert "Gathered: uniform50, bi1" in message or "Gathered: bi1, uniform50" in message, message
    children = cluster.children_of(run["id"])
    assert [(c["parameters"]["selection"], c["state_type"]) for c in children] == [("broken", "FAILED")]  # once
    arts = prefect_api(cluster.api, "artifacts/filter", {"artifacts": {"flow_run_id": {"any_": [run["id"]]}}})
    (md,) = [a["data"] for a in arts if a["key"] == "visual-region-sweep"]
    assert "failed: broken" in md and "| broken | failed |" in md and "| uniform50 | up to date |" in md, md
