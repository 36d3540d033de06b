"""`python -m stages.evaluate --run x` with `evaluate.benchmarks` configured: missing benchmark files stop the stage
(exit 2, one line naming the task and the path) before any model is loaded; with the files there, the scores land in
metrics/eval/x.json and on the MLflow run, lm-eval's results as artifacts."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

import benchmark_files

REPO = Path(__file__).resolve().parents[2]
DATA = {"image_size": 32, "num_captions": 4, "num_instruct": 5, "num_vqa_test": 5, "text_qa_repeats": 1,
        "digits_test_fraction": 0.95}
EXPERIMENT = "benchmarks-stage"


def params(benchmarks: dict) -> dict:
    return {
        "model": {"profile": "micro", "spec": {"lm_layers": 4}}, "data": DATA,
        "tune": {"runs": {"all": {"strategy": "all"}, "x": {"strategy": "uniform", "budget": 0.5}}},
        "evaluate": {"max_new_tokens": 2, "batch_size": 4, "vqa_samples": 2, "digits_samples": 2, "text_qa_samples": 2,
                     "text_ppl_chunks": 2, "benchmarks": benchmarks},
        "mlflow": {"experiment": EXPERIMENT},
    }


def evaluate(ws: Path, raw: dict) -> subprocess.CompletedProcess:
    (ws / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    env = {**os.environ, "PYTHONPATH": str(REPO), "VR_PARAMS": str(ws / "params.yaml"), "HF_HUB_OFFLINE": "1",
           "DO_NOT_TRACK": "1", "MLFLOW_DISABLE_TELEMETRY": "true", "MLFLOW_TRACKING_URI": f"sqlite:///{ws / 'mlflow.db'}",
           "HF_HUB_DISABLE_PROGRESS_BARS": "1", "TOKENIZERS_PARALLELISM": "false"}
    for key in ("PREFECT_API_URL", "VR_PREFECT", "VR_PIPELINE_RUN_ID"):
        env.pop(key, None)
    return subprocess.run([sys.executable, "-m", "stages.evaluate", "--run", "x"], cwd=ws, env=env, capture_output=True,
                          text=True, timeout=600)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Path:
    from pipeline import data

    out = tmp_path_factory.mktemp("prepared") / "prepared"
    data.prepare_all(data.DataConfig(**DATA), out)
    return out


def test_missing_benchmark_files_stop_evaluate_before_any_model_is_loaded(tmp_path):
    # no model, no data, no tune metrics in this workspace: the benchmark check comes first
    proc = evaluate(tmp_path, params({"tasks": ["gqa"], "data_dir": "data/benchmarks"}))
    assert proc.returncode == 2, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if " ERROR stages: " in line]
    assert errors == [line for line in errors if "BenchmarkFilesError: benchmark gqa: "
                      "data/benchmarks/gqa/testdev_balanced_questions.json is missing" in line] and len(errors) == 1
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "metrics" / "eval" / "x.json").exists()


def test_benchmark_scores_land_in_the_metrics_and_on_the_mlflow_run(tmp_path, prepared, micro4_dir):
    from mlflow import MlflowClient

    for rel in ("data/prepared", "models/tuned/x", "models/pruned/x"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).symlink_to(prepared if rel == "data/prepared" else micro4_dir, target_is_directory=True)
    benchmark_files.write_gqa(tmp_path / "data" / "benchmarks")
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = client.create_experiment(EXPERIMENT, artifact_location=(tmp_path / "mlartifacts").as_uri())
    tune_run = client.create_run(experiment).info.run_id
    (tmp_path / "metrics" / "tune").mkdir(parents=True)
    (tmp_path / "metrics" / "tune" / "x.json").write_text(json.dumps({"trainable_parameters": 1, "optimizer_state_bytes": 0}))
    (tmp_path / "runs" / "tune").mkdir(parents=True)  # the tune's run record: the MLflow run evaluate logs into
    (tmp_path / "runs" / "tune" / "x.json").write_text(json.dumps({"train_seconds": 1.0, "mlflow_run_id": tune_run}))

    proc = evaluate(tmp_path, params({"tasks": ["gqa", "pope"], "data_dir": "data/benchmarks", "limit": 2,
                                      "batch_size": 2, "on_missing": "skip"}))
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "benchmark pope_random skipped" in proc.stderr  # pope's files are not there: skipped with a warning
    scores = json.loads((tmp_path / "metrics" / "eval" / "x.json").read_text())
    for kind in ("tuned", "pruned"):
        bench = scores[kind]["benchmarks"]
        assert set(bench) == {"gqa", "visual_average"}  # the skipped POPE counts in no average
        assert 0 <= bench["gqa"]["exact_match"] <= 1
        assert bench["visual_average"] == {"mean": bench["gqa"]["exact_match"]}
    runs = client.search_runs([client.get_experiment_by_name(EXPERIMENT).experiment_id],
                              filter_string="metrics.tuned_bench_gqa_exact_match >= 0")
    assert len(runs) == 1
    logged = runs[0]
    assert logged.data.metrics["pruned_bench_gqa_exact_match"] == scores["pruned"]["benchmarks"]["gqa"]["exact_match"]
    assert logged.data.metrics["tuned_bench_visual_average_mean"] == scores["tuned"]["benchmarks"]["gqa"]["exact_match"]
    artifacts = {a.path for a in client.list_artifacts(logged.info.run_id, "benchmarks")}
    assert {"benchmarks/tuned_results.json", "benchmarks/pruned_samples.json"} <= artifacts
    results = json.loads((tmp_path / "mlartifacts" / logged.info.run_id / "artifacts" / "benchmarks" /
                          "tuned_results.json").read_text())
    assert results["visual"]["results"]["gqa"]["exact_match,none"] == scores["tuned"]["benchmarks"]["gqa"]["exact_match"]
