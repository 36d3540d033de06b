"""A stage's run record: what one run measured that another run of the same code, data and params would not repeat
(wall-clock seconds, peak memory, generation speed, its MLflow run and the commit it ran at). It is kept out of the
git- and DVC-tracked outputs, so that re-running a stage that changes no result changes no tracked file: not its
metrics, not dvc.lock (issue 22). MLflow keeps it too (the tune and evaluate runs log every field).

runs/<stage>.json, or runs/<stage>/<run>.json for a per-run stage: git-ignored and not a DVC output, so no stage's
results may read it. Its one use among the stages links MLflow runs (evaluate and register find the tune run to log
into); without a record, or with one whose outputs DVC has since replaced, they log under a run of their own."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from stages import _paths as paths

# The metric keys that vary between identical runs; every other key of a stage's metrics is a result.
VOLATILE = frozenset({
    "train_seconds", "peak_memory_bytes",  # training (pipeline.training.TrainResult)
    "vision_pretrain_seconds", "lm_pretrain_seconds",  # build_base (pipeline.pretraining)
    "generation_ms_per_sample", "generation_tokens_per_s",  # evaluation (pipeline.evaluation)
    "mlflow_run_id", "git_commit",  # the run's identity
})


def split(metrics: dict) -> tuple[dict, dict]:
    """(`metrics` without the VOLATILE keys, the VOLATILE keys alone), both at any depth of nested objects (an
    evaluation's `tuned` and `pruned`); an object left with no volatile key is not in the second."""
    results, record = {}, {}
    for key, value in metrics.items():
        if key in VOLATILE:
            record[key] = value
        elif isinstance(value, dict):
            results[key], inner = split(value)
            if inner:
                record[key] = inner
        else:
            results[key] = value
    return results, record


def write(record: dict, stage: str, run: str | None = None, *, describes: tuple[Path, ...] = ()) -> None:
    """runs/<stage>[/<run>].json, atomically, with the sha256 of each output it `describes` (written just before)."""
    from pipeline.storage import atomic_write_json

    atomic_write_json(paths.run_record(stage, run), record | {"describes": {str(p): _sha256(p) for p in describes}})


def read(stage: str, run: str | None = None) -> dict:
    """The stage's last run record, {} when there is none (a fresh clone), it is unreadable, or an output it
    describes has changed since (DVC restored another run's outputs): a record is a convenience, never a result."""
    try:
        record = json.loads(paths.run_record(stage, run).read_text(encoding="utf-8"))
        described = record.get("describes", {}) if isinstance(record, dict) else None
        if not isinstance(described, dict) or any(_sha256(Path(p)) != digest for p, digest in described.items()):
            return {}
    except (OSError, ValueError):
        return {}
    return record


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()
