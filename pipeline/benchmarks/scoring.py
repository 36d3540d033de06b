"""The benchmarks' published scoring rules, in pure Python (no torch, no lm-eval): the task definitions under
pipeline/benchmarks/tasks call these from their `process_results` and aggregation functions, and
tests/unit/test_benchmark_scoring.py checks them against hand-computed values.

* VQA accuracy (TextVQA, VQAv2): the official answer normalisation (punctuation, digits, articles, contractions) and
  min(#matching humans / 3, 1) averaged over the 10 leave-one-out subsets of the 10 human answers.
* Exact match (GQA): the normalised prediction equals the normalised answer.
* Yes/no binary metrics (POPE): accuracy, precision, recall, F1 and the yes ratio, "yes" the positive class.
* MME: per category, acc (per question) + acc+ (per image: both of its two questions right), each in percent; the
  perception and cognition scores are sums over their categories.
* Multiple choice (ScienceQA, MMBench): the option letter read from a free-form answer.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Iterable, Sequence

# ------------------------------------------------------------------------------------------- VQA answer normalisation
# The official VQA evaluation's tables (github.com/GT-Vision-Lab/VQA, vqaEval.py), used by TextVQA's evaluation too.
CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't", "dont": "don't",
    "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't", "havent": "haven't",
    "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's", "howd": "how'd", "howll": "how'll",
    "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm", "Ive": "I've", "isnt": "isn't", "itd": "it'd",
    "itd've": "it'd've", "it'dve": "it'd've", "itll": "it'll", "let's": "let's", "maam": "ma'am", "mightnt": "mightn't",
    "mightnt've": "mightn't've", "mightn'tve": "mightn't've", "mightve": "might've", "mustnt": "mustn't",
    "mustve": "must've", "neednt": "needn't", "notve": "not've", "oclock": "o'clock", "oughtnt": "oughtn't",
    "ow's'at": "'ow's'at", "'ows'at": "'ow's'at", "'ow'sat": "'ow's'at", "shant": "shan't", "shed've": "she'd've",
    "she'dve": "she'd've", "she's": "she's", "shouldve": "should've", "shouldnt": "shouldn't",
    "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've", "somebody'd": "somebodyd",
    "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've", "somebodyll": "somebody'll",
    "somebodys": "somebody's", "someoned": "someone'd", "someoned've": "someone'd've", "someone'dve": "someone'd've",
    "someonell": "someone'll", "someones": "someone's", "somethingd": "something'd",
    "somethingd've": "something'd've", "something'dve": "something'd've", "somethingll": "something'll",
    "thats": "that's", "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've",
    "therere": "there're", "theres": "there's", "theyd": "they'd", "theyd've": "they'd've", "they'dve": "they'd've",
    "theyll": "they'll", "theyre": "they're", "theyve": "they've", "twas": "'twas", "wasnt": "wasn't",
    "wed've": "we'd've", "we'dve": "we'd've", "weve": "we've", "werent": "weren't", "whatll": "what'll",
    "whatre": "what're", "whats": "what's", "whatve": "what've", "whens": "when's", "whered": "where'd",
    "wheres": "where's", "whereve": "where've", "whod": "who'd", "whod've": "who'd've", "who'dve": "who'd've",
    "wholl": "who'll", "whos": "who's", "whove": "who've", "whyll": "why'll", "whyre": "why're", "whys": "why's",
    "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't", "wouldnt've": "wouldn't've",
    "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll", "y'allll": "y'all'll",
    "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've", "youd": "you'd",
    "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll", "youre": "you're", "youve": "you've",
}
NUMBER_WORDS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5", "six": "6",
                "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
ARTICLES = ("a", "an", "the")
PUNCTUATION = (";", r"/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?",
               "!")
_PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")
_COMMA_STRIP = re.compile(r"(\d)(,)(\d)")


def _strip_punctuation(text: str) -> str:
    """vqaEval.processPunctuation: a mark next to a space (or any mark, in a text with a digit-comma-digit) goes; any
    other becomes a space; a full stop not inside a number goes."""
    out = text
    for mark in PUNCTUATION:
        if (mark + " " in text or " " + mark in text) or _COMMA_STRIP.search(text) is not None:
            out = out.replace(mark, "")
        else:
            out = out.replace(mark, " ")
    return _PERIOD_STRIP.sub("", out)


def _digits_and_articles(text: str) -> str:
    """vqaEval.processDigitArticle: number words to digits, articles dropped, contractions restored."""
    words = []
    for word in text.lower().split():
        word = NUMBER_WORDS.get(word, word)
        if word not in ARTICLES:
            words.append(word)
    return " ".join(CONTRACTIONS.get(word, word) for word in words)


def normalize_vqa_answer(answer: str) -> str:
    """An answer as the official VQA evaluation compares it."""
    answer = answer.replace("\n", " ").replace("\t", " ").strip()
    return _digits_and_articles(_strip_punctuation(answer))


def vqa_accuracy(prediction: str, answers: Sequence[str]) -> float:
    """VQA accuracy of one prediction against the human answers (10 for TextVQA and VQAv2): for each human answer
    left out, min(#remaining answers equal to the prediction / 3, 1); the mean over the leave-one-out subsets."""
    if not answers:
        raise ValueError("vqa_accuracy needs at least one human answer")
    prediction = normalize_vqa_answer(prediction)
    answers = [normalize_vqa_answer(a) for a in answers]
    scores = []
    for left_out in range(len(answers)):
        matches = sum(1 for k, a in enumerate(answers) if k != left_out and a == prediction)
        scores.append(min(1.0, matches / 3))
    return sum(scores) / len(scores)


def exact_match(prediction: str, answer: str) -> float:
    """1.0 when the normalised prediction is the normalised answer (GQA's accuracy, on short answers)."""
    return float(normalize_vqa_answer(prediction) == normalize_vqa_answer(answer))


# ------------------------------------------------------------------------------------------------------- yes / no
def pope_answer(prediction: str) -> str:
    """POPE's reading of a free-form answer (LLaVA's eval_pope.py): in its first sentence, without commas, a word
    'no', 'No' or 'not' makes it 'no'; anything else is 'yes'."""
    sentence = prediction.split(".")[0].replace(",", "")
    words = sentence.split()
    return "no" if ("No" in words or "no" in words or "not" in words) else "yes"


def mme_answer(prediction: str) -> str:
    """MME's reading of a free-form answer (its eval tool's parse_pred_ans): 'yes' or 'no' as the whole answer, else
    whichever of them its first four characters hold, else 'other' (wrong for every question)."""
    answer = prediction.strip().lower()
    if answer in ("yes", "no"):
        return answer
    prefix = answer[:4]
    if "yes" in prefix:
        return "yes"
    return "no" if "no" in prefix else "other"


def binary_metrics(pairs: Iterable[tuple[str, str]]) -> dict[str, float]:
    """POPE's metrics over (prediction, label) pairs of 'yes'/'no' ('yes' positive): accuracy, precision, recall,
    F1 and the ratio of 'yes' answers. A prediction that is not 'yes' counts as a 'no'. Precision/recall/F1 are 0
    when undefined (no positive prediction / label)."""
    tp = fp = tn = fn = 0
    for prediction, label in pairs:
        positive = prediction == "yes"
        if label == "yes":
            tp, fn = tp + positive, fn + (not positive)
        else:
            fp, tn = fp + positive, tn + (not positive)
    total = tp + fp + tn + fn
    if total == 0:
        raise ValueError("binary_metrics needs at least one (prediction, label) pair")
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"accuracy": (tp + tn) / total, "precision": precision, "recall": recall, "f1": f1,
            "yes_ratio": (tp + fp) / total}


# ------------------------------------------------------------------------------------------------------------ MME
MME_PERCEPTION = ("existence", "count", "position", "color", "posters", "celebrity", "scene", "landmark", "artwork",
                  "OCR")
MME_COGNITION = ("commonsense_reasoning", "numerical_calculation", "text_translation", "code_reasoning")


def mme_category_scores(items: Iterable[tuple[str, str, bool]]) -> dict[str, float]:
    """Per category: 100 x acc (questions right) + 100 x acc+ (images with every question right), from (category,
    image id, correct) triples; MME's score for that category (at most 200)."""
    per_image: dict[str, dict[str, list[bool]]] = defaultdict(lambda: defaultdict(list))
    for category, image, correct in items:
        per_image[category][image].append(bool(correct))
    scores = {}
    for category, images in per_image.items():
        answers = [c for results in images.values() for c in results]
        acc = sum(answers) / len(answers)
        acc_plus = sum(all(results) for results in images.values()) / len(images)
        scores[category] = 100 * acc + 100 * acc_plus
    return scores


def mme_totals(category_scores: dict[str, float]) -> dict[str, float]:
    """The perception and cognition scores: sums of their categories' scores (categories absent from the data add
    nothing)."""
    return {
        "perception": sum(category_scores.get(c, 0.0) for c in MME_PERCEPTION),
        "cognition": sum(category_scores.get(c, 0.0) for c in MME_COGNITION),
    }


# ------------------------------------------------------------------------------------------------ multiple choice
LETTERS = "ABCDEFGHIJ"


def choice_letter(prediction: str, options: Sequence[str]) -> str | None:
    """The option letter a free-form answer picks among len(options) options: a leading letter ('B', '(B)', 'B.',
    'B: text'), else an option's text given in full (the longest one contained, so that 'red car' beats 'red'), else
    None."""
    letters = LETTERS[: len(options)]
    text = prediction.strip()
    match = re.match(r"^\(?([A-J])\)?(?:[.:)\s]|$)", text)
    if match and match.group(1) in letters:
        return match.group(1)
    lowered = text.lower()
    contained = [(len(option), letters[k]) for k, option in enumerate(options) if option and option.lower() in lowered]
    return max(contained)[1] if contained else None


def circular_accuracy(items: Iterable[tuple[str, bool]]) -> float:
    """MMBench's circular evaluation: a question (its id shared by every rotation of its options) counts as right
    only when every rotation is answered right; the fraction of questions right."""
    per_question: dict[str, list[bool]] = defaultdict(list)
    for question, correct in items:
        per_question[question].append(bool(correct))
    if not per_question:
        raise ValueError("circular_accuracy needs at least one answer")
    return sum(all(results) for results in per_question.values()) / len(per_question)
