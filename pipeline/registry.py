"""The MLflow model registry: checkpoints become model versions; promotion is by alias (registry stages are deprecated).

- `register_checkpoint`: log a saved HF checkpoint directory as a pyfunc model (its artifact *is* the directory,
  copied as files: the model is not loaded to log it), register it as a new version and point `challenger` at it.
- `gate` / `promote`: `champion` moves to a version only when its visual and text retention (score / the `all` run's
  tuned score) each reach their threshold, and so does its retention on each benchmark score the gate names
  (`registry.min_benchmark_retention`); a refused version leaves the current champion where it is.
- `load`: `models:/<name>@champion` in any process; predict takes rows of (image bytes, question) and answers text.

The model's code travels with it (`code_paths`: this package), so loading needs only the packages, not this repo.
"""

from __future__ import annotations

import io
import logging
import math
import os
import time
import urllib.error
import urllib.request
import warnings
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as package_version
from pathlib import Path

import mlflow
import mlflow.pyfunc
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.models import ModelSignature
from mlflow.types.schema import ColSpec, ParamSchema, ParamSpec, Schema

from pipeline import benchmark_scores
from pipeline.errors import ProjectError

log = logging.getLogger(__name__)
CHALLENGER, CHAMPION = "challenger", "champion"
FINGERPRINT_TAG = "checkpoint_fingerprint"
PACKAGE_DIR = Path(__file__).resolve().parent
SIGNATURE = ModelSignature(
    inputs=Schema([ColSpec("binary", "image"), ColSpec("string", "question")]),
    outputs=Schema([ColSpec("string")]),
    params=ParamSchema([ParamSpec("max_new_tokens", "long", 16)]),
)
REQUIREMENTS = ("mlflow", "torch", "transformers", "tokenizers", "safetensors", "pillow", "numpy", "pandas", "datasets",
                "scikit-learn", "pydantic", "pyyaml")


class RegistryError(ProjectError, ValueError):
    """The registry cannot be used as asked; the message names the endpoint, model or version."""


# ---------------------------------------------------------------------------------------------------- the model
class VisionLanguageModel(mlflow.pyfunc.PythonModel):
    """A pyfunc over a HF LLaVA checkpoint: rows of `image` (encoded bytes: PNG, JPEG, ...) and `question` -> answers."""

    def __init__(self, dtype: str = "float32") -> None:
        self.dtype = dtype

    def load_context(self, context) -> None:
        import torch

        from pipeline.model import load_vlm

        self.model, self.processor = load_vlm(context.artifacts["checkpoint"], dtype=getattr(torch, self.dtype))
        self.model.to("cuda" if torch.cuda.is_available() else "cpu").eval()

    def predict(self, context, model_input: pd.DataFrame, params: dict | None = None) -> list[str]:
        import torch
        from PIL import Image

        from pipeline.data.chat import IMAGE_TOKEN, processor_inputs
        from pipeline.evaluation import _generate

        rows = model_input.to_dict("records")
        if not rows:
            return []
        records = []
        for r in rows:
            question = str(r["question"])
            records.append({"image": Image.open(io.BytesIO(r["image"])),
                            "conversations": [{"from": "human", "value": question if IMAGE_TOKEN in question
                                               else f"{IMAGE_TOKEN}\n{question}"}]})
        tokenizer = self.processor.tokenizer
        inputs = processor_inputs(self.processor, records, with_answers=False, padding_side="left")
        inputs = {k: v.to(self.model.device) for k, v in inputs.items()}
        with torch.no_grad():
            answers, _ = _generate(self.model, inputs, int((params or {}).get("max_new_tokens", 16)), tokenizer)
        return [a.strip() for a in answers]


# ---------------------------------------------------------------------------------------------------- the gate
@dataclass(frozen=True)
class GateDecision:
    passed: bool
    visual_retention: float | None
    text_retention: float | None
    reasons: tuple[str, ...] = field(default=())  # why it was refused; empty when it passed
    benchmark_retention: dict[str, float | None] = field(default_factory=dict)  # gate key -> retention; {}: none gated

    def summary(self) -> str:
        return "passed" if self.passed else "refused: " + "; ".join(self.reasons)


def _defined(x: float | None) -> bool:
    return x is not None and not math.isnan(x)


def gate(visual_retention: float | None, text_retention: float | None, *, min_visual: float, min_text: float,
         benchmarks: dict[str, float | None] | None = None,
         min_benchmarks: dict[str, float] | None = None) -> GateDecision:
    """`champion` needs visual retention >= min_visual and text retention >= min_text, and, for each key of
    `min_benchmarks` (registry.min_benchmark_retention: gate key -> floor), the retention `benchmarks` gives for it
    (benchmark_retention's answer) >= its floor. An undefined retention (the baseline scored 0) cannot show that
    anything was kept, so it refuses; so does a gated benchmark without a retention (its score is not in the
    metrics)."""
    reasons = []
    for what, value, floor in (("visual", visual_retention, min_visual), ("text", text_retention, min_text)):
        if not _defined(value):
            reasons.append(f"{what} retention is undefined (the `all` baseline scores 0)")
        elif value < floor:
            reasons.append(f"{what} retention {value:.3f} < {floor:.3f}")
    benchmarks = benchmarks or {}
    recorded = {}
    for key, floor in (min_benchmarks or {}).items():
        if key not in benchmarks:
            reasons.append(f"benchmark {key}: no score in this model's or the `all` run's eval metrics")
            continue
        value = benchmarks[key]
        recorded[key] = value if _defined(value) else None
        if not _defined(value):
            reasons.append(f"benchmark {key} retention is undefined "
                           f"(the `all` baseline scores 0, or a score is no number)")
        elif value < floor:
            reasons.append(f"benchmark {key} retention {value:.3f} < {floor:.3f}")
    clean = [v if _defined(v) else None for v in (visual_retention, text_retention)]
    return GateDecision(passed=not reasons, visual_retention=clean[0], text_retention=clean[1], reasons=tuple(reasons),
                        benchmark_retention=recorded)


def _gated_score(benchmarks: dict | None, key: str) -> tuple[bool, float | None]:
    """(found, value) of the score gate key `key` names in one model's `benchmarks` metrics; RegistryError naming the
    key when it names several (a task with several scores: the key must say which)."""
    found = benchmark_scores.scores(benchmarks)
    names = benchmark_scores.matching(found, key)
    if len(names) > 1:
        raise RegistryError(f"registry.min_benchmark_retention.{key}: names {len(names)} scores ({', '.join(names)}); "
                            f"name one of them")
    return (True, found[names[0]]) if names else (False, None)


def benchmark_retention(benchmarks: dict | None, baseline: dict | None, keys) -> dict[str, float | None]:
    """Gate key -> the model's retention on the score it names: the model's `benchmarks` metrics against the
    baseline's (the `all` run's tuned ones), as pipeline.evaluation.retention (NaN when the baseline scores 0). A key
    whose score is missing from either is left out (the gate refuses it); a score that is not a number gives None."""
    from pipeline.evaluation import retention  # that module imports torch: not at the top of this one

    out = {}
    for key in keys:
        (has_score, score), (has_base, base) = _gated_score(benchmarks, key), _gated_score(baseline, key)
        if has_score and has_base:
            out[key] = None if score is None or base is None else retention(score, base)
    return out


def check_benchmark_keys(keys, metrics: list[dict | None]) -> None:
    """RegistryError (one line, naming the key) for a gate key that names no score in any of `metrics` (the
    `benchmarks` entries of every model the gate reads: a misspelt name, or a benchmark no run evaluated) or that
    names several scores in one of them; call it before registering anything."""
    for key in keys:
        found = [_gated_score(benchmarks, key)[0] for benchmarks in metrics]  # each model: several names fail here
        if not any(found):
            known = benchmark_scores.ordered(name for benchmarks in metrics
                                             for name in benchmark_scores.scores(benchmarks))
            raise RegistryError(f"registry.min_benchmark_retention.{key}: no run's eval metrics have this benchmark "
                                f"score (they have: {', '.join(known) or 'none'})")


# ---------------------------------------------------------------------------------------------------- registry
def ensure_reachable(tracking_uri: str | None, *, attempts: int = 3, backoff_s: float = 1.0) -> None:
    """Fail fast, naming the server, when an HTTP tracking server is down (MLflow's own client would retry for
    minutes); bounded retries (1 s, 2 s) cover a restart. Local stores (sqlite, files) need no check."""
    if not tracking_uri or not tracking_uri.startswith(("http://", "https://")):
        return
    url = tracking_uri.rstrip("/") + "/health"
    last: Exception | None = None
    for attempt in range(attempts):
        try:
            with urllib.request.urlopen(url, timeout=5) as resp:  # noqa: S310 (the configured tracking server)
                if resp.status == 200:
                    return
                last = RuntimeError(f"HTTP {resp.status}")
        except (OSError, urllib.error.URLError) as err:
            last = err
        if attempt + 1 < attempts:
            time.sleep(backoff_s * 2**attempt)
    raise RegistryError(f"MLflow tracking server {tracking_uri} is unreachable after {attempts} attempts: "
                        f"{getattr(last, 'reason', last)}")


def model_name(base: str, run: str, kind: str) -> str:
    """One registered model per (run, kind): its versions are that run's checkpoints over time."""
    return f"{base}-{run}" if kind == "pruned" else f"{base}-{run}-{kind}"


def _requirements() -> list[str]:
    pins = []
    for pkg in REQUIREMENTS:
        try:
            pins.append(f"{pkg}=={package_version(pkg).split('+')[0]}")
        except PackageNotFoundError:
            pins.append(pkg)
    return pins


def register_checkpoint(checkpoint: str | os.PathLike, name: str, *, run_id: str | None = None, dtype: str = "float32",
                        tags: dict[str, str] | None = None, fingerprint: str | None = None) -> str:
    """Log `checkpoint` (a saved HF checkpoint directory) as a pyfunc model in run `run_id` (or a new run of the
    current experiment), register it as a new version of `name`, alias it `challenger`, and return the version.

    Requirements are given, not inferred (inference would load the model) and no input example is logged (that
    would run it): logging copies files and nothing more. With a `fingerprint` (a content hash of the checkpoint),
    a checkpoint that already is the newest version is not uploaded again: that version is returned."""
    ckpt = Path(checkpoint)
    if not any(ckpt.glob("*.safetensors")):
        raise RegistryError(f"checkpoint {ckpt} has no *.safetensors weights: nothing to register")
    client = mlflow.MlflowClient()
    if fingerprint is not None:
        latest = max(client.search_model_versions(f"name='{name}'"), key=lambda v: int(v.version), default=None)
        if latest is not None and latest.tags.get(FINGERPRINT_TAG) == fingerprint:
            log.info("%s: version %s already holds %s; not registering it again", name, latest.version, ckpt)
            client.set_registered_model_alias(name, CHALLENGER, latest.version)
            return str(latest.version)
    if run_id is not None:
        try:
            client.get_run(run_id)
        except MlflowException:
            log.warning("MLflow run %s is not in %s: logging %s under a new run", run_id, mlflow.get_tracking_uri(), name)
            run_id = None
    with mlflow.start_run(run_id=run_id, run_name=None if run_id else f"register-{name}"), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*An input example was not provided")  # on purpose: see above
        info = mlflow.pyfunc.log_model(
            name=name, python_model=VisionLanguageModel(dtype), artifacts={"checkpoint": str(ckpt)},
            code_paths=[str(PACKAGE_DIR)], signature=SIGNATURE, pip_requirements=_requirements(),
            registered_model_name=name,
        )
    version = str(info.registered_model_version)
    all_tags = {**(tags or {}), **({FINGERPRINT_TAG: fingerprint} if fingerprint else {})}
    for key, value in all_tags.items():
        client.set_model_version_tag(name, version, key, str(value))
    client.set_registered_model_alias(name, CHALLENGER, version)
    return version


def promote(name: str, version: str, decision: GateDecision) -> bool:
    """Point `champion` at `version` if the gate passed; record the decision on the version either way."""
    client = mlflow.MlflowClient()
    client.set_model_version_tag(name, version, "gate", decision.summary())
    if decision.passed:
        client.set_registered_model_alias(name, CHAMPION, version)
    return decision.passed


def alias_version(name: str, alias: str) -> str | None:
    try:
        return str(mlflow.MlflowClient().get_model_version_by_alias(name, alias).version)
    except MlflowException:
        return None


def load(name: str, alias: str = CHAMPION):
    """The pyfunc model `models:/<name>@<alias>`; a clear error when the alias is not set."""
    if alias_version(name, alias) is None:
        raise RegistryError(f"registered model {name!r} has no version with alias {alias!r} at {mlflow.get_tracking_uri()}")
    return mlflow.pyfunc.load_model(f"models:/{name}@{alias}")
