"""The prepared datasets' schema: what `prepare` writes under data/prepared and every later stage reads.

Layout: ``visual/`` (a DatasetDict of visual conversation records, split by use), ``text/`` (train/test chunks of
the text corpus), ``text_qa/`` (the text QA facts) and ``manifest.json`` (the data config, the counts and a content
hash of everything else, which stages use instead of re-reading the data).

A visual record::

    {"id": str, "image": datasets.Image() | None, "qtype": str,
     "conversations": [{"from": "human"|"gpt", "value": str}, ...]}

``image`` holds the source file's own bytes (a LLaVA JPEG is stored as it was, never re-encoded) and is None for a
text-only record. The first human turn of a record with an image starts with ``"<image>\\n"``.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import datasets

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
        if message.startswith("Caught DataError in DataLoader worker") and "Original Traceback" in message:
            # torch re-raises a DataLoader worker's DataError as DataError(<header + worker traceback>): keep the
            # error's own line, so bad data stays one line wherever it was read.
            message = message.rstrip().splitlines()[-1].split("DataError: ", 1)[-1]
        super().__init__(message)
        self.path = path
        self.index = index
        self.record_id = record_id
        self.field = field
        self.reason = reason


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
    # synthetic.make_scene_texts). 0 for real LLMs, which already have the skill.
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
    # Processes that validate LLaVA records (each decodes its records' images once). null: every CPU core. The
    # prepared bytes do not depend on it.
    num_proc: int | None = None

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
        if self.num_proc is not None and self.num_proc < 1:
            raise ValueError(f"DataConfig.num_proc must be >= 1 or null, got {self.num_proc}")

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> DataConfig:
        """Build from a mapping (e.g. params.yaml), rejecting unknown keys."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown DataConfig keys: {unknown}; known keys: {sorted(known)}")
        return cls(**values)

    def processes(self) -> int:
        return self.num_proc or os.cpu_count() or 1

    def content_fields(self) -> dict[str, Any]:
        """The fields that shape the prepared bytes (num_proc only changes how fast they are made)."""
        return {k: v for k, v in dataclasses.asdict(self).items() if k != "num_proc"}


def read_manifest(prepared_dir: str | os.PathLike = "data/prepared") -> dict:
    """The manifest `prepare` wrote: {"config", "counts", "content_hash"}."""
    path = Path(prepared_dir) / MANIFEST_FILE
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(f"{path} is missing: run `dvc repro prepare` first") from None
    except (ValueError, UnicodeDecodeError) as err:
        raise DataError(f"{path}: not a valid manifest ({err}); re-run `dvc repro prepare`", path=str(path)) from None


def content_hash(prepared_dir: str | os.PathLike = "data/prepared") -> str:
    """The prepared data's identity without re-reading it: the hash `prepare` recorded in its manifest."""
    manifest = read_manifest(prepared_dir)
    if "content_hash" not in manifest:
        raise DataError(f"{Path(prepared_dir) / MANIFEST_FILE} has no content_hash: re-run `dvc repro prepare`")
    return manifest["content_hash"]


def image_record_indices(records: datasets.Dataset) -> list[int]:
    """The rows of `records` that have an image, read from the Arrow validity bitmap (no image is decoded)."""
    import pyarrow.compute as pc

    found: list[int] = []
    offset = 0
    # 1,000 rows a batch: a batch may copy its rows' image bytes, so memory stays bounded
    for batch in records.select_columns(["image"]).with_format("arrow").iter(batch_size=1000):
        valid = pc.is_valid(batch.column("image")).to_numpy(zero_copy_only=False)
        found += [offset + int(i) for i in valid.nonzero()[0]]
        offset += batch.num_rows
    return found
