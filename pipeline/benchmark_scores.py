"""The published-benchmark scores of one evaluated model by name, for the report's benchmark table and the registry
gate (registry.min_benchmark_retention).

A model's eval metrics (metrics/eval/<run>.json, "tuned" / "pruned") carry them under `benchmarks` as
{task: {metric: value}} (stage evaluate, pipeline/benchmarks/runner.py); an entry may also be a single number (a
score without metrics of its own, e.g. an average). A score's name is `<task>.<metric>` (e.g. `pope_random.f1`,
`mmlu.acc`), or `<task>` for a single number. A gate key names a score by that name, or by its task alone when the
task has exactly one score (`mmlu`). The averages (AVERAGES) are ordinary entries where the metrics carry them.

Pure and import-free: not under pipeline/benchmarks, whose package imports its runner (every stage importing the
registry would then depend on the benchmark code)."""

from __future__ import annotations

AVERAGES = ("visual_average", "text_average")  # listed first in the report where the metrics carry them


def scores(benchmarks: dict | None) -> dict[str, float | None]:
    """name -> value of every score in one model's `benchmarks` entry (None or {}: no benchmark), in its order; a
    non-finite score is None (as the runner writes it)."""
    out: dict[str, float | None] = {}
    for task, entry in (benchmarks or {}).items():
        if isinstance(entry, dict):
            out |= {f"{task}.{metric}": value for metric, value in entry.items()}
        else:
            out[task] = entry
    return out


def matching(names, key: str) -> list[str]:
    """The score names (of `scores`) a gate key means: the key itself when it is a score's name, else every score of
    the task it names (one: that score; several: ambiguous, for the caller to refuse; none: not there)."""
    names = list(names)
    if key in names:
        return [key]
    return [name for name in names if name.startswith(f"{key}.")]


def ordered(names) -> list[str]:
    """Score names without repeats, the averages first, the others in their first order."""
    unique = list(dict.fromkeys(names))
    first = [n for n in unique if n in AVERAGES or n.partition(".")[0] in AVERAGES]
    return first + [n for n in unique if n not in first]
