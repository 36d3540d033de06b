"""Tests for pipeline/data/: synthetic scenes, splits, determinism, atomic writes, LLaVA import (the scale-specific
import tests are in test_data_scale.py).

Longer than 400 lines on purpose: one test module per library package, as the other tests mirror theirs."""

from __future__ import annotations

import hashlib
import io
import json
import os
import logging
import random
import re
from collections import Counter
from pathlib import Path

import datasets
import numpy as np
import pytest
from PIL import Image

import pipeline.data

FIXTURE_DIR = Path(__file__).resolve().parents[1] / "fixtures" / "llava_format"
SMALL = dict(num_captions=40, num_instruct=50, num_vqa_test=20)


# ---------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------


def shape_pixel(img: Image.Image, s: pipeline.data.Shape) -> tuple[int, int, int]:
    """A pixel that is inside the shape for every kind (triangles: lower middle)."""
    x0, y0, x1, y1 = s.bbox
    cx = (x0 + x1) // 2
    cy = (y0 + y1) // 2 if s.kind != "triangle" else y0 + 3 * (y1 - y0) // 4
    return img.getpixel((cx, cy))


def record_key(r: dict) -> tuple:
    return (r["id"], r["image"]["bytes"], json.dumps(r["conversations"]), r["qtype"])


def tree_digest(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def png(img: Image.Image, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def good_record(rid: str, image: str | None = "img.png", answer: str = "red") -> dict:
    rec: dict = {
        "id": rid,
        "conversations": [
            {"from": "human", "value": ("<image>\n" if image else "") + "What colour?"},
            {"from": "gpt", "value": answer},
        ],
    }
    if image is not None:
        rec["image"] = image
    return rec


def write_json(path: Path, records: list) -> Path:
    path.write_text(json.dumps(records))
    return path


def rgb_png(colour=(255, 0, 0)) -> bytes:
    return png(Image.new("RGB", (8, 8), colour))


# ---------------------------------------------------------------------------
# synthetic scenes
# ---------------------------------------------------------------------------


def test_draw_scene_shapes_are_visible_and_in_their_quadrant():
    rng = random.Random(123)
    seen_counts = Counter()
    for _ in range(300):
        img, shapes = pipeline.data.draw_scene(rng, 64)
        assert img.size == (64, 64) and img.mode == "RGB"
        assert 1 <= len(shapes) <= 4
        seen_counts[len(shapes)] += 1
        cells = [(s.row, s.col) for s in shapes]
        assert len(set(cells)) == len(cells), "two shapes share a quadrant"
        assert cells == sorted(cells), "shapes must be in reading order"
        for s in shapes:
            x0, y0, x1, y1 = s.bbox
            assert x1 - x0 + 1 >= 16 and y1 - y0 + 1 >= 16, "shape too small at 64px"
            assert s.col * 32 <= x0 and x1 < (s.col + 1) * 32
            assert s.row * 32 <= y0 and y1 < (s.row + 1) * 32
            assert shape_pixel(img, s) == pipeline.data.PALETTE[s.colour]
    assert set(seen_counts) == {1, 2, 3, 4}


def test_questions_answers_match_the_drawn_scene():
    rng = random.Random(7)
    asked = Counter()
    for _ in range(200):
        img, shapes = pipeline.data.draw_scene(rng, 64, rng.choice([1, None]))
        for qtype in pipeline.data.QTYPES:
            qa = pipeline.data.make_question(rng, shapes, qtype)
            if qa is None:
                assert qtype != "count" and len(shapes) > 1  # one-shape questions are not asked of busier scenes
                continue
            asked[qtype] += 1
            q, a = qa
            if qtype == "count":
                assert q == "How many shapes are there?" and a == str(len(shapes))
                continue
            (s,) = shapes
            if qtype == "colour":
                assert q == "What colour is the shape?" and a == s.colour and shape_pixel(img, s) == pipeline.data.PALETTE[a]
            elif qtype == "shape":
                assert q == "What shape is in the image?" and a == s.kind
            elif qtype == "position":
                assert q == "Where is the shape?" and a == s.position
                x0, y0, x1, y1 = s.bbox
                assert ((x0 + x1) / 2 < 32) == a.endswith("left")
                assert ((y0 + y1) / 2 < 32) == a.startswith("top")
            elif qtype == "yesno":
                colour = q.removeprefix("Is the shape ").removesuffix("?")
                assert colour in pipeline.data.COLOURS and a == ("yes" if s.colour == colour else "no")
    assert set(asked) == set(pipeline.data.QTYPES) and min(asked.values()) > 50


def test_vqa_records_balanced_and_well_formed():
    records = pipeline.data.make_vqa_records(random.Random(0), 500, 64, "t")
    counts = Counter(r["qtype"] for r in records)
    assert counts == {q: 100 for q in pipeline.data.QTYPES}
    yesno = Counter(r["conversations"][1]["value"] for r in records if r["qtype"] == "yesno")
    assert yesno == {"yes": 50, "no": 50}
    for r in records:
        human, gpt = r["conversations"]
        assert human["from"] == "human" and human["value"].startswith("<image>\n")
        assert human["value"].count("<image>") == 1
        assert gpt["from"] == "gpt"
        answer = gpt["value"]
        assert answer == answer.lower() and answer.replace(" ", "").isalnum(), answer
    pos = Counter(r["conversations"][1]["value"] for r in records if r["qtype"] == "position")
    assert set(pos) == {"top left", "top right", "bottom left", "bottom right"}


def test_caption_records():
    rng = random.Random(1)
    for i in range(50):
        r = pipeline.data.make_caption_record(rng, 64, f"c{i}")
        assert r["qtype"] == "caption"
        assert r["conversations"][0]["value"].startswith("<image>\n")
        caption = r["conversations"][1]["value"]
        assert caption.startswith("a ") and caption.endswith(".")
    shapes = [
        pipeline.data.Shape("circle", "red", 0, 0, (0, 0, 1, 1)),
        pipeline.data.Shape("square", "blue", 1, 1, (0, 0, 1, 1)),
    ]
    assert pipeline.data.describe_scene(shapes) == "a red circle on the top left and a blue square on the bottom right."


def test_synthetic_determinism():
    a = pipeline.data.make_vqa_records(random.Random("s"), 30, 64, "x")
    b = pipeline.data.make_vqa_records(random.Random("s"), 30, 64, "x")
    c = pipeline.data.make_vqa_records(random.Random("t"), 30, 64, "x")
    assert [record_key(r) for r in a] == [record_key(r) for r in b]
    assert [record_key(r) for r in a] != [record_key(r) for r in c]


# ---------------------------------------------------------------------------
# digits, text, text QA
# ---------------------------------------------------------------------------


def test_digits_split_is_disjoint_and_held_out():
    from sklearn.datasets import load_digits

    target = load_digits().target
    train, test = pipeline.data.make_digit_records(0, 32, 0.3)
    train_ids = {r["id"] for r in train}
    test_ids = {r["id"] for r in test}
    assert not train_ids & test_ids
    assert len(train_ids) + len(test_ids) == len(target)
    assert len(test) == round(0.3 * len(target))
    for r in test[:20] + train[:20]:
        idx = int(r["id"].split("-")[1])
        assert r["conversations"][1]["value"] == str(target[idx])
        assert r["conversations"][0]["value"] == "<image>\nWhat digit is this?"
        img = Image.open(io.BytesIO(r["image"]["bytes"]))
        assert img.size == (32, 32) and img.mode == "RGB"
    # same seed -> same split; other seed -> other split
    assert {r["id"] for r in pipeline.data.make_digit_records(0, 32, 0.3)[1]} == test_ids
    assert {r["id"] for r in pipeline.data.make_digit_records(1, 32, 0.3)[1]} != test_ids


def test_text_split_disjoint_and_chunking():
    topics = pipeline.data.load_pydoc_topics()
    train, test = pipeline.data.split_text_documents(0, 0.1)
    assert not set(train) & set(test)
    assert set(train) | set(test) == set(topics)
    assert len(test) == round(0.1 * len(topics))
    assert pipeline.data.split_text_documents(0, 0.1) == (train, test)
    for name in list(topics)[:30]:
        chunks = pipeline.data.chunk_text(topics[name], 200)
        assert chunks and all(0 < len(c) <= 200 for c in chunks)
        assert " ".join(chunks).split() == topics[name].split()  # nothing lost
    assert pipeline.data.chunk_text("x" * 50, 20) == ["x" * 20, "x" * 20, "x" * 10]
    assert pipeline.data.chunk_text("ab\n\n  \n\ncd\n\nefgh", 6) == ["ab\n\ncd", "efgh"]


def test_text_corpus_has_no_paragraph_leakage():
    # pydoc topics share whole paragraphs; none of the test ones may reach train
    train, test = pipeline.data.text_corpus_chunks(0, 0.1, 400)
    assert train and test
    train_paras = {p for c in train for p in pipeline.data.split_paragraphs(c)}
    test_paras = {p for c in test for p in pipeline.data.split_paragraphs(c)}
    assert not train_paras & test_paras
    assert not set(train) & set(test)
    assert all(len(c) <= 400 for c in train + test)


def test_text_qa():
    rows = pipeline.data.make_text_qa()
    assert len(rows) >= 60
    assert len({r["question"] for r in rows}) == len(rows)
    assert {"successor_word", "successor_digit", "opposite", "fact"} <= {r["qtype"] for r in rows}
    assert {"question": "What number comes after seven?", "answer": "eight",
            "qtype": "successor_word"} in rows
    for r in rows:
        assert r["answer"] == r["answer"].lower() and r["answer"].strip() == r["answer"]
    text = pipeline.data.text_qa_as_text("What is the opposite of up?", "down")
    assert text == "Question: What is the opposite of up? Answer: down"
    assert text.startswith(pipeline.data.text_qa_prompt("What is the opposite of up?"))


# ---------------------------------------------------------------------------
# prepare_all
# ---------------------------------------------------------------------------


def test_scene_texts_answer_from_the_told_scene():
    texts = pipeline.data.make_scene_texts(random.Random(0), 60)
    assert texts == pipeline.data.make_scene_texts(random.Random(0), 60)
    pattern = re.compile(r"USER: (.+)\n(.+\?) ASSISTANT: (.+)")
    asked = Counter()
    for t in texts:
        scene, question, answer = pattern.fullmatch(t).groups()
        if question == pipeline.data.DIGIT_PROMPT:
            asked["digit"] += 1
            assert scene == f"a handwritten digit {answer}."
            continue
        parts = re.findall(r"a (\w+) (\w+) on the (\w+ \w+)", scene)
        assert parts and scene.endswith(".")
        if question.startswith("How many"):
            asked["count"] += 1
            assert answer == str(len(parts))
            continue
        ((colour, kind, position),) = parts
        if question.startswith("What colour"):
            asked["colour"] += 1
            assert answer == colour
        elif question.startswith("What shape"):
            asked["shape"] += 1
            assert answer == kind
        elif question.startswith("Where"):
            asked["position"] += 1
            assert answer == position
        else:
            asked["yesno"] += 1
            assert answer == ("yes" if question == f"Is the shape {colour}?" else "no")
    assert asked == {q: 10 for q in (*pipeline.data.QTYPES, "digit")}


def test_scene_texts_are_mixed_into_the_lm_corpus():
    cfg = pipeline.data.DataConfig(image_size=32, **SMALL)
    plain = pipeline.data.build_text(cfg, pipeline.data.make_text_qa())["train"]["text"]
    mixed = pipeline.data.build_text(cfg.model_copy(update={"scene_texts": 12}), pipeline.data.make_text_qa())["train"]["text"]
    added = Counter(mixed) - Counter(plain)
    assert sum(added.values()) == 12 and all(t.startswith("USER: ") for t in added)


def test_vision_pairs_caption_their_images_and_stay_out_of_the_tests():
    cfg = pipeline.data.DataConfig(image_size=32, **SMALL)
    assert pipeline.data.VISION_PAIRS_SPLIT not in pipeline.data.build_visual(cfg)  # 0 by default: no split
    visual = pipeline.data.build_visual(cfg.model_copy(update={"vision_pairs": 30}))
    pairs = visual[pipeline.data.VISION_PAIRS_SPLIT]
    digits_train = [r for r in visual["instruct_train"] if r["qtype"] == "digit"]
    assert len(pairs) == 30 + len(digits_train) and set(pairs["qtype"]) == {"caption"}
    captions = [c[1]["value"] for c in pairs["conversations"]]
    assert all(re.fullmatch(r"a \w+ \w+ on the \w+ \w+((, | and )a \w+ \w+ on the \w+ \w+)*\.", c) for c in captions[:30]), captions[:3]
    digit_caption = {hashlib.sha256(png(r["image"])).digest(): r["conversations"][1]["value"] for r in digits_train}
    for rec, caption in zip(list(pairs)[30:], captions[30:]):
        assert caption == pipeline.data.digit_caption(int(digit_caption[hashlib.sha256(png(rec["image"])).digest()]))
    tests = {hashlib.sha256(png(r)).digest() for split in ("vqa_test", "digits_test") for r in visual[split]["image"]}
    assert not tests & {hashlib.sha256(png(r)).digest() for r in pairs["image"]}
    with pytest.raises(ValueError, match="vision_pairs"):
        pipeline.data.DataConfig(vision_pairs=-1)


def test_prepare_all_layout_and_determinism(tmp_path):
    cfg = pipeline.data.DataConfig(image_size=32, **SMALL)
    counts = pipeline.data.prepare_all(cfg, tmp_path / "a")
    out = tmp_path / "a"
    visual = datasets.load_from_disk(str(out / "visual"))
    assert set(visual) == set(pipeline.data.VISUAL_SPLITS)
    for name, split in visual.items():
        assert split.features == pipeline.data.VISUAL_FEATURES
        assert counts[f"visual/{name}"] == len(split)
    assert len(visual["caption_train"]) == 40 and len(visual["vqa_test"]) == 20
    qtypes = Counter(visual["instruct_train"]["qtype"])
    assert qtypes["digit"] > 1000 and sum(qtypes[q] for q in pipeline.data.QTYPES) == 50
    assert visual["instruct_train"][0]["image"].size == (32, 32)
    test_images = {hashlib.sha256(png(r)).digest() for r in visual["vqa_test"]["image"]}
    train_images = {hashlib.sha256(png(r)).digest() for r in visual["caption_train"]["image"]}
    assert not test_images & train_images

    text = datasets.load_from_disk(str(out / "text"))
    assert set(text) == {"train", "test"} and text["train"].column_names == ["text"]
    qa = datasets.load_from_disk(str(out / "text_qa"))
    assert qa.column_names == ["question", "answer", "qtype"]
    qa_strings = {pipeline.data.text_qa_as_text(q, a) for q, a in zip(qa["question"], qa["answer"])}
    train_counts = Counter(text["train"]["text"])
    assert all(train_counts[s] == cfg.text_qa_repeats for s in qa_strings)
    assert not qa_strings & set(text["test"]["text"])
    assert not set(text["test"]["text"]) & set(text["train"]["text"])
    assert all(len(t) <= cfg.text_chunk_chars for t in text["test"]["text"])
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["counts"] == counts
    # determinism: byte-identical directory trees; other seed differs
    pipeline.data.prepare_all(cfg, tmp_path / "b")
    assert tree_digest(tmp_path / "a") == tree_digest(tmp_path / "b")
    pipeline.data.prepare_all(pipeline.data.DataConfig(seed=1, image_size=32, **SMALL), tmp_path / "c")
    da, dc = tree_digest(tmp_path / "a"), tree_digest(tmp_path / "c")
    assert da["visual/vqa_test/data-00000-of-00001.arrow"] != dc["visual/vqa_test/data-00000-of-00001.arrow"]
    assert da["text/train/data-00000-of-00001.arrow"] != dc["text/train/data-00000-of-00001.arrow"]


def test_prepare_all_replaces_existing_out_dir(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "stale.txt").write_text("old")
    pipeline.data.prepare_all(pipeline.data.DataConfig(image_size=32, **SMALL), out)
    assert not (out / "stale.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


@pytest.mark.parametrize("existing", [True, False])
def test_prepare_all_is_atomic_on_failure(tmp_path, monkeypatch, existing):
    out = tmp_path / "out"
    if existing:
        out.mkdir()
        (out / "keep.txt").write_text("previous run")
    before = tree_digest(tmp_path)
    calls = {"n": 0}
    real_save = datasets.Dataset.save_to_disk

    def failing_save(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:  # fail mid-way through writing the visual splits
            raise OSError("disk full (simulated)")
        return real_save(self, *args, **kwargs)

    monkeypatch.setattr(datasets.Dataset, "save_to_disk", failing_save)
    with pytest.raises(OSError, match="simulated"):
        pipeline.data.prepare_all(pipeline.data.DataConfig(image_size=32, **SMALL), out)
    assert calls["n"] == 3
    assert tree_digest(tmp_path) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == (["out"] if existing else [])


def test_prepare_all_failure_in_swap_restores_previous(tmp_path, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("previous run")
    real_replace = os.replace

    def flaky_replace(src, dst):
        if Path(src).name.startswith(".out.tmp-"):
            raise OSError("rename failed (simulated)")
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", flaky_replace)
    with pytest.raises(OSError, match="simulated"):
        pipeline.data.prepare_all(pipeline.data.DataConfig(image_size=32, **SMALL), out)
    assert (out / "keep.txt").read_text() == "previous run"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_prepare_all_with_imported_llava(tmp_path):
    cfg = pipeline.data.DataConfig(image_size=32, llava_json=str(FIXTURE_DIR / "data.json"), **SMALL)
    counts = pipeline.data.prepare_all(cfg, tmp_path / "out")
    assert counts["visual/imported"] == 4
    visual = datasets.load_from_disk(str(tmp_path / "out" / "visual"))
    imported = visual["imported"]
    # stored as the file's own bytes: not resized, not re-encoded
    assert imported[0]["image"].size == (16, 16)
    source = json.loads((FIXTURE_DIR / "data.json").read_text())[0]["image"]
    raw = visual["imported"].cast_column("image", datasets.Image(decode=False))[0]["image"]["bytes"]
    assert raw == (FIXTURE_DIR / source).read_bytes()
    assert imported[3]["image"] is None


def test_data_config_validation():
    with pytest.raises(ValueError, match="digits_test_fraction"):
        pipeline.data.DataConfig(digits_test_fraction=1.5)
    with pytest.raises(ValueError, match="unknown DataConfig keys"):
        pipeline.data.DataConfig.from_dict({"seed": 1, "bogus": 2})
    assert pipeline.data.DataConfig.from_dict({"seed": 3}).seed == 3


# ---------------------------------------------------------------------------
# LLaVA importer: good fixture
# ---------------------------------------------------------------------------


def test_import_good_fixture():
    ds, report = pipeline.data.import_llava_json(FIXTURE_DIR / "data.json", FIXTURE_DIR)
    assert report.imported == 4 and report.skipped == {} and report.messages == []
    assert ds.features == pipeline.data.VISUAL_FEATURES
    assert ds["id"] == ["000000001", "000000002", "000000003", "text-only-1"]
    assert set(ds["qtype"]) == {"imported"}
    r0, r1, r2, r3 = (ds[i] for i in range(4))
    assert r0["conversations"][0]["value"] == "<image>\nWhat colour is the circle?"
    # trailing <image> normalised to a leading one; multi-turn kept
    assert r1["conversations"][0]["value"] == "<image>\nWhat shape is shown in the image?"
    assert [t["from"] for t in r1["conversations"]] == ["human", "gpt", "human", "gpt"]
    assert r1["conversations"][2]["value"] == "What colour is it?"
    assert r0["image"].mode == "RGB" and r0["image"].size == (16, 16)
    assert r0["image"].getpixel((8, 8)) == (255, 0, 0)
    assert r2["image"].getpixel((8, 8)) == (0, 128, 0)  # images/sub/0003.png
    assert r3["image"] is None and "<image>" not in r3["conversations"][0]["value"]
    # image_dir defaults to the JSON's folder
    ds2, _ = pipeline.data.import_llava_json(FIXTURE_DIR / "data.json")
    assert ds2["id"] == ds["id"]


def test_import_jsonl(tmp_path):
    records = json.loads((FIXTURE_DIR / "data.json").read_text())
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n\n")
    ds, report = pipeline.data.import_llava_json(path, FIXTURE_DIR)
    assert report.imported == 4 and len(ds) == 4


# ---------------------------------------------------------------------------
# LLaVA importer: bad records
# ---------------------------------------------------------------------------


def _bad_case(tmp_path: Path, case: str) -> tuple[Path, str, str]:
    """Write a dataset with one good and one bad record. Returns (json, bad_field, reason)."""
    (tmp_path / "good.png").write_bytes(rgb_png())
    bad = good_record("bad-1", "img.png")
    image_bytes: bytes | None = rgb_png()
    field, reason = "image", ""
    if case == "corrupt":
        image_bytes, reason = b"\x89PNG\r\n\x1a\nthis is not an image", "corrupt_image"
    elif case == "truncated":
        image_bytes, reason = png(Image.effect_noise((64, 64), 50).convert("RGB"))[:200], "corrupt_image"
    elif case == "missing_file":
        image_bytes, reason = None, "missing_image"
    elif case == "zero_size":
        image_bytes, reason = b"", "zero_size_image"
    elif case == "no_gpt":
        bad["conversations"] = bad["conversations"][:1]
        field, reason = "conversations", "missing_turn"
    elif case == "no_human":
        bad["conversations"] = [{"from": "gpt", "value": "<image>\nred"}]
        field, reason = "conversations", "missing_turn"
    elif case == "token_missing":
        bad["conversations"][0]["value"] = "What colour?"
        field, reason = "conversations", "image_token_mismatch"
    elif case == "token_twice":
        bad["conversations"][0]["value"] = "<image>\nWhat colour? <image>"
        field, reason = "conversations", "image_token_mismatch"
    elif case == "token_without_image":
        del bad["image"]
        field, reason = "conversations", "image_token_mismatch"
    elif case == "empty_answer":
        bad["conversations"][1]["value"] = "  \n"
        field, reason = "conversations[1].value", "empty_answer"
    elif case == "missing_conversations":
        del bad["conversations"]
        field, reason = "conversations", "missing_field"
    elif case == "wrong_type":
        bad["conversations"][1]["value"] = 42
        field, reason = "conversations[1].value", "wrong_type"
    else:
        raise AssertionError(case)
    if image_bytes is not None:
        (tmp_path / "img.png").write_bytes(image_bytes)
    path = write_json(tmp_path / "data.json", [good_record("good-0", "good.png"), bad])
    return path, field, reason


BAD_CASES = [
    "corrupt", "truncated", "missing_file", "zero_size", "no_gpt", "no_human", "token_missing",
    "token_twice", "token_without_image", "empty_answer", "missing_conversations", "wrong_type",
]


@pytest.mark.parametrize("case", BAD_CASES)
def test_import_bad_record_raises_with_context(tmp_path, case):
    path, field, reason = _bad_case(tmp_path, case)
    with pytest.raises(pipeline.data.DataError) as info:
        pipeline.data.import_llava_json(path, tmp_path)
    err = info.value
    msg = str(err)
    assert str(path) in msg
    assert "record 1" in msg and "id='bad-1'" in msg
    assert f"field '{field}'" in msg
    assert (err.reason, err.field, err.record_id, err.index) == (reason, field, "bad-1", 1)


@pytest.mark.parametrize("case", BAD_CASES)
def test_import_bad_record_skip_mode(tmp_path, case, caplog):
    path, _, reason = _bad_case(tmp_path, case)
    with caplog.at_level(logging.WARNING, logger="pipeline.data"):
        ds, report = pipeline.data.import_llava_json(path, tmp_path, on_error="skip")
    assert ds["id"] == ["good-0"]
    assert report.imported == 1 and report.skipped == {reason: 1}
    assert len(report.messages) == 1 and "bad-1" in report.messages[0]
    assert any("bad-1" in rec.getMessage() for rec in caplog.records)


def test_malformed_jsonl_line_names_line(tmp_path):
    (tmp_path / "img.png").write_bytes(rgb_png())
    lines = [json.dumps(good_record("a")), "", '{"id": "b", "conversations": [', json.dumps(good_record("c"))]
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(pipeline.data.DataError) as info:
        pipeline.data.import_llava_json(path, tmp_path)
    msg = str(info.value)
    assert str(path) in msg and "line 3" in msg and "record 1" in msg and "malformed JSON" in msg
    ds, report = pipeline.data.import_llava_json(path, tmp_path, on_error="skip")
    assert ds["id"] == ["a", "c"] and report.skipped == {"malformed_json": 1}


def test_malformed_json_file_names_line(tmp_path):
    path = tmp_path / "data.json"
    path.write_text('[\n  {"id": "a",\n   "conversations": [}\n]\n')
    with pytest.raises(pipeline.data.DataError, match=r"data\.json: malformed JSON at line 3"):
        pipeline.data.import_llava_json(path, tmp_path)
    path.write_text('{"id": "a"}')
    with pytest.raises(pipeline.data.DataError, match="must be a list"):
        pipeline.data.import_llava_json(path, tmp_path)


def test_all_records_bad_in_skip_mode_raises(tmp_path):
    path = write_json(tmp_path / "data.json", [good_record("x", "nope.png")])
    with pytest.raises(pipeline.data.DataError, match="no valid records"):
        pipeline.data.import_llava_json(path, tmp_path, on_error="skip")


# ---------------------------------------------------------------------------
# LLaVA importer: image modes
# ---------------------------------------------------------------------------


def _mode_image(mode: str) -> tuple[bytes, str, tuple[int, int, int]]:
    """(file bytes, file suffix, expected RGB pixel after conversion)."""
    if mode == "L":
        return png(Image.new("L", (8, 8), 100)), ".png", (100, 100, 100)
    if mode == "CMYK":
        return png(Image.new("CMYK", (8, 8), (0, 255, 255, 0)), "TIFF"), ".tiff", (255, 0, 0)
    if mode == "I;16":
        arr = np.full((8, 8), 32896, dtype=np.uint16)  # 32896 / 257 = 128
        arr[0, 0] = 65535
        return png(Image.fromarray(arr)), ".png", (128, 128, 128)
    if mode == "I":
        return png(Image.new("I", (8, 8), 65535), "TIFF"), ".tiff", (255, 255, 255)
    if mode == "RGBA":
        return png(Image.new("RGBA", (8, 8), (0, 0, 255, 255))), ".png", (0, 0, 255)
    raise AssertionError(mode)


@pytest.mark.parametrize("mode", ["L", "CMYK", "I;16", "I", "RGBA"])
def test_image_modes_convert_and_refuse(tmp_path, mode):
    data, suffix, expected = _mode_image(mode)
    assert Image.open(io.BytesIO(data)).mode == mode
    (tmp_path / f"img{suffix}").write_bytes(data)
    path = write_json(tmp_path / "data.json", [good_record("m-1", f"img{suffix}")])

    ds, report = pipeline.data.import_llava_json(path, tmp_path, image_mode="convert")
    assert ds[0]["image"].mode == mode  # stored as it was; converted when read
    img = pipeline.data.to_rgb(ds[0]["image"])
    assert img.mode == "RGB" and img.getpixel((4, 4)) == expected
    assert report.converted_modes == {mode: 1}
    if mode == "I;16":
        assert img.getpixel((0, 0)) == (255, 255, 255)

    with pytest.raises(pipeline.data.DataError) as info:
        pipeline.data.import_llava_json(path, tmp_path, image_mode="refuse")
    msg = str(info.value)
    assert str(path) in msg and "id='m-1'" in msg and "field 'image'" in msg and repr(mode) in msg
    assert info.value.reason == "image_mode"


def test_cmyk_jpeg_converts(tmp_path):
    Image.new("CMYK", (8, 8), (0, 255, 255, 0)).save(tmp_path / "img.jpg", format="JPEG")
    path = write_json(tmp_path / "data.json", [good_record("j", "img.jpg")])
    ds, _ = pipeline.data.import_llava_json(path, tmp_path)
    r, g, b = pipeline.data.to_rgb(ds[0]["image"]).getpixel((2, 2))
    assert ds[0]["image"].size == (8, 8) and r > 200 and g < 60 and b < 60


def test_an_animated_image_keeps_its_first_frame_and_the_report_counts_it(tmp_path):
    frames = [Image.new("RGB", (8, 8), colour) for colour in ((255, 0, 0), (0, 255, 0), (0, 0, 255))]
    buffer = io.BytesIO()
    frames[0].save(buffer, format="GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
    (tmp_path / "moving.gif").write_bytes(buffer.getvalue())
    Image.new("RGB", (8, 8), (9, 9, 9)).save(tmp_path / "still.png")
    path = write_json(tmp_path / "data.json", [good_record("a-1", "moving.gif"), good_record("s-1", "still.png")])

    ds, report = pipeline.data.import_llava_json(path, tmp_path, image_mode="convert")
    assert report.imported == 2 and report.animated == 1
    first = pipeline.data.to_rgb(ds[0]["image"])
    assert first.getpixel((4, 4))[0] > 200 and first.getpixel((4, 4))[1] < 50  # red: the first frame
