"""The README's quick start and the registry example, as a newcomer runs them: a fresh `git clone` of this commit,
`make repro`, a second `dvc repro` that finds nothing to do, `dvc metrics show`, a forced re-run that changes no
tracked file, then the registry block of docs/orchestration.md as written, with the project's own tracking store (no
MLFLOW_TRACKING_URI set).

Two deviations, both for time: params/micro.yaml replaces params.yaml (the tiny default takes about 10 minutes;
bench/time_repro.sh measures that one), and the clone uses this checkout's .venv (set up once by `make setup`), so
its requirements.lock is dated back for make to see the venv as up to date instead of re-creating it. Micro's gate
promotes no champion, so the block loads `@challenger` of micro's model name."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

import registry_example

REPO = Path(__file__).resolve().parents[2]
VENV = Path(sys.executable).parent.parent

pytestmark = pytest.mark.slow


def run(args, cwd, env, timeout=1200) -> subprocess.CompletedProcess:
    proc = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{args} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc


@pytest.fixture(scope="module")
def clone(tmp_path_factory):
    if not (VENV / ".installed").exists():
        pytest.skip("needs the project's .venv from `make setup`")
    home = tmp_path_factory.mktemp("newcomer")
    env = {key: value for key, value in os.environ.items()
           if not key.startswith(("MLFLOW_", "PREFECT_", "VR_", "AWS_", "DVC_"))}
    env |= {"HOME": str(home), "HF_HUB_OFFLINE": "1", "DO_NOT_TRACK": "1", "MLFLOW_DISABLE_TELEMETRY": "true",
            "GIT_AUTHOR_NAME": "n", "GIT_AUTHOR_EMAIL": "n@n", "GIT_COMMITTER_NAME": "n", "GIT_COMMITTER_EMAIL": "n@n"}
    ws = home / "visual-region"
    run(["git", "clone", "-q", str(REPO), str(ws)], home, env)
    (ws / ".venv").symlink_to(VENV)
    os.utime(ws / "requirements.lock", (0, 0))  # older than .venv/.installed: make keeps the venv
    (ws / "params.yaml").write_text((ws / "params" / "micro.yaml").read_text())
    first = run(["make", "repro"], ws, env)
    return ws, env, first


def test_make_repro_then_nothing_to_do_and_the_metrics_show(clone):
    ws, env, first = clone
    assert "Running stage 'register'" in first.stdout + first.stderr
    again = run([str(ws / ".venv/bin/dvc"), "repro"], ws, env)
    assert "Data and pipelines are up to date" in again.stdout, again.stdout
    metrics = run([str(ws / ".venv/bin/dvc"), "metrics", "show"], ws, env).stdout
    assert "metrics/summary.json" in metrics and "all.visual_score" in metrics, metrics
    assert (ws / "mlruns.db").exists() and not (ws / "mlflow.db").exists()  # the project's store, not MLflow's default


def test_a_rerun_from_scratch_changes_no_tracked_file(clone):
    """One result for one commit (issue 22): with the first run's outputs committed, `dvc repro --force` re-runs
    every stage (no run cache) and leaves every tracked file, dvc.lock included, byte for byte as it was. The
    timings and MLflow run ids went to the run records (runs/, not tracked) instead."""
    ws, env, _ = clone
    run(["git", "add", "-A"], ws, env)
    run(["git", "commit", "-q", "-m", "the micro profile's outputs"], ws, env)
    forced = run([str(ws / ".venv/bin/dvc"), "repro", "--force"], ws, env)
    assert "Running stage 'tune@all'" in forced.stdout + forced.stderr
    changed = run(["git", "status", "--porcelain"], ws, env).stdout
    assert changed == "", f"a re-run of the same commit changed tracked files:\n{changed}"
    assert (ws / "runs" / "tune" / "all.json").is_file()


def test_the_registry_example_answers_as_the_checkpoint_does(clone):
    ws, env, _ = clone
    python = str(ws / ".venv/bin/python")
    block = registry_example.doc_block("models:/visual-region-micro-all@challenger")
    printed = run([python, "-c", block], ws, env).stdout.strip().splitlines()[-1]
    expected = run([python, "-c", registry_example.DIRECT_ANSWER], ws, {**env, "PYTHONPATH": str(ws)})
    registry_example.assert_answers_as_the_checkpoint(printed, expected.stdout.strip().splitlines()[-1])
