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
