"""Selective tuning on the micro model: exactly the declared parameters train, frozen ones never move or carry
optimizer state, LoRA stays out of the vision tower, and merging gives back a plain LLaVA.

Longer than 400 lines on purpose: it mirrors pipeline/tuning.py, one test module per library module."""

import re

import pytest
import torch
from PIL import Image
from torch import nn

import pipeline.model
import pipeline.tuning

PROMPT = "USER: <image>\nWhat colour? ASSISTANT: red"
LORA = pipeline.tuning.LoraSpec(r=4, alpha=8, dropout=0.0)
LAYER_RE = re.compile(r"(?:^|\.)language_model\.layers\.(\d+)\.")


@pytest.fixture
def micro4(micro4_dir):
    torch.manual_seed(0)
    return pipeline.model.load_vlm(micro4_dir)


# ---------------------------------------------------------------------------------------------------- helpers
def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def trainable_names(model: nn.Module) -> set[str]:
    return {n for n, p in model.named_parameters() if p.requires_grad}


def layer_of(name: str) -> int | None:
    m = LAYER_RE.search(name)
    return int(m.group(1)) if m else None


def batch(processor):
    out = dict(processor(images=Image.new("RGB", (32, 32), (255, 0, 0)), text=PROMPT, return_tensors="pt"))
    labels = out["input_ids"].clone()
    labels[labels == processor.tokenizer.convert_tokens_to_ids(pipeline.model.IMAGE_TOKEN)] = -100
    out["labels"] = labels
    return out


def train_step(model, processor, optimizer):
    model.train()
    out = model(**batch(processor))
    assert torch.isfinite(out.loss)
    optimizer.zero_grad()
    out.loss.backward()
    optimizer.step()
    return out.loss.item()


def expected_full_trainable(names, layers, *, projector=True, embeddings=False, lm_head=False) -> set[str]:
    want = set()
    for n in names:
        if layer_of(n) in layers:
            want.add(n)
        elif projector and "multi_modal_projector" in n:
            want.add(n)
        elif embeddings and "embed_tokens" in n:
            want.add(n)
        elif lm_head and n.startswith("lm_head"):
            want.add(n)
    return want


# ---------------------------------------------------------------------------------------------------- full mode
@pytest.mark.parametrize("layers", [(0,), (1, 3), (0, 1, 2, 3)])
def test_full_mode_trains_exactly_the_selected_layers_and_projector(micro4, layers):
    model, _ = micro4
    names = [n for n, _ in model.named_parameters()]
    model = pipeline.tuning.apply_trainability(model, pipeline.tuning.Trainability(language_model="full", layers=layers))
    assert trainable_names(model) == expected_full_trainable(names, layers)
    # spot checks on everything that must stay frozen
    for n, p in model.named_parameters():
        if n.startswith("model.vision_tower") or "embed_tokens" in n or n.startswith("lm_head") or n.endswith("language_model.norm.weight"):
            assert not p.requires_grad, n


def test_full_mode_on_the_two_layer_micro(micro):
    model, _ = micro
    names = [n for n, _ in model.named_parameters()]
    model = pipeline.tuning.apply_trainability(model, pipeline.tuning.Trainability(layers=(1,)))
    assert trainable_names(model) == expected_full_trainable(names, (1,))


def test_layer_order_in_spec_does_not_matter(micro4):
    model, _ = micro4
    names = [n for n, _ in model.named_parameters()]
    model = pipeline.tuning.apply_trainability(model, pipeline.tuning.Trainability(layers=(3, 1)))
    assert trainable_names(model) == expected_full_trainable(names, (1, 3))


def test_apply_resets_previous_trainability(micro4):
    model, _ = micro4
    names = [n for n, _ in model.named_parameters()]
    model.requires_grad_(True)  # everything trainable beforehand (the transformers default)
    model = pipeline.tuning.apply_trainability(model, pipeline.tuning.Trainability(layers=(2,)))
    assert trainable_names(model) == expected_full_trainable(names, (2,))


def test_embeddings_and_lm_head_flags(micro4):
    model, _ = micro4
    names = [n for n, _ in model.named_parameters()]
    model = pipeline.tuning.apply_trainability(model, pipeline.tuning.Trainability(layers=(1,), embeddings=True, lm_head=True))
    want = expected_full_trainable(names, (1,), embeddings=True, lm_head=True)
    assert trainable_names(model) == want
    assert "model.language_model.embed_tokens.weight" in want and "lm_head.weight" in want
    assert not model.get_parameter("model.language_model.norm.weight").requires_grad


def test_only_embeddings_flag(micro4):
    model, _ = micro4
    names = [n for n, _ in model.named_parameters()]
    model = pipeline.tuning.apply_trainability(model, pipeline.tuning.Trainability(layers=(1,), embeddings=True))
    assert trainable_names(model) == expected_full_trainable(names, (1,), embeddings=True)
    assert not model.lm_head.weight.requires_grad


def test_projector_frozen(micro4):
    model, _ = micro4
    names = [n for n, _ in model.named_parameters()]
    model = pipeline.tuning.apply_trainability(model, pipeline.tuning.Trainability(projector="frozen", layers=(0, 2)))
    assert trainable_names(model) == expected_full_trainable(names, (0, 2), projector=False)
    assert not any(p.requires_grad for p in pipeline.model.projector(model).parameters())


def test_language_model_frozen_trains_projector_only(micro4):
    model, _ = micro4
    model = pipeline.tuning.apply_trainability(model, pipeline.tuning.Trainability(language_model="frozen"))
    assert trainable_names(model) == {n for n, _ in model.named_parameters() if "multi_modal_projector" in n}


# ---------------------------------------------------------------------------------------------------- optimizer
def test_build_optimizer_holds_exactly_trainable_params(micro4):
    model, _ = micro4
    model = pipeline.tuning.apply_trainability(model, pipeline.tuning.Trainability(layers=(1, 3)))
    opt = pipeline.tuning.build_optimizer(model, projector_lr=1e-4, lm_lr=1e-3, weight_decay=0.01)
    in_opt = [p for g in opt.param_groups for p in g["params"]]
    assert len(in_opt) == len({id(p) for p in in_opt})  # no duplicates
    assert {id(p) for p in in_opt} == {id(p) for p in model.parameters() if p.requires_grad}
    groups = {g["name"]: g for g in opt.param_groups}
    assert set(groups) == {"projector", "language_model"}
    assert groups["projector"]["lr"] == 1e-4 and groups["language_model"]["lr"] == 1e-3
    assert all(g["weight_decay"] == 0.01 for g in opt.param_groups)
    assert {id(p) for p in groups["projector"]["params"]} == {id(p) for p in pipeline.model.projector(model).parameters()}
    lm_ids = {id(p) for i in (1, 3) for p in pipeline.model.decoder_layers(model)[i].parameters()}
    assert {id(p) for p in groups["language_model"]["params"]} == lm_ids


def test_build_optimizer_without_projector_group(micro4):
    model, _ = micro4
    model = pipeline.tuning.apply_trainability(model, pipeline.tuning.Trainability(projector="frozen", layers=(0,)))
    opt = pipeline.tuning.build_optimizer(model, projector_lr=1e-4, lm_lr=1e-3)
    assert [g["name"] for g in opt.param_groups] == ["language_model"]


def test_build_optimizer_nothing_to_train(micro4):
    model, _ = micro4
    model = pipeline.tuning.apply_trainability(model, pipeline.tuning.Trainability(projector="frozen", language_model="frozen"))
    with pytest.raises(ValueError, match="nothing to train"):
        pipeline.tuning.build_optimizer(model, projector_lr=1e-4, lm_lr=1e-3)


@pytest.mark.parametrize("layers", [(1,), (0, 3)])
def test_full_step_changes_only_trainable_params(micro4, layers):
    model, processor = micro4
    model = pipeline.tuning.apply_trainability(model, pipeline.tuning.Trainability(layers=layers))
    opt = pipeline.tuning.build_optimizer(model, projector_lr=1e-3, lm_lr=1e-3)
    before = snapshot(model)
    train_step(model, processor, opt)
    after = model.state_dict()
    trainable = trainable_names(model)
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == trainable  # every trainable tensor moved, nothing else did
    assert all(k.startswith("model.multi_modal_projector") or layer_of(k) in layers for k in changed)

    # optimizer state: only for trainable params, sized like AdamW's two moments
    params = dict(model.named_parameters())
    state_ids = {id(p) for p in opt.state}
    assert state_ids <= {id(p) for p in params.values() if p.requires_grad}
    assert state_ids == {id(params[n]) for n in trainable}
    frozen_ids = {id(p) for p in params.values() if not p.requires_grad}
    assert not (state_ids & frozen_ids)
    n_trainable = sum(params[n].numel() for n in trainable)
    nbytes = pipeline.tuning.optimizer_state_bytes(opt)
    assert nbytes > 0
    assert 8 * n_trainable <= nbytes <= 8 * n_trainable + 8 * len(trainable)  # fp32 exp_avg + exp_avg_sq (+ step)


def test_optimizer_state_scales_with_the_number_of_layers(micro4_dir):
    sizes = {}
    for layers in [(1,), (0, 1), (0, 1, 2, 3)]:
        model, processor = pipeline.model.load_vlm(micro4_dir)
        model = pipeline.tuning.apply_trainability(model, pipeline.tuning.Trainability(projector="frozen", layers=layers))
        opt = pipeline.tuning.build_optimizer(model, projector_lr=1e-3, lm_lr=1e-3)
        train_step(model, processor, opt)
        sizes[len(layers)] = pipeline.tuning.optimizer_state_bytes(opt)
    assert sizes[2] == 2 * sizes[1]
    assert sizes[4] == 4 * sizes[1]


def test_optimizer_state_bytes_empty_before_step(micro4):
    model, _ = micro4
    model = pipeline.tuning.apply_trainability(model, pipeline.tuning.Trainability(layers=(1,)))
    assert pipeline.tuning.optimizer_state_bytes(pipeline.tuning.build_optimizer(model, projector_lr=1e-3, lm_lr=1e-3)) == 0


# ---------------------------------------------------------------------------------------------------- lora mode
def lora_model(micro4, layers=(1, 3), **kw):
    model, processor = micro4
    return pipeline.tuning.apply_trainability(model, pipeline.tuning.Trainability(language_model="lora", layers=layers, lora=LORA, **kw)), processor


def test_lora_targets_are_full_names_in_selected_layers(micro4):
    model, _ = micro4
    targets = pipeline.tuning.lora_targets(model, (1, 3))
    assert len(targets) == 2 * 7  # q k v o gate up down per layer
    assert all(t.startswith("model.language_model.layers.") for t in targets)
    assert {layer_of(t) for t in targets} == {1, 3}
    for t in targets:
        assert isinstance(model.get_submodule(t), nn.Linear)


def test_lora_wraps_with_peft_only_selected_layers(micro4):
    from peft import PeftModel

    model, _ = lora_model(micro4)
    assert isinstance(model, PeftModel)
    lora_modules = [n for n, m in model.named_modules() if hasattr(m, "lora_A")]
    assert lora_modules
    assert {layer_of(n) for n in lora_modules} == {1, 3}
    # every linear of the selected layers got an adapter, none elsewhere
    per_layer = {i: sum(1 for n in lora_modules if layer_of(n) == i) for i in range(4)}
    assert per_layer == {0: 0, 1: 7, 2: 0, 3: 7}


def test_no_lora_under_the_vision_tower(micro4):
    model, _ = lora_model(micro4, layers=(0, 1, 2, 3))
    vision = pipeline.model.vision_tower(model)
    offenders = [n for n, m in vision.named_modules() if hasattr(m, "lora_A") or hasattr(m, "lora_B")]
    assert offenders == []
    # and by name, over the whole model: adapter parameters live in language-model layers only
    vision_prefix = next(n for n, m in model.named_modules() if m is vision)
    for n, _ in model.named_parameters():
        if "lora_" in n:
            assert not n.startswith(vision_prefix) and layer_of(n) is not None, n
    # the vision tower's linears are still plain nn.Linear (peft replaces targeted ones with its own layer class)
    assert all(type(m) is nn.Linear for m in vision.modules() if isinstance(m, nn.Linear))


def test_vision_check_detects_short_target_names(micro4, monkeypatch):
    """Negative control: with peft's usual short names ("q_proj", ...) the vision tower *would* get adapters, and
    the walk above finds them; the full-name targets are what keeps it clean."""
    monkeypatch.setattr(pipeline.tuning, "lora_targets", lambda model, layers: ["q_proj", "v_proj"])
    model, _ = lora_model(micro4, layers=(0,))
    vision = pipeline.model.vision_tower(model)
    assert [n for n, m in vision.named_modules() if hasattr(m, "lora_A")]


def test_lora_trainable_params(micro4):
    model, _ = lora_model(micro4)
    trainable = trainable_names(model)
    for n in trainable:
        assert "lora_" in n or "multi_modal_projector" in n, n
    assert {n for n in trainable if "multi_modal_projector" in n}  # projector trainable
    assert all(p.requires_grad for p in pipeline.model.projector(model).parameters())
    assert {layer_of(n) for n in trainable if "lora_" in n} == {1, 3}
    # base weights are frozen everywhere, selected layers included
    for n, p in model.named_parameters():
        if "lora_" not in n and "multi_modal_projector" not in n:
            assert not p.requires_grad, n


def test_lora_projector_frozen(micro4):
    model, _ = lora_model(micro4, projector="frozen")
    assert all("lora_" in n for n in trainable_names(model))


def test_lora_step_leaves_vision_and_base_weights_unchanged(micro4):
    model, processor = lora_model(micro4)
    opt = pipeline.tuning.build_optimizer(model, projector_lr=1e-3, lm_lr=1e-2)
    before = snapshot(model)
    train_step(model, processor, opt)
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed <= trainable_names(model)
    assert any("lora_B" in k for k in changed)
    assert any("multi_modal_projector" in k for k in changed)
    vision_keys = [k for k in before if ".vision_tower." in k]
    assert vision_keys and all(torch.equal(before[k], after[k]) for k in vision_keys)
    state_ids = {id(p) for p in opt.state}
    assert state_ids <= {id(p) for p in model.parameters() if p.requires_grad}


def test_merge_for_export_non_peft_is_identity(micro4):
    model, _ = micro4
    model = pipeline.tuning.apply_trainability(model, pipeline.tuning.Trainability(layers=(1,)))
    assert pipeline.tuning.merge_for_export(model) is model


def test_merge_for_export_gives_plain_llava_with_merged_selected_layers(micro4):
    from transformers import LlavaForConditionalGeneration

    model, _ = micro4
    original = snapshot(model)
    original_names = [n for n, _ in model.named_parameters()]
    layers = (1, 3)
    peft_model = pipeline.tuning.apply_trainability(model, pipeline.tuning.Trainability(language_model="lora", layers=layers, lora=LORA))
    torch.manual_seed(1)
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5)
    merged = pipeline.tuning.merge_for_export(peft_model)
    assert type(merged) is LlavaForConditionalGeneration
    assert [n for n, _ in merged.named_parameters()] == original_names
    assert not any(hasattr(m, "lora_A") for m in merged.modules())
    sd = merged.state_dict()
    assert set(sd) == set(original)
    changed = {k for k in original if not torch.equal(original[k], sd[k])}
    expected = {
        f"model.language_model.layers.{i}.{sub}.weight"
        for i in layers
        for sub in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                    "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
    }
    assert changed == expected


def test_merge_after_a_real_step(micro4, tmp_path):
    from transformers import LlavaForConditionalGeneration

    model, processor = micro4
    original = snapshot(model)
    layers = (2,)
    peft_model = pipeline.tuning.apply_trainability(model, pipeline.tuning.Trainability(language_model="lora", layers=layers, lora=LORA))
    opt = pipeline.tuning.build_optimizer(peft_model, projector_lr=1e-2, lm_lr=1e-2)
    train_step(peft_model, processor, opt)
    train_step(peft_model, processor, opt)  # second step: lora_A gets a gradient once lora_B is nonzero
    merged = pipeline.tuning.merge_for_export(peft_model)
    assert type(merged) is LlavaForConditionalGeneration
    sd = merged.state_dict()
    changed = {k for k in original if not torch.equal(original[k], sd[k])}
    linear_changed = {k for k in changed if "multi_modal_projector" not in k}
    assert linear_changed and {layer_of(k) for k in linear_changed} == {2}
    assert all(k.endswith("_proj.weight") for k in linear_changed)
    assert not any(".vision_tower." in k for k in changed)
    # the merged model saves and reloads like any LLaVA checkpoint
    pipeline.model.save_vlm(merged, processor, tmp_path / "merged")
    reloaded, _ = pipeline.model.load_vlm(tmp_path / "merged")
    for k, v in reloaded.state_dict().items():
        assert torch.equal(v, sd[k]), k


# ---------------------------------------------------------------------------------------------------- report
@pytest.mark.parametrize("mode, layers", [("full", (1, 3)), ("full", (0,)), ("lora", (0, 2)), ("frozen", ())])
def test_trainability_report(micro4, mode, layers):
    model, _ = micro4
    model = pipeline.tuning.apply_trainability(model, pipeline.tuning.Trainability(language_model=mode, layers=layers, lora=LORA))
    rep = pipeline.tuning.trainability_report(model)
    params = list(model.parameters())
    assert rep["total"] == sum(p.numel() for p in params)
    assert rep["trainable"] == sum(p.numel() for p in params if p.requires_grad)
    comps = rep["components"]
    assert set(comps) == {"vision", "projector", "decoder_layers", "lm_other", "lm_head_and_rest"}
    assert sum(c["total"] for c in comps.values()) == rep["total"]
    assert sum(c["trainable"] for c in comps.values()) == rep["trainable"]
    assert rep["trainable_fraction"] == pytest.approx(rep["trainable"] / rep["total"])
    assert comps["vision"]["trainable"] == 0
    assert comps["lm_other"]["trainable"] == 0 and comps["lm_head_and_rest"]["trainable"] == 0
    assert comps["projector"]["trainable"] == comps["projector"]["total"] > 0
    assert [r["layer"] for r in rep["layers"]] == [0, 1, 2, 3]
    assert rep["trained_layers"] == sorted(layers)
    assert sum(r["total"] for r in rep["layers"]) == comps["decoder_layers"]["total"]
    for r in rep["layers"]:
        if r["layer"] not in layers:
            assert r["trainable"] == 0
        elif mode == "full":
            assert r["trainable"] == r["total"] > 0
        else:
            assert 0 < r["trainable"] < r["total"]


def test_trainability_report_embeddings_and_lm_head(micro4):
    model, _ = micro4
    model = pipeline.tuning.apply_trainability(model, pipeline.tuning.Trainability(layers=(1,), embeddings=True, lm_head=True))
    comps = pipeline.tuning.trainability_report(model)["components"]
    assert comps["lm_other"]["trainable"] == model.model.language_model.embed_tokens.weight.numel()
    assert comps["lm_head_and_rest"]["trainable"] == model.lm_head.weight.numel()


# ---------------------------------------------------------------------------------------------------- validation
@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"vision": "full", "layers": (0,)}, r"vision must be 'frozen'"),
        ({"vision": "lora", "layers": (0,)}, r"vision must be 'frozen'"),
        ({"projector": "lora", "layers": (0,)}, r"projector must be 'full' or 'frozen'"),
        ({"projector": "Full", "layers": (0,)}, r"projector must be 'full' or 'frozen'"),
        ({"language_model": "partial", "layers": (0,)}, r"language_model must be 'full', 'lora' or 'frozen'"),
        ({"language_model": "full", "layers": ()}, r"language_model='full' needs a non-empty layer selection"),
        ({"language_model": "lora", "layers": ()}, r"language_model='lora' needs a non-empty layer selection"),
        ({}, r"needs a non-empty layer selection"),  # the default is full with no layers: must be explicit
    ],
)
def test_trainability_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        pipeline.tuning.Trainability(**kwargs)


def test_frozen_lm_needs_no_layers():
    assert pipeline.tuning.Trainability(language_model="frozen").layers == ()


@pytest.mark.parametrize("layers", [(4,), (0, 7), (-1,)])
@pytest.mark.parametrize("mode", ["full", "lora"])
def test_out_of_range_layer(micro4, layers, mode):
    model, _ = micro4
    with pytest.raises(ValueError, match=r"selected layer -?\d+ is out of range for 4 decoder layers"):
        pipeline.tuning.apply_trainability(model, pipeline.tuning.Trainability(language_model=mode, layers=layers, lora=LORA))


@pytest.mark.parametrize(
    "kwargs, match",
    [({"r": 0}, r"r\n  Input should be greater than or equal to 1"),
     ({"alpha": 0}, r"alpha\n  Input should be greater than or equal to 1"),
     ({"dropout": 1.0}, r"dropout\n  Input should be less than 1"),
     ({"dropout": -0.1}, r"dropout\n  Input should be greater than or equal to 0")],
)
def test_lora_spec_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        pipeline.tuning.LoraSpec(**kwargs)
