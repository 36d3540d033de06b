"""Selective tuning: per-component trainability declared in config (torchtune style), never implied.

    vision:          frozen
    projector:       full | frozen
    language_model:  full | lora | frozen, on a layer selection

`full` makes exactly the selected decoder layers trainable (embeddings and LM head only when asked); `lora` puts
peft adapters on the linear modules *of the selected language-model layers only* (full module names, so the vision
tower can never match). The optimizer is built from trainable parameters only: frozen layers carry no state.

Speed (what the method allows, see `bench/train_bench.py`): frozen parameters have `requires_grad=False`, so autograd
computes no weight gradient for them (a frozen layer costs ~2F instead of 3F: forward + input gradient); AdamW is the
fused kernel where torch has one (CPU and CUDA); `install_backward_stop` detaches the hidden states entering the
decoder layers up to the lowest trainable one when nothing upstream trains (projector, embeddings, vision tower all
frozen), so no graph is built or back-propagated below it; `enable_gradient_checkpointing` checkpoints the decoder
layers non-reentrantly *without* forcing the input embeddings to require grad (transformers' default hook), which
would otherwise make backward run through every frozen layer and the frozen vision tower.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import nn

import pipeline.model
from pipeline.config import LoraSpec


@dataclass(frozen=True)
class Trainability:
    vision: Literal["frozen"] = "frozen"
    projector: Literal["full", "frozen"] = "full"
    language_model: Literal["full", "lora", "frozen"] = "full"
    layers: tuple[int, ...] = ()
    embeddings: bool = False
    lm_head: bool = False
    lora: LoraSpec = field(default_factory=LoraSpec)

    def __post_init__(self) -> None:
        if self.vision != "frozen":
            raise ValueError(f"vision must be 'frozen', got {self.vision!r}")
        if self.projector not in ("full", "frozen"):
            raise ValueError(f"projector must be 'full' or 'frozen', got {self.projector!r}")
        if self.language_model not in ("full", "lora", "frozen"):
            raise ValueError(f"language_model must be 'full', 'lora' or 'frozen', got {self.language_model!r}")
        if self.language_model != "frozen" and not self.layers:
            raise ValueError(f"language_model={self.language_model!r} needs a non-empty layer selection")


def lora_targets(model: nn.Module, layers: tuple[int, ...] | list[int]) -> list[str]:
    """Full module names of every nn.Linear inside the selected language-model decoder layers."""
    base = pipeline.model._unwrap(model)
    decoder = pipeline.model.decoder_layers(base)
    wanted = {id(decoder[i]) for i in layers}
    lm_path = pipeline.model.language_model_path(base)
    names = []
    for i, layer in enumerate(decoder):
        if id(layer) not in wanted:
            continue
        for sub, mod in layer.named_modules():
            if isinstance(mod, nn.Linear):
                names.append(f"{lm_path}.layers.{i}.{sub}")
    return names


def apply_trainability(model: nn.Module, spec: Trainability) -> nn.Module:
    """Freeze/unfreeze in place (or wrap with peft for `lora`). Returns the model to train."""
    decoder = pipeline.model.decoder_layers(model)
    for i in spec.layers:
        if not 0 <= i < len(decoder):
            raise ValueError(f"selected layer {i} is out of range for {len(decoder)} decoder layers")
    model.requires_grad_(False)

    if spec.language_model == "lora":
        from peft import LoraConfig, get_peft_model

        config = LoraConfig(
            r=spec.lora.r, lora_alpha=spec.lora.alpha, lora_dropout=spec.lora.dropout, bias="none",
            target_modules=lora_targets(model, spec.layers),
        )
        model = get_peft_model(model, config)
    elif spec.language_model == "full":
        for i in spec.layers:
            decoder[i].requires_grad_(True)

    if spec.projector == "full":
        pipeline.model.projector(model).requires_grad_(True)
    lm = pipeline.model.language_model(model)
    if spec.embeddings:
        lm.get_input_embeddings().requires_grad_(True)
    if spec.lm_head:
        pipeline.model._unwrap(model).get_output_embeddings().requires_grad_(True)
    return model


def build_optimizer(
    model: nn.Module, *, projector_lr: float, lm_lr: float, weight_decay: float = 0.0, fused: bool | None = None
) -> torch.optim.AdamW:
    """AdamW over trainable parameters only: the projector with its own learning rate, everything else at lm_lr.

    `fused=None` (default) uses torch's fused AdamW kernel when every trainable parameter is a floating-point tensor
    on a device that has one (CPU and CUDA in torch >= 2.4: about 3x faster than the per-tensor loop on CPU, same
    update rule), else the default implementation."""
    proj = {id(p) for p in pipeline.model.projector(model).parameters()}
    proj_params = [p for p in model.parameters() if p.requires_grad and id(p) in proj]
    other_params = [p for p in model.parameters() if p.requires_grad and id(p) not in proj]
    groups = []
    if proj_params:
        groups.append({"params": proj_params, "lr": projector_lr, "weight_decay": weight_decay, "name": "projector"})
    if other_params:
        groups.append({"params": other_params, "lr": lm_lr, "weight_decay": weight_decay, "name": "language_model"})
    if not groups:
        raise ValueError("nothing to train: every parameter is frozen")
    if fused is None:
        fused = _fused_adamw_supported(proj_params + other_params)
    return torch.optim.AdamW(groups, fused=fused or None)


def _fused_adamw_supported(params: list[torch.Tensor]) -> bool:
    try:
        from torch.optim.optimizer import _get_fused_kernels_supported_devices

        devices = set(_get_fused_kernels_supported_devices())
    except ImportError:  # pragma: no cover - older torch
        return False
    return all(p.is_floating_point() and p.device.type in devices for p in params)


# --------------------------------------------------------------------------------------------------------------
# Backward stop and gradient checkpointing
# --------------------------------------------------------------------------------------------------------------
def _trains(module: nn.Module | None) -> bool:
    return module is not None and any(p.requires_grad for p in module.parameters())


def _detach_args(args: tuple) -> tuple:
    return tuple(a.detach() if torch.is_tensor(a) and a.requires_grad else a for a in args)


def _detach_hidden_states(module: nn.Module, args: tuple, kwargs: dict):
    if not torch.is_grad_enabled():
        return None
    if args and torch.is_tensor(args[0]) and args[0].requires_grad:
        return (args[0].detach(), *args[1:]), kwargs
    hidden = kwargs.get("hidden_states")
    if torch.is_tensor(hidden) and hidden.requires_grad:
        return args, {**kwargs, "hidden_states": hidden.detach()}
    return None


def _detach_projector_input(module: nn.Module, args: tuple):
    if not torch.is_grad_enabled():
        return None
    return _detach_args(args)


@dataclass
class BackwardStop:
    """Hooks installed by `install_backward_stop`: which decoder layers get a detached input, whether the projector
    input is detached, and the lowest trainable decoder layer (None: none trains). `remove()` takes the hooks off."""

    detached_layers: tuple[int, ...] = ()
    projector_input_detached: bool = False
    lowest_trainable_layer: int | None = None
    handles: list = field(default_factory=list, repr=False)

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()


def install_backward_stop(model: nn.Module) -> BackwardStop:
    """Stop autograd below the lowest point where anything trains, whatever upstream code does to `requires_grad`.

    Forward order in LLaVA: vision tower -> projector -> (merged with the token embeddings) -> decoder layers 0..L-1
    -> norm -> LM head. Gradient is needed into a module's input only if something before it trains. So:
      - the vision tower never trains (Trainability), so the projector's input (the image features) is detached;
      - with k the lowest decoder layer that has a trainable parameter (L if none), if neither the vision tower, the
        projector nor the input embeddings train, the hidden states entering layers 0..k are detached: layers below
        k run without building a graph and backward ends inside layer k (its input gradient is never computed).
    Plain autograd already skips this when no input requires grad; these hooks make it hold also when something
    forces the embedding output to require grad (transformers' `enable_input_require_grads`, which gradient
    checkpointing and peft install). Call after `apply_trainability`; the hooks are no-ops under `torch.no_grad`.
    Gradients of every trainable parameter are unchanged (tested)."""
    base = pipeline.model._unwrap(model)
    decoder = pipeline.model.decoder_layers(base)
    stop = BackwardStop()
    trainable_layers = [i for i, layer in enumerate(decoder) if _trains(layer)]
    stop.lowest_trainable_layer = trainable_layers[0] if trainable_layers else None
    vision, proj = pipeline.model.vision_tower(base), pipeline.model.projector(base)
    if not _trains(vision):
        stop.handles.append(proj.register_forward_pre_hook(_detach_projector_input))
        stop.projector_input_detached = True
    embeddings = pipeline.model.language_model(base).get_input_embeddings()
    if not (_trains(vision) or _trains(proj) or _trains(embeddings)):
        k = stop.lowest_trainable_layer if trainable_layers else len(decoder) - 1
        for i in range(k + 1):
            stop.handles.append(decoder[i].register_forward_pre_hook(_detach_hidden_states, with_kwargs=True))
        stop.detached_layers = tuple(range(k + 1))
    return stop


def enable_gradient_checkpointing(model: nn.Module) -> None:
    """Checkpoint every decoder (and vision) layer non-reentrantly: activations inside a layer are recomputed in
    backward instead of stored. Unlike transformers' `activation_checkpointing_enable` alone, the input embeddings
    are *not* forced to require grad (that hook exists for reentrant checkpointing; non-reentrant checkpointing gives
    trainable parameters inside a layer their gradients without it), so backward still stops where nothing trains."""
    base = pipeline.model._unwrap(model)
    kwargs = {"use_reentrant": False}
    if hasattr(base, "activation_checkpointing_enable"):
        base.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:  # pragma: no cover - transformers < 5
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    if hasattr(base, "disable_input_require_grads"):
        base.disable_input_require_grads()


def disable_gradient_checkpointing(model: nn.Module) -> None:
    base = pipeline.model._unwrap(model)
    if hasattr(base, "activation_checkpointing_disable"):
        base.activation_checkpointing_disable()
    else:  # pragma: no cover - transformers < 5
        base.gradient_checkpointing_disable()


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    return sum(v.numel() * v.element_size() for s in optimizer.state.values() for v in s.values() if torch.is_tensor(v))


def _count(params) -> tuple[int, int]:
    params = list(params)
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


def trainability_report(model: nn.Module) -> dict:
    """Trainable / total parameters per component and per decoder layer."""
    lm = pipeline.model.language_model(model)
    decoder = pipeline.model.decoder_layers(model)
    seen: set[int] = set()

    def take(module: nn.Module) -> tuple[int, int]:
        params = [p for p in module.parameters() if id(p) not in seen]
        seen.update(id(p) for p in params)
        return _count(params)

    components = {"vision": take(pipeline.model.vision_tower(model)), "projector": take(pipeline.model.projector(model))}
    layers = [take(layer) for layer in decoder]
    components["decoder_layers"] = (sum(t for t, _ in layers), sum(n for _, n in layers))
    components["lm_other"] = take(lm)  # embeddings, final norm
    components["lm_head_and_rest"] = _count(p for p in model.parameters() if id(p) not in seen)
    total_t = sum(t for t, _ in components.values())
    total_n = sum(n for _, n in components.values())
    return {
        "trainable": total_t,
        "total": total_n,
        "trainable_fraction": total_t / total_n if total_n else 0.0,
        "components": {k: {"trainable": t, "total": n} for k, (t, n) in components.items()},
        "layers": [{"layer": i, "trainable": t, "total": n} for i, (t, n) in enumerate(layers)],
        "trained_layers": [i for i, (t, _) in enumerate(layers) if t > 0],
    }


def merge_for_export(model: nn.Module) -> nn.Module:
    """A plain transformers model ready for save_pretrained: LoRA adapters merged into the base weights."""
    if hasattr(model, "merge_and_unload"):
        return model.merge_and_unload()
    return model
