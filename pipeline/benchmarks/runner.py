"""Running the configured benchmarks on one exported checkpoint through lm-evaluation-harness.

Visual tasks run with lm-eval's `hf-multimodal` model (HFMultimodalLM), prompted in the checkpoint's own chat
template (the tokenizer's, pipeline/data/chat.py) and decoded greedily; text tasks with lm-eval's `hf` model
(HFLM) on the same loaded checkpoint, text only (a LLaVA's forward without pixels is its language model's). The
shipped task definitions (pipeline/benchmarks/tasks) read the local files under the benchmarks data_dir; lm-eval's
own tasks read the Hugging Face datasets cache, offline.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from pathlib import Path
from typing import Any

from pipeline.benchmarks import catalog

log = logging.getLogger(__name__)


def _multimodal_class():
    """HFMultimodalLM, prompted in the model's own chat template: the tokenizer's template renders the user turn
    (string content with `<image>`, as in training) instead of the processor's list-of-parts template, which our
    checkpoints do not carry. The render starts with BOS where the template puts one; the processor adds its own,
    so the rendered one is dropped when the tokenizer adds BOS itself."""
    from lm_eval.models.hf_vlms import HFMultimodalLM

    class ChatTemplateMultimodalLM(HFMultimodalLM):
        def apply_chat_template(self, chat_history, add_generation_prompt: bool = True) -> str:
            self.chat_applied = True
            text = self.tokenizer.apply_chat_template(chat_history, tokenize=False,
                                                      add_generation_prompt=add_generation_prompt)
            bos = self.tokenizer.bos_token
            if not hasattr(self, "_tokenizer_adds_bos"):
                self._tokenizer_adds_bos = bos is not None and self.tokenizer("x")["input_ids"][:1] == [self.tokenizer.bos_token_id]
            return text[len(bos):] if self._tokenizer_adds_bos and text.startswith(bos) else text

    return ChatTemplateMultimodalLM


def _datasets_offline() -> None:
    """lm-eval's own tasks read the local datasets cache only: HF_DATASETS_OFFLINE for any process started from here,
    and datasets' flag itself, which it reads from the environment once, at import (the stage has imported it)."""
    import datasets

    os.environ["HF_DATASETS_OFFLINE"] = "1"
    datasets.config.HF_HUB_OFFLINE = datasets.config.HF_DATASETS_OFFLINE = True


def _flat_scores(results: dict) -> dict[str, dict[str, float]]:
    """{task: {metric: value}} from lm-eval's results, without stderr: the unfiltered ('none') metrics, or, for a task
    that reports only filtered ones (BBH's chain-of-thought tasks: 'get-answer'), those of its first filter; a group
    entry without metrics of its own is left out."""
    scores: dict[str, dict[str, float]] = {}
    for task, entries in results.get("results", {}).items():
        by_filter: dict[str, dict[str, float | None]] = {}
        for key, value in entries.items():
            metric, _, filter_name = key.partition(",")
            if not filter_name or metric.endswith("_stderr") or not isinstance(value, (int, float)):
                continue
            by_filter.setdefault(filter_name, {})[metric] = \
                None if isinstance(value, float) and not math.isfinite(value) else float(value)
        metrics = by_filter.get("none") or next(iter(by_filter.values()), None)
        if metrics:
            scores[task] = metrics
    return scores


def _jsonable(value: Any) -> Any:
    """lm-eval's results as strict JSON: objects it keeps (images, functions, dtypes) as their type name, base64
    images dropped (the samples would hold every MMBench image), NaN as null."""
    def describe(obj):
        return f"<{type(obj).__name__}>"

    def clean(obj):
        if isinstance(obj, dict):
            return {str(k): clean(v) for k, v in obj.items() if k != "image_base64"}
        if isinstance(obj, (list, tuple)):
            return [clean(v) for v in obj]
        if isinstance(obj, float) and not math.isfinite(obj):
            return None
        return obj

    return clean(json.loads(json.dumps(clean(value), default=describe)))


def _evaluate(lm, tasks: list[str], params, data_dir: Path, *, chat_template: bool) -> tuple[dict, float]:
    import lm_eval
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=str(catalog.TASKS_DIR), include_defaults=not all(map(catalog.is_shipped, tasks)),
                          metadata={"benchmark_data_dir": str(data_dir)})
    start = time.perf_counter()
    results = lm_eval.simple_evaluate(
        model=lm, tasks=tasks, task_manager=manager, limit=params.limit, num_fewshot=params.num_fewshot,
        batch_size=params.batch_size, apply_chat_template=chat_template, fewshot_as_multiturn=False,
        log_samples=True, bootstrap_iters=0, random_seed=0, numpy_random_seed=0, torch_random_seed=0,
        fewshot_random_seed=0,
    )
    return results, time.perf_counter() - start


def run_benchmarks(model_dir: str | Path, params, data_dir: str | Path | None = None, *, tasks: list[str] | None = None,
                   loaded: tuple | None = None, dtype=None, device: str | None = None) -> dict[str, Any]:
    """Evaluate the checkpoint at `model_dir` on `params.tasks` (a config.BenchmarksParams; groups and lm-eval task
    names allowed), or on `tasks` (runnable_tasks' answer, already checked). `loaded`: the checkpoint's (model,
    processor) when the caller has them, else they are loaded (`dtype`, default float32). Returns {"scores": {task:
    {metric: value}} plus `visual_average` / `text_average` ({"mean": ...}, catalog.averages), "results": lm-eval's
    results JSON per kind (visual, text) without samples, "samples": {task: [lm-eval's per-question records]},
    "throughput": {kind: {samples, seconds, samples_per_second}}}, all strict JSON. Tasks whose files are missing
    raise BenchmarkFilesError (on_missing fail) or are left out with a warning (skip), before the model is loaded."""
    import torch
    from lm_eval.models.huggingface import HFLM

    from pipeline import model as model_lib

    data_dir = Path(data_dir if data_dir is not None else params.data_dir)
    tasks = runnable_tasks(params, data_dir) if tasks is None else tasks
    out: dict[str, Any] = {"scores": {}, "results": {}, "samples": {}, "throughput": {}}
    if not tasks:
        return out
    _datasets_offline()
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    vlm, processor = loaded or model_lib.load_vlm(model_dir, dtype=dtype or torch.float32)
    vlm.to(device).eval()
    max_length = model_lib.text_config(vlm).max_position_embeddings
    by_kind = {kind: [t for t in tasks if catalog.kind(t) == kind] for kind in ("visual", "text")}
    for kind, kind_tasks in by_kind.items():
        if not kind_tasks:
            continue
        if kind == "visual":
            lm = _multimodal_class()(pretrained=vlm, batch_size=params.batch_size, max_length=max_length)
        else:
            lm = HFLM(pretrained=vlm, tokenizer=processor.tokenizer, backend="causal", batch_size=params.batch_size,
                      max_length=max_length)
        results, seconds = _evaluate(lm, kind_tasks, params, data_dir, chat_template=kind == "visual")
        samples = _jsonable(results.pop("samples", {}))
        out["samples"] |= samples
        out["results"][kind] = _jsonable(results)
        out["scores"] |= _flat_scores(results)
        count = sum(len(v) for v in samples.values())
        out["throughput"][kind] = {"samples": count, "seconds": seconds,
                                   "samples_per_second": count / seconds if seconds > 0 else None}
        log.info("benchmarks (%s): %d questions in %.1f s", kind, count, seconds)
    configured = [name for name in params.tasks if any(t in tasks for t in catalog.GROUPS.get(name, (name,)))]
    out["scores"] |= catalog.averages(out["scores"], configured)  # what the report and the registry gate read
    return out


def runnable_tasks(params, data_dir: str | Path | None = None) -> list[str]:
    """The configured tasks, groups expanded, that can run: every one (on_missing fail: BenchmarkFilesError for the
    first whose files are missing), or those whose files are there (skip: a warning for each left out). The shipped
    tasks' question files are read too, so a file outside its published format (BenchmarkDataError, naming the file
    and record) or without questions also fails here. No model and no lm-eval is loaded: call it before loading
    anything."""
    from pipeline.benchmarks import loaders

    data_dir = Path(data_dir if data_dir is not None else params.data_dir)
    tasks = catalog.expand(list(params.tasks))
    if params.on_missing == "fail":
        catalog.check_files(tasks, data_dir)
    else:
        missing = catalog.missing_files(tasks, data_dir)
        for task, path in missing.items():
            log.warning("benchmark %s skipped: %s is missing (evaluate.benchmarks.on_missing: skip)", task, path)
        tasks = [t for t in tasks if t not in missing]
    for task in filter(catalog.is_shipped, tasks):
        loaders.read(task, data_dir)
    return tasks


def mlflow_metrics(kind: str, scores: dict[str, dict[str, float]]) -> dict[str, float]:
    """MLflow metric names for one model's scores: `<kind>_bench_<task>_<metric>` (e.g. tuned_bench_pope_random_f1),
    non-finite values left out."""
    return {f"{kind}_bench_{task}_{metric}".replace("-", "_"): value for task, metrics in scores.items()
            for metric, value in metrics.items() if value is not None}


def log_to_mlflow(mlflow, kind: str, run: dict[str, Any]) -> None:
    """One model's benchmark run on the active MLflow run: its scores as metrics (mlflow_metrics), lm-eval's results
    and samples as JSON artifacts under benchmarks/."""
    mlflow.log_metrics(mlflow_metrics(kind, run["scores"]))
    for part in ("results", "samples", "throughput"):
        mlflow.log_dict(run[part], f"benchmarks/{kind}_{part}.json")
