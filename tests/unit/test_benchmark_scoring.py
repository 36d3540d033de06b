"""The benchmarks' scoring rules (pipeline/benchmarks/scoring.py) against values worked out by hand."""

import pytest

from pipeline.benchmarks import scoring


# ------------------------------------------------------------------------------------------------ VQA accuracy
@pytest.mark.parametrize("raw, normalised", [
    ("the Red.", "red"),  # article dropped, full stop stripped, lower case
    ("Two", "2"),  # number words become digits
    ("dont", "don't"),  # contractions restored
    ("1,000", "1000"),  # a digit-comma-digit text: marks removed, not spaced
    ("left-hand", "left hand"),  # a mark between letters becomes a space
    ("3.5", "3.5"),  # a decimal point stays
    ("  yes\n", "yes"),
])
def test_vqa_normalisation(raw, normalised):
    assert scoring.normalize_vqa_answer(raw) == normalised


def test_vqa_accuracy_averages_the_ten_leave_one_out_subsets():
    answers = ["red"] * 2 + ["blue"] * 8
    # "red": leaving out one of the 2 reds leaves 1 match (1/3), any of the 8 blues leaves 2 (2/3):
    # (2 x 1/3 + 8 x 2/3) / 10 = 0.6
    assert scoring.vqa_accuracy("red", answers) == pytest.approx(0.6)
    # "blue": at least 7 matches in every subset -> min(7/3, 1) = 1
    assert scoring.vqa_accuracy("Blue.", answers) == pytest.approx(1.0)
    # 3 humans agree: leaving one of them out leaves 2/3 (3 subsets), otherwise 1 (7): 0.9
    assert scoring.vqa_accuracy("two", ["2"] * 3 + ["3"] * 7) == pytest.approx(0.9)
    assert scoring.vqa_accuracy("green", answers) == 0.0


def test_vqa_accuracy_needs_answers():
    with pytest.raises(ValueError):
        scoring.vqa_accuracy("red", [])


def test_exact_match_compares_normalised_answers():
    assert scoring.exact_match("The table.", "table") == 1.0
    assert scoring.exact_match("chair", "table") == 0.0


# ---------------------------------------------------------------------------------------------------------- POPE
@pytest.mark.parametrize("prediction, answer", [
    ("Yes", "yes"), ("No", "no"), ("No, there is not.", "no"), ("Yes, there is a dog.", "yes"),
    ("There is no dog in the image", "no"), ("Yes. No dog though", "yes"),  # only the first sentence counts
    ("", "yes"),  # POPE's rule: no 'no'/'not' word is a yes
])
def test_pope_answer(prediction, answer):
    assert scoring.pope_answer(prediction) == answer


def test_binary_metrics_on_a_known_confusion_matrix():
    # tp 3, fn 2, fp 1, tn 4: precision 3/4, recall 3/5, F1 = 2PR/(P+R) = 0.9/1.35 = 2/3
    pairs = [("yes", "yes")] * 3 + [("no", "yes")] * 2 + [("yes", "no")] + [("no", "no")] * 4
    metrics = scoring.binary_metrics(pairs)
    assert metrics == pytest.approx({"accuracy": 0.7, "precision": 0.75, "recall": 0.6, "f1": 2 / 3, "yes_ratio": 0.4})


def test_binary_metrics_without_positive_predictions():
    metrics = scoring.binary_metrics([("no", "yes"), ("no", "no")])
    assert metrics["precision"] == metrics["f1"] == 0.0 and metrics["accuracy"] == 0.5


# ----------------------------------------------------------------------------------------------------------- MME
@pytest.mark.parametrize("prediction, answer", [
    ("Yes", "yes"), ("no", "no"), ("Yes, it is.", "yes"), ("No.", "no"), ("Maybe", "other"), ("", "other"),
])
def test_mme_answer(prediction, answer):
    assert scoring.mme_answer(prediction) == answer


def test_mme_acc_plus_counts_images_with_both_answers_right():
    items = [
        ("existence", "a", True), ("existence", "a", True),  # both right
        ("existence", "b", True), ("existence", "b", False),  # one right
        ("count", "c", False), ("count", "c", False),
        ("code_reasoning", "d", True), ("code_reasoning", "d", True),
    ]
    scores = scoring.mme_category_scores(items)
    # existence: acc 3/4 -> 75, acc+ 1/2 -> 50
    assert scores == pytest.approx({"existence": 125.0, "count": 0.0, "code_reasoning": 200.0})
    assert scoring.mme_totals(scores) == pytest.approx({"perception": 125.0, "cognition": 200.0})


# ---------------------------------------------------------------------------------------------- multiple choice
@pytest.mark.parametrize("prediction, letter", [
    ("B", "B"), ("(C) green", "C"), ("A.", "A"), ("D: grey", "D"), ("The answer is green", "C"),
    ("E", None),  # no such option, no option text
    ("purple", None),
])
def test_choice_letter(prediction, letter):
    assert scoring.choice_letter(prediction, ["red", "blue", "green", "grey"]) == letter


def test_choice_letter_prefers_the_longest_option_text():
    assert scoring.choice_letter("a red car", ["red", "red car"]) == "B"


def test_circular_accuracy_needs_every_rotation_right():
    items = [("1", True), ("1", True), ("1", True), ("2", True), ("2", False)]
    assert scoring.circular_accuracy(items) == 0.5
