"""The functions the shipped task YAMLs in this folder name with `!function utils.<name>` (lm-eval loads this file by
its path): each benchmark's dataset (pipeline/benchmarks/loaders.py), image, prompt, and per-question results, plus
the aggregations over a task's questions that are not plain means (pipeline/benchmarks/scoring.py).

Prompts are LLaVA-1.5's evaluation prompts; lm-eval wraps them in the model's own chat template."""

from pipeline.benchmarks import loaders, scoring, tiny_probes

SHORT_ANSWER = "\nAnswer the question using a single word or phrase."
LETTER_ANSWER = "\nAnswer with the option's letter from the given choices directly."


def dataset(benchmark: str, benchmark_data_dir: str, **_metadata):
    """`custom_dataset`: lm-eval calls it with the task's metadata (the runner puts benchmark_data_dir there) and
    dataset_kwargs (the YAML names the benchmark)."""
    return loaders.as_dataset(benchmark, benchmark_data_dir)


def doc_to_image(doc):
    return [loaders.open_image(doc)]


def short_answer_text(doc):
    return "<image>\n" + doc["question"] + SHORT_ANSWER


def choice_text(doc):
    """ScienceQA and MMBench: the hint as context, the question, the lettered options."""
    context = f"Context: {doc['hint']}\n" if doc["hint"] else ""
    options = "".join(f"\n{scoring.LETTERS[k]}. {option}" for k, option in enumerate(doc["options"]))
    return "<image>\n" + context + doc["question"] + options + LETTER_ANSWER


def _prediction(results):
    return results[0] if results else ""


# --------------------------------------------------------------------------------------------------------- POPE
def pope_results(doc, results):
    pair = (scoring.pope_answer(_prediction(results)), doc["answer"])
    return {metric: pair for metric in ("accuracy", "precision", "recall", "f1", "yes_ratio")}


def pope_accuracy(pairs):
    return scoring.binary_metrics(pairs)["accuracy"]


def pope_precision(pairs):
    return scoring.binary_metrics(pairs)["precision"]


def pope_recall(pairs):
    return scoring.binary_metrics(pairs)["recall"]


def pope_f1(pairs):
    return scoring.binary_metrics(pairs)["f1"]


def pope_yes_ratio(pairs):
    return scoring.binary_metrics(pairs)["yes_ratio"]


# ------------------------------------------------------------------------------------------------ GQA, TextVQA
def gqa_results(doc, results):
    return {"exact_match": scoring.exact_match(_prediction(results), doc["answer"])}


def textvqa_results(doc, results):
    return {"vqa_accuracy": scoring.vqa_accuracy(_prediction(results), doc["answers"])}


# ---------------------------------------------------------------------------------------- ScienceQA, MMBench
def choice_results(doc, results):
    return {"accuracy": float(scoring.choice_letter(_prediction(results), doc["options"]) == doc["answer"])}


def circular_choice_results(doc, results):
    """Also (question id, correct) for the circular accuracy: the rotations of one question share its id."""
    correct = choice_results(doc, results)["accuracy"]
    return {"accuracy": correct, "circular_accuracy": (doc["question_id"], correct)}


def circular_accuracy(items):
    return scoring.circular_accuracy(items)


# ---------------------------------------------------------------------------------------------------------- MME
def mme_results(doc, results):
    item = (doc["category"], doc["image_id"], scoring.mme_answer(_prediction(results)) == doc["answer"])
    return {"perception": item, "cognition": item}


def mme_perception(items):
    return scoring.mme_totals(scoring.mme_category_scores(items))["perception"]


def mme_cognition(items):
    return scoring.mme_totals(scoring.mme_category_scores(items))["cognition"]


# ---------------------------------------------------------------------------------------------------- MMLU (CSV)
def mmlu_text(doc):
    """lm-eval's MMLU prompt: the question, the lettered options, 'Answer:'."""
    options = "".join(f"\n{scoring.LETTERS[k]}. {option.strip()}" for k, option in enumerate(doc["options"]))
    return doc["question"].strip() + options + "\nAnswer:"


# ------------------------------------------------------------------------------------------ the tiny world's probes
def tiny_probe_results(doc, results):
    """Exact match after pipeline/evaluation.py's normalise, as the native evaluator scores (tiny_probes.py)."""
    return tiny_probes.results(doc, _prediction(results))


tiny_colour_accuracy, tiny_count_accuracy = tiny_probes.colour_accuracy, tiny_probes.count_accuracy
tiny_position_accuracy, tiny_shape_accuracy = tiny_probes.position_accuracy, tiny_probes.shape_accuracy
tiny_yesno_accuracy, tiny_digit_accuracy = tiny_probes.yesno_accuracy, tiny_probes.digit_accuracy
tiny_visual_score = tiny_probes.visual_score
tiny_vqa_accuracy, tiny_digits_accuracy = tiny_probes.vqa_accuracy, tiny_probes.digits_accuracy
