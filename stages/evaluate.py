"""Stage `evaluate`: greedy-decoding metrics for one run's tuned and pruned models (pipeline/evaluation.py).

    python -m stages.evaluate --run uniform25
"""

from pipeline.tracking import outage
from stages import _inputs as inputs, _paths as paths
from stages._common import run, run_name

TUNE_METRICS_KEPT = ("train_seconds", "peak_memory_bytes", "trainable_parameters", "optimizer_state_bytes")


def main(argv: list[str]) -> None:
    name = run_name(argv, "stages.evaluate")

    from pipeline import data, evaluation, model, tracking
    from pipeline.storage import atomic_write_json

    params = inputs.load_params()
    params.tune.run(name)  # a bad --run fails here, before any loading
    tune_stage, prune_stage = inputs.stage_name(params, "tune", name), inputs.stage_name(params, "prune", name)
    models = {"tuned": inputs.need(paths.tuned_model(name), tune_stage), "pruned": inputs.need(paths.pruned_model(name), prune_stage)}
    tune_metrics = inputs.read_json(paths.stage_metrics("tune", name), tune_stage, TUNE_METRICS_KEPT)
    selection = inputs.read_json(paths.selection(name), tune_stage, ("mlflow_run_id",))
    sets = evaluation.evaluation_sets(inputs.prepared(data.VISUAL_DIR), inputs.prepared(data.TEXT_DIR),
                                      inputs.prepared(data.TEXT_QA_DIR), params.evaluate)
    results = {}
    for kind, path in models.items():
        vlm, processor = model.load_vlm(path, dtype=inputs.torch_dtype(params.model.dtype))
        results[kind] = evaluation.evaluate_model(vlm, processor, sets, params.evaluate, seq_len=params.lm_pretrain.seq_len)
    results["tuned"] |= {k: tune_metrics[k] for k in TUNE_METRICS_KEPT}
    atomic_write_json(paths.stage_metrics("eval", name), results)

    mlflow = tracking.setup(params.mlflow.experiment)
    with mlflow.start_run(run_id=selection["mlflow_run_id"]):
        for kind, res in results.items():
            mlflow.log_metrics({f"{kind}_{k}": v for k, v in res.items() if isinstance(v, (int, float))})
            mlflow.log_metrics({f"{kind}_acc_{q}": v for q, v in res["per_type"].items()})
        mlflow.log_dict(results, "eval.json")


if __name__ == "__main__":
    run(main, outage=outage)
