"""The study as a DVC experiment queue (flows/queue.py): which params each selection's experiment keeps, and the queue
run end to end on the micro profile, each selection its own DVC experiment with its own MLflow run."""

import copy
import json
import os
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from flows.queue import selection_overrides
from pipeline import config

REPO = Path(__file__).resolve().parents[2]


def apply(raw: dict, overrides: list[str]) -> dict:
    """What `dvc exp run -S` makes of these overrides: `~a.b` deletes a key, `a.b=[x,y]` sets a list."""
    out = copy.deepcopy(raw)
    for o in overrides:
        key, _, value = o.lstrip("~").partition("=")
        *parents, last = key.split(".")
        node = out
        for p in parents:
            node = node[p]
        if o.startswith("~"):
            del node[last]
        else:
            node[last] = [v for v in value.strip("[]").split(",") if v]
    return out


SEEDED = {"all", "all-seed1", "all-seed2"}


@pytest.mark.parametrize("run, runs, importance, curve", [  # each selection with its training-seed replicas
    ("uniform25", SEEDED | {"uniform25", "uniform25-seed1", "uniform25-seed2"}, set(),
     ["all", "all-seed1", "all-seed2", "uniform25", "uniform25-seed1", "uniform25-seed2"]),
    ("top25", SEEDED | {"top25", "top25-seed1", "top25-seed2"}, set(), ["all", "all-seed1", "all-seed2"]),
    ("random25-s1", SEEDED | {"random25-s1"}, set(), ["all", "all-seed1", "all-seed2"]),
    ("bi25", SEEDED, {"bi25"}, ["all", "all-seed1", "all-seed2"]),
])
def test_each_selection_keeps_itself_and_the_baseline(run, runs, importance, curve):
    raw = yaml.safe_load((REPO / "params" / "study.yaml").read_text())
    params = config.validate(raw)
    kept = config.validate(apply(raw, selection_overrides(params, run)))
    assert set(kept.tune.runs) == runs and set(kept.tune.importance_runs) == importance
    assert kept.prune.curve.runs == curve
    assert kept.tune.all_runs()[run] == params.tune.all_runs()[run]


def test_queue_refuses_unknown_runs_before_queueing_anything(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "flows.queue", "--params-file", "params/micro.yaml", "--runs", "all", "nope",
                           "--no-run"], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 2 and "['all', 'nope']" in proc.stderr
    assert "exp" not in proc.stdout


def test_queue_runs_one_experiment_per_selection(tmp_path):
    ws = tmp_path / "ws"
    ws.mkdir()
    for name in ("pipeline", "stages", "flows", "params", "dvc.yaml", ".dvcignore"):
        src = REPO / name
        (shutil.copytree if src.is_dir() else shutil.copy)(src, ws / name, **({"ignore": shutil.ignore_patterns("__pycache__")} if src.is_dir() else {}))
    shutil.copy(REPO / "params" / "micro.yaml", ws / "params.yaml")
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}", "HF_HUB_OFFLINE": "1",
           "DO_NOT_TRACK": "1", "MLFLOW_DISABLE_TELEMETRY": "true", "HF_HUB_DISABLE_PROGRESS_BARS": "1",
           "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t"}
    for key in ("MLFLOW_TRACKING_URI", "VR_PARAMS", "VR_PIPELINE_RUN_ID"):
        env.pop(key, None)

    def sh(*args):
        proc = subprocess.run(args, cwd=ws, env=env, capture_output=True, text=True, timeout=1200)
        assert proc.returncode == 0, f"{args}:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
        return proc.stdout

    (ws / ".gitignore").write_text("__pycache__/\n/mlruns.db\n/mlartifacts/\n/checkpoints/\n")
    sh("git", "init", "-q")
    sh(sys.executable, "-m", "dvc", "init", "-q")
    sh(sys.executable, "-m", "dvc", "config", "core.analytics", "false")
    sh("git", "add", "-A")
    sh("git", "commit", "-qm", "init")
    before = (ws / "params.yaml").read_text()
    sh(sys.executable, "-m", "flows.queue", "--params-file", "params/micro.yaml", "--runs", "uniform50", "bi1",
       "--prefix", "micro")
    assert (ws / "params.yaml").read_text() == before  # the workspace's params are left as they were

    refs = dict(line.split()[::-1] for line in sh("git", "for-each-ref", "--format=%(objectname) %(refname)",
                                                       "refs/exps").splitlines())
    by_name = {ref.rsplit("/", 1)[1]: sha for ref, sha in refs.items()}
    assert {"micro-uniform50", "micro-bi1"} <= set(by_name)
    for name, run in (("micro-uniform50", "uniform50"), ("micro-bi1", "bi1")):
        summary = json.loads(sh("git", "show", f"{by_name[name]}:metrics/summary.json"))
        assert set(summary) == {"all", run, "claims"}
        assert 0 <= summary[run]["visual_score"] <= 1
    with sqlite3.connect(ws / "mlruns.db") as db:  # the queued experiments logged into this repo's store
        names = {row[0] for row in db.execute("select name from runs")}
    assert {"all", "uniform50", "bi1"} <= names
