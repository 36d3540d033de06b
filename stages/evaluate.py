"""Stage `evaluate`: greedy-decoding metrics for one run's tuned and pruned models (pipeline/evaluation.py), and the
published benchmarks of `evaluate.benchmarks` when it names any (pipeline/benchmarks, docs/benchmarks.md).

    python -m stages.evaluate --run uniform25
"""

from pipeline.tracking import outage
from stages import _inputs as inputs, _paths as paths, _records as records
from stages._common import run, run_name

TUNE_METRICS_KEPT = ("trainable_parameters", "optimizer_state_bytes")


def main(argv: list[str]) -> None:
    name = run_name(argv, "stages.evaluate")

    from pipeline import benchmarks, data, evaluation, model, tracking
    from pipeline.storage import atomic_write_json

    params = inputs.load_params()
    params.tune.run(name)  # a bad --run fails here, before any loading
    bench_tasks = benchmarks.runnable_tasks(params.evaluate.benchmarks)  # so do missing benchmark files
    tune_stage, prune_stage = inputs.stage_name(params, "tune", name), inputs.stage_name(params, "prune", name)
    models = {"tuned": inputs.need(paths.tuned_model(name), tune_stage), "pruned": inputs.need(paths.pruned_model(name), prune_stage)}
    tune_metrics = inputs.read_json(paths.stage_metrics("tune", name), tune_stage, TUNE_METRICS_KEPT)
    sets = evaluation.evaluation_sets(inputs.prepared(data.VISUAL_DIR), inputs.prepared(data.TEXT_DIR),
                                      inputs.prepared(data.TEXT_QA_DIR), params.evaluate)
    results, bench_runs = {}, {}
    for kind, path in models.items():
        vlm, processor = model.load_vlm(path, dtype=inputs.torch_dtype(params.model.dtype))
        results[kind] = evaluation.evaluate_model(vlm, processor, sets, params.evaluate, seq_len=params.lm_pretrain.seq_len)
        if bench_tasks:
            bench_runs[kind] = benchmarks.run_benchmarks(path, params.evaluate.benchmarks, tasks=bench_tasks,
                                                         loaded=(vlm, processor))
            results[kind]["benchmarks"] = bench_runs[kind]["scores"]
    results["tuned"] |= {k: tune_metrics[k] for k in TUNE_METRICS_KEPT}
    scores, record = records.split(results)  # generation speed: runs/eval/<run>.json
    atomic_write_json(paths.stage_metrics("eval", name), scores)
    records.write(record, "eval", name, describes=(paths.stage_metrics("eval", name),))

    mlflow = tracking.setup(params.mlflow.experiment)
    tune_run_id = records.read("tune", name).get("mlflow_run_id")  # None: the tune ran elsewhere (restored by DVC)
    run_id = tracking.evaluation_run_id(mlflow, tracking.pipeline_key(params), name, tune_run_id)
    with mlflow.start_run(run_id=run_id):
        mlflow.log_params(tracking.prune_params(params))
        for kind, res in results.items():
            mlflow.log_metrics({f"{kind}_{k}": v for k, v in res.items() if isinstance(v, (int, float))})
            mlflow.log_metrics({f"{kind}_acc_{q}": v for q, v in res["per_type"].items()})
        for kind, bench_run in bench_runs.items():
            benchmarks.log_to_mlflow(mlflow, kind, bench_run)
        mlflow.log_dict(results, "eval.json")


if __name__ == "__main__":
    run(main, outage=outage)
