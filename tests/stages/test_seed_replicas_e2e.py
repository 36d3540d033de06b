"""Seed replicas through `dvc repro` on the micro profile (issue 20): runs that differ only in `train_seed` train other
models, and the report reads each selection as the mean over its seeds, with intervals that draw the seeds."""

import json
import sys

import pytest
import yaml
from safetensors.torch import load_file

from test_pipeline_e2e import REPO, prepare_workspace, sh


def replica_params() -> dict:
    raw = yaml.safe_load((REPO / "params" / "micro.yaml").read_text())
    raw["tune"]["runs"] = {
        "all": {"strategy": "all"}, "all-seed1": {"strategy": "all", "train_seed": 1},
        "uniform25": {"strategy": "uniform", "budget": 0.25},
        "uniform25-seed1": {"strategy": "uniform", "budget": 0.25, "train_seed": 1},
        "top25": {"strategy": "top", "budget": 0.25},
    }
    raw["tune"]["importance_runs"] = {}
    raw["prune"]["curve"] = {"runs": ["all", "all-seed1", "uniform25", "uniform25-seed1"], "max_layers": 1,
                             "heal_steps": 0}
    raw["registry"]["enabled"] = False
    return raw


@pytest.fixture(scope="module")
def replicated(tmp_path_factory):
    return prepare_workspace(tmp_path_factory.mktemp("replicas"), replica_params())


def test_replicas_train_other_models_and_record_their_seed(replicated):
    ws, env, _ = replicated
    weights = {run: load_file(next((ws / f"models/tuned/{run}").glob("*.safetensors")))
               for run in ("uniform25", "uniform25-seed1")}
    layers = {run: json.loads((ws / f"models/tuned/{run}/selection.json").read_text())["layers"] for run in weights}
    assert layers["uniform25"] == layers["uniform25-seed1"]  # the same selection...
    changed = [k for k, v in weights["uniform25"].items() if not v.equal(weights["uniform25-seed1"][k])]
    assert changed  # ...trained on another data order
    code = ("import mlflow, json; mlflow.set_tracking_uri(%r); exp = mlflow.get_experiment_by_name('visual-region-micro');"
            "print(json.dumps({r.data.tags.get('vr_run'): r.data.params for r in mlflow.search_runs("
            "[exp.experiment_id], output_format='list') if r.data.tags.get('vr_kind') == 'tune'}))") % env["MLFLOW_TRACKING_URI"]
    params = json.loads(sh([sys.executable, "-c", code], ws, env).stdout.strip().splitlines()[-1])
    assert params["uniform25-seed1"]["tune.run.train_seed"] == "1" and "tune.run.train_seed" not in params["uniform25"]


def test_the_report_reads_each_selection_over_its_seeds(replicated):
    ws, _, _ = replicated
    summary = json.loads((ws / "metrics/summary.json").read_text())
    selections = summary["selections"]
    assert set(selections) == {"all", "uniform25", "top25"}
    assert selections["uniform25"]["seeds"] == ["uniform25", "uniform25-seed1"] and selections["top25"]["seeds"] == ["top25"]
    mean = (summary["uniform25"]["visual_score"] + summary["uniform25-seed1"]["visual_score"]) / 2
    assert selections["uniform25"]["visual_score"] == pytest.approx(mean)
    low, high = selections["uniform25"]["visual_score_interval"]
    assert low <= mean <= high
    report = (ws / "reports/summary.md").read_text()
    assert "## Selections over training seeds" in report and "over the training seeds and the evaluation samples" in report
    assert "(mean over 2 seeds)" in report
    assert set(summary["claims"]) >= {"uniform 25% keeps >= 95% of the `all` visual score", "uniform beats contiguous top"}
    assert (ws / "reports/figures/pruning_curves.png").stat().st_size > 0
