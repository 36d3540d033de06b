"""Offline, deterministic data preparation for the visual-region pipeline.

Everything is generated locally (no network) from a seed:

* synthetic shape scenes drawn with Pillow (captions for stage-1 projector
  pretraining, VQA for stage-2 instruction tuning and a held-out VQA test set),
* the 8x8 handwritten digits bundled with scikit-learn,
* a text corpus made of the CPython ``pydoc_data`` documentation topics,
* a small text QA set of memorisable facts (used to measure forgetting).

Optionally, a dataset in LLaVA format (JSON list or JSONL) is validated and
imported into the same unified visual record schema::

    {"id": str, "image": datasets.Image(), "qtype": str,
     "conversations": [{"from": "human"|"gpt", "value": str}, ...]}

The first human turn of every visual record starts with ``"<image>\\n"``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import logging
import os
import random
import re
import shutil
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import datasets
import numpy as np
from PIL import Image, ImageDraw

from pipeline import storage

logger = logging.getLogger(__name__)

IMAGE_TOKEN = "<image>"

# ---------------------------------------------------------------------------
# Schema
# ---------------------------------------------------------------------------

VISUAL_FEATURES = datasets.Features(
    {
        "id": datasets.Value("string"),
        "image": datasets.Image(),
        "conversations": datasets.List(
            {"from": datasets.Value("string"), "value": datasets.Value("string")}
        ),
        "qtype": datasets.Value("string"),
    }
)
TEXT_FEATURES = datasets.Features({"text": datasets.Value("string")})
TEXT_QA_FEATURES = datasets.Features(
    {
        "question": datasets.Value("string"),
        "answer": datasets.Value("string"),
        "qtype": datasets.Value("string"),
    }
)

VISUAL_DIR = "visual"
TEXT_DIR = "text"
TEXT_QA_DIR = "text_qa"
MANIFEST_FILE = "manifest.json"
VISUAL_SPLITS = ("caption_train", "instruct_train", "vqa_test", "digits_test")
VISION_PAIRS_SPLIT = "vision_pairs"  # only when DataConfig.vision_pairs > 0
IMPORTED_SPLIT = "imported"
TEXT_SPLITS = ("train", "test")


class DataError(ValueError):
    """Invalid input data. The message names the file, record and field."""

    def __init__(
        self,
        message: str,
        *,
        path: str | None = None,
        index: int | None = None,
        record_id: str | None = None,
        field: str | None = None,
        reason: str = "invalid",
    ) -> None:
        super().__init__(message)
        self.path = path
        self.index = index
        self.record_id = record_id
        self.field = field
        self.reason = reason


# ---------------------------------------------------------------------------
# Configuration
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class DataConfig:
    seed: int = 0
    image_size: int = 64
    num_captions: int = 2000
    num_instruct: int = 3000
    num_vqa_test: int = 500
    digits_test_fraction: float = 0.3
    text_test_fraction: float = 0.1
    text_chunk_chars: int = 400
    text_qa_repeats: int = 10
    # Scenes told in words, with the visual questions about them, mixed into the tiny LM's pretraining (see
    # make_scene_texts). 0 for real LLMs, which already have the skill.
    scene_texts: int = 0
    # Image-text pairs for the tiny vision tower's contrastive pretraining (stage build_base, params vision_pretrain):
    # the stand-in for the web pairs CLIP and SigLIP learnt from, since the paper's encoders come pretrained. Scenes
    # with their captions, plus the training digits as "a handwritten digit N."; split `vision_pairs`, its images
    # kept out of the test splits like every training image. 0: no such split (the tower stays random).
    vision_pairs: int = 0
    # Real data in LLaVA format (e.g. LLaVA-Pretrain 558K captions, LLaVA-665K instructions). When set, the imported
    # records replace the synthetic caption_train / instruct_train split; held-out synthetic tests stay.
    pretrain_json: str | None = None
    pretrain_image_dir: str | None = None
    instruct_json: str | None = None
    instruct_image_dir: str | None = None
    llava_json: str | None = None  # an extra LLaVA-format set, imported as its own split "imported"
    llava_image_dir: str | None = None
    llava_on_error: Literal["raise", "skip"] = "raise"
    llava_image_mode: Literal["convert", "refuse"] = "convert"

    def __post_init__(self) -> None:
        if self.image_size < 16:
            raise ValueError(f"DataConfig.image_size must be >= 16, got {self.image_size}")
        for name in ("num_captions", "num_instruct", "num_vqa_test", "text_qa_repeats", "scene_texts", "vision_pairs"):
            if getattr(self, name) < 0:
                raise ValueError(f"DataConfig.{name} must be >= 0, got {getattr(self, name)}")
        for name in ("digits_test_fraction", "text_test_fraction"):
            value = getattr(self, name)
            if not 0.0 < value < 1.0:
                raise ValueError(f"DataConfig.{name} must be in (0, 1), got {value}")
        if self.text_chunk_chars < 20:
            raise ValueError(
                f"DataConfig.text_chunk_chars must be >= 20, got {self.text_chunk_chars}"
            )
        if self.llava_on_error not in ("raise", "skip"):
            raise ValueError(
                f"DataConfig.llava_on_error must be 'raise' or 'skip', got {self.llava_on_error!r}"
            )
        for prefix in ("llava", "pretrain", "instruct"):
            if getattr(self, f"{prefix}_image_dir") is not None and getattr(self, f"{prefix}_json") is None:
                raise ValueError(f"DataConfig.{prefix}_image_dir is set but {prefix}_json is not")
        if self.llava_image_mode not in ("convert", "refuse"):
            raise ValueError(f"DataConfig.llava_image_mode must be 'convert' or 'refuse', got {self.llava_image_mode!r}")

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> DataConfig:
        """Build from a mapping (e.g. params.yaml), rejecting unknown keys."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown DataConfig keys: {unknown}; known keys: {sorted(known)}")
        return cls(**values)


def _rng(seed: int, stream: str) -> random.Random:
    """Independent deterministic random stream (str seeds are hashed with SHA-512)."""
    return random.Random(f"visual-region/{seed}/{stream}")


# ---------------------------------------------------------------------------
# Synthetic scenes
# ---------------------------------------------------------------------------

SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (230, 30, 30),
    "green": (30, 190, 40),
    "blue": (40, 90, 255),
    "yellow": (245, 220, 20),
    "white": (245, 245, 245),
}
COLOURS: tuple[str, ...] = tuple(PALETTE)
BACKGROUND: tuple[int, int, int] = (0, 0, 0)
GRID = 2  # 2x2 quadrants: row 0 = top, col 0 = left
QTYPES: tuple[str, ...] = ("colour", "shape", "count", "position", "yesno")
CAPTION_PROMPTS: tuple[str, ...] = (
    "Describe the image.",
    "What is in this picture?",
    "Describe the shapes in the image.",
    "Give a short description of the image.",
)


@dataclass(frozen=True)
class Shape:
    kind: str  # one of SHAPES
    colour: str  # one of COLOURS
    row: int  # 0 = top, 1 = bottom
    col: int  # 0 = left, 1 = right
    bbox: tuple[int, int, int, int]  # (x0, y0, x1, y1) inclusive pixel box

    @property
    def horizontal(self) -> str:
        return "left" if self.col == 0 else "right"

    @property
    def vertical(self) -> str:
        return "top" if self.row == 0 else "bottom"

    @property
    def position(self) -> str:
        return f"{self.vertical} {self.horizontal}"

    @property
    def name(self) -> str:
        return f"{self.colour} {self.kind}"


def draw_scene(
    rng: random.Random, image_size: int, num_shapes: int | None = None
) -> tuple[Image.Image, list[Shape]]:
    """Draw 1-4 shapes, each inside its own quadrant (so they never overlap).

    Shapes are returned in reading order (top-left, top-right, bottom-left,
    bottom-right). Each shape spans 75-90% of its quadrant: at that size its area says which shape it is
    (a linear probe on the frozen tiny vision tower, with 32 px patches, read the shape at 0.98, against 0.79 at
    55-80%; the LM learnt to answer shape only once the tower used 16 px patches, see pipeline/model.py).
    """
    if image_size < 16:
        raise ValueError(f"image_size must be >= 16, got {image_size}")
    n = rng.randint(1, GRID * GRID) if num_shapes is None else num_shapes
    if not 1 <= n <= GRID * GRID:
        raise ValueError(f"num_shapes must be in 1..{GRID * GRID}, got {n}")
    cells = sorted(rng.sample(range(GRID * GRID), n))
    cell = image_size / GRID
    img = Image.new("RGB", (image_size, image_size), BACKGROUND)
    draw = ImageDraw.Draw(img)
    shapes: list[Shape] = []
    for c in cells:
        row, col = divmod(c, GRID)
        kind = rng.choice(SHAPES)
        colour = rng.choice(COLOURS)
        side = max(4, int(round(cell * rng.uniform(0.75, 0.9))))
        slack = int(cell) - side - 2  # keep at least 1px margin on each side
        x0 = int(col * cell) + 1 + rng.randint(0, max(0, slack))
        y0 = int(row * cell) + 1 + rng.randint(0, max(0, slack))
        x1, y1 = x0 + side - 1, y0 + side - 1
        fill = PALETTE[colour]
        if kind == "circle":
            draw.ellipse((x0, y0, x1, y1), fill=fill)
        elif kind == "square":
            draw.rectangle((x0, y0, x1, y1), fill=fill)
        else:  # triangle pointing up
            draw.polygon([((x0 + x1) / 2, y0), (x0, y1), (x1, y1)], fill=fill)
        shapes.append(Shape(kind, colour, row, col, (x0, y0, x1, y1)))
    return img, shapes


def png_bytes(img: Image.Image) -> bytes:
    """Deterministic PNG encoding (no metadata, no timestamps)."""
    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=False)
    return buf.getvalue()


def describe_scene(shapes: list[Shape]) -> str:
    """Caption such as 'a red circle on the top left and a blue square on the bottom right.'"""
    if not shapes:
        raise ValueError("cannot describe an empty scene")
    parts = [f"a {s.name} on the {s.position}" for s in shapes]
    if len(parts) == 1:
        text = parts[0]
    else:
        text = ", ".join(parts[:-1]) + " and " + parts[-1]
    return text + "."


def _visual_record(rec_id: str, image: bytes, question: str, answer: str, qtype: str) -> dict:
    return {
        "id": rec_id,
        "image": {"bytes": image, "path": None},
        "conversations": [
            {"from": "human", "value": f"{IMAGE_TOKEN}\n{question}"},
            {"from": "gpt", "value": answer},
        ],
        "qtype": qtype,
    }


def make_caption_record(rng: random.Random, image_size: int, rec_id: str) -> dict:
    img, shapes = draw_scene(rng, image_size)
    prompt = rng.choice(CAPTION_PROMPTS)
    return _visual_record(rec_id, png_bytes(img), prompt, describe_scene(shapes), "caption")


def digit_caption(digit: int) -> str:
    return f"a handwritten digit {digit}."


def make_question(
    rng: random.Random, shapes: list[Shape], qtype: str, *, yes: bool | None = None
) -> tuple[str, str] | None:
    """Return (question, answer) about the scene, or None if qtype is not askable unambiguously.

    For ``yesno``, ``yes`` selects the answer (random when None).
    """
    # Colour, shape, position and yes/no are asked of one-shape scenes; only count sees several shapes. Questions
    # that single out one of several shapes ("the shape on the top left") need the LM to bind a phrase to an image
    # region, which the tiny model does not learn within the repro budget: every such type stayed at chance.
    if qtype == "count":
        return "How many shapes are there?", str(len(shapes))
    if qtype not in QTYPES:
        raise ValueError(f"unknown question type {qtype!r}; expected one of {QTYPES}")
    if len(shapes) != 1:
        return None
    (s,) = shapes
    if qtype == "colour":
        return "What colour is the shape?", s.colour
    if qtype == "shape":
        return "What shape is in the image?", s.kind
    if qtype == "position":
        return "Where is the shape?", s.position
    answer_yes = rng.random() < 0.5 if yes is None else yes
    asked = s.colour if answer_yes else rng.choice([c for c in COLOURS if c != s.colour])
    return f"Is the shape {asked}?", "yes" if answer_yes else "no"
    raise ValueError(f"unknown question type {qtype!r}; expected one of {QTYPES}")


def make_vqa_record(
    rng: random.Random,
    image_size: int,
    rec_id: str,
    qtype: str,
    *,
    yes: bool | None = None,
    exclude_images: set[bytes] | None = None,
    max_tries: int = 1000,
) -> dict:
    """Draw scenes until one admits an unambiguous question of ``qtype``.

    ``exclude_images`` holds SHA-256 digests of PNGs that must not be reused
    (keeps the held-out test set disjoint from training images).
    """
    for _ in range(max_tries):
        img, shapes = draw_scene(rng, image_size, None if qtype == "count" else 1)
        qa = make_question(rng, shapes, qtype, yes=yes)
        if qa is None:
            continue
        data = png_bytes(img)
        if exclude_images is not None and hashlib.sha256(data).digest() in exclude_images:
            continue
        return _visual_record(rec_id, data, qa[0], qa[1], qtype)
    raise RuntimeError(f"could not draw a scene for question type {qtype!r} in {max_tries} tries")


def make_vqa_records(
    rng: random.Random,
    n: int,
    image_size: int,
    id_prefix: str,
    *,
    exclude_images: set[bytes] | None = None,
) -> list[dict]:
    """``n`` VQA records balanced across QTYPES (counts differ by at most 1), yes/no 50/50."""
    qtypes = [QTYPES[i % len(QTYPES)] for i in range(n)]
    rng.shuffle(qtypes)
    num_yesno = qtypes.count("yesno")
    yes_flags = [i % 2 == 0 for i in range(num_yesno)]
    rng.shuffle(yes_flags)
    records = []
    for i, qtype in enumerate(qtypes):
        yes = yes_flags.pop() if qtype == "yesno" else None
        records.append(
            make_vqa_record(
                rng, image_size, f"{id_prefix}-{i:06d}", qtype, yes=yes,
                exclude_images=exclude_images,
            )
        )
    return records


# LLaVA-1.5's conversation format ("vicuna_v1" without the system prompt), for instructions and scene texts alike
# (pipeline.model.prompt_text); answers end with the EOS token.
PROMPT_TEMPLATE = "USER: {question} ASSISTANT:"


def make_scene_texts(rng: random.Random, n: int) -> list[str]:
    """``n`` visual questions about scenes told in words instead of shown, in the chat format of the instructions:
    'USER: a red circle on the top left.\nWhat colour is the shape? ASSISTANT: red'. A real LLM can already answer
    a question about a scene it is told; visual tuning only has to bring what the image shows into that skill, which
    is the paper's premise. The tiny LM learns the skill from these texts (question types balanced, digits included)."""
    qtypes = QTYPES + ("digit",)
    texts = []
    for i in range(n):
        qtype = qtypes[i % len(qtypes)]
        if qtype == "digit":
            digit = rng.randrange(10)
            scene, question, answer = digit_caption(digit), DIGIT_PROMPT, str(digit)
        else:
            _, shapes = draw_scene(rng, 16, None if qtype == "count" else 1)  # the same scenes, image unused
            scene = describe_scene(shapes)
            question, answer = make_question(rng, shapes, qtype)
        prompt = PROMPT_TEMPLATE.format(question=f"{scene}\n{question}")
        texts.append(f"{prompt} {answer}")
    return texts


# ---------------------------------------------------------------------------
# Digits (scikit-learn, bundled, no download)
# ---------------------------------------------------------------------------

DIGIT_PROMPT = "What digit is this?"


def digit_image(pixels: np.ndarray, image_size: int) -> Image.Image:
    """8x8 array of 0..16 (ink high) -> RGB image_size x image_size, white ink on black."""
    arr = np.clip(np.rint(np.asarray(pixels, dtype=np.float64) * (255.0 / 16.0)), 0, 255)
    small = Image.fromarray(arr.astype(np.uint8))
    return small.resize((image_size, image_size), Image.Resampling.NEAREST).convert("RGB")


def split_indices(n: int, test_fraction: float, rng: random.Random) -> tuple[list[int], list[int]]:
    """Seeded permutation split -> (train, test), both sorted; test has round(n*f) >= 1 items."""
    if n < 2:
        raise ValueError(f"need at least 2 items to split, got {n}")
    perm = list(range(n))
    rng.shuffle(perm)
    n_test = min(n - 1, max(1, int(round(n * test_fraction))))
    return sorted(perm[n_test:]), sorted(perm[:n_test])


def make_digit_records(
    seed: int, image_size: int, test_fraction: float
) -> tuple[list[dict], list[dict]]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    train_idx, test_idx = split_indices(len(digits.target), test_fraction, _rng(seed, "digits"))

    def record(i: int) -> dict:
        img = digit_image(digits.images[i], image_size)
        return _visual_record(
            f"digit-{i:04d}", png_bytes(img), DIGIT_PROMPT, str(int(digits.target[i])), "digit"
        )

    return [record(i) for i in train_idx], [record(i) for i in test_idx]


# ---------------------------------------------------------------------------
# Text corpus (CPython pydoc topics) and text QA
# ---------------------------------------------------------------------------


def split_paragraphs(text: str) -> list[str]:
    """Blank-line-separated paragraphs, stripped, empty ones dropped."""
    return [p.strip() for p in re.split(r"\n\s*\n", text) if p.strip()]


def pack_paragraphs(paragraphs: list[str], max_chars: int) -> list[str]:
    """Pack paragraphs (joined by a blank line) into chunks of at most ``max_chars``.

    Paragraphs longer than ``max_chars`` are split at whitespace (hard cut if none).
    """
    if max_chars < 1:
        raise ValueError(f"max_chars must be >= 1, got {max_chars}")
    pieces: list[str] = []
    for para in paragraphs:
        para = para.strip()
        while len(para) > max_chars:
            cut = max(para.rfind(" ", 0, max_chars + 1), para.rfind("\n", 0, max_chars + 1))
            if cut <= 0:
                cut = max_chars
            pieces.append(para[:cut].rstrip())
            para = para[cut:].lstrip()
        if para:
            pieces.append(para)
    chunks: list[str] = []
    current = ""
    for piece in pieces:
        if current and len(current) + 2 + len(piece) <= max_chars:
            current = f"{current}\n\n{piece}"
        else:
            if current:
                chunks.append(current)
            current = piece
    if current:
        chunks.append(current)
    return chunks


def chunk_text(text: str, max_chars: int) -> list[str]:
    """Split ``text`` into paragraph-aligned chunks of at most ``max_chars``."""
    return pack_paragraphs(split_paragraphs(text), max_chars)


def load_pydoc_topics() -> dict[str, str]:
    from pydoc_data.topics import topics

    return {name: topics[name] for name in sorted(topics)}


def split_text_documents(
    seed: int, test_fraction: float
) -> tuple[list[str], list[str]]:
    """Split pydoc topic names (sorted, then seeded shuffle) -> (train_names, test_names)."""
    names = sorted(load_pydoc_topics())
    train_idx, test_idx = split_indices(len(names), test_fraction, _rng(seed, "text-split"))
    return [names[i] for i in train_idx], [names[i] for i in test_idx]


_NUMBER_WORDS = (
    "zero one two three four five six seven eight nine ten eleven twelve thirteen "
    "fourteen fifteen sixteen seventeen eighteen nineteen twenty"
).split()

_OPPOSITES = (
    ("up", "down"), ("left", "right"), ("hot", "cold"), ("big", "small"),
    ("open", "closed"), ("day", "night"), ("black", "white"), ("fast", "slow"),
    ("wet", "dry"), ("in", "out"), ("yes", "no"), ("true", "false"),
    ("high", "low"), ("full", "empty"), ("happy", "sad"), ("north", "south"),
    ("east", "west"), ("first", "last"), ("top", "bottom"), ("push", "pull"),
    ("early", "late"), ("rich", "poor"), ("thick", "thin"), ("buy", "sell"),
)

_FACTS = (
    ("What colour is the sky?", "blue"),
    ("What colour is grass?", "green"),
    ("What colour is snow?", "white"),
    ("How many legs does a spider have?", "eight"),
    ("How many legs does a dog have?", "four"),
    ("How many days are in a week?", "seven"),
    ("How many months are in a year?", "twelve"),
    ("What is the capital of France?", "paris"),
    ("What is the capital of Japan?", "tokyo"),
    ("What is the capital of Italy?", "rome"),
    ("What is the capital of Germany?", "berlin"),
    ("What is the capital of Spain?", "madrid"),
    ("What planet do we live on?", "earth"),
    ("What is frozen water called?", "ice"),
    ("What animal says moo?", "cow"),
    ("What animal says woof?", "dog"),
    ("What animal says meow?", "cat"),
    ("What do bees make?", "honey"),
    ("What is the first letter of the alphabet?", "a"),
    ("What is the last letter of the alphabet?", "z"),
    ("What is two plus two?", "four"),
    ("What is three plus four?", "seven"),
    ("What is ten minus one?", "nine"),
    ("What gas do we breathe to live?", "oxygen"),
    ("What is the largest ocean?", "pacific"),
    ("What is the closest star to the earth?", "sun"),
    ("What programming language is this documentation about?", "python"),
)


def make_text_qa() -> list[dict[str, str]]:
    """Fixed list of simple facts (deterministic, no randomness)."""
    rows: list[dict[str, str]] = []
    for i in range(len(_NUMBER_WORDS) - 1):
        rows.append({
            "question": f"What number comes after {_NUMBER_WORDS[i]}?",
            "answer": _NUMBER_WORDS[i + 1],
            "qtype": "successor_word",
        })
    for i in range(50):
        rows.append({
            "question": f"What number comes after {i}?",
            "answer": str(i + 1),
            "qtype": "successor_digit",
        })
    for a, b in _OPPOSITES:
        rows.append({"question": f"What is the opposite of {a}?", "answer": b, "qtype": "opposite"})
    for q, a in _FACTS:
        rows.append({"question": q, "answer": a, "qtype": "fact"})
    questions = [r["question"] for r in rows]
    assert len(set(questions)) == len(questions), "duplicate text QA question"
    return rows


def text_qa_prompt(question: str) -> str:
    """Prompt used to query the LM; the model should continue with ' <answer>'."""
    return f"Question: {question} Answer:"


def text_qa_as_text(question: str, answer: str) -> str:
    """Exact string mixed into the pretraining corpus: 'Question: ... Answer: ...'."""
    return f"{text_qa_prompt(question)} {answer}"


# ---------------------------------------------------------------------------
# LLaVA-format importer
# ---------------------------------------------------------------------------

_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")


@dataclass
class ImportReport:
    source: str
    imported: int = 0
    skipped: dict[str, int] = field(default_factory=dict)
    messages: list[str] = field(default_factory=list)
    converted_modes: dict[str, int] = field(default_factory=dict)

    @property
    def num_skipped(self) -> int:
        return sum(self.skipped.values())


def to_rgb(img: Image.Image) -> Image.Image:
    """Convert any supported mode to 8-bit RGB. 16/32-bit integer modes are treated as
    0..65535 and scaled to 0..255 (value / 257, rounded); float 'F' as 0..1 if max <= 1,
    else clipped to 0..255."""
    if img.mode == "RGB":
        return img
    if img.mode in _SIXTEEN_BIT_MODES:
        arr = np.asarray(img).astype(np.float64)
        arr8 = np.rint(np.clip(arr, 0, 65535) / 257.0).astype(np.uint8)
        return Image.fromarray(arr8).convert("RGB")
    if img.mode == "F":
        arr = np.asarray(img).astype(np.float64)
        if arr.size and np.nanmax(arr) <= 1.0:
            arr = arr * 255.0
        arr8 = np.rint(np.clip(np.nan_to_num(arr), 0, 255)).astype(np.uint8)
        return Image.fromarray(arr8).convert("RGB")
    return img.convert("RGB")  # L, LA, P, PA, RGBA, CMYK, 1, YCbCr, LAB, HSV


class _Ctx:
    """Formats DataErrors for one record."""

    def __init__(self, path: Path, index: int, line: int | None) -> None:
        self.path = path
        self.index = index
        self.line = line
        self.record_id: str | None = None

    def error(self, field_name: str, reason: str, problem: str) -> DataError:
        where = f"record {self.index}"
        if self.line is not None:
            where += f" (line {self.line})"
        rid = "<missing>" if self.record_id is None else repr(self.record_id)
        msg = f"{self.path}: {where}, id={rid}, field '{field_name}': {problem} [{reason}]"
        return DataError(
            msg, path=str(self.path), index=self.index, record_id=self.record_id,
            field=field_name, reason=reason,
        )


def _read_llava_file(path: Path) -> list[tuple[int | None, Any] | DataError]:
    """Return [(line_or_None, raw_record) | DataError(malformed line)] in file order."""
    if not path.is_file():
        raise DataError(f"{path}: LLaVA JSON file not found", path=str(path), reason="missing_file")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(
            f"{path}: not valid UTF-8 at byte {exc.start} [malformed_json]",
            path=str(path), field="<json>", reason="malformed_json",
        ) from exc
    if path.suffix.lower() == ".jsonl":
        items: list[tuple[int | None, Any] | DataError] = []
        index = 0
        for lineno, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                items.append((lineno, json.loads(line)))
            except json.JSONDecodeError as exc:
                items.append(DataError(
                    f"{path}: record {index} (line {lineno}), id=<unknown>, field '<json>': "
                    f"malformed JSON: {exc.msg} at column {exc.colno} [malformed_json]",
                    path=str(path), index=index, field="<json>", reason="malformed_json",
                ))
            index += 1
        return items
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataError(
            f"{path}: malformed JSON at line {exc.lineno} column {exc.colno}: {exc.msg} "
            "[malformed_json]",
            path=str(path), field="<json>", reason="malformed_json",
        ) from exc
    if not isinstance(data, list):
        raise DataError(
            f"{path}: top-level JSON must be a list of records, got {type(data).__name__} "
            "[wrong_type]",
            path=str(path), field="<root>", reason="wrong_type",
        )
    return [(None, rec) for rec in data]


def _load_image(
    ctx: _Ctx, image_path: Path, image_mode: str, resize_to: int | None,
    report: ImportReport,
) -> bytes:
    if not image_path.is_file():
        raise ctx.error("image", "missing_image", f"image file not found: {image_path}")
    if image_path.stat().st_size == 0:
        raise ctx.error("image", "zero_size_image", f"image file is empty (0 bytes): {image_path}")
    try:
        with Image.open(image_path) as probe:
            probe.verify()
        with Image.open(image_path) as opened:
            opened.load()
            img = opened.copy()
    except Exception as exc:  # PIL raises many types for broken files
        raise ctx.error(
            "image", "corrupt_image", f"cannot decode image {image_path}: {exc}"
        ) from exc
    if img.width == 0 or img.height == 0:
        raise ctx.error("image", "zero_size_image", f"image has zero size {img.size}: {image_path}")
    original_mode = img.mode
    if original_mode != "RGB":
        if image_mode == "refuse":
            raise ctx.error(
                "image", "image_mode",
                f"image mode {img.mode!r} is not RGB (image_mode='refuse'): {image_path}",
            )
        try:
            img = to_rgb(img)
        except Exception as exc:
            raise ctx.error(
                "image", "image_mode", f"cannot convert mode {img.mode!r} to RGB: {exc}"
            ) from exc
        report.converted_modes[original_mode] = report.converted_modes.get(original_mode, 0) + 1
    if resize_to is not None and img.size != (resize_to, resize_to):
        img = img.resize((resize_to, resize_to), Image.Resampling.BICUBIC)
    return png_bytes(img)


def _normalise_record(
    raw: Any, ctx: _Ctx, image_dir: Path, image_mode: str, resize_to: int | None,
    report: ImportReport,
) -> dict:
    if not isinstance(raw, dict):
        raise ctx.error("<record>", "wrong_type", f"record must be an object, got {type(raw).__name__}")
    if "id" not in raw:
        raise ctx.error("id", "missing_field", "missing key 'id'")
    rid = raw["id"]
    if isinstance(rid, bool) or not isinstance(rid, (str, int)) or str(rid).strip() == "":
        raise ctx.error("id", "wrong_type", f"'id' must be a non-empty string or int, got {rid!r}")
    ctx.record_id = str(rid)
    if "conversations" not in raw:
        raise ctx.error("conversations", "missing_field", "missing key 'conversations'")
    convs = raw["conversations"]
    if not isinstance(convs, list) or not convs:
        raise ctx.error("conversations", "wrong_type", "'conversations' must be a non-empty list")
    turns: list[dict[str, str]] = []
    for t, turn in enumerate(convs):
        fname = f"conversations[{t}]"
        if not isinstance(turn, dict):
            raise ctx.error(fname, "wrong_type", f"turn must be an object, got {type(turn).__name__}")
        for key in ("from", "value"):
            if key not in turn:
                raise ctx.error(f"{fname}.{key}", "missing_field", f"missing key '{key}'")
            if not isinstance(turn[key], str):
                raise ctx.error(
                    f"{fname}.{key}", "wrong_type",
                    f"'{key}' must be a string, got {type(turn[key]).__name__}",
                )
        if turn["from"] not in ("human", "gpt"):
            raise ctx.error(
                f"{fname}.from", "wrong_type", f"'from' must be 'human' or 'gpt', got {turn['from']!r}"
            )
        turns.append({"from": turn["from"], "value": turn["value"]})
    roles = [t["from"] for t in turns]
    if "human" not in roles:
        raise ctx.error("conversations", "missing_turn", "no 'human' turn")
    if "gpt" not in roles:
        raise ctx.error("conversations", "missing_turn", "no 'gpt' turn")
    for t, role in enumerate(roles):
        expected = "human" if t % 2 == 0 else "gpt"
        if role != expected:
            raise ctx.error(
                f"conversations[{t}].from", "turn_order",
                f"turns must alternate human/gpt starting with human; got {role!r} at turn {t}",
            )
    for t, turn in enumerate(turns):
        if turn["from"] == "gpt" and not turn["value"].strip():
            raise ctx.error(f"conversations[{t}].value", "empty_answer", "empty gpt answer")

    has_image = "image" in raw and raw["image"] is not None
    if has_image and (not isinstance(raw["image"], str) or not raw["image"].strip()):
        raise ctx.error("image", "wrong_type", f"'image' must be a non-empty string, got {raw['image']!r}")
    n_tokens = sum(t["value"].count(IMAGE_TOKEN) for t in turns)
    expected_tokens = 1 if has_image else 0
    if n_tokens != expected_tokens:
        raise ctx.error(
            "conversations", "image_token_mismatch",
            f"found {n_tokens} '{IMAGE_TOKEN}' tokens but the record has {expected_tokens} image(s)",
        )
    if has_image and IMAGE_TOKEN not in turns[0]["value"]:
        raise ctx.error(
            "conversations[0].value", "image_token_mismatch",
            f"'{IMAGE_TOKEN}' must be in the first human turn",
        )
    for t, turn in enumerate(turns):
        if turn["from"] == "human":
            question = turn["value"].replace(IMAGE_TOKEN, "").strip()
            if not question:
                raise ctx.error(f"conversations[{t}].value", "empty_question", "empty human question")
            turn["value"] = f"{IMAGE_TOKEN}\n{question}" if (t == 0 and has_image) else question
        else:
            turn["value"] = turn["value"].strip()

    image: dict | None = None
    if has_image:
        rel = Path(raw["image"])
        image_path = rel if rel.is_absolute() else image_dir / rel
        image = {"bytes": _load_image(ctx, image_path, image_mode, resize_to, report), "path": None}
    return {"id": ctx.record_id, "image": image, "conversations": turns, "qtype": "imported"}


def import_llava_json(
    json_path: str | os.PathLike[str],
    image_dir: str | os.PathLike[str] | None = None,
    *,
    on_error: Literal["raise", "skip"] = "raise",
    image_mode: Literal["convert", "refuse"] = "convert",
    resize_to: int | None = None,
) -> tuple[datasets.Dataset, ImportReport]:
    """Validate and import a LLaVA-format dataset (JSON list, or .jsonl one record per line).

    ``image`` paths are relative to ``image_dir`` (default: the JSON file's folder).
    Text-only records (no ``image``) are kept with image=None and must contain no
    ``<image>`` token. Images are decoded, converted to RGB (or refused when
    ``image_mode='refuse'`` and not RGB), optionally resized to ``resize_to`` and
    stored as PNG. With ``on_error='skip'`` bad records are skipped, logged and
    counted per reason in the report; otherwise the first bad record raises DataError.
    Raises DataError if no record is importable.
    """
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
    if image_mode not in ("convert", "refuse"):
        raise ValueError(f"image_mode must be 'convert' or 'refuse', got {image_mode!r}")
    path = Path(json_path)
    img_dir = Path(image_dir) if image_dir is not None else path.parent
    report = ImportReport(source=str(path))
    records: list[dict] = []
    for index, item in enumerate(_read_llava_file(path)):
        try:
            if isinstance(item, DataError):
                raise item
            line, raw = item
            ctx = _Ctx(path, index, line)
            records.append(_normalise_record(raw, ctx, img_dir, image_mode, resize_to, report))
        except DataError as err:
            if on_error == "raise":
                raise
            report.skipped[err.reason] = report.skipped.get(err.reason, 0) + 1
            report.messages.append(str(err))
            logger.warning("skipping LLaVA record: %s", err)
    report.imported = len(records)
    if not records:
        raise DataError(
            f"{path}: no valid records imported (skipped: {report.skipped})",
            path=str(path), field="<root>", reason="empty",
        )
    if report.skipped:
        logger.warning(
            "imported %d records from %s, skipped %d: %s",
            report.imported, path, report.num_skipped, report.skipped,
        )
    else:
        logger.info("imported %d records from %s", report.imported, path)
    return _visual_dataset(records), report


# ---------------------------------------------------------------------------
# Assembly and atomic writing
# ---------------------------------------------------------------------------


def _visual_dataset(records: list[dict]) -> datasets.Dataset:
    columns = {name: [r[name] for r in records] for name in VISUAL_FEATURES}
    return datasets.Dataset.from_dict(columns, features=VISUAL_FEATURES)


def _png_digests(records: list[dict]) -> set[bytes]:
    return {hashlib.sha256(r["image"]["bytes"]).digest() for r in records}


def build_visual(cfg: DataConfig) -> datasets.DatasetDict:
    s = cfg.image_size
    cap_rng = _rng(cfg.seed, "caption")
    captions = [make_caption_record(cap_rng, s, f"caption-{i:06d}") for i in range(cfg.num_captions)]
    vqa_train = make_vqa_records(_rng(cfg.seed, "vqa-train"), cfg.num_instruct, s, "vqa-train")
    digits_train, digits_test = make_digit_records(cfg.seed, s, cfg.digits_test_fraction)
    pair_rng = _rng(cfg.seed, "vision-pairs")
    pairs = [make_caption_record(pair_rng, s, f"pair-{i:06d}") for i in range(cfg.vision_pairs)]
    if pairs:
        pairs += [_visual_record(f"pair-{r['id']}", r["image"]["bytes"], CAPTION_PROMPTS[0],
                                 digit_caption(int(r["conversations"][1]["value"])), "caption") for r in digits_train]
    seen = _png_digests(captions) | _png_digests(vqa_train) | _png_digests(pairs)
    vqa_test = make_vqa_records(
        _rng(cfg.seed, "vqa-test"), cfg.num_vqa_test, s, "vqa-test", exclude_images=seen
    )
    instruct = vqa_train + digits_train
    _rng(cfg.seed, "instruct-shuffle").shuffle(instruct)
    splits = {
        "caption_train": _visual_dataset(captions),
        "instruct_train": _visual_dataset(instruct),
        "vqa_test": _visual_dataset(vqa_test),
        "digits_test": _visual_dataset(digits_test),
    }
    if pairs:
        splits[VISION_PAIRS_SPLIT] = _visual_dataset(pairs)
    real = {"caption_train": ("pretrain", None), "instruct_train": ("instruct", None), IMPORTED_SPLIT: ("llava", cfg.image_size)}
    for split, (prefix, resize_to) in real.items():
        json_path = getattr(cfg, f"{prefix}_json")
        if json_path is None:
            continue
        imported, report = import_llava_json(
            json_path, getattr(cfg, f"{prefix}_image_dir"), on_error=cfg.llava_on_error,
            image_mode=cfg.llava_image_mode, resize_to=resize_to,
        )
        logger.info("imported %s into %s: %d records, skipped %s, converted to RGB %s", json_path, split,
                    report.imported, report.skipped, report.converted_modes)
        splits[split] = imported
    return datasets.DatasetDict(splits)


def text_corpus_chunks(
    seed: int, test_fraction: float, max_chars: int
) -> tuple[list[str], list[str]]:
    """Train/test chunks of the pydoc topics, split by document.

    Many topics share whole paragraphs (e.g. 'specialnames' contains 'customization'),
    so paragraphs are deduplicated: each distinct paragraph is kept once, and any
    paragraph that occurs in a test document is removed from the training documents.
    """
    topics = load_pydoc_topics()
    train_names, test_names = split_text_documents(seed, test_fraction)
    test_paras = {p for n in test_names for p in split_paragraphs(topics[n])}
    seen: set[str] = set()

    def chunks(names: list[str], banned: set[str]) -> list[str]:
        out: list[str] = []
        for name in names:
            paras = []
            for p in split_paragraphs(topics[name]):
                if p not in banned and p not in seen:
                    seen.add(p)
                    paras.append(p)
            out += pack_paragraphs(paras, max_chars)
        return out

    test = chunks(test_names, set())
    train = chunks(train_names, test_paras)
    return train, test


def build_text(cfg: DataConfig, qa: list[dict[str, str]]) -> datasets.DatasetDict:
    train, test = text_corpus_chunks(cfg.seed, cfg.text_test_fraction, cfg.text_chunk_chars)
    train += [text_qa_as_text(r["question"], r["answer"]) for r in qa] * cfg.text_qa_repeats
    train += make_scene_texts(_rng(cfg.seed, "scene-text"), cfg.scene_texts)
    _rng(cfg.seed, "text-shuffle").shuffle(train)
    return datasets.DatasetDict({
        "train": datasets.Dataset.from_dict({"text": train}, features=TEXT_FEATURES),
        "test": datasets.Dataset.from_dict({"text": test}, features=TEXT_FEATURES),
    })


def _current_umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _swap_into_place(tmp: Path, out_dir: Path) -> None:
    """Replace out_dir by tmp; on failure out_dir is left as it was."""
    if not out_dir.exists():
        os.replace(tmp, out_dir)
        return
    backup = Path(tempfile.mkdtemp(prefix=storage.temp_prefix(out_dir, "old"), dir=out_dir.parent))
    backup.rmdir()
    os.replace(out_dir, backup)
    try:
        os.replace(tmp, out_dir)
    except BaseException:
        os.replace(backup, out_dir)
        raise
    shutil.rmtree(backup, ignore_errors=True)


def prepare_all(cfg: DataConfig, out_dir: str | os.PathLike[str]) -> dict[str, int]:
    """Build every dataset and write them atomically under ``out_dir``.

    Layout: ``visual/`` (DatasetDict: caption_train, instruct_train, vqa_test,
    digits_test[, vision_pairs][, imported]), ``text/`` (DatasetDict: train, test), ``text_qa/``
    (Dataset) and ``manifest.json`` (config + counts). Returns counts keyed
    ``"<dir>/<split>"`` (``"text_qa"`` for the QA set).
    """
    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    storage.sweep_stale(out)  # what a killed earlier run left beside out_dir
    tmp = Path(tempfile.mkdtemp(prefix=storage.temp_prefix(out), dir=out.parent))
    try:
        os.chmod(tmp, 0o777 & ~_current_umask())  # mkdtemp creates 0700
        visual = build_visual(cfg)
        qa_rows = make_text_qa()
        text = build_text(cfg, qa_rows)
        text_qa = datasets.Dataset.from_dict(
            {k: [r[k] for r in qa_rows] for k in TEXT_QA_FEATURES}, features=TEXT_QA_FEATURES
        )
        counts: dict[str, int] = {}
        for name, split in visual.items():
            counts[f"{VISUAL_DIR}/{name}"] = len(split)
        for name, split in text.items():
            counts[f"{TEXT_DIR}/{name}"] = len(split)
        counts[TEXT_QA_DIR] = len(text_qa)
        visual.save_to_disk(str(tmp / VISUAL_DIR))
        text.save_to_disk(str(tmp / TEXT_DIR))
        text_qa.save_to_disk(str(tmp / TEXT_QA_DIR))
        manifest = {"config": dataclasses.asdict(cfg), "counts": counts}
        (tmp / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
        _swap_into_place(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    logger.info("prepared datasets in %s: %s", out, counts)
    return counts
