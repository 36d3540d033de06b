"""Region-protected pruning: layer choice, in-place removal (config + layer_idx), export round trip, KV-cache generation."""

import json
import math

import pytest
import torch
from PIL import Image

import pipeline.model
from pipeline import pruning

PROMPT = "USER: <image>\nWhat colour is the circle? ASSISTANT:"


@pytest.fixture
def micro4(micro4_dir):
    model, processor = pipeline.model.load_vlm(micro4_dir)
    return model.eval(), processor


def prompt_inputs(processor):
    return dict(processor(images=Image.new("RGB", (40, 40), (255, 0, 0)), text=PROMPT, return_tensors="pt"))


def layer_idxs(model):
    return [[m.layer_idx for m in layer.modules() if hasattr(m, "layer_idx")] for layer in pipeline.model.decoder_layers(model)]


# ---------------------------------------------------------------------------------------------------- choosing
def test_choose_lowest_scores_outside_protected():
    scores = [0.5, 0.1, 0.4, 0.2, 0.3]
    assert pruning.choose_layers_to_prune(scores, 2) == [1, 3]
    assert pruning.choose_layers_to_prune(scores, 2, protected=[1]) == [3, 4]
    assert pruning.choose_layers_to_prune(scores, 1, protected=[1, 3]) == [4]
    assert pruning.choose_layers_to_prune([0.2, 0.2, 0.1, 0.2], 2) == [0, 2]  # ties: lower index first


def test_choose_never_prunes_nan_first():
    assert pruning.choose_layers_to_prune([math.nan, 0.9, math.nan, 0.8], 2) == [1, 3]
    assert pruning.choose_layers_to_prune([math.nan, 0.9, math.nan, 0.8, 0.7], 3, protected=[4]) == [0, 1, 3]  # NaN only once the finite ones are used up


def test_choose_refusals():
    scores = [0.1, 0.2, 0.3, 0.4]
    with pytest.raises(ValueError, match=">= 1"):
        pruning.choose_layers_to_prune(scores, 0)
    with pytest.raises(ValueError, match="integer"):
        pruning.choose_layers_to_prune(scores, 1.0)
    with pytest.raises(ValueError, match="unprotected"):
        pruning.choose_layers_to_prune(scores, 2, protected=[0, 1])  # 2 unprotected: n must be < 2
    with pytest.raises(ValueError, match="unprotected"):
        pruning.choose_layers_to_prune(scores, 4)
    with pytest.raises(ValueError, match="out of range"):
        pruning.choose_layers_to_prune(scores, 1, protected=[4])
    with pytest.raises(ValueError, match="negative"):
        pruning.choose_layers_to_prune(scores, 1, protected=[-1])
    with pytest.raises(ValueError, match="duplicate"):
        pruning.choose_layers_to_prune(scores, 1, protected=[1, 1])


def test_remap_layers():
    kept = [0, 2, 3, 5]
    assert pruning.remap_layers(kept, [2, 5, 0]) == [1, 3, 0]
    with pytest.raises(ValueError, match=r"\[1\]"):
        pruning.remap_layers(kept, [1, 2])


# ---------------------------------------------------------------------------------------------------- removing
def test_remove_layers_updates_config_and_layer_idx(micro4):
    model, _ = micro4
    originals = list(pipeline.model.decoder_layers(model))
    kept = pruning.remove_layers(model, [2, 0], protected=[1])
    assert kept == [1, 3]
    layers = pipeline.model.decoder_layers(model)
    assert [id(x) for x in layers] == [id(originals[1]), id(originals[3])]
    assert model.config.text_config.num_hidden_layers == 2
    assert pipeline.model.language_model(model).config.num_hidden_layers == 2
    assert layer_idxs(model) == [[0], [1]]  # every module with a layer_idx, here the attention module
    assert pruning.remap_layers(kept, [1, 3]) == [0, 1]


def test_remove_layers_filters_per_layer_config_lists(micro4):
    model, _ = micro4
    tc = model.config.text_config
    tc.layer_types = ["a", "b", "c", "d"]
    pruning.remove_layers(model, [1, 2])
    assert tc.layer_types == ["a", "d"]
    assert tc.architectures == ["LlamaForCausalLM"]  # not a per-layer list


def test_remove_layers_refusals(micro4):
    model, _ = micro4
    with pytest.raises(ValueError, match=r"protected layer\(s\) \[2\]"):
        pruning.remove_layers(model, [0, 2], protected=[2, 3])
    with pytest.raises(ValueError, match="no decoder layer"):
        pruning.remove_layers(model, [0, 1, 2, 3])
    with pytest.raises(ValueError, match=r"duplicate layer indices \[1\]"):
        pruning.remove_layers(model, [1, 1])
    with pytest.raises(ValueError, match="4 is out of range"):
        pruning.remove_layers(model, [4])
    with pytest.raises(ValueError, match="-1 is negative"):
        pruning.remove_layers(model, [-1])
    with pytest.raises(ValueError, match="empty"):
        pruning.remove_layers(model, [])
    with pytest.raises(ValueError, match="protected layers.*out of range"):
        pruning.remove_layers(model, [0], protected=[7])
    # nothing changed
    assert len(pipeline.model.decoder_layers(model)) == 4 and model.config.text_config.num_hidden_layers == 4
    assert layer_idxs(model) == [[0], [1], [2], [3]]


# ---------------------------------------------------------------------------------------------------- export
def test_export_round_trip_and_kv_cache_generation(micro4, tmp_path):
    from transformers import LlavaForConditionalGeneration

    model, processor = micro4
    inputs = prompt_inputs(processor)
    kept = pruning.remove_layers(model, [1, 2], protected=[0])
    out = pruning.export_pruned(model, processor, tmp_path / "pruned", removed=[1, 2], kept=kept, meta={"metric": "angular"})

    record = json.loads((out / pruning.PRUNING_FILE).read_text())
    assert record["removed"] == [1, 2] and record["kept"] == [0, 3]
    assert record["num_layers_before"] == 4 and record["num_layers_after"] == 2
    assert record["new_index"] == {"0": 0, "3": 1} and record["meta"] == {"metric": "angular"}
    assert pruning.read_pruning(out) == record
    assert json.loads((out / "config.json").read_text())["text_config"]["num_hidden_layers"] == 2
    assert list(out.glob("*.safetensors"))

    loaded = LlavaForConditionalGeneration.from_pretrained(out).eval()
    assert len(pipeline.model.decoder_layers(loaded)) == 2
    with torch.no_grad():
        expected = model(**inputs).logits
        got = loaded(**inputs).logits
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)

    # greedy decoding with the KV cache equals decoding without it (stale layer_idx breaks this: issue 30508)
    for m in (model, loaded):
        kw = dict(max_new_tokens=8, min_new_tokens=8, do_sample=False)
        with_cache = m.generate(**inputs, use_cache=True, **kw)
        without = m.generate(**inputs, use_cache=False, **kw)
        assert with_cache.shape[1] == inputs["input_ids"].shape[1] + 8
        assert torch.equal(with_cache, without)


def test_export_refusals_write_nothing(micro4, tmp_path):
    model, processor = micro4
    kept = pruning.remove_layers(model, [3])
    with pytest.raises(ValueError, match="partition"):
        pruning.export_pruned(model, processor, tmp_path / "a", removed=[3], kept=[0, 1])
    with pytest.raises(ValueError, match="decoder layers"):
        pruning.export_pruned(model, processor, tmp_path / "b", removed=[2, 3], kept=[0, 1])
    with pytest.raises(TypeError):
        pruning.export_pruned(model, processor, tmp_path / "c", removed=[3], kept=kept, meta={"bad": object()})
    assert list(tmp_path.iterdir()) == []
