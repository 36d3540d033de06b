"""Bootstrap confidence intervals over the evaluation samples, and the verdicts the report reads from them.

`evaluate` keeps, per model, which held-out samples it answered right (`samples`: a string of 0/1 per question type,
in the evaluation set's order, and one for the text QA set). Every run is scored on the same samples, so a comparison
of two runs resamples the same indices for both (a paired bootstrap): the interval of a retention or a difference
is much narrower than the two scores' own intervals would suggest. Resampling is stratified by question type, as the
visual score is the mean over types.

Training noise (another seed, another thread count: the tiny model's retention moved from 0.953 to 0.907 on another
machine) is covered when a compared run has seed replicas (tune runs that differ only in `train_seed`): each side of
a comparison is then the list of its replicas' hits, the point estimate is the mean over seeds, and each resample
first draws seeds with replacement (a hierarchical bootstrap: seeds, then samples). When both sides have the same
number of seeds, seed i of each (the same training seed, so the same data order) is drawn together. With three
seeds the seed draw is coarse (ten distinct draws) and, as any bootstrap of so few, somewhat narrow; a single-seed
run's interval covers the evaluation sample only.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np

LEVEL = 0.95
RESAMPLES = 2000
SEED = 0
Hits = dict[str, np.ndarray]  # stratum (question type) -> 0/1 per sample


def encode(hits: Sequence[int]) -> str:
    """0/1 hits as a string, e.g. "0110" (compact in JSON, readable in a diff)."""
    return "".join("1" if h else "0" for h in hits)


def decode(strata: dict[str, str]) -> Hits:
    return {name: np.frombuffer(bits.encode(), dtype=np.uint8) - ord("0") for name, bits in strata.items()}


def visual_score(hits: Hits) -> float:
    """The mean over strata of each stratum's accuracy (pipeline.evaluation.evaluate_model's visual_score)."""
    return float(np.mean([h.mean() for h in hits.values()]))


def accuracy(hits: Hits) -> float:
    """The share right over every sample, whatever its stratum (the text QA accuracy)."""
    return float(np.concatenate(list(hits.values())).mean())


Group = list[Hits]  # one compared run: its seed replicas' hits (a single run: one element)


def _group(run: Hits | Group) -> Group:
    return list(run) if isinstance(run, list) else [run]


def mean_score(group: Hits | Group, score: Callable[[Hits], float] = visual_score) -> float:
    """The mean over a run's seed replicas of score(hits): the point estimate a comparison of groups reads."""
    return float(np.mean([score(hits) for hits in _group(group)]))


def paired_interval(statistic: Callable[[list], float], runs: list, *, level: float = LEVEL,
                    resamples: int = RESAMPLES, seed: int = SEED) -> tuple[float, float]:
    """The percentile bootstrap interval of `statistic(runs)`. `runs`: per compared run its hits, or the list of its
    seed replicas' hits (then `statistic` gets, per run, the list of its drawn replicas). Each resample draws the
    seeds (with replacement; by position across runs that have as many) and then, per stratum, the same sample
    indices (with replacement) for every model. Every model must have the same strata, each with as many samples."""
    grouped = [isinstance(run, list) for run in runs]
    groups = [_group(run) for run in runs]
    strata = {name: len(h) for name, h in groups[0][0].items()}
    for hits in (h for group in groups for h in group):
        if {name: len(h) for name, h in hits.items()} != strata:
            raise ValueError(f"paired runs need the same evaluation samples per stratum: {strata} vs "
                             f"{ {name: len(h) for name, h in hits.items()} }")
    sizes = {len(group) for group in groups}
    rng = np.random.default_rng(seed)
    values = np.empty(resamples)
    for i in range(resamples):
        if sizes == {1}:  # no seeds to draw (and no draw: single-seed intervals stay those of earlier commits)
            seeds = [np.zeros(1, dtype=int)] * len(groups)
        elif len(sizes) == 1:  # seed i of every run drawn together
            shared = rng.integers(0, len(groups[0]), len(groups[0]))
            seeds = [shared] * len(groups)
        else:
            seeds = [rng.integers(0, len(group), len(group)) for group in groups]
        picks = {name: rng.integers(0, n, n) for name, n in strata.items()}
        drawn = [[{name: group[s][name][picks[name]] for name in strata} for s in chosen]
                 for group, chosen in zip(groups, seeds)]
        values[i] = statistic([d if was_group else d[0] for d, was_group in zip(drawn, grouped)])
    values = values[~np.isnan(values)]
    if not len(values):
        return math.nan, math.nan
    tail = (1 - level) / 2
    return float(np.quantile(values, tail)), float(np.quantile(values, 1 - tail))


def retention_interval(run: Hits | Group, baseline: Hits | Group,
                       score: Callable[[Hits], float] = visual_score) -> tuple[float, float]:
    """The interval of score(run) / score(baseline), each the mean over its seeds (NaN where the baseline scores 0
    in a resample)."""
    def ratio(pair: list) -> float:
        base = mean_score(pair[1], score)
        return mean_score(pair[0], score) / base if base else math.nan

    return paired_interval(ratio, [run, baseline])


def difference_interval(a: Hits | Group, b: Hits | Group,
                        score: Callable[[Hits], float] = visual_score) -> tuple[float, float]:
    """The interval of score(a) - score(b), each the mean over its seeds."""
    return paired_interval(lambda pair: mean_score(pair[0], score) - mean_score(pair[1], score), [a, b])


def score_interval(run: Hits | Group, score: Callable[[Hits], float] = visual_score) -> tuple[float, float]:
    """The interval of one run's score (the mean over its seeds): what a figure's error bar draws."""
    return paired_interval(lambda one: mean_score(one[0], score), [run])


def verdict(interval: tuple[float, float], threshold: float, *, strict: bool = False) -> str:
    """"holds" when the whole interval is at or above `threshold` (above it, `strict`), "fails" when it is all
    below, "within noise" when it straddles the threshold (or is undefined)."""
    low, high = interval
    if math.isnan(low) or math.isnan(high):
        return "within noise"
    if low > threshold or (low == threshold and not strict):
        return "holds"
    if high < threshold or (high == threshold and strict):
        return "fails"
    return "within noise"


def combine(verdicts: list[str]) -> str:
    """A claim made at several points (e.g. 1, 2 and 3 removed layers) holds when it holds at each, fails when it
    fails at any."""
    if "fails" in verdicts:
        return "fails"
    return "holds" if verdicts and all(v == "holds" for v in verdicts) else "within noise"
