"""The tiny world's visual probes (the scene VQA questions and the digits that pipeline/evaluation.py scores) as an
lm-eval task, `tiny_probes` (tasks/tiny_probes.yaml): the same records, in the same order, as `evaluation_sets` gives
`evaluate_model`, the same prompt (the first question in the model's chat template, the image in place of
`<image>`), greedy decoding of the same number of tokens, exact match after the native `normalise`, reported per
question type and as the visual score (the mean over types). tests/unit/test_probe_equivalence.py shows that both
evaluators give the same answers and scores on the micro model. `evaluate` keeps the native path; no params list this
task by default.

The records are exported once from the prepared data, beside the other benchmarks' files:

    python -m pipeline.benchmarks.tiny_probes [--params params.yaml] [--prepared data/prepared] [--out data/benchmarks]

writes <out>/tiny_probes/probes.jsonl (one record a line: id, set, qtype, question, answer, image) and the images
(<out>/tiny_probes/images/<n>.png, RGB as the native path feeds them). Then
`run_benchmarks(model_dir, BenchmarksParams(tasks=["tiny_probes"], data_dir=<out>))`.

Torch-free at import (tasks/utils.py imports the per-question functions below)."""

from __future__ import annotations

import argparse
import json
import re
from collections import defaultdict
from pathlib import Path

TASK = "tiny_probes"
FOLDER = "tiny_probes"
RECORDS_FILE = "probes.jsonl"
SETS = ("vqa", "digits")  # evaluation_sets' visual sets, in evaluate_model's order
TYPES = ("colour", "count", "position", "shape", "yesno", "digit")  # data.QTYPES + the digits' type
METRICS = (*TYPES, "visual_score", "vqa_accuracy", "digits_accuracy")
TASK_YAML = Path(__file__).resolve().parent / "tasks" / "tiny_probes.yaml"


class ProbeExportError(ValueError):
    """The probes cannot be exported as the task would score them (e.g. another max_new_tokens)."""


def max_gen_toks() -> int:
    """The tokens the task decodes (tasks/tiny_probes.yaml: generation_kwargs.max_gen_toks)."""
    match = re.search(r"^\s*max_gen_toks:\s*(\d+)\s*$", TASK_YAML.read_text(encoding="utf-8"), re.MULTILINE)
    if match is None:
        raise ProbeExportError(f"{TASK_YAML} sets no generation_kwargs.max_gen_toks")
    return int(match.group(1))


# ---------------------------------------------------------------------------------------------------------- export
def export(sets: dict, data_dir: str | Path, *, max_new_tokens: int | None = None) -> Path:
    """Write the visual sets of `sets` (evaluation.evaluation_sets: "vqa" then "digits", each in its order) under
    `data_dir`/tiny_probes; returns the records file. `max_new_tokens` (the evaluate params'): refused unless the
    task decodes as many tokens, so its scores stay comparable with the native ones."""
    from pipeline.data.images import to_rgb
    from pipeline.storage import atomic_dir

    if max_new_tokens is not None and max_new_tokens != max_gen_toks():
        raise ProbeExportError(f"evaluate.max_new_tokens is {max_new_tokens} but the {TASK} task decodes "
                               f"{max_gen_toks()} tokens ({TASK_YAML}: generation_kwargs.max_gen_toks)")
    out = Path(data_dir) / FOLDER
    with atomic_dir(out) as tmp:
        (tmp / "images").mkdir()
        lines = []
        for set_name in SETS:
            for record in sets[set_name]:
                if record.get("image") is None:
                    raise ProbeExportError(f"record {record['id']} of the {set_name} set has no image")
                image = f"images/{len(lines):06d}.png"
                to_rgb(record["image"]).save(tmp / image, format="PNG")  # lossless: the pixels the native path sees
                human, gpt = record["conversations"][0], record["conversations"][1]
                lines.append(json.dumps({"id": record["id"], "set": set_name, "qtype": record["qtype"],
                                         "question": human["value"], "answer": gpt["value"], "image": image}))
        (tmp / RECORDS_FILE).write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return out / RECORDS_FILE


# ---------------------------------------------------------------------------------------- per question, aggregated
def results(doc: dict, prediction: str) -> dict:
    """lm-eval's process_results: every metric gets (set, qtype, hit), hit as evaluation.visual_accuracy counts it."""
    from pipeline.evaluation import normalise

    item = (doc["set"], doc["qtype"], int(normalise(prediction) == normalise(doc["answer"])))
    return {metric: item for metric in METRICS}


def _per_type(items) -> dict[str, float]:
    """evaluate_model's per_type: per set, the types in sorted order, then the union (vqa first, digits after)."""
    hits: dict[str, dict[str, list[int]]] = defaultdict(lambda: defaultdict(list))
    for set_name, qtype, hit in items:
        hits[set_name][qtype].append(hit)
    per_type: dict[str, float] = {}
    for set_name in SETS:
        per_type |= {q: sum(v) / len(v) for q, v in sorted(hits[set_name].items())}
    return per_type


def type_accuracy(items, qtype: str) -> float:
    return _per_type(items).get(qtype, float("nan"))


def visual_score(items) -> float:
    """The mean over question types, digits included (evaluate_model's visual_score)."""
    per_type = _per_type(items)
    return sum(per_type.values()) / len(per_type) if per_type else float("nan")


def set_accuracy(items, set_name: str) -> float:
    """The share right over one set, whatever the type (evaluate_model's vqa_accuracy / digits_accuracy)."""
    hits = [hit for s, _, hit in items if s == set_name]
    return sum(hits) / max(1, len(hits))


# lm-eval's aggregations, one per metric (tasks/utils.py re-exports them for tasks/tiny_probes.yaml)
def _aggregation(score, key: str):
    def aggregate(items):
        return score(items, key)

    aggregate.__name__ = f"{key}_accuracy"
    return aggregate


colour_accuracy, count_accuracy, position_accuracy, shape_accuracy, yesno_accuracy, digit_accuracy = (
    _aggregation(type_accuracy, qtype) for qtype in TYPES)
vqa_accuracy, digits_accuracy = (_aggregation(set_accuracy, set_name) for set_name in SETS)


# ------------------------------------------------------------------------------------------------------------- CLI
def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(prog="python -m pipeline.benchmarks.tiny_probes", description=__doc__.split("\n\n")[0])
    parser.add_argument("--params", default="params.yaml", help="the params whose evaluate section sizes the sets")
    parser.add_argument("--prepared", default="data/prepared", help="the prepared data (stage prepare)")
    parser.add_argument("--out", default="data/benchmarks", help="the benchmarks data_dir")
    args = parser.parse_args(argv)

    import datasets

    from pipeline import config, data, evaluation

    params = config.load(args.params)
    prepared = {name: datasets.load_from_disk(str(Path(args.prepared) / name))
                for name in (data.VISUAL_DIR, data.TEXT_DIR, data.TEXT_QA_DIR)}
    sets = evaluation.evaluation_sets(prepared[data.VISUAL_DIR], prepared[data.TEXT_DIR], prepared[data.TEXT_QA_DIR],
                                      params.evaluate)
    path = export(sets, args.out, max_new_tokens=params.evaluate.max_new_tokens)
    print(f"{path}: {len(sets['vqa'])} VQA and {len(sets['digits'])} digit probes")
    return path


if __name__ == "__main__":
    main()
