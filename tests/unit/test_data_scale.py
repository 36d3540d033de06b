"""The data path at scale, on small inputs: the streaming, parallel LLaVA import; lazy training samples (equal to
the eager ones); errors from DataLoader workers; modality-length batches; the calibration sample."""

from __future__ import annotations

import io
import json
from pathlib import Path

import datasets
import pytest
import torch
from PIL import Image

from pipeline import data
from pipeline.data import encoding, llava


def jpeg(colour, size=(40, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def records(n: int, *, text_only_every: int = 5, multi_turn_every: int = 4) -> list[dict]:
    out = []
    for i in range(n):
        rec = {"id": f"r{i}", "conversations": [{"from": "human", "value": "What colour?"}, {"from": "gpt", "value": "red"}]}
        if i % text_only_every:
            rec["image"] = f"img/{i % 3}.jpg"
            rec["conversations"][0]["value"] = "<image>\nWhat colour?"
        if i % multi_turn_every == 0:
            rec["conversations"] += [{"from": "human", "value": "And the shape?"}, {"from": "gpt", "value": "a square"}]
        out.append(rec)
    return out


@pytest.fixture
def llava_dir(tmp_path) -> Path:
    (tmp_path / "img").mkdir()
    for k, colour in enumerate([(200, 0, 0), (0, 200, 0), (0, 0, 200)]):
        (tmp_path / "img" / f"{k}.jpg").write_bytes(jpeg(colour))
    return tmp_path


def raw_images(ds: datasets.Dataset) -> list[bytes | None]:
    return [None if im is None else im["bytes"] for im in ds.cast_column("image", datasets.Image(decode=False))["image"]]


def test_parallel_import_equals_one_process_and_keeps_the_bytes(llava_dir, monkeypatch):
    monkeypatch.setattr(llava, "CHUNK", 7)  # several chunks, so two processes share the work
    path = llava_dir / "data.json"
    path.write_text(json.dumps(records(40), indent=1))
    one, _ = data.import_llava_json(path, llava_dir, num_proc=1)
    two, report = data.import_llava_json(path, llava_dir, num_proc=2)
    assert two["id"] == one["id"] == [f"r{i}" for i in range(40)]
    assert two["conversations"] == one["conversations"]
    assert raw_images(two) == raw_images(one)
    assert raw_images(two)[1] == (llava_dir / "img" / "1.jpg").read_bytes()  # the JPEG itself, not re-encoded
    assert raw_images(two)[0] is None  # text-only
    assert len(two[0]["conversations"]) == 4 and report.imported == 40


def test_parallel_raise_names_the_first_bad_record_in_file_order(llava_dir, monkeypatch):
    monkeypatch.setattr(llava, "CHUNK", 5)
    recs = records(30)
    recs[23]["image"] = "img/missing.jpg"
    recs[12]["conversations"][1]["value"] = " "
    path = llava_dir / "data.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    with pytest.raises(data.DataError) as info:
        data.import_llava_json(path, llava_dir, num_proc=2)
    assert "record 12 (line 13)" in str(info.value) and info.value.reason == "empty_answer"
    ds, report = data.import_llava_json(path, llava_dir, num_proc=2, on_error="skip")
    assert len(ds) == 28 and report.skipped == {"empty_answer": 1, "missing_image": 1}
    assert "r12" not in ds["id"] and "r23" not in ds["id"]


def test_json_list_is_streamed_and_errors_name_the_line(llava_dir, monkeypatch):
    monkeypatch.setattr(llava, "_READ_BYTES", 64)  # records span many reads
    recs = records(25)
    path = llava_dir / "data.json"
    path.write_text(json.dumps(recs, indent=2))
    ds, _ = data.import_llava_json(path, llava_dir)
    assert ds["id"] == [r["id"] for r in recs]
    text = path.read_text().splitlines()
    bad_line = next(k for k, line in enumerate(text) if '"r20"' in line)
    text[bad_line] = text[bad_line].replace('"r20",', '"r20" oops,')
    path.write_text("\n".join(text))
    with pytest.raises(data.DataError, match=rf"malformed JSON at line {bad_line + 1} column"):
        data.import_llava_json(path, llava_dir)


@pytest.mark.parametrize("name", ["../outside.jpg", "/etc/hostname", "img/../../outside.jpg"])
def test_image_path_may_not_leave_the_image_folder(llava_dir, name):
    (llava_dir.parent / "outside.jpg").write_bytes(jpeg((1, 2, 3)))
    rec = records(2)[1] | {"image": name}
    path = llava_dir / "data.json"
    path.write_text(json.dumps([rec]))
    with pytest.raises(data.DataError, match="leaves the image folder") as info:
        data.import_llava_json(path, llava_dir)
    assert info.value.reason == "image_outside_dir"


def test_absolute_image_paths_only_when_allowed_and_relative_escapes_never(llava_dir):
    outside = llava_dir.parent / "outside.jpg"
    outside.write_bytes(jpeg((1, 2, 3)))
    path = llava_dir / "data.json"
    path.write_text(json.dumps([records(2)[1] | {"image": str(outside)}]))
    with pytest.raises(data.DataError, match="llava_absolute_image_paths: true allows absolute paths"):
        data.import_llava_json(path, llava_dir)
    imported, _ = data.import_llava_json(path, llava_dir, absolute_paths=True)
    assert raw_images(imported) == [outside.read_bytes()]  # the file's own bytes
    path.write_text(json.dumps([records(2)[1] | {"image": "../outside.jpg"}]))
    with pytest.raises(data.DataError, match="leaves the image folder"):
        data.import_llava_json(path, llava_dir, absolute_paths=True)


def test_a_lone_surrogate_in_an_answer_names_the_record_and_field(llava_dir):
    rec = records(2)[1]
    rec["conversations"][1]["value"] = "red \ud800"  # valid JSON, not valid Unicode text
    path = llava_dir / "data.json"
    path.write_text(json.dumps([rec]))
    with pytest.raises(data.DataError, match="text is not valid Unicode") as info:
        data.import_llava_json(path, llava_dir)
    assert (info.value.reason, info.value.field, info.value.index) == ("invalid_text", "conversations[1].value", 0)


def test_exif_orientation_is_applied_when_read():
    img = Image.new("RGB", (40, 20), (255, 0, 0))
    exif = img.getexif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    buf = io.BytesIO()
    img.save(buf, format="JPEG", exif=exif)
    assert data.to_rgb(Image.open(buf)).size == (20, 40)


def imported_micro(llava_dir, n=12) -> datasets.Dataset:
    path = llava_dir / "data.json"
    path.write_text(json.dumps(records(n)))
    return data.import_llava_json(path, llava_dir)[0]


def test_lazy_samples_equal_eager_samples(micro, llava_dir):
    _, processor = micro
    ds = imported_micro(llava_dir)
    lazy, lazy_cut = encoding.visual_samples(ds, processor, max_length=64, on_overflow="truncate", preprocess="lazy")
    eager, eager_cut = encoding.visual_samples(ds, processor, max_length=64, on_overflow="truncate", preprocess="eager")
    assert isinstance(lazy, encoding.ConversationDataset) and lazy_cut is None and eager_cut == 0
    for i in range(len(ds)):
        a, b = lazy[i], eager[i]
        assert a["input_ids"].tolist() == b["input_ids"].tolist() and a["labels"].tolist() == b["labels"].tolist()
        assert (a["pixel_values"] is None) == (not bool(b["has_image"]))
        if a["pixel_values"] is not None:
            assert torch.equal(a["pixel_values"], b["pixel_values"])
    # every answer of a multi-turn record is supervised
    answers = processor.tokenizer.decode([t for t in lazy[0]["labels"].tolist() if t != -100])
    assert "red" in answers and "a square" in answers
    collator = encoding.VisualCollator(pad_token_id=processor.tokenizer.pad_token_id)
    batch = collator([lazy[i] for i in range(5)])
    assert batch["pixel_values"].shape[0] == 4  # record 0 is text-only: no placeholder image


def test_a_bad_image_in_a_worker_is_one_line_naming_the_record(micro):
    _, processor = micro
    ds = datasets.Dataset.from_dict(
        {"id": ["ok", "broken"], "qtype": ["x", "x"], "image": [{"bytes": jpeg((9, 9, 9)), "path": None},
                                                               {"bytes": jpeg((9, 9, 9))[:-200], "path": None}],
         "conversations": [[{"from": "human", "value": "<image>\nQ?"}, {"from": "gpt", "value": "A"}]] * 2},
        features=data.VISUAL_FEATURES,
    )
    samples = encoding.ConversationDataset(ds, processor, max_length=64, on_overflow="truncate", source="data/x")
    loader = torch.utils.data.DataLoader(samples, batch_size=1, num_workers=1,
                                         collate_fn=encoding.VisualCollator(processor.tokenizer.pad_token_id))
    with pytest.raises(data.DataError) as info:
        list(loader)
    message = str(info.value)
    assert "\n" not in message and "data/x" in message and "record 1" in message and "'image'" in message


def test_modality_length_batches_hold_one_modality(llava_dir):
    ds = imported_micro(llava_dir, n=40)
    lengths = encoding.modality_lengths(ds, n_image_tokens=16)
    has_image = [r is not None for r in raw_images(ds)]
    assert [length > 0 for length in lengths] == has_image
    order = list(encoding.ModalityLengthSampler(lengths, 4, seed=0))
    assert sorted(order) == list(range(40))
    full = [order[k : k + 4] for k in range(0, 32, 4)]  # the full batches come first
    for batch in full:
        assert len({has_image[i] for i in batch}) == 1
    assert list(encoding.ModalityLengthSampler(lengths, 4, seed=0)) == order


def test_calibration_sample_is_seeded_and_skips_text_only(llava_dir):
    from pipeline.importance import calibration_sample

    ds = imported_micro(llava_dir, n=30)
    sample = calibration_sample(ds, 10, seed=0)
    assert len(sample) == 10 and all(r["image"] is not None for r in sample)
    assert [r["id"] for r in calibration_sample(ds, 10, seed=0)] == [r["id"] for r in sample]
    text_only = ds.select([i for i, im in enumerate(raw_images(ds)) if im is None])
    with pytest.raises(data.DataError, match="no record has an image"):
        calibration_sample(text_only, 4, seed=0)


def test_manifest_content_hash_names_the_data(tmp_path):
    cfg = data.DataConfig(image_size=32, num_captions=8, num_instruct=10, num_vqa_test=5)
    data.prepare_all(cfg, tmp_path / "a")
    data.prepare_all(cfg, tmp_path / "b")
    assert data.content_hash(tmp_path / "a") == data.content_hash(tmp_path / "b")
    data.prepare_all(data.DataConfig(image_size=32, num_captions=9, num_instruct=10, num_vqa_test=5), tmp_path / "c")
    assert data.content_hash(tmp_path / "c") != data.content_hash(tmp_path / "a")
