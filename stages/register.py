"""Stage `register`: every run's checkpoints (`registry.kinds`) become MLflow model versions with alias `challenger`;
`champion` moves only through the gate (visual and text retention vs the `all` run's tuned scores, and on the
benchmark scores `registry.min_benchmark_retention` names). Writes
`metrics/registry.json`. With `registry.enabled: false` it registers nothing and says so in that file.

    python -m stages.register
"""

import os

from pipeline.tracking import outage
from stages import _inputs as inputs, _paths as paths, _records as records
from stages._common import run

# registry.kinds -> (the path of a run's checkpoint of that kind, the stage writing it)
CHECKPOINTS = {"tuned": (paths.tuned_model, "tune"), "pruned": (paths.pruned_model, "prune")}


def _int(version: str | None) -> int | None:
    return None if version is None else int(version)


def main(argv: list[str]) -> None:
    from pipeline.storage import atomic_write_json

    params = inputs.load_params()
    cfg = params.registry
    if not cfg.enabled:
        atomic_write_json(paths.stage_metrics("registry"), {"enabled": False})
        return

    from pipeline import registry, tracking
    from pipeline.evaluation import retention

    registry.ensure_reachable(os.environ.get("MLFLOW_TRACKING_URI"))
    runs = params.tune.all_runs()
    evals = {name: inputs.read_json(paths.stage_metrics("eval", name), inputs.stage_name(params, "evaluate", name),
                                    ("tuned", "pruned")) for name in runs}
    base, floors = evals["all"]["tuned"], cfg.min_benchmark_retention
    registry.check_benchmark_keys(floors, [base.get("benchmarks"), *(e[kind].get("benchmarks") for e in evals.values()
                                                                      for kind in cfg.kinds)])
    tracking.setup(params.mlflow.experiment)
    results: dict = {"enabled": True, "models": {}}
    for name in runs:
        tune_run_id = records.read("tune", name).get("mlflow_run_id")  # None: a run of its own (registry.py)
        for kind in cfg.kinds:
            scores = evals[name][kind]
            decision = registry.gate(
                retention(scores["visual_score"], base["visual_score"]),
                retention(scores["text_qa_accuracy"], base["text_qa_accuracy"]),
                min_visual=cfg.min_visual_retention, min_text=cfg.min_text_retention, min_benchmarks=floors,
                benchmarks=registry.benchmark_retention(scores.get("benchmarks"), base.get("benchmarks"), floors),
            )
            model = registry.model_name(cfg.model_name, name, kind)
            path, stage = CHECKPOINTS[kind]
            checkpoint = str(inputs.need(path(name), inputs.stage_name(params, stage, name)))
            version = registry.register_checkpoint(
                checkpoint, model, run_id=tune_run_id, dtype=params.model.dtype,
                fingerprint=tracking.tree_hash(checkpoint),
                tags={"vr_run": name, "vr_kind": kind, "git_commit": tracking.git_commit(),
                      "visual_retention": decision.visual_retention, "text_retention": decision.text_retention},
            )
            registry.promote(model, version, decision)
            results["models"][f"{name}.{kind}"] = {
                "model": model, "version": int(version), "champion": _int(registry.alias_version(model, registry.CHAMPION)),
                "promoted": decision.passed, "gate": decision.summary(),
                "visual_retention": decision.visual_retention, "text_retention": decision.text_retention,
            } | ({"benchmark_retention": decision.benchmark_retention} if floors else {})
    atomic_write_json(paths.stage_metrics("registry"), results)


if __name__ == "__main__":
    run(main, outage=outage)
