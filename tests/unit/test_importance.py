"""Layer importance: hand-computed token math, NaN safety, true last-layer capture, attention share, param deltas."""

import math

import pytest
import torch
from PIL import Image

from pipeline import importance
import pipeline.model

PROMPTS = [
    "USER: <image>\nWhat colour is the circle? ASSISTANT:",
    "USER: <image>\nHow many shapes are there, and is the red circle on the left or the right? ASSISTANT: two, left",
]


@pytest.fixture
def micro4(micro4_dir):
    return pipeline.model.load_vlm(micro4_dir)


COLOURS = [(255, 0, 0), (0, 0, 255)]


def image_batch(processor, prompts=PROMPTS, colours=COLOURS):
    imgs = [Image.new("RGB", (40, 40), c) for c in colours[: len(prompts)]]
    return dict(processor(images=imgs, text=prompts, return_tensors="pt", padding=True))


# ---------------------------------------------------------------------------------------------------- token math
def test_token_math_hand_computed():
    e1, e2 = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]])
    assert importance.block_influence(e1, e2) == pytest.approx(1.0)
    assert importance.angular_distance(e1, e2) == pytest.approx(0.5)
    assert importance.block_influence(e1, e1) == pytest.approx(0.0, abs=1e-12)
    assert importance.angular_distance(e1, 3 * e1) == pytest.approx(0.0, abs=1e-7)
    assert importance.block_influence(e1, -e1) == pytest.approx(2.0)
    assert importance.angular_distance(e1, -e1) == pytest.approx(1.0)
    # 45 degrees: cos = 1/sqrt(2), angle = 1/4 of pi
    assert importance.angular_distance(e1, torch.tensor([[1.0, 1.0]])) == pytest.approx(0.25)


def test_token_math_means_over_masked_tokens():
    h_in = torch.tensor([[[1.0, 0.0], [1.0, 0.0], [1.0, 0.0]]])  # [B=1, T=3, H=2]
    h_out = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]]])  # cos 1, 0, -1
    assert importance.block_influence(h_in, h_out) == pytest.approx(1.0)  # 1 - mean(1, 0, -1)
    assert importance.angular_distance(h_in, h_out) == pytest.approx(0.5)  # mean(0, .5, 1)
    mask = torch.tensor([[True, True, False]])
    assert importance.block_influence(h_in, h_out, mask) == pytest.approx(0.5)
    assert importance.angular_distance(h_in, h_out, mask) == pytest.approx(0.25)


def test_nan_safety():
    zero = torch.zeros(1, 2)
    e1 = torch.tensor([[1.0, 0.0]])
    assert importance.token_cosine(zero, e1).item() == 0.0
    assert importance.token_cosine(zero, zero).item() == 0.0
    assert importance.block_influence(zero, zero) == pytest.approx(1.0)
    # cosine rounding beyond 1 is clamped, never NaN
    v = torch.tensor([[0.1, 0.2, 0.3]], dtype=torch.float32)
    assert not math.isnan(importance.angular_distance(v, v * 1.0000001))
    none = torch.zeros(1, dtype=torch.bool)
    assert math.isnan(importance.block_influence(e1, e1, none))
    assert math.isnan(importance.angular_distance(e1, e1, none))
    assert importance.multimodal_bi(0.2, 0.4) == pytest.approx(0.3)
    assert importance.multimodal_bi(math.nan, 0.4) == 0.4
    assert importance.multimodal_bi(0.2, math.nan) == 0.2
    assert math.isnan(importance.multimodal_bi(math.nan, math.nan))


# ---------------------------------------------------------------------------------------------------- on the model
def manual_decoder_forward(model, batch):
    """Run the decoder layers one by one on the merged embeddings; returns [h_0, h_1, ..., h_L] without final norm."""
    with torch.no_grad():
        out = model(**batch, output_hidden_states=True, use_cache=False)
        h = out.hidden_states[0]
        lm = pipeline.model.language_model(model)
        pos = torch.arange(h.shape[1]).unsqueeze(0)
        pe = lm.rotary_emb(h, position_ids=pos)
        states = [h]
        for layer in pipeline.model.decoder_layers(model):
            h = layer(h, attention_mask=None, position_embeddings=pe, position_ids=pos)
            h = h[0] if isinstance(h, tuple) else h
            states.append(h)
    return states, out.hidden_states


def test_hooks_capture_true_last_layer_output(micro4):
    model, processor = micro4
    model.eval()
    norm = pipeline.model.language_model(model).norm
    with torch.no_grad():  # a trained final norm is not a pure rescale (unit weights would preserve every cosine)
        norm.weight.copy_(torch.linspace(0.1, 3.0, norm.weight.numel()))
    batch = image_batch(processor, PROMPTS[:1])  # one sequence: no padding, plain causal mask
    states, hf_hidden = manual_decoder_forward(model, batch)
    L = len(states) - 1
    for i in range(1, L):  # intermediate layers agree with HF's hidden states
        torch.testing.assert_close(states[i], hf_hidden[i], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(norm(states[L]), hf_hidden[L], atol=1e-5, rtol=1e-5)  # HF's last one is post-norm

    scores = importance.hidden_state_scores(model, [batch], attention=False)
    ids = batch["input_ids"]
    image = ids == pipeline.model.image_token_id(model)
    for i in range(L):
        assert scores.bi[i] == pytest.approx(importance.block_influence(states[i], states[i + 1]), abs=1e-6)
        assert scores.angular[i] == pytest.approx(importance.angular_distance(states[i], states[i + 1]), abs=1e-6)
        assert scores.bi_image[i] == pytest.approx(importance.block_influence(states[i], states[i + 1], image), abs=1e-6)
        assert scores.bi_text[i] == pytest.approx(importance.block_influence(states[i], states[i + 1], ~image), abs=1e-6)
        assert scores.mm_bi[i] == pytest.approx((scores.bi_image[i] + scores.bi_text[i]) / 2)
    post_norm_bi = importance.block_influence(states[L - 1], hf_hidden[L])
    assert abs(scores.bi[-1] - post_norm_bi) > 1e-3  # the post-norm state would have given a different score
    assert scores.tokens == {"all": ids.numel(), "image": int(image.sum()), "text": int((~image).sum())}
    assert scores.image_attention is None


def test_padded_batches_pool_valid_tokens(micro4):
    model, processor = micro4
    batch = image_batch(processor)
    assert (batch["attention_mask"] == 0).any(), "the prompts should pad"
    twice = importance.hidden_state_scores(model, [batch, batch], attention=False)
    assert twice.tokens["all"] == 2 * int(batch["attention_mask"].sum())
    # padding is ignored: the padded batch scores like its two sequences run alone, pooled token by token
    alone = [image_batch(processor, [p], [c]) for p, c in zip(PROMPTS, COLOURS)]
    pooled = importance.hidden_state_scores(model, alone, attention=False)
    padded = importance.hidden_state_scores(model, [batch], attention=False)
    assert pooled.tokens == padded.tokens
    for metric in importance.HIDDEN_METRICS:
        assert getattr(padded, metric) == pytest.approx(getattr(pooled, metric), abs=1e-5)
        assert getattr(twice, metric) == pytest.approx(getattr(padded, metric), abs=1e-9)


def test_text_only_batch_gives_nan_image_metrics(micro4):
    model, processor = micro4
    batch = dict(processor.tokenizer(["USER: hello there ASSISTANT: hi"], return_tensors="pt"))
    scores = importance.layer_importance(model, [batch])
    n = len(pipeline.model.decoder_layers(model))
    assert all(math.isnan(v) for v in scores.bi_image)
    assert all(math.isnan(v) for v in scores.image_attention)
    assert scores.mm_bi == scores.bi_text
    assert all(0.0 <= v <= 2.0 for v in scores.bi) and len(scores.bi) == n
    rows = scores.to_rows()
    assert rows[0]["bi_image"] is None and rows[0]["layer"] == 0


def test_image_attention_share_hand_made():
    img = 9
    ids = torch.tensor([[1, img, img, 5, 6]])
    att = torch.zeros(1, 2, 5, 5)
    att[0, :, 3] = torch.tensor([0.1, 0.2, 0.3, 0.4, 0.0])  # query 3: 0.5 on image keys
    att[0, :, 4] = torch.tensor([0.5, 0.0, 0.1, 0.2, 0.2])  # query 4: 0.1 on image keys
    att[0, :, :3] = 1.0  # queries 0..2 (BOS / image) must be ignored
    sums, pairs = importance.image_attention_share([att, att * 0], ids, None, img)
    assert pairs == 4  # 2 text queries x 2 heads
    assert sums[0] / pairs == pytest.approx(0.3)
    assert sums[1] == 0.0
    # a padded query is ignored
    sums, pairs = importance.image_attention_share([att], ids, torch.tensor([[1, 1, 1, 1, 0]]), img)
    assert pairs == 2 and sums[0] / pairs == pytest.approx(0.5)


def test_image_attention_on_micro(micro4):
    model, processor = micro4
    batch = image_batch(processor)
    impl = model.config.text_config._attn_implementation
    scores = importance.layer_importance(model, [batch])
    assert model.config.text_config._attn_implementation == impl  # restored
    assert all(0.0 <= v <= 1.0 for v in scores.image_attention)

    # recompute by hand with eager attention: rows are distributions, the share matches
    image_id = pipeline.model.image_token_id(model)
    with importance.eager_attention(model), torch.no_grad():
        atts = model(**batch, output_attentions=True).attentions
    ids, valid = batch["input_ids"], batch["attention_mask"].bool()
    image = ids == image_id
    total, count = [0.0] * len(atts), 0
    for b in range(ids.shape[0]):
        first = int(image[b].nonzero()[0])
        for t in range(first + 1, ids.shape[1]):
            if not valid[b, t] or image[b, t]:
                continue
            for layer, a in enumerate(atts):
                rows = a[b, :, t]  # [heads, keys]
                torch.testing.assert_close(rows.sum(-1), torch.ones(rows.shape[0]), atol=1e-5, rtol=0)
                total[layer] += float(rows[:, image[b]].sum())
            count += atts[0].shape[1]
    assert scores.image_attention == pytest.approx([s / count for s in total], abs=1e-6)


# ---------------------------------------------------------------------------------------------------- param deltas
def test_param_metrics_hand_made():
    w = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    assert importance.weight_change_ratio(w, 2 * w) == pytest.approx(1.0)
    assert importance.weight_angular_distance(w, 2 * w) == pytest.approx(0.0, abs=1e-7)
    assert importance.weight_angular_distance(w, w) == 0.0
    orth = torch.tensor([[1.0, 0.0], [0.0, 0.0]]), torch.tensor([[0.0, 1.0], [0.0, 0.0]])
    assert importance.weight_angular_distance(*orth) == pytest.approx(0.5)
    assert importance.weight_angular_distance(w, -w) == pytest.approx(1.0)
    assert not math.isnan(importance.weight_change_ratio(torch.zeros(2, 2), w))

    prefix = "model.language_model.layers"
    base = {
        f"{prefix}.0.self_attn.q_proj.weight": w, f"{prefix}.0.mlp.up_proj.weight": w,
        f"{prefix}.0.input_layernorm.weight": torch.ones(2),  # 1-D: not a linear weight
        f"{prefix}.1.self_attn.q_proj.weight": orth[0],
        "model.vision_tower.vision_model.encoder.layers.0.mlp.fc1.weight": w,  # vision layer: ignored
    }
    tuned = dict(base)
    tuned[f"{prefix}.0.self_attn.q_proj.weight"] = 2 * w
    tuned[f"{prefix}.0.mlp.up_proj.weight"] = 3 * w
    tuned[f"{prefix}.0.input_layernorm.weight"] = 5 * torch.ones(2)
    tuned[f"{prefix}.1.self_attn.q_proj.weight"] = orth[1]
    tuned["model.vision_tower.vision_model.encoder.layers.0.mlp.fc1.weight"] = -w
    change, angular = importance.param_delta_scores(base, tuned)
    assert change == pytest.approx([1.0 + 2.0, math.sqrt(2.0)])
    assert angular == pytest.approx([0.0, 0.5], abs=1e-7)

    with pytest.raises(ValueError, match="layers"):
        importance.param_delta_scores(base, {k: v for k, v in tuned.items() if ".1." not in k})
    with pytest.raises(ValueError, match="shape"):
        importance.param_delta_scores(base, {**tuned, f"{prefix}.1.self_attn.q_proj.weight": torch.ones(3, 2)})


def test_layer_importance_with_base(micro4, micro4_dir):
    model, processor = micro4
    base, _ = pipeline.model.load_vlm(micro4_dir)
    with torch.no_grad():
        pipeline.model.decoder_layers(model)[2].mlp.down_proj.weight.mul_(2.0)
    scores = importance.layer_importance(model, [image_batch(processor)], base=base)
    assert scores.param_change == pytest.approx([0.0, 0.0, 1.0, 0.0])
    assert scores.param_angular == pytest.approx([0.0, 0.0, 0.0, 0.0], abs=1e-7)
    # module and state-dict forms agree
    sd_change, _ = importance.param_delta_scores(base.state_dict(), model.state_dict())
    assert sd_change == pytest.approx(scores.param_change)
    d = scores.to_dict()
    assert set(d) == set(importance.METRICS) | {"tokens"}
    assert importance.LayerScores.from_dict(d).bi == pytest.approx(scores.bi)
    rows = scores.to_rows()
    assert [r["layer"] for r in rows] == [0, 1, 2, 3]
    assert set(rows[0]) == {"layer", *importance.METRICS}


def test_no_batches_raises(micro):
    model, _ = micro
    with pytest.raises(ValueError, match="no calibration batches"):
        importance.layer_importance(model, [])


# ---------------------------------------------------------------------------------------- the base LM's depth profile
def test_the_base_lm_profile_is_measured_on_text_alone(micro4):
    """BI of the language model alone, on text: the same numbers the full model's hooks give on a text-only batch,
    one per decoder layer, and the spread reads them (hand-checked on known profiles)."""
    vlm, processor = micro4
    texts = ["the red circle is left of the blue square", "two shapes"]
    bi = importance.text_block_influence(vlm.model.language_model, processor.tokenizer, texts, batch_size=2,
                                         max_length=16)
    assert len(bi) == 4 and all(0 <= b <= 2 for b in bi)
    enc = processor.tokenizer(texts, return_tensors="pt", padding=True, truncation=True, max_length=16)
    full = importance.hidden_state_scores(vlm, [dict(enc)], attention=False).bi
    assert bi == pytest.approx(full, abs=1e-9)
    even = importance.influence_spread([0.1] * 4)
    assert even["top_share"] == pytest.approx(0.25) and even["effective_layers"] == pytest.approx(4.0)
    assert even["median_to_max"] == pytest.approx(1.0)
    one = importance.influence_spread([0.8, 0.0, 0.0, 0.0])
    assert one["top_share"] == 1.0 and one["effective_layers"] == pytest.approx(1.0) and one["median_to_max"] == 0.0
    # the tiny LM's measured profile (layer 0 does the work) against a published-like one (every layer some)
    tiny = [0.799, 0.034, 0.008, 0.009, 0.008, 0.015, 0.012, 0.019, 0.026, 0.036, 0.035, 0.033]
    assert importance.influence_spread(tiny)["median_to_max"] == pytest.approx(0.0225 / 0.799)
    assert importance.influence_spread([0.85, 0.37, 0.66] + [0.12] * 9)["median_to_max"] == pytest.approx(0.12 / 0.85)
    assert math.isnan(importance.influence_spread([0.0, 0.0])["top_share"])
