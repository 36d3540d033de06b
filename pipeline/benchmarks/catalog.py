"""Which benchmarks there are, what kind each is, and which files under the benchmarks data_dir each reads
(docs/benchmarks.md says where to get them). Torch- and lm-eval-free, so the files are checked before any model or
library is loaded.

A configured task name is one of:

* a shipped task (SHIPPED: YAML + utils.py under pipeline/benchmarks/tasks, reading the local files below), or a
  shipped group (GROUPS: `pope` = its three splits); all visual but mmlu_csv (MMLU from its original CSV release);
* any task or group of lm-eval's own (e.g. mmlu, bbh, ceval-valid, cmmlu, mmmu_val), read from the Hugging Face
  datasets cache (HF_DATASETS_OFFLINE=1: nothing is downloaded); its files are not checked here. It is visual when
  named in LM_EVAL_VISUAL (run with hf-multimodal), text otherwise (run with hf)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from pipeline.errors import MissingInputError


class BenchmarkFilesError(MissingInputError):
    """A configured benchmark's files are not under the benchmarks data_dir; the message names the task and path."""


@dataclass(frozen=True)
class Benchmark:
    name: str  # the lm-eval task name (pipeline/benchmarks/tasks/<folder>/<name>.yaml)
    files: tuple[str, ...]  # paths under data_dir that must exist (files or folders)
    metrics: tuple[str, ...]  # the metrics its task reports
    kind: str = "visual"  # visual (hf-multimodal) or text (hf)


POPE_METRICS = ("accuracy", "precision", "recall", "f1", "yes_ratio")
SHIPPED: dict[str, Benchmark] = {b.name: b for b in (
    Benchmark("pope_random", ("pope/coco_pope_random.json", "pope/val2014"), POPE_METRICS),
    Benchmark("pope_popular", ("pope/coco_pope_popular.json", "pope/val2014"), POPE_METRICS),
    Benchmark("pope_adversarial", ("pope/coco_pope_adversarial.json", "pope/val2014"), POPE_METRICS),
    Benchmark("gqa", ("gqa/testdev_balanced_questions.json", "gqa/images"), ("exact_match",)),
    Benchmark("textvqa_val", ("textvqa/TextVQA_0.5.1_val.json", "textvqa/train_images"), ("vqa_accuracy",)),
    Benchmark("scienceqa_img", ("scienceqa/problems.json", "scienceqa/images/test"), ("accuracy",)),
    Benchmark("mmbench_dev_en", ("mmbench/mmbench_dev_20230712.tsv",), ("accuracy",)),
    Benchmark("mmbench_dev_en_circular", ("mmbench/mmbench_dev_20230712.tsv",), ("accuracy", "circular_accuracy")),
    Benchmark("mme", ("mme",), ("perception", "cognition")),
    Benchmark("seedbench_img", ("seedbench/SEED-Bench.json", "seedbench/SEED-Bench-image"), ("accuracy",)),
    Benchmark("mmlu_csv", ("mmlu/test", "mmlu/dev"), ("acc",), kind="text"),
    # the tiny world's own probes, exported from the prepared data (pipeline/benchmarks/tiny_probes.py); in no
    # params' task list: evaluate scores them natively, tests/unit/test_probe_equivalence.py shows both agree
    Benchmark("tiny_probes", ("tiny_probes/probes.jsonl", "tiny_probes/images"),
              ("colour", "count", "position", "shape", "yesno", "digit", "visual_score", "vqa_accuracy",
               "digits_accuracy")),
)}
GROUPS: dict[str, tuple[str, ...]] = {"pope": ("pope_random", "pope_popular", "pope_adversarial")}

# lm-eval's own multimodal tasks (the rest of its tasks are text).
LM_EVAL_VISUAL = ("mmmu_val", "chartqa")

TASKS_DIR = Path(__file__).resolve().parent / "tasks"


def expand(tasks: list[str]) -> list[str]:
    """The configured names with the shipped groups replaced by their tasks, in order, without repeats."""
    out: list[str] = []
    for name in tasks:
        for task in GROUPS.get(name, (name,)):
            if task not in out:
                out.append(task)
    return out


def is_shipped(task: str) -> bool:
    return task in SHIPPED


def kind(task: str) -> str:
    """'visual' (hf-multimodal) or 'text' (hf)."""
    if task in SHIPPED:
        return SHIPPED[task].kind
    return "visual" if task.startswith(LM_EVAL_VISUAL) else "text"


def expected_files_line(task: str, data_dir: str | Path) -> str:
    return "expects " + ", ".join(str(Path(data_dir) / f) for f in SHIPPED[task].files)


def missing_files(tasks: list[str], data_dir: str | Path) -> dict[str, Path]:
    """For each shipped task (groups expanded) whose files are not all there: the first missing path."""
    missing = {}
    for task in expand(tasks):
        if task not in SHIPPED:
            continue
        for relative in SHIPPED[task].files:
            path = Path(data_dir) / relative
            if not path.exists():
                missing[task] = path
                break
    return missing


def check_files(tasks: list[str], data_dir: str | Path) -> None:
    """BenchmarkFilesError (one line: the task, the path it expects, where to read how to get it) for the first
    configured shipped task whose files are missing."""
    missing = missing_files(tasks, data_dir)
    if missing:
        task, path = next(iter(missing.items()))
        raise BenchmarkFilesError(f"benchmark {task}: {path} is missing (evaluate.benchmarks.data_dir; "
                                  f"docs/benchmarks.md says where to get it)")


# ------------------------------------------------------------------------------------------------------ averages
# Each benchmark's headline score, in [0, 1], for the visual and text averages (the paper's "average over the
# benchmarks"): the metric a paper's table quotes for it. MME's perception + cognition sum is divided by its maximum,
# 2800 (14 categories of at most 200). A group (POPE's three splits) counts once, as the mean of its tasks.
HEADLINE = {"pope_random": "f1", "pope_popular": "f1", "pope_adversarial": "f1", "gqa": "exact_match",
            "textvqa_val": "vqa_accuracy", "scienceqa_img": "accuracy", "mmbench_dev_en": "accuracy",
            "mmbench_dev_en_circular": "circular_accuracy", "seedbench_img": "accuracy", "mmlu_csv": "acc",
            "tiny_probes": "visual_score"}
MME_MAX = 2800.0
AVERAGE_METRIC = "mean"  # the averages' entry: {"visual_average": {"mean": ...}}


def headline(task: str, metrics: dict[str, float | None]) -> float | None:
    """The task's headline score (HEADLINE; MME normalised; for lm-eval's own tasks `acc`, else `exact_match`), None
    when its metrics lack it."""
    if task == "mme":
        parts = [metrics.get("perception"), metrics.get("cognition")]
        return None if None in parts else sum(parts) / MME_MAX
    for metric in (HEADLINE.get(task), "acc", "exact_match"):
        if metric is not None and metrics.get(metric) is not None:
            return metrics[metric]
    return None


def averages(scores: dict[str, dict[str, float | None]], configured: list[str]) -> dict[str, dict[str, float]]:
    """{"visual_average": {"mean": ...}, "text_average": {...}} over the configured benchmarks (names as in params,
    groups unexpanded; lm-eval's subtasks not counted twice) that have a headline score; a kind without any is left
    out. An average over a subset of tasks is not comparable with one over another subset: every run of a pipeline is
    scored on the same configured tasks."""
    per_kind: dict[str, list[float]] = {"visual": [], "text": []}
    for name in dict.fromkeys(configured):
        members = GROUPS.get(name, (name,))
        values = [headline(task, scores[task]) for task in members if task in scores]
        values = [v for v in values if v is not None]
        if values:
            per_kind[kind(members[0])].append(sum(values) / len(values))
    return {f"{k}_average": {AVERAGE_METRIC: sum(v) / len(v)} for k, v in per_kind.items() if v}
