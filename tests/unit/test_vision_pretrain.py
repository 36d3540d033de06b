"""Contrastive pretraining of the tiny vision tower (stage build_base, params vision_pretrain): CLIP / SigLIP around
the tower, the caption batches, the retrieval metric, and that training teaches the tower to tell images apart."""


import datasets
import pytest
import torch
from PIL import Image
from transformers import AutoImageProcessor, AutoModel, AutoTokenizer

from conftest import MICRO_TEXTS
from pipeline import evaluation, training
import pipeline.model
from pipeline.config import TrainParams

COLOURS = {"red": (230, 30, 30), "green": (30, 190, 40), "blue": (40, 90, 255), "yellow": (245, 220, 20),
           "white": (245, 245, 245), "grey": (120, 120, 120)}


@pytest.fixture(scope="module", params=["clip", "siglip"])
def parts(request, tmp_path_factory):
    spec = pipeline.model.PROFILES["micro"].model_copy(update={"vision_type": request.param})
    vision_dir, lm_dir = pipeline.model.build_offline_parts(spec, MICRO_TEXTS, tmp_path_factory.mktemp(request.param), seed=0)
    return vision_dir, AutoTokenizer.from_pretrained(lm_dir)


def colour_pairs(vision_dir, repeats: int = 1) -> datasets.Dataset:
    """One caption record per colour: a square of that colour in the top-left corner."""
    records = []
    for name, rgb in list(COLOURS.items()) * repeats:
        img = Image.new("RGB", (32, 32), (0, 0, 0))
        img.paste(rgb, (2, 2, 18, 18))
        records.append({"image": img, "conversations": [{"from": "human", "value": "<image>\nDescribe the image."},
                                                        {"from": "gpt", "value": f"a {name} square on the top left."}]})
    ds = datasets.Dataset.from_list(records)
    return training.image_text_dataset(ds, AutoImageProcessor.from_pretrained(vision_dir))


def test_the_tower_is_shared_and_captions_are_pooled_at_their_end_token(parts):
    vision_dir, tokenizer = parts
    tower = AutoModel.from_pretrained(vision_dir)
    model, end_id = pipeline.model.contrastive_model(tower, tokenizer, text_layers=1, max_length=16)
    assert model.vision_model is tower and end_id == len(tokenizer)
    data = colour_pairs(vision_dir)
    batch = training.ImageTextCollator(tokenizer, end_id, 16)([data[i] for i in range(len(data))])
    assert batch["input_ids"].shape == (len(COLOURS), 16)
    ends = [(row == end_id).nonzero().flatten().tolist() for row in batch["input_ids"]]
    lengths = batch["attention_mask"].sum(dim=1).tolist()
    assert all(e == [n - 1] for e, n in zip(ends, lengths))  # exactly one end token, the last unpadded one
    if tower.config.model_type == "clip_vision_model":
        text = model.text_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        at_end = text.last_hidden_state[torch.arange(len(lengths)), torch.tensor(lengths) - 1]
        torch.testing.assert_close(text.pooler_output, at_end)
    out = model(**batch)
    assert torch.isfinite(out.loss)
    out.loss.backward()
    assert all(p.grad is not None for p in tower.parameters() if p.requires_grad)


def test_pretraining_teaches_the_tower_to_match_images_to_captions(parts, tmp_path):
    vision_dir, tokenizer = parts
    torch.manual_seed(0)
    tower = AutoModel.from_pretrained(vision_dir)
    before_weights = {n: p.detach().clone() for n, p in tower.named_parameters()}
    model, end_id = pipeline.model.contrastive_model(tower, tokenizer, text_layers=1, max_length=16)
    data = colour_pairs(vision_dir, repeats=4)
    held_out = colour_pairs(vision_dir)
    collator = training.ImageTextCollator(tokenizer, end_id, 16)
    before = evaluation.image_to_caption_accuracy(model, held_out, collator, batch_size=4)
    model.requires_grad_(True)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    params = TrainParams(max_steps=60, batch_size=len(COLOURS), save_steps=100, logging_steps=10, warmup_ratio=0.0)
    training.train(model, data, collator=collator, optimizer=optimizer, params=params, ckpt_dir=tmp_path / "ckpt", seed=0,
            fingerprint={"test": 1})
    after = evaluation.image_to_caption_accuracy(model, held_out, collator, batch_size=4)
    assert before < 0.5 and after == 1.0, (before, after)
    assert any(not torch.equal(before_weights[n], p) for n, p in tower.named_parameters())
