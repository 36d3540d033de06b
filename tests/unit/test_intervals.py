"""pipeline/intervals.py: the paired bootstrap behind the report's verdicts, on hand-made hit patterns whose answers
are known (a difference of one answer in a hundred is noise; thirty is not; identical runs differ by exactly 0)."""

import math

import numpy as np
import pytest

from pipeline import intervals


def hits(**strata: str) -> intervals.Hits:
    return intervals.decode(strata)


def test_hits_round_trip_through_their_string_form():
    assert intervals.encode([1, 0, 0, 1]) == "1001"
    assert {k: v.tolist() for k, v in hits(colour="1001", digit="1").items()} == {"colour": [1, 0, 0, 1], "digit": [1]}
    assert intervals.visual_score(hits(a="1100", b="1")) == pytest.approx((0.5 + 1.0) / 2)  # mean over types
    assert intervals.accuracy(hits(a="1100", b="1")) == pytest.approx(3 / 5)  # over samples


def test_identical_runs_differ_by_exactly_zero_and_keep_all_of_each_other():
    run = hits(colour="1100101011" * 10, shape="0111" * 25)
    assert intervals.difference_interval(run, run) == (0.0, 0.0)
    assert intervals.retention_interval(run, run) == (1.0, 1.0)


def test_the_interval_width_matches_the_binomial_standard_error():
    run = hits(only="01" * 200)  # p = 0.5, n = 400: 95% interval about +-1.96 * 0.025
    low, high = intervals.paired_interval(lambda r: intervals.visual_score(r[0]), [run])
    assert low < 0.5 < high and 0.08 < high - low < 0.12


def test_one_more_right_answer_in_a_hundred_is_noise_thirty_are_not():
    base = "0" * 50 + "1" * 50
    one_more, thirty_more = "1" + base[1:], "1" * 30 + base[30:]
    one = intervals.difference_interval(hits(t=one_more), hits(t=base))
    assert one[0] == 0.0 and one[1] > 0  # paired: the difference is never negative
    assert intervals.verdict(one, 0.0, strict=True) == "within noise"
    thirty = intervals.difference_interval(hits(t=thirty_more), hits(t=base))
    assert intervals.verdict(thirty, 0.0, strict=True) == "holds"
    assert intervals.verdict(intervals.difference_interval(hits(t=base), hits(t=thirty_more)), 0.0, strict=True) == "fails"


@pytest.mark.parametrize(("interval", "strict", "expected"), [
    ((0.96, 0.99), False, "holds"), ((0.95, 0.99), False, "holds"), ((0.95, 0.99), True, "within noise"),
    ((0.90, 0.94), False, "fails"), ((0.90, 0.95), True, "fails"), ((0.93, 0.97), False, "within noise"),
    ((math.nan, math.nan), False, "within noise"),
])
def test_verdicts_read_the_interval_against_the_threshold(interval, strict, expected):
    assert intervals.verdict(interval, 0.95, strict=strict) == expected


def test_a_claim_at_several_points_holds_only_where_it_holds_at_each():
    assert intervals.combine(["holds", "holds"]) == "holds"
    assert intervals.combine(["holds", "within noise"]) == "within noise"
    assert intervals.combine(["holds", "fails", "within noise"]) == "fails"
    assert intervals.combine([]) == "within noise"


def test_runs_scored_on_other_samples_cannot_be_paired():
    with pytest.raises(ValueError, match="same evaluation samples"):
        intervals.difference_interval(hits(t="0101"), hits(t="010"))


def test_a_baseline_that_scores_zero_gives_no_retention():
    assert all(math.isnan(v) for v in intervals.retention_interval(hits(t="1111"), hits(t="0000")))
    assert np.isnan(intervals.retention_interval(hits(t="1"), hits(t="0"))[0])


def test_seed_replicas_widen_the_interval_by_their_spread():
    """Two runs scored on the same samples: as single models, the same answers give a point interval; as three
    seeds each whose scores disagree, the seed draw widens it, and a run's replicas are averaged."""
    base = hits(t="1" * 60 + "0" * 40)
    agree = [hits(t="1" * 60 + "0" * 40)] * 3
    spread = [hits(t="1" * 40 + "0" * 60), hits(t="1" * 60 + "0" * 40), hits(t="1" * 80 + "0" * 20)]
    assert intervals.mean_score(spread) == pytest.approx(0.6)
    assert intervals.difference_interval(agree, [base] * 3) == (0.0, 0.0)
    low, high = intervals.difference_interval(spread, [base] * 3)
    assert low < -0.05 and high > 0.05  # seeds 0.4 .. 0.8 around the baseline's 0.6: within noise
    assert intervals.verdict((low, high), 0.0) == "within noise"
    # a real gap survives the seed draw: every seed of one run above every seed of the other
    better = [hits(t="1" * 90 + "0" * 10), hits(t="1" * 92 + "0" * 8), hits(t="1" * 88 + "0" * 12)]
    assert intervals.verdict(intervals.difference_interval(better, spread), 0.0, strict=True) == "holds"


def test_a_single_seed_interval_is_the_same_given_as_a_group_of_one():
    a, b = hits(t="1100101011" * 10), hits(t="1000101011" * 10)
    assert intervals.difference_interval([a], [b]) == intervals.difference_interval(a, b)
    assert intervals.retention_interval([a], b) == intervals.retention_interval(a, b)


def test_runs_with_other_seed_counts_are_drawn_independently():
    a = [hits(t="1" * 50 + "0" * 50), hits(t="1" * 70 + "0" * 30)]
    b = [hits(t="1" * 60 + "0" * 40)] * 3
    low, high = intervals.difference_interval(a, b)
    assert low <= 0.0 <= high
    low, high = intervals.score_interval(a)
    assert low < 0.6 < high
