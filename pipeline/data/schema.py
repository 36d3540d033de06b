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

import json
import os
from pathlib import Path

import datasets

from pipeline.config import DataConfig  # noqa: F401  (re-exported: the data params are defined with the params schema)
from pipeline.errors import MissingInputError, ProjectError

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


class DataError(ProjectError, ValueError):
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


def read_manifest(prepared_dir: str | os.PathLike = "data/prepared") -> dict:
    """The manifest `prepare` wrote: {"config", "counts", "content_hash"}."""
    path = Path(prepared_dir) / MANIFEST_FILE
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise MissingInputError(f"{path} is missing: run `dvc repro prepare` first") from None
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
