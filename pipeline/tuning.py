"""Selective tuning: per-component trainability declared in config (torchtune style), never implied.

    vision:          frozen
    projector:       full | frozen
    language_model:  full | lora | frozen, on a layer selection

`full` makes exactly the selected decoder layers trainable (embeddings and LM head only when asked); `lora` puts
peft adapters on the linear modules *of the selected language-model layers only* (full module names, so the vision
tower can never match). The optimizer is built from trainable parameters only: frozen layers carry no state.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import nn

from pipeline import model as M


@dataclass(frozen=True)
class LoraSpec:
    r: int = 128
    alpha: int = 256
    dropout: float = 0.05

    def __post_init__(self) -> None:
        if self.r < 1 or self.alpha < 1:
            raise ValueError(f"lora r and alpha must be >= 1, got r={self.r}, alpha={self.alpha}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"lora dropout must be in [0, 1), got {self.dropout}")


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
    base = M._unwrap(model)
    decoder = M.decoder_layers(base)
    wanted = {id(decoder[i]) for i in layers}
    lm_path = M.language_model_path(base)
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
    decoder = M.decoder_layers(model)
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
        M.projector(model).requires_grad_(True)
    lm = M.language_model(model)
    if spec.embeddings:
        lm.get_input_embeddings().requires_grad_(True)
    if spec.lm_head:
        M._unwrap(model).get_output_embeddings().requires_grad_(True)
    return model


def build_optimizer(model: nn.Module, *, projector_lr: float, lm_lr: float, weight_decay: float = 0.0) -> torch.optim.AdamW:
    """AdamW over trainable parameters only: the projector with its own learning rate, everything else at lm_lr."""
    proj = {id(p) for p in M.projector(model).parameters()}
    proj_params = [p for p in model.parameters() if p.requires_grad and id(p) in proj]
    other_params = [p for p in model.parameters() if p.requires_grad and id(p) not in proj]
    groups = []
    if proj_params:
        groups.append({"params": proj_params, "lr": projector_lr, "weight_decay": weight_decay, "name": "projector"})
    if other_params:
        groups.append({"params": other_params, "lr": lm_lr, "weight_decay": weight_decay, "name": "language_model"})
    if not groups:
        raise ValueError("nothing to train: every parameter is frozen")
    return torch.optim.AdamW(groups)


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    return sum(v.numel() * v.element_size() for s in optimizer.state.values() for v in s.values() if torch.is_tensor(v))


def _count(params) -> tuple[int, int]:
    params = list(params)
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


def trainability_report(model: nn.Module) -> dict:
    """Trainable / total parameters per component and per decoder layer."""
    lm = M.language_model(model)
    decoder = M.decoder_layers(model)
    seen: set[int] = set()

    def take(module: nn.Module) -> tuple[int, int]:
        params = [p for p in module.parameters() if id(p) not in seen]
        seen.update(id(p) for p in params)
        return _count(params)

    components = {"vision": take(M.vision_tower(model)), "projector": take(M.projector(model))}
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
