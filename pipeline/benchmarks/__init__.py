"""Published-benchmark evaluation (MMBench, MME, SEED-style multiple choice, GQA, TextVQA, POPE, ScienceQA-IMG; MMMU,
MMLU, BBH, C-Eval, CMMLU through lm-eval's own tasks) of exported checkpoints with lm-evaluation-harness;
docs/benchmarks.md says where each benchmark's files come from and go.

* catalog: the benchmarks, their kind and the files each reads (no torch, no lm-eval: checked before loading);
* loaders: the published file formats read into records;
* scoring: the published scoring rules, pure Python;
* tasks/: the lm-eval task definitions (YAML + utils.py);
* runner: run_benchmarks (lm_eval.simple_evaluate on a checkpoint), runnable_tasks, MLflow names.

Importing this package imports neither torch nor lm-eval."""

from pipeline.benchmarks.catalog import BenchmarkFilesError
from pipeline.benchmarks.runner import log_to_mlflow, mlflow_metrics, run_benchmarks, runnable_tasks

__all__ = ["BenchmarkFilesError", "log_to_mlflow", "mlflow_metrics", "run_benchmarks", "runnable_tasks"]
