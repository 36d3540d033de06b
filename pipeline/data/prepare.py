"""Stage `prepare`'s library: build every dataset and write data/prepared atomically (layout: schema.py)."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from pathlib import Path

import datasets

from pipeline import storage
from pipeline.data.llava import import_llava_json
from pipeline.data.schema import (
    IMPORTED_SPLIT, MANIFEST_FILE, TEXT_DIR, TEXT_FEATURES, TEXT_QA_DIR, TEXT_QA_FEATURES, VISION_PAIRS_SPLIT,
    VISUAL_DIR, VISUAL_FEATURES, DataConfig,
)
from pipeline.data.synthetic import (
    CAPTION_PROMPTS, _rng, _visual_record, digit_caption, load_pydoc_topics, make_caption_record,
    make_digit_records, make_scene_texts, make_text_qa, make_vqa_records, pack_paragraphs, split_paragraphs,
    split_text_documents, text_qa_as_text,
)

logger = logging.getLogger(__name__)


def _visual_dataset(records: list[dict]) -> datasets.Dataset:
    columns = {name: [r[name] for r in records] for name in VISUAL_FEATURES}
    return datasets.Dataset.from_dict(columns, features=VISUAL_FEATURES)


def _png_digests(records: list[dict]) -> set[bytes]:
    return {hashlib.sha256(r["image"]["bytes"]).digest() for r in records}


def build_visual(cfg: DataConfig, work_dir: str | os.PathLike[str] | None = None) -> datasets.DatasetDict:
    """The visual splits: the synthetic world's, with LLaVA-format data in place of (or beside) them where the
    config names some (imported through `work_dir`, see llava.import_llava_json)."""
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
    real = {"caption_train": "pretrain", "instruct_train": "instruct", IMPORTED_SPLIT: "llava"}
    for split, prefix in real.items():
        json_path = getattr(cfg, f"{prefix}_json")
        if json_path is None:
            continue
        imported, report = import_llava_json(
            json_path, getattr(cfg, f"{prefix}_image_dir"), on_error=cfg.llava_on_error,
            image_mode=cfg.llava_image_mode, num_proc=cfg.processes(), work_dir=work_dir,
            absolute_paths=cfg.llava_absolute_image_paths,
        )
        logger.info("imported %s into %s: %d records, skipped %s, converted to RGB %s, animated (first frame used) %d",
                    json_path, split, report.imported, report.skipped, report.converted_modes, report.animated)
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


def tree_digest(root: str | os.PathLike[str], exclude: tuple[str, ...] = (MANIFEST_FILE,)) -> str:
    """SHA-256 over the relative paths and contents of every file under `root` (read in 1 MiB pieces)."""
    root = Path(root)
    digest = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file() and p.name not in exclude):
        digest.update(path.relative_to(root).as_posix().encode() + b"\0")
        with open(path, "rb") as f:
            while piece := f.read(1 << 20):
                digest.update(piece)
    return digest.hexdigest()


def prepare_all(cfg: DataConfig, out_dir: str | os.PathLike[str]) -> dict[str, int]:
    """Build every dataset and write them atomically under ``out_dir`` (layout: pipeline/data/schema.py).

    Returns counts keyed ``"<dir>/<split>"`` (``"text_qa"`` for the QA set). The manifest records the config, the
    counts and a content hash of everything written, which later stages use as the data's identity."""
    out = Path(out_dir)
    with storage.atomic_dir(out) as tmp:
        # Imported records are validated into Arrow files here, then saved into place; the work files go before
        # the swap (a killed run leaves them inside its own temporary directory, which the next run sweeps).
        work = tmp / ".import-work"
        work.mkdir()
        visual = build_visual(cfg, work)
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
        del visual
        shutil.rmtree(work)
        manifest = {"config": cfg.content_fields(), "counts": counts, "content_hash": tree_digest(tmp)}
        (tmp / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    logger.info("prepared datasets in %s: %s", out, counts)
    return counts
