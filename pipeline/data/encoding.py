"""Training samples from prepared visual records: token ids, answer-only labels and pixel values.

Two ways to the same samples, behind one interface (`visual_samples`):

* **lazy** (`ConversationDataset`): each record is tokenised and its image opened and processed when the DataLoader
  asks for it, in its workers (`train.dataloader_num_workers`), as LLaVA's `LazySupervisedDataset` and TRL's
  vision-language collator do. Memory does not grow with the dataset: the records stay memory-mapped Arrow.
* **eager** (`encode_visual_dataset`): everything encoded once, before training, and held in memory. Only for small
  data (the tiny default's 4,000 64 px records: its training step stays as fast as it was); `preprocess: auto`
  chooses it when the pixel arrays would take at most EAGER_MAX_BYTES.

Text-only records (ShareGPT's in LLaVA-665K) have no image tokens and, lazily, no pixel array at all; a batch stacks
the pixel values of its image records only, which LLaVA matches to the `<image>` tokens in order.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from pipeline.config import ParamsError
from pipeline.data.chat import IGNORE_INDEX, IMAGE_TOKEN, OverLengthError, encode_conversation
from pipeline.data.images import to_rgb
from pipeline.data.schema import DataError

log = logging.getLogger(__name__)

EAGER_MAX_BYTES = 256 << 20
SUPERVISION_SAMPLE = 512  # lazy samples: how many records (evenly spaced) `check_supervision` encodes to count


def num_image_tokens(processor) -> int:
    """How many placeholder tokens the processor puts in for one image."""
    from PIL import Image

    height, width = image_shape(processor)[1:]
    out = processor(images=Image.new("RGB", (width, height)), text=IMAGE_TOKEN, return_tensors="pt")
    image_id = processor.tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    return int((out["input_ids"] == image_id).sum())


def image_shape(processor) -> tuple[int, int, int]:
    """(channels, height, width) of the processor's pixel values."""
    size = processor.image_processor.crop_size or processor.image_processor.size
    return 3, size.get("height", size.get("shortest_edge")), size.get("width", size.get("shortest_edge"))


class _Encoder:
    """Tokenises one record's conversation, with errors that name the dataset, the record and the params key."""

    def __init__(self, processor, *, max_length: int, on_overflow: str, source: str, params_key: str) -> None:
        self.n_image = num_image_tokens(processor)
        if max_length <= self.n_image + 8:
            raise ParamsError(f"{params_key}.max_length {max_length} leaves no room for text after {self.n_image} image "
                             "tokens")
        self.tokenizer = processor.tokenizer
        self.max_length, self.on_overflow = max_length, on_overflow
        self.source, self.params_key = source, params_key

    def __call__(self, index: int, record_id: str, conversations: list[dict]) -> tuple[list[int], list[int], bool]:
        try:
            return encode_conversation(
                self.tokenizer, conversations, n_image_tokens=self.n_image, max_length=self.max_length,
                on_overflow=self.on_overflow, record_id=f"{index}, id={record_id!r}",
            )
        except OverLengthError as err:
            raise DataError(f"{self.source}: {err}: raise {self.params_key}.max_length, or set "
                            f"{self.params_key}.on_overflow: truncate") from None
        except DataError as err:
            raise DataError(f"{self.source}: {err}") from None


def _pixels(image_processor, images, source: str, indices, ids) -> np.ndarray:
    try:
        rgb = [to_rgb(im) for im in images]
    except (OSError, ValueError) as err:  # bytes that no longer decode
        raise DataError(f"{source}: record {indices[0]}, id={ids[0]!r}, field 'image': cannot decode image: {err}") from None
    return image_processor(rgb, return_tensors="np")["pixel_values"]


class ConversationDataset(torch.utils.data.Dataset):
    """The lazy samples: record `i` is read, tokenised and its image processed in `__getitem__`."""

    def __init__(self, records: datasets.Dataset, processor, *, max_length: int, on_overflow: str,
                 source: str = "dataset", params_key: str = "train") -> None:
        self.records = records
        self.encoder = _Encoder(processor, max_length=max_length, on_overflow=on_overflow, source=source,
                                params_key=params_key)
        self.image_processor = processor.image_processor
        self.source = source

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict:
        try:
            row = self.records[int(index)]
        except (OSError, ValueError) as err:  # the image column failed to decode
            raise DataError(f"{self.source}: record {index}, field 'image': cannot read the record: {err}") from None
        ids, labels, _ = self.encoder(index, row["id"], row["conversations"])
        sample = {"input_ids": torch.tensor(ids), "labels": torch.tensor(labels), "pixel_values": None}
        if row["image"] is not None:
            pixels = _pixels(self.image_processor, [row["image"]], self.source, [index], [row["id"]])
            sample["pixel_values"] = torch.from_numpy(pixels[0])
        return sample


def encode_visual_dataset(
    ds: datasets.Dataset, processor, *, max_length: int, on_overflow: str, source: str = "dataset",
    params_key: str = "train",
) -> tuple[datasets.Dataset, int]:
    """The eager samples: tokenise and preprocess every image once, before training, kept in memory (nothing is
    written beside the data). Returns (dataset with input_ids/labels/pixel_values/has_image, truncated count)."""
    encoder = _Encoder(processor, max_length=max_length, on_overflow=on_overflow, source=source,
                       params_key=params_key)
    shape = image_shape(processor)

    def encode(batch, indices):
        out = {"input_ids": [], "labels": [], "truncated": [], "pixel_values": [], "has_image": []}
        for i, rid, conv in zip(indices, batch["id"], batch["conversations"]):
            ids, labels, cut = encoder(i, rid, conv)
            out["input_ids"].append(ids)
            out["labels"].append(labels)
            out["truncated"].append(cut)
        with_image = [k for k, im in enumerate(batch["image"]) if im is not None]
        pixels = iter(_pixels(processor.image_processor, [batch["image"][k] for k in with_image], source,
                              [indices[k] for k in with_image], [batch["id"][k] for k in with_image])
                      if with_image else [])
        for im in batch["image"]:  # text-only records: a zero placeholder, never stacked (has_image False)
            out["has_image"].append(im is not None)
            out["pixel_values"].append(next(pixels) if im is not None else np.zeros(shape, dtype=np.float32))
        return out

    # pixel_values as a fixed-shape Array3D: the torch formatter then converts a batch in one call instead of walking
    # 3 x H x W nested lists (that walk was 40% of a tiny training step).
    features = datasets.Features({
        "input_ids": datasets.Sequence(datasets.Value("int64")), "labels": datasets.Sequence(datasets.Value("int64")),
        "truncated": datasets.Value("bool"), "pixel_values": datasets.Array3D(shape=shape, dtype="float32"),
        "has_image": datasets.Value("bool"),
    })
    encoded = ds.map(encode, batched=True, with_indices=True, batch_size=256, remove_columns=ds.column_names,
                     keep_in_memory=True, features=features)
    truncated = int(sum(encoded["truncated"]))
    return encoded.remove_columns("truncated").with_format("torch"), truncated


def modality_lengths(records: datasets.Dataset, n_image_tokens: int) -> list[int]:
    """Per record, an estimate of its length in tokens (words of every turn, plus the image tokens), negative for a
    text-only record: LLaVA's `modality_lengths`. Read from the Arrow columns, never decoding an image."""
    lengths: list[int] = []
    # 1,000 rows a batch: a batch may copy its rows' image bytes, so memory stays bounded
    for batch in records.select_columns(["conversations", "image"]).with_format("arrow").iter(batch_size=1000):
        conversations = batch.column("conversations")
        conversations = conversations.combine_chunks() if isinstance(conversations, pa.ChunkedArray) else conversations
        values = pc.struct_field(conversations.flatten(), "value")
        words = pc.add(pc.count_substring(values, " "), 1).to_numpy(zero_copy_only=False)
        parents = pc.list_parent_indices(conversations).to_numpy(zero_copy_only=False)
        per_record = np.bincount(parents, weights=words, minlength=len(conversations)).astype(np.int64)
        has_image = pc.is_valid(batch.column("image")).to_numpy(zero_copy_only=False)
        lengths += np.where(has_image, per_record + n_image_tokens, -np.maximum(per_record, 1)).tolist()
    return lengths


class ModalityLengthSampler(torch.utils.data.Sampler):
    """LLaVA's modality-length grouping: batches hold one modality (image records or text-only ones) and records of
    similar length, so padding is small; the order of the batches is shuffled (seeded, per epoch)."""

    def __init__(self, lengths: list[int], batch_size: int, *, seed: int) -> None:
        self.lengths, self.batch_size, self.seed, self.epoch = lengths, batch_size, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.lengths)

    def __iter__(self):
        rng = np.random.default_rng([self.seed, self.epoch])
        lengths = np.asarray(self.lengths)
        full, partial = [], []
        for group in (np.flatnonzero(lengths > 0), np.flatnonzero(lengths < 0)):
            group = group[rng.permutation(len(group))]
            for start in range(0, len(group), self.batch_size):
                batch = group[start : start + self.batch_size]
                batch = batch[np.argsort(-np.abs(lengths[batch]), kind="stable")]
                (full if len(batch) == self.batch_size else partial).append(batch)
        order = rng.permutation(len(full))
        batches = [full[k] for k in order] + partial
        return iter(int(i) for batch in batches for i in batch)


def visual_samples(
    records: datasets.Dataset, processor, *, max_length: int, on_overflow: str, preprocess: str = "auto",
    source: str = "dataset", params_key: str = "train",
) -> tuple[torch.utils.data.Dataset | datasets.Dataset, int | None]:
    """The training samples of `records`, lazy or eager after `preprocess` (auto | eager | lazy, see the module), and
    how many were cut at max_length (None when lazy: each is cut as it is read)."""
    if preprocess not in ("auto", "eager", "lazy"):
        raise ValueError(f"{params_key}.preprocess must be auto, eager or lazy, got {preprocess!r}")
    if preprocess == "auto":
        eager_bytes = len(records) * math.prod(image_shape(processor)) * 4
        preprocess = "eager" if eager_bytes <= EAGER_MAX_BYTES else "lazy"
    if preprocess == "eager":
        encoded, truncated = encode_visual_dataset(records, processor, max_length=max_length, on_overflow=on_overflow,
                                                   source=source, params_key=params_key)
        if truncated:
            log.warning("%d of %d samples of %s were longer than %s.max_length %d and were truncated", truncated,
                        len(records), source, params_key, max_length)
        return encoded, truncated
    log.info("%s: %d records, encoded lazily in the DataLoader", source, len(records))
    return ConversationDataset(records, processor, max_length=max_length, on_overflow=on_overflow, source=source,
                               params_key=params_key), None


def check_supervision(
    records: datasets.Dataset, samples, processor, *, max_length: int, on_overflow: str, source: str = "dataset",
    params_key: str = "train",
) -> None:
    """Refuse samples that teach nothing: no answer token (label != IGNORE_INDEX) left after `max_length` (a
    ParamsError naming `<params_key>.max_length`), or no record with an image (a DataError naming the dataset's
    field 'image'): a visual stage trains on images. Eager samples are counted whole, from their Arrow columns; lazy
    ones on SUPERVISION_SAMPLE evenly spaced records, tokenised here without opening their images."""
    if len(records) == 0:
        raise DataError(f"{source}: no records to train on ({params_key})", path=source)
    if isinstance(samples, datasets.Dataset):  # eager: every sample, already encoded
        table = samples.with_format("arrow")[:]
        labels = pc.list_flatten(table.column("labels"))
        answer_tokens = int(pc.sum(pc.not_equal(labels, IGNORE_INDEX)).as_py() or 0)
        image_records = int(pc.sum(table.column("has_image")).as_py() or 0)
        scope = f"all {len(records)} records"
    else:
        indices = sorted({int(i) for i in np.linspace(0, len(records) - 1, min(len(records), SUPERVISION_SAMPLE))})
        encoder = _Encoder(processor, max_length=max_length, on_overflow=on_overflow, source=source,
                           params_key=params_key)
        text = records.select_columns(["id", "conversations"]).select(indices)
        answer_tokens = 0
        for index, row in zip(indices, text):
            _, labels, _ = encoder(index, row["id"], row["conversations"])
            answer_tokens += sum(label != IGNORE_INDEX for label in labels)
        images = records.select_columns(["image"]).with_format("arrow")[indices].column("image")
        image_records = int(pc.sum(pc.is_valid(images)).as_py() or 0)
        scope = f"{len(indices)} records sampled evenly from {len(records)}"
    if answer_tokens == 0:
        raise ParamsError(f"{params_key}.max_length {max_length} leaves no answer token to learn from in {source} "
                          f"({scope}): every answer is cut off; raise {params_key}.max_length")
    if image_records == 0:
        raise DataError(f"{source}: no record has an image (field 'image', {scope}): a visual stage ({params_key}) "
                        "would train on text only", path=source, field="image", reason="no_images")
    log.info("%s: %d answer tokens to learn from and %d image records in %s", source, answer_tokens, image_records,
             scope)


@dataclass
class VisualCollator:
    """Pads a batch of samples (lazy or eager) to its longest; stacks the pixel values of its image records."""

    pad_token_id: int

    def __call__(self, batch: list[dict]) -> dict[str, torch.Tensor]:
        length = max(len(b["input_ids"]) for b in batch)
        ids = torch.full((len(batch), length), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(batch), length), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((len(batch), length), dtype=torch.long)
        for i, b in enumerate(batch):
            n = len(b["input_ids"])
            ids[i, :n], labels[i, :n], mask[i, :n] = b["input_ids"], b["labels"], 1
        out = {"input_ids": ids, "labels": labels, "attention_mask": mask}
        with_image = [b["pixel_values"] for b in batch if b.get("has_image", b["pixel_values"] is not None)]
        if with_image:  # LLaVA matches image features to <image> tokens in order, so text-only rows need none
            out["pixel_values"] = torch.stack(with_image).float()
        return out
