"""Where the stages read and write, relative to the repository root: every path DVC tracks, as dvc.yaml's deps and
outs name it (tests/stages/test_dvc_deps.py checks that the two agree). Stage code takes these paths from here only."""

from pathlib import Path

PREPARED = Path("data/prepared")
BASE = Path("models/base")
PROJECTOR = Path("models/projector")
TUNED = Path("models/tuned")  # one directory per tune run
PRUNED = Path("models/pruned")
METRICS = Path("metrics")
LOSS_PLOTS = Path("plots/loss")  # one CSV per training stage or tune run
IMPORTANCE = Path("plots/importance")  # per tune run: its per-layer scores (JSON) and their plot (CSV)
CURVE_METRICS = METRICS / "pruning_curve.json"
CURVE_PLOT = Path("plots/pruning_curve.csv")
SUMMARY = METRICS / "summary.json"
RETENTION_PLOT = Path("plots/retention_vs_layers.csv")
REPORT = Path("reports/summary.md")
FIGURES = Path("reports/figures")
CHECKPOINTS = Path("checkpoints")  # resume checkpoints of the training stages; not tracked
RUNS = Path("runs")  # each stage's run record: timings, memory, MLflow run id (stages/_records.py); not tracked


def stage_metrics(stage: str, run: str | None = None) -> Path:
    """metrics/<stage>.json, or metrics/<stage>/<run>.json for a per-run stage (tune, prune, eval)."""
    return METRICS / stage / f"{run}.json" if run else METRICS / f"{stage}.json"


def run_record(stage: str, run: str | None = None) -> Path:
    """runs/<stage>.json, or runs/<stage>/<run>.json for a per-run stage (stages/_records.py)."""
    return RUNS / stage / f"{run}.json" if run else RUNS / f"{stage}.json"


def tuned_model(run: str) -> Path:
    return TUNED / run


def pruned_model(run: str) -> Path:
    return PRUNED / run


def selection(run: str) -> Path:
    """The tune run's selection.json, saved inside its tuned model."""
    return tuned_model(run) / "selection.json"


def loss_plot(name: str) -> Path:
    return LOSS_PLOTS / f"{name}.csv"


def importance_scores(run: str) -> Path:
    return IMPORTANCE / f"{run}.json"


def importance_plot(run: str) -> Path:
    return IMPORTANCE / f"{run}.csv"


def output_lock(stage: str, run: str | None = None) -> Path:
    """The lock a training stage holds on its outputs and checkpoints while it runs (not tracked, beside the
    checkpoints): checkpoints/<stage>.lock, or checkpoints/<stage>/<run>.lock for a tune run."""
    return CHECKPOINTS / stage / f"{run}.lock" if run else CHECKPOINTS / f"{stage}.lock"
