"""One tune run (an entry of `tune.runs` or `tune.importance_runs`) around its training: the layers it selects on the
loaded model, its trainability, what MLflow records about it (params, metrics, the selection) and the selection and
metrics written beside the tuned model (stage `tune`)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager

from pipeline import tracking
from pipeline.config import ParamsError
from pipeline.selection import select_layers
from pipeline.tuning import Trainability


def resolve_layers(tune, name: str, num_layers: int, scores: list[float] | None = None) -> list[int]:
    """The decoder layers run `name` of the tune params `tune` selects on a model of `num_layers` layers (`scores`:
    the per-layer scores an importance run selects from)."""
    spec = tune.run(name)
    try:
        return select_layers(num_layers, spec.strategy, spec.budget, seed=spec.seed, scores=scores)
    except ValueError as err:  # e.g. an explicit layer index past this model's depth (only known once it is loaded)
        group = "importance_runs" if name in tune.importance_runs else "runs"
        raise ParamsError(f"tune.{group}.{name}: {err}") from None


def trainability(tune, spec, layers: list[int]) -> Trainability:
    """What run `spec` (an entry of the tune params `tune`) trains, with its selected `layers`."""
    return Trainability(projector=spec.projector, language_model=spec.language_model, layers=tuple(layers),
                        embeddings=tune.embeddings, lm_head=tune.lm_head, lora=tune.lora)


def run_params(params, name: str, layers: list[int], key: dict, *, processes: int) -> dict:
    """The run's MLflow params (also its checkpoints' fingerprint), named by their params.yaml keys (the run's own
    entry `tune.runs.<name>` as `tune.run.*`, one column for every run): its selection and the exact layers it
    tuned, the tune settings, and the code and data it ran on (`key`: tracking.pipeline_key). A budget is logged only
    for the strategies that read one. `processes`: of a multi-process launch (batch_size is per process)."""
    spec, cfg = params.tune.run(name), params.tune
    strategy = spec.strategy if isinstance(spec.strategy, str) else "explicit"
    selection = {"tune.run.strategy": strategy, "tune.run.language_model": spec.language_model,
                 "tune.run.projector": spec.projector}
    if strategy not in ("all", "explicit"):  # every other strategy takes its layer count from the budget
        selection["tune.run.budget"] = spec.budget
    if strategy == "random":
        selection["tune.run.seed"] = spec.seed
    if spec.train_seed is not None:  # a seed replica: the seed it trained with (else the top-level `seed`)
        selection["tune.run.train_seed"] = spec.train_seed
    if strategy == "importance":
        selection |= {"tune.run.importance_metric": spec.importance_metric, "tune.run.importance_from": spec.importance_from}
    return {
        "run": name, "layers": ",".join(map(str, layers)), "num_tuned_layers": len(layers), **selection,
        "tune.projector_lr": cfg.projector_lr, "tune.lm_lr": cfg.lm_lr, "seed": params.seed,
        "tune.train.max_steps": cfg.train.max_steps, "tune.train.batch_size": cfg.train.batch_size,
        **({"tune.lora": json.dumps(cfg.lora.__dict__)} if spec.language_model == "lora" else {}),
        "git_commit": key["git_commit"], "data_hash": key["data_hash"], "processes": processes,
    }


@contextmanager
def mlflow_run(mlflow, key: dict, name: str, logged: dict) -> Iterator:
    """The run's MLflow run, nested in the pipeline's parent run for `key`, with its params `logged`; an earlier
    attempt of the same run still RUNNING (its process died) is ended as KILLED first. A failure inside ends the run
    FAILED, tagged `vr_error` with the one-line reason (tracking.failure_recorded)."""
    parent = tracking.parent_run_id(mlflow, key)
    with mlflow.start_run(run_id=parent):
        tracking.end_stale_runs(mlflow, parent, kind="tune", run=name)
        with mlflow.start_run(run_name=name, nested=True, tags=tracking.run_tags("tune", name)) as active:
            with tracking.failure_recorded(mlflow):
                mlflow.log_params(tracking.scrub(logged))
                yield active


def metrics(result, report: dict, *, mlflow_run_id: str, git_commit: str) -> dict:
    """The run's metrics: the training result, the trainability report, and the run's identity (its MLflow run, the
    commit it ran at). The stage writes the results to metrics/tune/<run>.json and the timings and identity to its run
    record (stages/_records.py), never into the DVC-cached model: a model's bytes, and so its hash in dvc.lock, must
    depend only on what trained it, or no two runs could share it through a remote (issue 21)."""
    return {
        "mlflow_run_id": mlflow_run_id, "git_commit": git_commit,
        "steps": result.steps, "train_seconds": result.train_seconds, "final_loss": result.final_loss,
        "peak_memory_bytes": result.peak_memory_bytes, "trainable_parameters": report["trainable"],
        "trainable_fraction": report["trainable_fraction"], "optimizer_state_bytes": report["optimizer_state_bytes"],
        "truncated_samples": report["truncated_samples"],
    }


RUN_IDENTITY = ("git_commit",)  # in the MLflow params, not in the model: it changes with every commit


def selection(name: str, layers: list[int], num_decoder_layers: int, logged: dict) -> dict:
    """selection.json, saved beside the tuned model: its layers and the params that made it (not the run's identity,
    which is in the run record, runs/tune/<run>.json)."""
    return {"run": name, "layers": layers, "num_decoder_layers": num_decoder_layers,
            **{k: v for k, v in logged.items() if k not in ("layers", *RUN_IDENTITY)}}


def log_result(mlflow, result, run_metrics: dict, report: dict, run_selection: dict) -> None:
    """The loss curve, the metrics (those known: truncated_samples is None with lazy samples), the trainability report
    and the selection, into the active MLflow run."""
    for h in result.loss_history:
        mlflow.log_metric("train_loss", h["loss"], step=h["step"])
    mlflow.log_metrics({k: v for k, v in run_metrics.items() if isinstance(v, (int, float))})
    mlflow.log_dict(report, "trainability.json")
    mlflow.log_dict(run_selection, "selection.json")
