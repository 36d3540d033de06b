"""Model assembly: the micro profile's tokenizer and composition, save/load round trips (CLIP and SigLIP), structure
lookups, generation, remote-code warnings and ProfileSpec validation."""

import json
import os

import pytest
import torch
from PIL import Image
from torch import nn

from conftest import MICRO_TEXTS
import pipeline.model
from pipeline.data.encoding import num_image_tokens

PROMPT = "USER: <image>\nWhat colour is the circle? ASSISTANT:"


def test_offline_env():
    assert os.environ.get("HF_HUB_OFFLINE") == "1"


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    """(vision_dir, lm_dir) for the CLIP micro profile."""
    return pipeline.model.build_offline_parts(pipeline.model.PROFILES["micro"], MICRO_TEXTS, tmp_path_factory.mktemp("micro_parts"), seed=0)


@pytest.fixture(scope="module")
def siglip_parts(tmp_path_factory):
    spec = pipeline.model.PROFILES["micro"].model_copy(update={"vision_type": "siglip"})
    return pipeline.model.build_offline_parts(spec, MICRO_TEXTS, tmp_path_factory.mktemp("micro_siglip"), seed=0)


def image(colour=(255, 0, 0), size=(40, 30)):
    return Image.new("RGB", size, colour)


def state_dicts_equal(a: nn.Module, b: nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert set(sa) == set(sb)
    for k in sa:
        assert sa[k].dtype == sb[k].dtype, k
        assert torch.equal(sa[k], sb[k]), k


# ---------------------------------------------------------------------------------------------------- tokenizer
def test_image_token_is_one_token(micro):
    model, processor = micro
    tok = processor.tokenizer
    ids = tok(pipeline.model.IMAGE_TOKEN, add_special_tokens=False).input_ids
    assert len(ids) == 1
    assert ids[0] == tok.convert_tokens_to_ids(pipeline.model.IMAGE_TOKEN) == pipeline.model.image_token_id(model)
    assert ids[0] != tok.unk_token_id
    assert tok.tokenize("<image><image>") == ["<image>", "<image>"]  # never merged with neighbours
    assert tok("USER: <image>\nhi", add_special_tokens=False).input_ids.count(ids[0]) == 1


def test_special_tokens(micro):
    _, processor = micro
    tok = processor.tokenizer
    assert tok.bos_token == "<s>" and tok.eos_token == "</s>" and tok.pad_token == "<pad>"
    assert tok("hi").input_ids[0] == tok.bos_token_id


def test_trained_tokenizer_directly():
    tok = pipeline.model.train_tokenizer(MICRO_TEXTS, 300)
    assert len(tok) <= 300
    assert len(tok("<image>", add_special_tokens=False).input_ids) == 1
    assert tok.decode(tok("What colour?", add_special_tokens=False).input_ids) == "What colour?"


# ---------------------------------------------------------------------------------------------------- compose
def test_compose_llava_structure(parts):
    from transformers import LlavaForConditionalGeneration

    model, processor = pipeline.model.compose_llava(str(parts[0]), str(parts[1]))
    assert type(model) is LlavaForConditionalGeneration
    assert model.config.vision_feature_layer == -2
    assert model.config.vision_feature_select_strategy == "default"  # CLIP: the CLS token is dropped
    proj = pipeline.model.projector(model)
    linears = [m for m in proj.modules() if isinstance(m, nn.Linear)]
    assert len(linears) == 2
    assert linears[0].in_features == pipeline.model.PROFILES["micro"].vision_hidden
    assert linears[1].out_features == pipeline.model.PROFILES["micro"].lm_hidden
    acts = [m for m in proj.children() if not isinstance(m, nn.Linear)]
    assert len(acts) == 1 and "GELU" in type(acts[0]).__name__
    x = torch.linspace(-3, 3, 13)
    assert torch.allclose(acts[0](x), torch.nn.functional.gelu(x), atol=1e-6)
    # nothing left on the meta device
    assert all(p.device.type == "cpu" for p in model.parameters())
    assert all(b.device.type == "cpu" for b in model.buffers())
    assert pipeline.model.num_decoder_layers(model) == 2
    assert pipeline.model.language_model_path(model) == "model.language_model"
    assert model.config.image_token_id == processor.tokenizer.convert_tokens_to_ids(pipeline.model.IMAGE_TOKEN)
    assert model.generation_config.pad_token_id == processor.tokenizer.pad_token_id
    assert model.generation_config.eos_token_id == processor.tokenizer.eos_token_id


def test_compose_llava_bf16(parts):
    model, _ = pipeline.model.compose_llava(str(parts[0]), str(parts[1]), dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}


def test_compose_rejects_a_non_vision_encoder(parts):
    with pytest.raises(pipeline.model.ModelStructureError, match="model_type 'llama'"):
        pipeline.model.compose_llava(str(parts[1]), str(parts[1]))


def test_num_image_tokens(micro):
    _, processor = micro
    spec = pipeline.model.PROFILES["micro"]
    assert num_image_tokens(processor) == (spec.image_size // spec.patch_size) ** 2 == 16


def test_processor_expands_image_token(micro):
    model, processor = micro
    out = processor(images=image(), text=PROMPT, return_tensors="pt")
    assert int((out["input_ids"] == pipeline.model.image_token_id(model)).sum()) == num_image_tokens(processor)
    assert tuple(out["pixel_values"].shape) == (1, 3, 32, 32)


# ---------------------------------------------------------------------------------------------------- save / load
def test_save_vlm_round_trip(micro, tmp_path):
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    model, processor = micro
    out = tmp_path / "saved"
    pipeline.model.save_vlm(model, processor, out, extra_json={"selection.json": {"layers": [1, 3], "strategy": "uniform"}})
    assert list(out.glob("*.safetensors"))
    assert not list(out.glob("*.bin"))
    assert json.loads((out / "selection.json").read_text()) == {"layers": [1, 3], "strategy": "uniform"}
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary dirs left behind

    loaded = LlavaForConditionalGeneration.from_pretrained(out)
    state_dicts_equal(model, loaded)
    proc2 = AutoProcessor.from_pretrained(out)
    assert proc2.tokenizer.get_vocab() == processor.tokenizer.get_vocab()
    a = processor(images=image(), text=PROMPT, return_tensors="pt")
    b = proc2(images=image(), text=PROMPT, return_tensors="pt")
    assert torch.equal(a["input_ids"], b["input_ids"])
    assert torch.equal(a["pixel_values"], b["pixel_values"])


def test_save_vlm_overwrites(micro, tmp_path):
    model, processor = micro
    out = tmp_path / "saved"
    out.mkdir()
    (out / "stale.txt").write_text("old")
    pipeline.model.save_vlm(model, processor, out)
    assert not (out / "stale.txt").exists()
    assert list(out.glob("*.safetensors"))


def test_load_vlm_round_trip(micro_dir, micro):
    model, _ = micro
    again, processor = pipeline.model.load_vlm(micro_dir)
    state_dicts_equal(model, again)
    assert num_image_tokens(processor) == 16


def test_load_vlm_without_weights(tmp_path, micro_dir):
    empty = tmp_path / "empty_model"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match=str(empty)):
        pipeline.model.load_vlm(empty)
    # a config but no weights: still refused, before transformers gets a chance to guess
    cfg_only = tmp_path / "config_only"
    cfg_only.mkdir()
    (cfg_only / "config.json").write_text((micro_dir / "config.json").read_text())
    with pytest.raises(FileNotFoundError, match=str(cfg_only)):
        pipeline.model.load_vlm(cfg_only)


def test_trust_remote_code_warns(micro_dir):
    with pytest.warns(UserWarning, match="trust_remote_code=True"):
        pipeline.model.load_vlm(micro_dir, trust_remote_code=True)


def test_no_warning_without_remote_code(micro_dir, recwarn):
    pipeline.model.load_vlm(micro_dir)
    assert not [w for w in recwarn if "trust_remote_code" in str(w.message)]


def test_compose_trust_remote_code_warns(parts):
    with pytest.warns(UserWarning, match="trust_remote_code=True"):
        pipeline.model.compose_llava(str(parts[0]), str(parts[1]), trust_remote_code=True)


# ---------------------------------------------------------------------------------------------------- structure
@pytest.mark.parametrize("make", ["linear", "clip_vision", "sequential"])
def test_decoder_layers_on_a_model_without_layers(make):
    from transformers import CLIPVisionModel

    if make == "linear":
        m, name = nn.Linear(4, 4), "Linear"
    elif make == "sequential":
        m, name = nn.Sequential(nn.Linear(4, 4)), "Sequential"
    else:
        m, name = CLIPVisionModel(pipeline.model.vision_config(pipeline.model.PROFILES["micro"])), "CLIPVisionModel"
    with pytest.raises(pipeline.model.ModelStructureError, match=name):
        pipeline.model.decoder_layers(m)
    with pytest.raises(pipeline.model.ModelStructureError, match=name):
        pipeline.model.num_decoder_layers(m)
    assert issubclass(pipeline.model.ModelStructureError, ValueError)


def test_projector_and_vision_lookup_errors():
    with pytest.raises(pipeline.model.ModelStructureError, match="Linear has no vision tower"):
        pipeline.model.vision_tower(nn.Linear(2, 2))
    with pytest.raises(pipeline.model.ModelStructureError, match="Linear has no multimodal projector"):
        pipeline.model.projector(nn.Linear(2, 2))
    from transformers import CLIPVisionModel

    with pytest.raises(pipeline.model.ModelStructureError, match="CLIPVisionModel config has no image token id"):
        pipeline.model.image_token_id(CLIPVisionModel(pipeline.model.vision_config(pipeline.model.PROFILES["micro"])))


def test_structure_lookups(micro):
    model, _ = micro
    assert pipeline.model.decoder_layers(model) is model.model.language_model.layers
    assert pipeline.model.vision_tower(model) is model.model.vision_tower
    assert pipeline.model.projector(model) is model.model.multi_modal_projector
    assert pipeline.model.language_model(model) is model.model.language_model
    assert pipeline.model.text_config(model).num_hidden_layers == 2
    assert pipeline.model.text_config(model).hidden_size == 32


# ---------------------------------------------------------------------------------------------------- generation
def greedy(model, processor, colour=(255, 0, 0), max_new_tokens=5):
    inputs = processor(images=image(colour), text=PROMPT, return_tensors="pt")
    model.eval()
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    return inputs, out


def test_greedy_generate(micro):
    model, processor = micro
    inputs, out = greedy(model, processor)
    n = inputs["input_ids"].shape[1]
    assert out.shape[0] == 1 and n < out.shape[1] <= n + 5
    assert torch.equal(out[0, :n], inputs["input_ids"][0])
    assert pipeline.model.image_token_id(model) not in out[0, n:].tolist()
    _, again = greedy(model, processor)
    assert torch.equal(out, again)  # greedy is deterministic
    assert isinstance(processor.decode(out[0, n:], skip_special_tokens=True), str)


def test_image_changes_the_logits(micro):
    model, processor = micro
    model.eval()
    with torch.no_grad():
        red = model(**processor(images=image((255, 0, 0)), text=PROMPT, return_tensors="pt")).logits
        blue = model(**processor(images=image((0, 0, 255)), text=PROMPT, return_tensors="pt")).logits
    assert not torch.allclose(red[0, -1], blue[0, -1])


# ---------------------------------------------------------------------------------------------------- siglip
def test_siglip_composes_round_trips_and_generates(siglip_parts, tmp_path):
    from transformers import LlavaForConditionalGeneration, SiglipVisionModel

    model, processor = pipeline.model.compose_llava(str(siglip_parts[0]), str(siglip_parts[1]))
    assert isinstance(pipeline.model.vision_tower(model), SiglipVisionModel)
    assert model.config.vision_feature_layer == -2
    assert model.config.vision_feature_select_strategy == "full"  # SigLIP has no CLS token to drop
    assert num_image_tokens(processor) == 16

    pipeline.model.save_vlm(model, processor, tmp_path / "siglip")
    assert list((tmp_path / "siglip").glob("*.safetensors")) and not list((tmp_path / "siglip").glob("*.bin"))
    loaded, proc2 = pipeline.model.load_vlm(tmp_path / "siglip")
    assert type(loaded) is LlavaForConditionalGeneration
    assert isinstance(pipeline.model.vision_tower(loaded), SiglipVisionModel)
    state_dicts_equal(model, loaded)
    inputs, out = greedy(loaded, proc2)
    assert out.shape[1] > inputs["input_ids"].shape[1]
    _, ref = greedy(model, processor)
    assert torch.equal(out, ref)


# ---------------------------------------------------------------------------------------------------- ProfileSpec
@pytest.mark.parametrize(
    "changes, match",
    [
        ({"image_size": 30}, r"image_size 30 is not a multiple of patch_size 8"),
        ({"patch_size": 5}, r"image_size 32 is not a multiple of patch_size 5"),
        ({"vision_layers": 1}, r"vision_layers\n  Input should be greater than or equal to 2"),
        ({"vision_layers": 0}, r"vision_layers\n  Input should be greater than or equal to 2"),
        ({"vision_hidden": 30, "vision_heads": 4}, r"vision_hidden 30 is not divisible by vision_heads 4"),
        ({"lm_hidden": 30, "lm_heads": 4, "lm_kv_heads": 4}, r"lm_hidden 30 is not divisible by lm_heads 4"),
        ({"lm_heads": 2, "lm_kv_heads": 3}, r"lm_heads 2 is not divisible by lm_kv_heads 3"),
        ({"vision_type": "vit"}, r"vision_type\n  Input should be 'clip' or 'siglip'"),
    ],
)
def test_profile_spec_validation(changes, match):
    with pytest.raises(ValueError, match=match):
        pipeline.model.ProfileSpec(**(pipeline.model.PROFILES["micro"].model_dump() | changes))


def test_profiles_are_valid():
    assert set(pipeline.model.PROFILES) == {"tiny", "micro"}
    micro = pipeline.model.PROFILES["micro"]
    assert micro.lm_layers == 2 and micro.lm_hidden == 32
    assert micro.model_copy(update={"vision_type": "siglip"}).vision_type == "siglip"


def test_offline_vision_tower_position_embeddings_are_not_drowned():
    """At the default init (std 0.02) a random tower's tokens do not say where they are; ours are rescaled."""
    tower = pipeline.model.build_vision_tower(pipeline.model.PROFILES["micro"], seed=0)
    (position,) = [m for name, m in tower.named_modules() if name.endswith("position_embedding")]
    assert abs(float(position.weight.std()) - pipeline.model.POSITION_EMBEDDING_STD) < 0.1
    again = pipeline.model.build_vision_tower(pipeline.model.PROFILES["micro"], seed=0)
    assert all(torch.equal(a, b) for a, b in zip(tower.state_dict().values(), again.state_dict().values()))  # seeded
