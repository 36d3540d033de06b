"""Layer selection: (depth L, spec) -> sorted 0-based decoder layer indices.

Strategies (k = budget resolved against L, see `resolve_budget`):

- ``uniform``: sparse and evenly spread. With stride s = L / k, the upper half is anchored on the last
  layer and the lower half starts one layer above the bottom:
      upper: L - 1 - floor(j * s)        for j = 0 .. ceil(k/2) - 1
      lower: o + floor(i * s)            for i = 0 .. floor(k/2) - 1,   o = min(1, floor(s) - 1)
  For L=32, k=8 this gives 1,5,9,13,19,23,27,31 -- exactly the authors' list.
- ``bottom`` / ``top``: the first / last k layers.
- ``lower_middle``: the k layers ending at floor(L/2); ``upper_middle``: the k layers starting at floor(L/2)
  (for L=32, k=8: 8-15 and 16-23, as in the paper).
- ``bottom_top``: floor(k/2) bottom layers + ceil(k/2) top layers.
- ``random``: k layers drawn without replacement with a seeded RNG.
- ``all``: every layer.
- ``importance``: the k layers with the highest scores (ties: lower index first).
- an explicit list of indices.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence

STRATEGIES = ("uniform", "bottom", "lower_middle", "upper_middle", "top", "bottom_top", "random", "all", "importance")


def resolve_budget(num_layers: int, budget: float | int) -> int:
    """A ratio in (0, 1] (a float) or a layer count (an int) -> number of layers k, 1 <= k <= L."""
    if num_layers < 1:
        raise ValueError(f"num_layers must be >= 1, got {num_layers}")
    if isinstance(budget, bool) or not isinstance(budget, (int, float)):
        raise ValueError(f"budget must be a ratio in (0, 1] or a positive layer count, got {budget!r}")
    if isinstance(budget, float):
        if not (0.0 < budget <= 1.0) or math.isnan(budget):
            raise ValueError(f"budget ratio must be in (0, 1], got {budget}")
        return max(1, math.floor(budget * num_layers + 0.5))
    if budget < 1:
        raise ValueError(f"budget count must be >= 1, got {budget}")
    if budget > num_layers:
        raise ValueError(f"budget count {budget} exceeds the number of layers {num_layers}")
    return budget


def validate_indices(num_layers: int, layers: Sequence[int], what: str = "layers") -> list[int]:
    """Check an explicit list: integers, no duplicates, each in [0, L). Returns it sorted."""
    if len(layers) == 0:
        raise ValueError(f"{what}: the layer list is empty")
    for i in layers:
        if isinstance(i, bool) or not isinstance(i, int):
            raise ValueError(f"{what}: layer index {i!r} is not an integer")
        if i < 0:
            raise ValueError(f"{what}: layer index {i} is negative (indices are 0-based, 0..{num_layers - 1})")
        if i >= num_layers:
            raise ValueError(f"{what}: layer index {i} is out of range for {num_layers} layers (0..{num_layers - 1})")
    dupes = sorted({i for i in layers if list(layers).count(i) > 1})
    if dupes:
        raise ValueError(f"{what}: duplicate layer indices {dupes}")
    return sorted(layers)


def uniform(num_layers: int, k: int) -> list[int]:
    stride = num_layers / k
    offset = min(1, math.floor(stride) - 1)
    upper = [num_layers - 1 - math.floor(j * stride) for j in range(math.ceil(k / 2))]
    lower = [offset + math.floor(i * stride) for i in range(k // 2)]
    layers = sorted(set(lower + upper))
    assert len(layers) == k and 0 <= layers[0] and layers[-1] < num_layers, (num_layers, k, layers)
    return layers


def select_layers(
    num_layers: int,
    strategy: str | Sequence[int],
    budget: float | int = 0.25,
    *,
    seed: int = 0,
    scores: Sequence[float] | None = None,
) -> list[int]:
    """Resolve a selection spec to sorted 0-based layer indices."""
    if not isinstance(strategy, str):
        return validate_indices(num_layers, list(strategy))
    if strategy == "all":
        return list(range(num_layers))
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown layer-selection strategy {strategy!r}; expected one of {list(STRATEGIES)} or a list of indices")
    k = resolve_budget(num_layers, budget)
    half = num_layers // 2
    if strategy == "uniform":
        return uniform(num_layers, k)
    if strategy == "bottom":
        return list(range(k))
    if strategy == "top":
        return list(range(num_layers - k, num_layers))
    if strategy == "lower_middle":
        start = max(0, half - k)
        return list(range(start, start + k))
    if strategy == "upper_middle":
        start = min(half, num_layers - k)
        return list(range(start, start + k))
    if strategy == "bottom_top":
        return sorted(set(range(k // 2)) | set(range(num_layers - (k - k // 2), num_layers)))
    if strategy == "random":
        return sorted(random.Random(seed).sample(range(num_layers), k))
    # importance
    if scores is None:
        raise ValueError("strategy 'importance' needs per-layer scores")
    if len(scores) != num_layers:
        raise ValueError(f"importance scores have {len(scores)} entries for {num_layers} layers")
    return top_k(scores, k)


def top_k(scores: Sequence[float], k: int, exclude: Sequence[int] = ()) -> list[int]:
    """Indices of the k highest scores (NaN ranks lowest; ties: lower index first), sorted."""
    skip = set(exclude)
    candidates = [i for i in range(len(scores)) if i not in skip]
    if k > len(candidates):
        raise ValueError(f"asked for {k} layers but only {len(candidates)} are eligible")
    key = lambda i: (-(scores[i] if not math.isnan(scores[i]) else -math.inf), i)  # noqa: E731
    return sorted(sorted(candidates, key=key)[:k])


def bottom_k(scores: Sequence[float], k: int, exclude: Sequence[int] = ()) -> list[int]:
    """Indices of the k lowest scores among the non-excluded layers (NaN ranks highest), sorted."""
    return top_k([-s if not math.isnan(s) else -math.inf for s in scores], k, exclude)
