"""Reading each shipped benchmark from its published files (the layout under the benchmarks data_dir is in
pipeline/benchmarks/catalog.py and docs/benchmarks.md) into plain records, one per question, that the lm-eval task
definitions under pipeline/benchmarks/tasks turn into prompts. Images stay on disk (a path) or in the TSV (base64)
until a question is asked, so loading a benchmark decodes no image. Torch-free.

A record the published format does not allow (a missing field, an unknown answer) is a BenchmarkDataError naming the
file and the record."""

from __future__ import annotations

import base64
import csv
import io
import json
import sys
from pathlib import Path

from pipeline.benchmarks import catalog, scoring
from pipeline.errors import ProjectError


class BenchmarkDataError(ProjectError, ValueError):
    """A benchmark file that is not in its published format; the message names the file and the record."""


def _read_json(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise BenchmarkDataError(f"{path} is missing") from None
    except (ValueError, UnicodeDecodeError) as err:
        raise BenchmarkDataError(f"{path} is not valid JSON: {err}") from None


def _field(record: dict, key: str, path: Path, where: str):
    if key not in record:
        raise BenchmarkDataError(f"{path}: record {where} has no field {key!r}")
    return record[key]


def open_image(record: dict):
    """The record's image as an RGB PIL image (from `image_path`, or base64 `image_base64`)."""
    from PIL import Image

    if record.get("image_base64"):
        image = Image.open(io.BytesIO(base64.b64decode(record["image_base64"])))
    else:
        image = Image.open(record["image_path"])
    return image.convert("RGB")


# ------------------------------------------------------------------------------------------------------------ POPE
def _jsonl(path: Path):
    """(line number, parsed object) for each non-blank line of a JSON-lines file; a missing file or a line that is not
    JSON is a BenchmarkDataError naming the file (and line)."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise BenchmarkDataError(f"{path} is missing") from None
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            yield number, json.loads(line)
        except ValueError as err:
            raise BenchmarkDataError(f"{path}: line {number} is not JSON: {err}") from None


def load_pope(data_dir: Path, split: str) -> list[dict]:
    """POPE (github.com/RUCAIBox/POPE, output/coco/coco_pope_<split>.json): one JSON object per line, {question_id,
    image, text, label}; the images are COCO val2014's."""
    root = Path(data_dir) / "pope"
    path = root / f"coco_pope_{split}.json"
    records = []
    for number, raw in _jsonl(path):
        label = str(_field(raw, "label", path, f"on line {number}")).strip().lower()
        if label not in ("yes", "no"):
            raise BenchmarkDataError(f"{path}: line {number}: label must be yes or no, got {label!r}")
        records.append({
            "question_id": str(_field(raw, "question_id", path, f"on line {number}")),
            "image_path": str(root / "val2014" / _field(raw, "image", path, f"on line {number}")),
            "question": _field(raw, "text", path, f"on line {number}"), "answer": label, "split": split,
        })
    return records


# ------------------------------------------------------------------------------------------------------------- GQA
def load_gqa(data_dir: Path) -> list[dict]:
    """GQA testdev-balanced (cs.stanford.edu/people/dorarad/gqa): testdev_balanced_questions.json, {question id:
    {imageId, question, answer, ...}}; images/<imageId>.jpg."""
    root = Path(data_dir) / "gqa"
    path = root / "testdev_balanced_questions.json"
    questions = _read_json(path)
    if not isinstance(questions, dict):
        raise BenchmarkDataError(f"{path}: expected an object of question id -> question")
    return [
        {"question_id": str(qid), "image_path": str(root / "images" / f"{_field(q, 'imageId', path, qid)}.jpg"),
         "question": _field(q, "question", path, qid), "answer": _field(q, "answer", path, qid)}
        for qid, q in questions.items()
    ]


# --------------------------------------------------------------------------------------------------------- TextVQA
def _list_under(path: Path, key: str) -> list:
    """The list under `key` of the JSON object in `path`; a BenchmarkDataError naming the file otherwise."""
    content = _read_json(path)
    found = content.get(key) if isinstance(content, dict) else None
    if not isinstance(found, list):
        raise BenchmarkDataError(f"{path}: expected an object with a list under {key!r}")
    return found


def load_textvqa(data_dir: Path) -> list[dict]:
    """TextVQA 0.5.1 val (textvqa.org): TextVQA_0.5.1_val.json, {"data": [{question_id, image_id, question,
    answers (10)}, ...]}; train_images/<image_id>.jpg (the val images ship with the train ones)."""
    root = Path(data_dir) / "textvqa"
    path = root / "TextVQA_0.5.1_val.json"
    data = _list_under(path, "data")
    records = []
    for k, q in enumerate(data):
        where = str(q.get("question_id", f"#{k}"))
        answers = _field(q, "answers", path, where)
        if not isinstance(answers, list) or not answers:
            raise BenchmarkDataError(f"{path}: record {where}: 'answers' must be a non-empty list")
        records.append({"question_id": where, "question": _field(q, "question", path, where), "answers": answers,
                        "image_path": str(root / "train_images" / f"{_field(q, 'image_id', path, where)}.jpg")})
    return records


# ---------------------------------------------------------------------------------------------------- ScienceQA-IMG
def load_scienceqa_img(data_dir: Path) -> list[dict]:
    """ScienceQA (scienceqa.github.io) test questions with an image: problems.json, {pid: {question, choices,
    answer (index), hint, image, split, ...}}; images/test/<pid>/<image>."""
    root = Path(data_dir) / "scienceqa"
    path = root / "problems.json"
    problems = _read_json(path)
    if not isinstance(problems, dict):
        raise BenchmarkDataError(f"{path}: expected an object of problem id -> problem")
    records = []
    for pid, p in problems.items():
        if p.get("split") != "test" or not p.get("image"):
            continue
        choices = _field(p, "choices", path, pid)
        answer = _field(p, "answer", path, pid)
        if not isinstance(answer, int) or not 0 <= answer < len(choices):
            raise BenchmarkDataError(f"{path}: problem {pid}: answer {answer!r} is not an index of its {len(choices)} choices")
        records.append({"question_id": str(pid), "question": _field(p, "question", path, pid),
                        "hint": p.get("hint") or "", "options": list(choices), "answer": scoring.LETTERS[answer],
                        "image_path": str(root / "images" / "test" / str(pid) / p["image"])})
    return records


# ---------------------------------------------------------------------------------------------------------- MMBench
def load_mmbench(data_dir: Path, circular: bool = False) -> list[dict]:
    """MMBench dev (github.com/open-compass/MMBench): mmbench_dev_20230712.tsv, columns index, question, hint, A-D,
    answer, category, image (base64), ... `circular`: each question once per rotation of its options (MMBench's
    CircularEval), the rotations sharing `question_id`."""
    path = Path(data_dir) / "mmbench" / "mmbench_dev_20230712.tsv"
    csv.field_size_limit(sys.maxsize)  # the base64 images are longer than csv's default field limit
    try:
        with path.open(encoding="utf-8", newline="") as handle:
            rows = list(csv.DictReader(handle, delimiter="\t"))
    except FileNotFoundError:
        raise BenchmarkDataError(f"{path} is missing") from None
    records = []
    for row in rows:
        where = row.get("index", "?")
        options = [row[letter] for letter in "ABCD" if row.get(letter) not in (None, "", "nan")]
        answer = _field(row, "answer", path, where)
        if answer not in scoring.LETTERS[: len(options)]:
            raise BenchmarkDataError(f"{path}: row {where}: answer {answer!r} is not one of its {len(options)} options")
        hint = row.get("hint") or ""
        rotations = range(len(options)) if circular else range(1)
        for shift in rotations:
            rotated = options[shift:] + options[:shift]
            records.append({
                "question_id": str(where), "question": _field(row, "question", path, where),
                "hint": "" if hint == "nan" else hint, "options": rotated,
                "answer": scoring.LETTERS[rotated.index(options[scoring.LETTERS.index(answer)])],
                "category": row.get("category", ""), "image_base64": _field(row, "image", path, where),
            })
    return records


# ------------------------------------------------------------------------------------------------------- SEED-Bench
def load_seedbench_img(data_dir: Path) -> list[dict]:
    """SEED-Bench (v1, huggingface.co/datasets/AILab-CVC/SEED-Bench) image questions: SEED-Bench.json, {"questions":
    [{question_id, question, choice_a..choice_d, answer (letter), data_id, data_type, question_type_id}]}, those
    with data_type 'image' (dimensions 1-9); SEED-Bench-image/<data_id> (with or without an extension)."""
    root = Path(data_dir) / "seedbench"
    path = root / "SEED-Bench.json"
    questions = _list_under(path, "questions")
    records = []
    for k, q in enumerate(questions):
        if q.get("data_type") != "image":
            continue
        where = str(q.get("question_id", f"#{k}"))
        answer = _field(q, "answer", path, where)
        if answer not in ("A", "B", "C", "D"):
            raise BenchmarkDataError(f"{path}: question {where}: answer {answer!r} is not A-D")
        data_id = str(_field(q, "data_id", path, where))
        candidates = [root / "SEED-Bench-image" / name for name in (data_id, f"{data_id}.jpg", f"{data_id}.png")]
        image = next((c for c in candidates if c.exists()), candidates[0])
        records.append({"question_id": where, "question": _field(q, "question", path, where), "hint": "",
                        "options": [_field(q, f"choice_{c}", path, where) for c in "abcd"], "answer": answer,
                        "category": str(q.get("question_type_id", "")), "image_path": str(image)})
    return records


# -------------------------------------------------------------------------------------------------------------- MME
def load_mme(data_dir: Path) -> list[dict]:
    """MME (github.com/BradyFU/Awesome-Multimodal-Large-Language-Models, MME_Benchmark_release_version): one folder
    per category; per image a .txt of question<TAB>Yes|No lines (two per image). The images and .txt files sit in
    the category folder, or in its images/ and questions_answers_YN/ (artwork, celebrity, landmark, posters, scene)."""
    root = Path(data_dir) / "mme"
    records = []
    for category in (*scoring.MME_PERCEPTION, *scoring.MME_COGNITION):
        folder = root / category
        if not folder.is_dir():
            continue  # a subset of the categories is allowed; the totals add the categories there are
        qa_dir, image_dir = (folder / "questions_answers_YN", folder / "images") if (folder / "images").is_dir() else (folder, folder)
        for txt in sorted(qa_dir.glob("*.txt")):
            images = [p for p in image_dir.glob(f"{txt.stem}.*") if p.suffix.lower() in (".jpg", ".jpeg", ".png")]
            if not images:
                raise BenchmarkDataError(f"{txt}: no image {txt.stem}.jpg/.png in {image_dir}")
            for number, line in enumerate(txt.read_text(encoding="utf-8").splitlines(), 1):
                if not line.strip():
                    continue
                question, _, answer = line.rpartition("\t")
                if answer.strip().lower() not in ("yes", "no") or not question:
                    raise BenchmarkDataError(f"{txt}: line {number} is not question<TAB>Yes|No")
                records.append({"question_id": f"{category}/{txt.stem}/{number}", "category": category,
                                "image_id": f"{category}/{txt.stem}", "image_path": str(images[0]),
                                "question": question.strip(), "answer": answer.strip().lower()})
    if not records:
        raise BenchmarkDataError(f"{root}: no MME category folder with questions (expected e.g. {root / 'existence'})")
    return records


# ------------------------------------------------------------------------------------------------------ MMLU (CSV)
def _mmlu_rows(folder: Path, suffix: str) -> list[dict]:
    records = []
    for path in sorted(folder.glob(f"*_{suffix}.csv")):
        subject = path.name[: -len(f"_{suffix}.csv")]
        with path.open(encoding="utf-8", newline="") as handle:
            for number, row in enumerate(csv.reader(handle), 1):
                if len(row) != 6 or row[5].strip() not in ("A", "B", "C", "D"):
                    raise BenchmarkDataError(f"{path}: row {number} is not question,A,B,C,D,answer (A-D)")
                records.append({"question_id": f"{subject}/{number}", "subject": subject, "question": row[0],
                                "options": row[1:5], "answer": "ABCD".index(row[5].strip())})
    return records


def load_mmlu_csv(data_dir: Path) -> dict[str, list[dict]]:
    """MMLU in its original release (github.com/hendrycks/test, data.tar): test/<subject>_test.csv and
    dev/<subject>_dev.csv (the few-shot examples), rows question,A,B,C,D,answer without a header."""
    root = Path(data_dir) / "mmlu"
    return {"test": _mmlu_rows(root / "test", "test"), "dev": _mmlu_rows(root / "dev", "dev")}


# ------------------------------------------------------------------------------------------ the tiny world's probes
def load_tiny_probes(data_dir: Path) -> list[dict]:
    """The tiny world's probes as pipeline/benchmarks/tiny_probes.py exports them from the prepared data:
    tiny_probes/probes.jsonl, one {id, set (vqa|digits), qtype, question, answer, image} a line, in the order the
    native evaluator asks them; image relative to tiny_probes/."""
    root = Path(data_dir) / "tiny_probes"
    path = root / "probes.jsonl"
    records = []
    for number, raw in _jsonl(path):
        where = f"on line {number}"
        if _field(raw, "set", path, where) not in ("vqa", "digits"):
            raise BenchmarkDataError(f"{path}: line {number}: set must be vqa or digits, got {raw['set']!r}")
        records.append({key: str(_field(raw, key, path, where)) for key in ("id", "set", "qtype", "question", "answer")}
                       | {"image_path": str(root / _field(raw, "image", path, where))})
    return records


LOADERS = {
    "pope_random": lambda d: load_pope(d, "random"), "pope_popular": lambda d: load_pope(d, "popular"),
    "pope_adversarial": lambda d: load_pope(d, "adversarial"), "gqa": load_gqa, "textvqa_val": load_textvqa,
    "scienceqa_img": load_scienceqa_img, "mmbench_dev_en": load_mmbench,
    "mmbench_dev_en_circular": lambda d: load_mmbench(d, circular=True), "mme": load_mme, "seedbench_img": load_seedbench_img,
    "mmlu_csv": load_mmlu_csv, "tiny_probes": load_tiny_probes,
}


def read(task: str, data_dir: str | Path) -> dict[str, list[dict]]:
    """A shipped task's records by split: test (and dev, the few-shot examples, where the benchmark has one). No
    question at all is a BenchmarkDataError naming the files expected."""
    if task not in LOADERS:
        raise BenchmarkDataError(f"no loader for benchmark task {task!r}; shipped: {sorted(LOADERS)}")
    splits = LOADERS[task](Path(data_dir))
    splits = splits if isinstance(splits, dict) else {"test": splits}
    if not splits["test"]:
        raise BenchmarkDataError(f"benchmark {task}: no questions under {Path(data_dir)} "
                                 f"({catalog.expected_files_line(task, data_dir)})")
    return splits


def as_dataset(task: str, data_dir: str | Path):
    """The lm-eval `custom_dataset` of a shipped task: its records (`read`) as a datasets.DatasetDict."""
    import datasets

    return datasets.DatasetDict({name: datasets.Dataset.from_list(records)
                                 for name, records in read(task, data_dir).items() if records})
