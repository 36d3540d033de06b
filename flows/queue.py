"""The study as a DVC experiment queue: one queued `dvc exp run` per layer selection of a params file, so each selection
is its own DVC experiment (`dvc exp show`, `dvc exp apply study-<run>`) with its own MLflow runs. Each experiment keeps
the `all` baseline beside its selection (the retention's denominator; after the first experiment DVC's run cache
restores it instead of training it again) and the pruning-curve runs it has.

    python -m flows.queue --params-file params/study.yaml             # queue every selection, then run the queue
    python -m flows.queue --params-file params/study.yaml --no-run    # queue only; later `dvc exp run --run-all`
    dvc exp show --only-changed

`make study` runs the same study as one experiment through the Prefect flow (one report over every selection); this is
the per-selection form. The queue runs in this repository, one experiment at a time unless --jobs says otherwise.
"""

from __future__ import annotations

import argparse
import sys

from flows.workspace import REPO, PipelineError, dvc, dvc_env
from pipeline.errors import ProjectError

BASELINE = "all"


class QueueError(PipelineError):
    """A queue step cannot go on; the message names the runs or the params file."""


def selection_overrides(params, run: str) -> list[str]:
    """`dvc exp run -S` overrides that leave, of the params' runs, only `run`, the baseline and the run `run` is
    scored from (an importance run), each with its seed replicas (config.TuneParams.replicas), and only those in the
    pruning curve."""
    spec = params.tune.all_runs()[run]
    wanted = {BASELINE, run} | ({spec.importance_from} if spec.importance_from else set())
    keep = {name for names in params.tune.replicas(params.seed).values() if wanted & set(names) for name in names}
    overrides = [f"~tune.runs.{name}" for name in params.tune.runs if name not in keep]
    overrides += [f"~tune.importance_runs.{name}" for name in params.tune.importance_runs if name not in keep]
    curve = [name for name in params.prune.curve.runs if name in keep]
    return overrides + [f"prune.curve.runs=[{','.join(curve)}]"]


def queue_study(params_file: str, runs: list[str] | None = None, prefix: str = "study", jobs: int = 1,
                run_queue: bool = True) -> list[str]:
    """Queue one experiment `<prefix>-<run>` per selection of `params_file` (every run but the baseline, or `runs`),
    then run the queue unless `run_queue` is False. Returns the experiment names."""
    from pipeline import config, tracking

    source = (REPO / params_file).resolve()
    params = config.load(source)  # validated: a bad file fails here, before anything is queued
    # one experiment per selection: its seed replicas train in it together (selection_overrides)
    selections = runs or [name for name, replicas in params.tune.replicas(params.seed).items() if BASELINE not in replicas]
    unknown = sorted(set(selections) - set(params.tune.all_runs()) | ({BASELINE} & set(selections)))
    if unknown:
        raise QueueError(f"--runs {unknown}: not selections of {params_file} (the baseline `{BASELINE}` is in every one)")
    current = REPO / "params.yaml"
    before = current.read_text()
    names = []
    try:
        current.write_text(source.read_text())  # a queued experiment takes the workspace's params as they are now
        for run in selections:
            name = f"{prefix}-{run}"
            dvc(REPO, "exp", "run", "--queue", "--name", name,
                *[a for o in selection_overrides(params, run) for a in ("-S", o)])
            names.append(name)
    finally:
        current.write_text(before)
    if run_queue:
        env = dvc_env()  # the stages' `python` is this interpreter
        if "MLFLOW_TRACKING_URI" not in env:
            # Queued experiments run in temporary copies of the repo: point them at this repo's store, and create the
            # MLflow experiment here so that its artifacts live here too.
            tracking.setup(params.mlflow.experiment)
            env["MLFLOW_TRACKING_URI"] = f"sqlite:///{REPO / 'mlruns.db'}"
        dvc(REPO, "exp", "run", "--run-all", "--jobs", str(jobs), env=env)
    return names


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m flows.queue", description=__doc__.split("\n")[0])
    parser.add_argument("--params-file", default="params/study.yaml", help="the study's params (default: %(default)s)")
    parser.add_argument("--runs", nargs="+", help="only these selections (default: every run but the baseline)")
    parser.add_argument("--prefix", default="study", help="experiment names are <prefix>-<run> (default: %(default)s)")
    parser.add_argument("--jobs", type=int, default=1, help="experiments at a time (default: %(default)s)")
    parser.add_argument("--no-run", action="store_true", help="queue only")
    args = parser.parse_args(argv)
    try:
        names = queue_study(args.params_file, args.runs, args.prefix, args.jobs, run_queue=not args.no_run)
    except ProjectError as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    print("queued" if args.no_run else "ran", ", ".join(names))


if __name__ == "__main__":
    main()
