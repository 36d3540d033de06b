"""The fast training path on the micro model: frozen parameters get no gradient, backward stops below the lowest
trainable layer when nothing upstream trains (with gradients identical to the plain path), gradient checkpointing
gives the same gradients and does not drag backward through frozen layers, AdamW is the fused kernel."""

import datasets
import pytest
import torch
from PIL import Image
from torch import nn

import pipeline.model
from pipeline import tuning

PROMPT = "USER: <image>\nWhat colour? ASSISTANT: red"
LORA = tuning.LoraSpec(r=4, alpha=8, dropout=0.0)


def load(micro4_dir):
    torch.manual_seed(0)
    return pipeline.model.load_vlm(micro4_dir)


def batch(processor, n=2):
    images = [Image.new("RGB", (32, 32), (255 * (i % 2), 40 * i, 0)) for i in range(n)]
    out = dict(processor(images=images, text=[PROMPT] * n, return_tensors="pt"))
    labels = out["input_ids"].clone()
    labels[labels == processor.tokenizer.convert_tokens_to_ids(pipeline.model.IMAGE_TOKEN)] = -100
    out["labels"] = labels
    return out


def grads(model, inputs) -> dict[str, torch.Tensor]:
    model.train()
    model.zero_grad(set_to_none=True)
    model(**inputs).loss.backward()
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


class LayerProbe:
    """Records, per decoder layer, whether its (post-hook) input and its output carry an autograd graph, and how
    often its first norm ran (twice per step when checkpointing runs the layer in backward;
    non-reentrant recompute stops early, after the last saved tensor, so a late module may not rerun)."""

    def __init__(self, model):
        self.inputs, self.outputs, self.runs = {}, {}, {}
        self.handles = []
        for i, layer in enumerate(pipeline.model.decoder_layers(model)):
            self.handles.append(layer.register_forward_pre_hook(self._pre(i), with_kwargs=True))
            self.handles.append(layer.register_forward_hook(self._post(i)))
            self.handles.append(layer.input_layernorm.register_forward_hook(self._count(i)))

    def _pre(self, i):
        def hook(module, args, kwargs):
            hidden = args[0] if args else kwargs["hidden_states"]
            self.inputs[i] = hidden.requires_grad
        return hook

    def _post(self, i):
        def hook(module, args, output):
            hidden = output[0] if isinstance(output, tuple) else output
            self.outputs[i] = hidden.grad_fn is not None
        return hook

    def _count(self, i):
        def hook(module, args, output):
            self.runs[i] = self.runs.get(i, 0) + 1
        return hook


def assert_same_grads(a: dict, b: dict, exact=True):
    assert a.keys() == b.keys() and a
    for n in a:
        if exact:
            assert torch.equal(a[n], b[n]), n
        else:
            torch.testing.assert_close(a[n], b[n], rtol=1e-5, atol=1e-7, msg=n)


# ---------------------------------------------------------------------------------------------------- frozen params
@pytest.mark.parametrize("mode", ["full", "lora"])
def test_frozen_params_compute_no_gradient(micro4_dir, mode):
    model, processor = load(micro4_dir)
    model = tuning.apply_trainability(model, tuning.Trainability(language_model=mode, layers=(1, 3), lora=LORA))
    g = grads(model, batch(processor))
    for n, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None, n
        else:
            assert p.grad is None, n  # autograd never produced (or stored) a gradient for a frozen tensor
    assert g


def test_build_optimizer_uses_the_fused_kernel_on_cpu(micro4_dir):
    model, _ = load(micro4_dir)
    model = tuning.apply_trainability(model, tuning.Trainability(layers=(1,)))
    assert tuning.build_optimizer(model, projector_lr=1e-3, lm_lr=1e-3).defaults["fused"] is True
    assert not tuning.build_optimizer(model, projector_lr=1e-3, lm_lr=1e-3, fused=False).defaults["fused"]


# ---------------------------------------------------------------------------------------------------- backward stop
@pytest.mark.parametrize(
    "kwargs, layers, lowest",
    [
        (dict(projector="frozen"), (2, 3), (0, 1, 2)),  # nothing upstream trains: detach inputs of layers 0..2
        (dict(projector="frozen", language_model="lora", lora=LORA), (1, 3), (0, 1)),
        (dict(projector="full"), (2, 3), ()),  # projector trains: backward must go down to it
        (dict(projector="frozen", embeddings=True), (2, 3), ()),  # embeddings train: likewise
    ],
)
def test_backward_stop_places_hooks(micro4_dir, kwargs, layers, lowest):
    model, _ = load(micro4_dir)
    model = tuning.apply_trainability(model, tuning.Trainability(layers=layers, **kwargs))
    stop = tuning.install_backward_stop(model)
    assert stop.lowest_trainable_layer == layers[0]
    assert stop.detached_layers == lowest
    assert stop.projector_input_detached  # the vision tower is always frozen
    stop.remove()
    base = pipeline.model._unwrap(model)
    assert not any(layer._forward_pre_hooks for layer in pipeline.model.decoder_layers(base))
    assert not pipeline.model.projector(base)._forward_pre_hooks


@pytest.mark.parametrize("mode", ["full", "lora"])
def test_backward_stop_same_gradients_and_no_graph_below_k(micro4_dir, mode):
    """Projector frozen, layers (2, 3) train. Something forces the embedding output to require grad (as
    transformers' gradient checkpointing and peft do): without the stop, every layer below 2 builds a graph and
    backward runs through it; with the stop, none does, and every trainable parameter gets the same gradient."""
    spec = tuning.Trainability(projector="frozen", language_model=mode, layers=(2, 3), lora=LORA)
    plain, processor = load(micro4_dir)
    plain = tuning.apply_trainability(plain, spec)
    stopped, _ = load(micro4_dir)
    stopped = tuning.apply_trainability(stopped, spec)
    if mode == "lora":  # same adapter init in both copies (lora_B is zero at init: give it values)
        with torch.no_grad():
            src = dict(plain.named_parameters())
            for n, p in stopped.named_parameters():
                p.copy_(src[n])
            for m in (plain, stopped):
                for n, p in m.named_parameters():
                    if "lora_B" in n:
                        p.copy_(torch.linspace(-0.1, 0.1, p.numel()).reshape(p.shape))
    for m in (plain, stopped):
        pipeline.model._unwrap(m).enable_input_require_grads()
    stop = tuning.install_backward_stop(stopped)
    inputs = batch(processor)

    probe_plain, probe_stopped = LayerProbe(plain), LayerProbe(stopped)
    g_plain, g_stopped = grads(plain, inputs), grads(stopped, inputs)
    assert_same_grads(g_plain, g_stopped)
    # negative control: the forced input grad really builds a graph below layer 2 on the plain path
    assert probe_plain.outputs[0] and probe_plain.outputs[1] and probe_plain.inputs[2]
    # with the stop: no graph below layer 2, and layer 2's input carries none (backward ends inside layer 2)
    assert not probe_stopped.outputs[0] and not probe_stopped.outputs[1]
    assert not any(probe_stopped.inputs[i] for i in (0, 1, 2))
    assert probe_stopped.outputs[2] and probe_stopped.outputs[3]
    # no gradient reaches anything frozen either way
    assert all(p.grad is None for p in stopped.parameters() if not p.requires_grad)
    stop.remove()


def test_backward_stop_is_a_no_op_without_forced_input_grads(micro4_dir):
    """Plain autograd already builds no graph below the lowest trainable layer; the hooks change nothing then."""
    spec = tuning.Trainability(projector="frozen", layers=(2,))
    model, processor = load(micro4_dir)
    model = tuning.apply_trainability(model, spec)
    probe = LayerProbe(model)
    before = grads(model, batch(processor))
    assert not probe.outputs[0] and not probe.outputs[1] and probe.outputs[2]
    stop = tuning.install_backward_stop(model)
    assert_same_grads(before, grads(model, batch(processor)))
    stop.remove()


def test_backward_stop_hooks_do_nothing_under_no_grad(micro4_dir):
    model, processor = load(micro4_dir)
    model = tuning.apply_trainability(model, tuning.Trainability(projector="frozen", layers=(3,)))
    model.eval()
    inputs = {k: v for k, v in batch(processor).items() if k != "labels"}
    with torch.no_grad():
        ref = model(**inputs).logits
        stop = tuning.install_backward_stop(model)
        assert torch.equal(ref, model(**inputs).logits)
    stop.remove()


# ---------------------------------------------------------------------------------------------------- checkpointing
@pytest.mark.parametrize(
    "spec",
    [
        tuning.Trainability(projector="full", layers=(1, 3)),
        tuning.Trainability(projector="full", language_model="lora", layers=(0, 2), lora=LORA),
        tuning.Trainability(projector="frozen", layers=(2, 3)),
    ],
    ids=["full+projector", "lora+projector", "full-projector-frozen"],
)
def test_gradient_checkpointing_same_gradients(micro4_dir, spec):
    plain, processor = load(micro4_dir)
    plain = tuning.apply_trainability(plain, spec)
    torch.manual_seed(0)
    ckpt, _ = load(micro4_dir)
    ckpt = tuning.apply_trainability(ckpt, spec)
    with torch.no_grad():
        src = dict(plain.named_parameters())
        for n, p in ckpt.named_parameters():
            p.copy_(src[n])
    stops = [tuning.install_backward_stop(m) for m in (plain, ckpt)]
    tuning.enable_gradient_checkpointing(ckpt)
    base = pipeline.model._unwrap(ckpt)
    assert all(layer.gradient_checkpointing for layer in pipeline.model.decoder_layers(base))
    assert not getattr(base, "_require_grads_hooks", None)  # no forced input grads (they defeat the backward stop)

    inputs = batch(processor)
    probe_plain, probe_ckpt = LayerProbe(plain), LayerProbe(ckpt)
    assert_same_grads(grads(plain, inputs), grads(ckpt, inputs), exact=False)
    assert all(n == 1 for n in probe_plain.runs.values())
    # checkpointed layers on the gradient path are recomputed in backward; layers below it are not
    on_path = range(4) if spec.projector == "full" else range(spec.layers[0], 4)
    assert probe_ckpt.runs == {i: 2 if i in on_path else 1 for i in range(4)}

    tuning.disable_gradient_checkpointing(ckpt)
    assert not any(layer.gradient_checkpointing for layer in pipeline.model.decoder_layers(base))
    for s in stops:
        s.remove()


# ---------------------------------------------------------------------------------------------------- train_visual
def test_train_visual_with_gradient_checkpointing(micro4_dir, tmp_path):
    from pipeline import data
    from pipeline.config import TrainParams
    from pipeline.training import train_visual

    model, processor = load(micro4_dir)
    records = [
        {"id": str(i), "image": Image.new("RGB", (32, 32), (255 * (i % 2), 0, 0)), "qtype": "colour",
         "conversations": [{"from": "human", "value": "<image>\nWhat colour?"}, {"from": "gpt", "value": "red"}]}
        for i in range(4)
    ]
    ds = datasets.Dataset.from_list(records, features=data.VISUAL_FEATURES)
    params = TrainParams(max_steps=2, batch_size=2, max_length=64, gradient_checkpointing=True, logging_steps=1)
    merged, result, report = train_visual(
        model, processor, ds, trainability=tuning.Trainability(projector="frozen", layers=(2, 3)), projector_lr=1e-3,
        lm_lr=1e-3, params=params, ckpt_dir=tmp_path / "ckpt", seed=0, fingerprint={"t": 1},
    )
    assert result.steps == 2 and torch.isfinite(torch.tensor(result.final_loss))
    assert report["optimizer_state_bytes"] > 0
    # hooks and checkpointing are gone from the returned model; nothing left requires grad
    assert not any(layer._forward_pre_hooks or layer.gradient_checkpointing for layer in pipeline.model.decoder_layers(merged))
    assert not pipeline.model.projector(merged)._forward_pre_hooks
    assert not any(p.requires_grad for p in merged.parameters())
    assert isinstance(merged, nn.Module)


def test_transformers_checkpointing_alone_recomputes_frozen_layers_unless_stopped(micro4_dir):
    """Why `enable_gradient_checkpointing` and the backward stop exist: transformers' own checkpointing switch also
    forces the embedding output to require grad, so with the projector frozen every frozen layer below the lowest
    trainable one is recomputed and back-propagated; the backward stop cuts that off again."""
    spec = tuning.Trainability(projector="frozen", layers=(2, 3))
    inputs = None
    runs = {}
    for stopped in (False, True):
        model, processor = load(micro4_dir)
        model = tuning.apply_trainability(model, spec)
        pipeline.model._unwrap(model).activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        assert pipeline.model._unwrap(model)._require_grads_hooks  # the forced input grad
        if stopped:
            tuning.install_backward_stop(model)
        inputs = inputs or batch(processor)
        probe = LayerProbe(model)
        grads(model, inputs)
        runs[stopped] = probe.runs
    assert runs[False] == {0: 2, 1: 2, 2: 2, 3: 2}
    assert runs[True] == {0: 1, 1: 1, 2: 2, 3: 2}


@pytest.mark.parametrize("how", ["transformers", "transformers+stop", "ours"])
def test_checkpointing_never_back_propagates_the_frozen_vision_tower(micro4_dir, how):
    """The usual stage 2 (projector + layers train): transformers' checkpointing switch also hooks the *vision
    tower's* patch embedding to require grad, so the frozen tower is recomputed and back-propagated every step
    (a CLIP ViT-L per image for LLaVA-1.5). The projector-input detach, or checkpointing enabled our way, stops it."""
    model, processor = load(micro4_dir)
    model = tuning.apply_trainability(model, tuning.Trainability(projector="full", layers=(1, 3)))
    if how == "ours":
        tuning.enable_gradient_checkpointing(model)
    else:
        pipeline.model._unwrap(model).activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    if how == "transformers+stop":
        tuning.install_backward_stop(model)
    vision_layers = [m for m in pipeline.model.vision_tower(model).modules() if type(m).__name__.endswith("EncoderLayer")]
    runs = []
    for i, layer in enumerate(vision_layers):
        layer.layer_norm1.register_forward_hook(lambda *a, i=i: runs.append(i))
    model.train()
    loss = model(**batch(processor)).loss
    forward_runs = len(runs)
    loss.backward()
    assert forward_runs == len(vision_layers)
    recomputed = runs[forward_runs:]
    if how == "transformers":
        assert recomputed  # negative control: the waste exists
    else:
        assert recomputed == []
