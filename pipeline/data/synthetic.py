"""The tiny world, generated offline and deterministically from a seed: synthetic shape scenes drawn with Pillow
(captions for projector pretraining, VQA for instruction tuning, a held-out VQA test set), the 8x8 handwritten
digits bundled with scikit-learn, a text corpus made of CPython's ``pydoc_data`` documentation topics, and a small
text QA set of memorisable facts (used to measure forgetting).

Longer than 400 lines on purpose: the scenes, questions, digits and texts share their drawing helpers and seeded
random streams (`_rng`), and keeping the generators in one module keeps what shapes the prepared bytes in one place."""

from __future__ import annotations

import hashlib
import io
import random
import re
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

from pipeline.data.chat import IMAGE_TOKEN, plain_text


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
    bottom-right). Each shape spans 75-90% of its quadrant: at that size its area says which shape it is (the
    measurements behind these sizes: docs/results.md, "What makes the tiny setting a fair test").
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
        texts.append(plain_text(f"{scene}\n{question}", answer))
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


