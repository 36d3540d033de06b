"""Stage `report`: every run against the `all` baseline (retention), the layer-count sweep, the pruning curves, the
published benchmarks (when any were run) and the paper's claims checked on these numbers -- as metrics, a markdown
report, figures and DVC plot data (pipeline/report.py).

    python -m stages.report
"""

import os
import shutil

from pipeline.tracking import outage
from stages import _inputs as inputs, _paths as paths
from stages._common import run


def main(argv: list[str]) -> None:
    from pipeline import report, tracking
    from pipeline.storage import atomic_write_json, atomic_write_text

    params = inputs.load_params()
    runs = params.tune.all_runs()
    evals, layers = {}, {}
    for name in runs:
        evals[name] = inputs.read_json(paths.stage_metrics("eval", name), inputs.stage_name(params, "evaluate", name),
                                       ("tuned", "pruned"))
        layers[name] = inputs.read_json(paths.selection(name), inputs.stage_name(params, "tune", name), ("layers",))["layers"]
    curves = inputs.read_json(paths.CURVE_METRICS, "pruning_curve") if paths.CURVE_METRICS.exists() else {}
    importance = {path.stem: inputs.read_json(path, inputs.stage_name(params, "prune", path.stem))
                  for path in sorted(paths.IMPORTANCE.glob("*.json"))}

    base_lm = inputs.read_json(paths.stage_metrics("base"), "build_base")
    rows = report.run_rows(runs, evals, layers, base_lm)
    replicas = params.tune.replicas(params.seed)  # a selection's runs over training seeds
    selections = report.group_rows(rows, replicas)
    sweep = report.sweep_rows(selections, runs)
    checks = report.claims(rows, curves, report.claim_runs(runs), evals, replicas)
    seeds = report.seed_table(selections, evals, replicas)
    shutil.rmtree(paths.FIGURES, ignore_errors=True)
    losses = {name: report.read_loss_csv(paths.loss_plot(name).read_text())
              for name in (*report.PRETRAINING_LOSSES, *runs) if paths.loss_plot(name).exists()}
    grouped_curves = report.group_curves(curves, replicas)
    bars = report.error_bars(selections, sweep, grouped_curves, evals, replicas)
    written = report.figures(grouped_curves, sweep, importance, paths.FIGURES, losses, bars)
    atomic_write_text(paths.RETENTION_PLOT, report.retention_csv(sweep))
    atomic_write_json(paths.SUMMARY, report.summary(rows, checks, seeds))
    links = [os.path.relpath(path, paths.REPORT.parent) for path in sorted(written)]
    benchmarks = {kind: report.benchmark_rows(evals, kind) for kind in ("tuned", "pruned")}
    text = report.markdown(rows, curves, checks, links, benchmarks, seeds)
    atomic_write_text(paths.REPORT, text)

    mlflow = tracking.setup(params.mlflow.experiment)
    with mlflow.start_run(run_id=tracking.parent_run_id(mlflow, tracking.pipeline_key(params))):
        mlflow.log_text(text, "report/summary.md")
        for path in written:
            mlflow.log_artifact(str(path), "report/figures")


if __name__ == "__main__":
    run(main, outage=outage)
