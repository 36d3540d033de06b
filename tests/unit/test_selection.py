"""Layer selection: the paper's tables, contiguous blocks, invariants over every depth, seeding, budgets, errors."""

import math

import pytest

from pipeline import selection
from pipeline.selection import resolve_budget, select_layers, top_k, bottom_k, validate_indices

SIZED = [s for s in selection.STRATEGIES if s not in ("all", "importance")]


# ------------------------------------------------------------------------------------------------ uniform tables
@pytest.mark.parametrize(
    "num_layers, budget, expected",
    [
        (32, 8, [1, 5, 9, 13, 19, 23, 27, 31]),  # the authors' list for LLaVA-1.5-7B (32 layers)
        (32, 0.25, [1, 5, 9, 13, 19, 23, 27, 31]),
        (40, 0.25, [1, 5, 9, 13, 17, 23, 27, 31, 35, 39]),
        (12, 0.25, [1, 7, 11]),
        (8, 0.25, [1, 7]),
        (12, 1, [11]),
        (12, 2, [1, 11]),
        (4, 0.5, [1, 3]),
        (1, 1, [0]),
    ],
)
def test_uniform_tables(num_layers, budget, expected):
    assert select_layers(num_layers, "uniform", budget) == expected


def test_uniform_is_the_default_budget_quarter():
    assert select_layers(32, "uniform") == [1, 5, 9, 13, 19, 23, 27, 31]


def test_uniform_full_budget_is_every_layer():
    for L in (1, 2, 7, 12, 32):
        assert select_layers(L, "uniform", L) == list(range(L))
        assert select_layers(L, "uniform", 1.0) == list(range(L))


def test_uniform_always_includes_last_layer():
    for L in range(1, 65):
        for k in range(1, L + 1):
            assert select_layers(L, "uniform", k)[-1] == L - 1


# ------------------------------------------------------------------------------------------------ contiguous
@pytest.mark.parametrize(
    "strategy, expected",
    [
        ("bottom", list(range(0, 8))),
        ("lower_middle", list(range(8, 16))),
        ("upper_middle", list(range(16, 24))),
        ("top", list(range(24, 32))),
        ("bottom_top", [0, 1, 2, 3, 28, 29, 30, 31]),
    ],
)
def test_contiguous_blocks_32_layers(strategy, expected):
    assert select_layers(32, strategy, 8) == expected
    assert select_layers(32, strategy, 0.25) == expected


def test_contiguous_blocks_small_depth():
    assert select_layers(12, "bottom", 3) == [0, 1, 2]
    assert select_layers(12, "top", 3) == [9, 10, 11]
    assert select_layers(12, "lower_middle", 3) == [3, 4, 5]
    assert select_layers(12, "upper_middle", 3) == [6, 7, 8]
    # odd k: the extra layer goes to the top
    assert select_layers(12, "bottom_top", 3) == [0, 10, 11]
    assert select_layers(12, "bottom_top", 1) == [11]


def test_middle_blocks_clamp_at_the_edges():
    # k larger than half the depth must still give k in-range layers
    assert select_layers(6, "lower_middle", 5) == [0, 1, 2, 3, 4]
    assert select_layers(6, "upper_middle", 5) == [1, 2, 3, 4, 5]


# ------------------------------------------------------------------------------------------------ invariants
def test_every_strategy_every_depth_every_budget():
    for L in range(1, 65):
        for k in range(1, L + 1):
            for strategy in SIZED:
                got = select_layers(L, strategy, k, seed=k)
                assert len(got) == k, (L, k, strategy, got)
                assert got == sorted(set(got)), (L, k, strategy, got)
                assert all(isinstance(i, int) and 0 <= i < L for i in got), (L, k, strategy, got)
            scores = [math.sin(i * 1.7) for i in range(L)]
            got = select_layers(L, "importance", k, scores=scores)
            assert len(got) == k and got == sorted(set(got)) and 0 <= got[0] and got[-1] < L


# ------------------------------------------------------------------------------------------------ random
def test_random_is_seeded():
    a = select_layers(32, "random", 8, seed=123)
    assert a == select_layers(32, "random", 8, seed=123)
    assert a == sorted(a) and len(set(a)) == 8
    others = {tuple(select_layers(32, "random", 8, seed=s)) for s in range(20)}
    assert len(others) > 1  # different seeds give different lists (C(32, 8) choices: collisions are rare)
    assert select_layers(32, "random", 8, seed=0) != select_layers(32, "random", 8, seed=1)


def test_random_full_budget_is_every_layer():
    assert select_layers(10, "random", 10, seed=7) == list(range(10))


# ------------------------------------------------------------------------------------------------ all / explicit
def test_all_ignores_budget():
    assert select_layers(32, "all") == list(range(32))
    assert select_layers(5, "all", 1) == list(range(5))
    assert select_layers(1, "all") == [0]


def test_explicit_list_is_sorted():
    assert select_layers(32, [31, 1, 19, 5]) == [1, 5, 19, 31]
    assert select_layers(32, (3,)) == [3]
    assert validate_indices(4, [3, 0]) == [0, 3]


@pytest.mark.parametrize(
    "layers, match",
    [
        ([1, 1, 2], r"duplicate layer indices \[1\]"),
        ([0, 32], r"layer index 32 is out of range for 32 layers"),
        ([-1, 3], r"layer index -1 is negative"),
        ([], r"empty"),
        ([1.0], r"not an integer"),
        ([True], r"not an integer"),
        (["3"], r"not an integer"),
    ],
)
def test_explicit_list_errors(layers, match):
    with pytest.raises(ValueError, match=match):
        select_layers(32, layers)


# ------------------------------------------------------------------------------------------------ importance
def test_importance_top_k():
    scores = [0.1, 0.9, 0.3, 0.8, 0.2, 0.7]
    assert select_layers(6, "importance", 3, scores=scores) == [1, 3, 5]
    assert select_layers(6, "importance", 0.5, scores=scores) == [1, 3, 5]


def test_importance_ties_prefer_lower_index():
    assert select_layers(5, "importance", 2, scores=[1.0, 1.0, 1.0, 1.0, 1.0]) == [0, 1]
    assert select_layers(5, "importance", 2, scores=[0.0, 2.0, 1.0, 2.0, 2.0]) == [1, 3]


def test_importance_nan_ranks_lowest():
    nan = float("nan")
    assert select_layers(4, "importance", 2, scores=[nan, 0.1, nan, 0.2]) == [1, 3]
    assert select_layers(4, "importance", 3, scores=[nan, 0.1, nan, 0.2]) == [0, 1, 3]
    assert select_layers(3, "importance", 3, scores=[nan, nan, nan]) == [0, 1, 2]
    # NaN is never preferred over a negative score or -inf
    assert select_layers(3, "importance", 1, scores=[nan, -5.0, nan]) == [1]


def test_top_k_and_bottom_k_with_exclude():
    scores = [0.5, 0.1, 0.9, 0.3]
    assert top_k(scores, 2) == [0, 2]
    assert top_k(scores, 2, exclude=[2]) == [0, 3]
    assert bottom_k(scores, 2) == [1, 3]
    assert bottom_k(scores, 1, exclude=[1]) == [3]
    assert bottom_k([float("nan"), 0.2, 0.1], 1) == [2]  # NaN is never the "least important"
    with pytest.raises(ValueError, match="only 1 are eligible"):
        top_k(scores, 2, exclude=[0, 1, 2])


def test_importance_without_scores():
    with pytest.raises(ValueError, match="needs per-layer scores"):
        select_layers(8, "importance", 2)


def test_importance_wrong_length():
    with pytest.raises(ValueError, match="3 entries for 8 layers"):
        select_layers(8, "importance", 2, scores=[0.1, 0.2, 0.3])


# ------------------------------------------------------------------------------------------------ budgets
@pytest.mark.parametrize(
    "num_layers, budget, k",
    [
        (12, 0.25, 3),
        (32, 0.25, 8),
        (40, 0.25, 10),
        (8, 0.25, 2),
        (12, 1.0, 12),
        (12, 0.01, 1),  # a tiny ratio still trains one layer
        (12, 1, 1),  # an int is a count...
        (12, 3, 3),
        (12, 12, 12),
        (1, 1.0, 1),
    ],
)
def test_resolve_budget(num_layers, budget, k):
    assert resolve_budget(num_layers, budget) == k


def test_ratio_vs_count():
    # 1 (int) is one layer, 1.0 (float) is every layer
    assert len(select_layers(12, "bottom", 1)) == 1
    assert len(select_layers(12, "bottom", 1.0)) == 12


@pytest.mark.parametrize(
    "budget, match",
    [
        (0, r"budget count must be >= 1, got 0"),
        (-1, r"budget count must be >= 1, got -1"),
        (0.0, r"budget ratio must be in \(0, 1\], got 0.0"),
        (1.5, r"budget ratio must be in \(0, 1\], got 1.5"),
        (-0.25, r"budget ratio must be in \(0, 1\]"),
        (float("nan"), r"budget ratio must be in \(0, 1\]"),
        (13, r"budget count 13 exceeds the number of layers 12"),
        (True, r"budget must be a ratio"),
        ("0.25", r"budget must be a ratio"),
        (None, r"budget must be a ratio"),
    ],
)
def test_bad_budget(budget, match):
    with pytest.raises(ValueError, match=match):
        resolve_budget(12, budget)
    with pytest.raises(ValueError, match=match):
        select_layers(12, "uniform", budget)


def test_k_greater_than_depth_for_every_sized_strategy():
    for strategy in SIZED:
        with pytest.raises(ValueError, match="exceeds the number of layers"):
            select_layers(4, strategy, 5)


def test_bad_num_layers():
    with pytest.raises(ValueError, match="num_layers must be >= 1"):
        resolve_budget(0, 1)


def test_unknown_strategy():
    with pytest.raises(ValueError, match=r"unknown layer-selection strategy 'middle'"):
        select_layers(32, "middle", 8)
    with pytest.raises(ValueError, match=r"unknown layer-selection strategy 'Uniform'"):
        select_layers(32, "Uniform", 8)
