"""A handful of records per shipped benchmark, written in its published format and layout under a benchmarks
data_dir (pipeline/benchmarks/catalog.py, docs/benchmarks.md), with small images drawn by PIL: for the loader, task
and stage tests."""

from __future__ import annotations

import base64
import csv
import io
import json
from pathlib import Path

from PIL import Image, ImageDraw

COLOURS = {"red": (220, 30, 30), "blue": (30, 60, 220), "green": (30, 180, 60)}


def draw(colour: str, size: int = 32) -> Image.Image:
    """A grey image with a filled circle of `colour`."""
    image = Image.new("RGB", (size, size), (128, 128, 128))
    ImageDraw.Draw(image).ellipse((size // 4, size // 4, 3 * size // 4, 3 * size // 4), fill=COLOURS[colour])
    return image


def write_pope(root: Path, n: int = 4) -> None:
    """coco_pope_<split>.json (one JSON object per line) and val2014/ images, for the three splits."""
    folder = root / "pope"
    (folder / "val2014").mkdir(parents=True, exist_ok=True)
    for split in ("random", "popular", "adversarial"):
        lines = []
        for k in range(n):
            name = f"COCO_val2014_{k:012d}.jpg"
            draw(list(COLOURS)[k % 3]).save(folder / "val2014" / name)
            lines.append(json.dumps({"question_id": k + 1, "image": name, "text": f"Is there a {['circle', 'dog'][k % 2]} in the image?",
                                     "label": ["yes", "no"][k % 2]}))
        (folder / f"coco_pope_{split}.json").write_text("\n".join(lines) + "\n", encoding="utf-8")


def write_gqa(root: Path, n: int = 4) -> None:
    folder = root / "gqa"
    (folder / "images").mkdir(parents=True, exist_ok=True)
    questions = {}
    for k in range(n):
        colour = list(COLOURS)[k % 3]
        draw(colour).save(folder / "images" / f"n{k}.jpg")
        questions[f"2010{k}"] = {"imageId": f"n{k}", "question": "What colour is the circle?", "answer": colour,
                                 "fullAnswer": f"The circle is {colour}.", "isBalanced": True}
    (folder / "testdev_balanced_questions.json").write_text(json.dumps(questions), encoding="utf-8")


def write_textvqa(root: Path, n: int = 4) -> None:
    folder = root / "textvqa"
    (folder / "train_images").mkdir(parents=True, exist_ok=True)
    data = []
    for k in range(n):
        colour = list(COLOURS)[k % 3]
        draw(colour).save(folder / "train_images" / f"img{k}.jpg")
        data.append({"question_id": 34602 + k, "image_id": f"img{k}", "question": "what colour is it?",
                     "answers": [colour] * 7 + ["grey"] * 3, "set_name": "val", "image_classes": ["circle"]})
    (folder / "TextVQA_0.5.1_val.json").write_text(
        json.dumps({"dataset_type": "val", "dataset_name": "textvqa", "dataset_version": "0.5.1", "data": data}), encoding="utf-8")


def write_scienceqa(root: Path, n: int = 4) -> None:
    """problems.json with n test questions with an image, plus one without an image and one train question (both
    left out of ScienceQA-IMG)."""
    folder = root / "scienceqa"
    problems = {}
    for k in range(n):
        pid = str(100 + k)
        (folder / "images" / "test" / pid).mkdir(parents=True, exist_ok=True)
        colour = list(COLOURS)[k % 3]
        draw(colour).save(folder / "images" / "test" / pid / "image.png")
        choices = ["red", "blue", "green"]
        problems[pid] = {"question": "Which colour is the circle?", "choices": choices, "answer": choices.index(colour),
                         "hint": "Look at the picture." if k % 2 else "", "image": "image.png", "task": "closed choice",
                         "grade": "grade2", "subject": "natural science", "split": "test"}
    problems["900"] = {"question": "Which is a mammal?", "choices": ["cat", "fish"], "answer": 0, "hint": "",
                       "image": None, "split": "test"}
    problems["901"] = {"question": "Which colour?", "choices": ["red", "blue"], "answer": 0, "hint": "",
                       "image": "image.png", "split": "train"}
    (folder / "problems.json").write_text(json.dumps(problems), encoding="utf-8")


def write_mmbench(root: Path, n: int = 4) -> None:
    """mmbench_dev_20230712.tsv with base64 images; the last row has three options (D empty)."""
    folder = root / "mmbench"
    folder.mkdir(parents=True, exist_ok=True)
    columns = ["index", "question", "hint", "A", "B", "C", "D", "answer", "category", "image", "source", "l2-category",
               "comment", "split"]
    with (folder / "mmbench_dev_20230712.tsv").open("w", encoding="utf-8", newline="") as handle:
        writer = csv.writer(handle, delimiter="\t")
        writer.writerow(columns)
        for k in range(n):
            colour = list(COLOURS)[k % 3]
            buffer = io.BytesIO()
            draw(colour).save(buffer, format="JPEG")
            options = ["red", "blue", "green", "grey"] if k < n - 1 else ["red", "blue", "green", ""]
            writer.writerow([k, "What colour is the circle?", "nan" if k % 2 else "A circle is drawn.", *options,
                             "ABC"[k % 3], "attribute_recognition", base64.b64encode(buffer.getvalue()).decode(),
                             "synthetic", "FP-S", "nan", "dev"])


def write_mme(root: Path) -> None:
    """Two perception categories (existence: images beside their .txt; artwork: images/ + questions_answers_YN/) and
    one cognition category, two images each, two questions per image."""
    folder = root / "mme"
    layouts = {"existence": False, "artwork": True, "commonsense_reasoning": False}
    for category, nested in layouts.items():
        image_dir = folder / category / ("images" if nested else "")
        qa_dir = folder / category / ("questions_answers_YN" if nested else "")
        image_dir.mkdir(parents=True, exist_ok=True)
        qa_dir.mkdir(parents=True, exist_ok=True)
        for k, colour in enumerate(("red", "blue")):
            draw(colour).save(image_dir / f"{k:04d}.jpg")
            (qa_dir / f"{k:04d}.txt").write_text(
                f"Is there a {colour} circle in this image? Please answer yes or no.\tYes\n"
                f"Is there a green circle in this image? Please answer yes or no.\tNo\n", encoding="utf-8")


def write_mmlu(root: Path, subjects: tuple[str, ...] = ("astronomy", "virology"), n: int = 3) -> None:
    """test/<subject>_test.csv and dev/<subject>_dev.csv, rows question,A,B,C,D,answer without a header."""
    for split, count in (("test", n), ("dev", 2)):
        folder = root / "mmlu" / split
        folder.mkdir(parents=True, exist_ok=True)
        for subject in subjects:
            with (folder / f"{subject}_{split}.csv").open("w", encoding="utf-8", newline="") as handle:
                writer = csv.writer(handle)
                for k in range(count):
                    writer.writerow([f"Which colour, {subject} question {k}?", "red", "blue", "green, or grey", "white", "ABCD"[k % 4]])


def write_seedbench(root: Path, n: int = 4) -> None:
    """SEED-Bench.json with n image questions and one video question (left out); images named by data_id + .jpg."""
    folder = root / "seedbench"
    (folder / "SEED-Bench-image").mkdir(parents=True, exist_ok=True)
    questions = []
    for k in range(n):
        colour = list(COLOURS)[k % 3]
        draw(colour).save(folder / "SEED-Bench-image" / f"1454426_{k}.jpg")
        questions.append({"answer": "ABC"[k % 3], "choice_a": "red", "choice_b": "blue", "choice_c": "green",
                          "choice_d": "grey", "data_id": f"1454426_{k}", "data_type": "image",
                          "question": "What colour is the circle?", "question_id": str(101669 + k), "question_type_id": 3})
    questions.append({"answer": "A", "choice_a": "open", "choice_b": "close", "choice_c": "push", "choice_d": "pull",
                      "data_id": "v_1.mp4", "data_type": "video", "question": "What happens?", "question_id": "9",
                      "question_type_id": 10})
    (folder / "SEED-Bench.json").write_text(json.dumps({"question_type": {"Instance Attributes": 3}, "questions": questions}),
                                            encoding="utf-8")


def write_all(root: Path) -> Path:
    """Every shipped benchmark under `root`; returns `root`."""
    for write in (write_pope, write_gqa, write_textvqa, write_scienceqa, write_mmbench):
        write(root)
    write_mme(root)
    write_mmlu(root)
    write_seedbench(root)
    return root
