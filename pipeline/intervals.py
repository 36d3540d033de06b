"""Bootstrap confidence intervals over the evaluation samples, and the verdicts the report reads from them.

`evaluate` keeps, per model, which held-out samples it answered right (`samples`: a string of 0/1 per question type,
in the evaluation set's order, and one for the text QA set). Every run is scored on the same samples, so a comparison
of two runs resamples the same indices for both (a paired bootstrap): the interval of a retention or a difference
is much narrower than the two scores' own intervals would suggest. Resampling is stratified by question type, as the
visual score is the mean over types.

What these intervals cover is the evaluation sample only. Training noise (another seed, another thread count: the
tiny model's retention moved from 0.953 to 0.907 on another machine) is not in them; that takes runs with several
training seeds.
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


def paired_interval(statistic: Callable[[list[Hits]], float], runs: list[Hits], *, level: float = LEVEL,
                    resamples: int = RESAMPLES, seed: int = SEED) -> tuple[float, float]:
    """The percentile bootstrap interval of `statistic(runs)`: each resample draws, per stratum, the same sample
    indices (with replacement) for every run. The runs must have the same strata, each with as many samples."""
    strata = {name: len(h) for name, h in runs[0].items()}
    for hits in runs[1:]:
        if {name: len(h) for name, h in hits.items()} != strata:
            raise ValueError(f"paired runs need the same evaluation samples per stratum: {strata} vs "
                             f"{ {name: len(h) for name, h in hits.items()} }")
    rng = np.random.default_rng(seed)
    values = np.empty(resamples)
    for i in range(resamples):
        picks = {name: rng.integers(0, n, n) for name, n in strata.items()}
        values[i] = statistic([{name: hits[name][picks[name]] for name in strata} for hits in runs])
    values = values[~np.isnan(values)]
    if not len(values):
        return math.nan, math.nan
    tail = (1 - level) / 2
    return float(np.quantile(values, tail)), float(np.quantile(values, 1 - tail))


def retention_interval(run: Hits, baseline: Hits, score: Callable[[Hits], float] = visual_score) -> tuple[float, float]:
    """The interval of score(run) / score(baseline) (NaN where the baseline scores 0 in a resample)."""
    def ratio(pair: list[Hits]) -> float:
        base = score(pair[1])
        return score(pair[0]) / base if base else math.nan

    return paired_interval(ratio, [run, baseline])


def difference_interval(a: Hits, b: Hits, score: Callable[[Hits], float] = visual_score) -> tuple[float, float]:
    """The interval of score(a) - score(b)."""
    return paired_interval(lambda pair: score(pair[0]) - score(pair[1]), [a, b])


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
