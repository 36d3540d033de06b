"""Visual-region-protected layer pruning and export of the pruned checkpoint.

After region-targeted tuning, rank the decoder layers by an importance score computed on visual data (see
`pipeline.importance`, e.g. the angular distance) and remove the least important layers that lie *outside* the visual
region (the tuned layers are never removed). `remove_layers` edits the model in place so that it stays a normal
transformers model: the decoder ModuleList shrinks, the config's layer count and per-layer lists follow, and every
`layer_idx` is re-numbered (stale indices corrupt KV-cache generation after the first token: transformers issue 30508).
`export_pruned` writes a plain checkpoint that `LlavaForConditionalGeneration.from_pretrained` loads, ready for
evaluation or an optional healing fine-tune.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from torch import nn

from pipeline.model import _unwrap, decoder_layers, language_model, text_config
from pipeline.selection import bottom_k, validate_indices
from pipeline.storage import atomic_dir

PRUNING_FILE = "pruning.json"
# Config lists whose length can equal the layer count by coincidence but that are not per-layer.
_NOT_PER_LAYER = frozenset({
    "architectures", "eos_token_id", "bos_token_id", "pad_token_id", "bad_words_ids", "suppress_tokens",
    "begin_suppress_tokens", "forced_decoder_ids", "id2label", "label2id",
})


def _validate_protected(num_layers: int, protected: Sequence[int]) -> list[int]:
    protected = list(protected)
    return validate_indices(num_layers, protected, what="protected layers") if protected else []


def choose_layers_to_prune(scores: Sequence[float], n: int, protected: Sequence[int] = ()) -> list[int]:
    """The `n` least important layers (lowest score) outside `protected`, sorted.

    Rules (each violation is a ValueError):
      - `n` is an integer >= 1;
      - `protected` holds distinct integer indices in [0, len(scores));
      - `n` < the number of unprotected layers: at least one unprotected layer always survives, so pruning can
        never reduce the model to its protected region alone (nor to nothing).
    Ranking: lowest score first, ties broken by the lower index; a NaN score counts as the *most* important (an
    undefined score is never a reason to prune a layer).
    """
    num_layers = len(scores)
    if isinstance(n, bool) or not isinstance(n, int):
        raise ValueError(f"prune count must be an integer, got {n!r}")
    if n < 1:
        raise ValueError(f"prune count must be >= 1, got {n}")
    prot = _validate_protected(num_layers, protected)
    unprotected = num_layers - len(prot)
    if n >= unprotected:
        raise ValueError(
            f"cannot prune {n} layer(s): only {unprotected} of {num_layers} layers are unprotected "
            f"(protected: {prot}); the prune count must be smaller than the number of unprotected layers"
        )
    scores = [float(s) for s in scores]
    return bottom_k([s if not math.isnan(s) else math.inf for s in scores], n, exclude=prot)


def remap_layers(kept: Sequence[int], layers: Sequence[int]) -> list[int]:
    """Map original layer indices (e.g. the visual region) to their positions after pruning, in the given order.
    `kept` is the sorted list of original indices that survived (as `remove_layers` returns)."""
    position = {orig: new for new, orig in enumerate(kept)}
    gone = [i for i in layers if i not in position]
    if gone:
        raise ValueError(f"layers {gone} were removed by pruning and have no position in the pruned model")
    return [position[i] for i in layers]


def _configs(model: nn.Module) -> list[Any]:
    """Every distinct config object that describes the decoder stack (top-level config only if it mirrors it)."""
    out: list[Any] = []
    for cfg in (text_config(model), getattr(language_model(model), "config", None), _unwrap(model).config):
        if cfg is not None and all(cfg is not c for c in out):
            out.append(cfg)
    return out


def _update_config(cfg: Any, old: int, kept: list[int]) -> None:
    if getattr(cfg, "num_hidden_layers", None) != old:
        return
    # Per-layer lists first: some configs validate len(layer_types) == num_hidden_layers.
    for key, value in list(vars(cfg).items()):
        if key in _NOT_PER_LAYER or key.startswith("_"):
            continue
        if isinstance(value, (list, tuple)) and len(value) == old:
            setattr(cfg, key, type(value)(value[i] for i in kept))
    cfg.num_hidden_layers = len(kept)


def remove_layers(model: nn.Module, layers: Sequence[int], *, protected: Sequence[int] = ()) -> list[int]:
    """Remove decoder `layers` (original 0-based indices) from `model` in place; returns the kept original indices.

    Refuses (ValueError): an empty, non-integer, negative, out-of-range or duplicated index list (naming the culprits);
    removing a protected layer (naming it); removing every layer. Afterwards the decoder ModuleList holds the kept
    layers in order, `num_hidden_layers` (text config, the language model's config and a top-level config that
    mirrors it) is the new count, every per-layer list of those configs (e.g. `layer_types`) is filtered, and every
    module inside the kept layers with a `layer_idx` attribute carries its new position.
    """
    lm = language_model(model)
    old_layers = lm.layers
    num_layers = len(old_layers)
    remove = validate_indices(num_layers, list(layers), what="layers to remove")
    prot = set(_validate_protected(num_layers, protected))
    hit = sorted(prot & set(remove))
    if hit:
        raise ValueError(f"refusing to remove protected layer(s) {hit} (protected: {sorted(prot)})")
    if len(remove) >= num_layers:
        raise ValueError(f"removing layers {remove} would leave no decoder layer (the model has {num_layers})")
    kept = [i for i in range(num_layers) if i not in set(remove)]

    for cfg in _configs(model):
        _update_config(cfg, num_layers, kept)
    lm.layers = nn.ModuleList([old_layers[i] for i in kept])
    for new_idx, layer in enumerate(lm.layers):
        for module in layer.modules():
            if isinstance(getattr(module, "layer_idx", None), int):
                module.layer_idx = new_idx
    assert decoder_layers(model) is lm.layers
    return kept


def export_pruned(
    model: nn.Module,
    processor: Any,
    out_dir: str | os.PathLike,
    *,
    removed: Sequence[int],
    kept: Sequence[int],
    meta: Mapping[str, Any] | None = None,
) -> Path:
    """Atomically write the pruned model (safetensors) + processor + `pruning.json` to `out_dir`.

    `pruning.json` records the original indices removed and kept, the layer counts before and after, the
    original -> new index map and `meta` (must be JSON-serialisable). The result is a normal checkpoint:
    `LlavaForConditionalGeneration.from_pretrained(out_dir)` rebuilds the pruned model. LoRA adapters must be merged
    first (merge_and_unload)."""
    if hasattr(model, "peft_config"):
        raise ValueError("export_pruned needs a plain model: merge the LoRA adapters first (merge_and_unload)")
    removed, kept = sorted(removed), sorted(kept)
    total = len(removed) + len(kept)
    if sorted(removed + kept) != list(range(total)):
        raise ValueError(f"removed {removed} and kept {kept} must partition the original layers 0..{total - 1}")
    current = len(decoder_layers(model))
    if current != len(kept):
        raise ValueError(f"the model has {current} decoder layers but {len(kept)} are recorded as kept")
    record = {
        "removed": removed,
        "kept": kept,
        "num_layers_before": total,
        "num_layers_after": len(kept),
        "new_index": {str(orig): new for new, orig in enumerate(kept)},
        "meta": dict(meta or {}),
    }
    text = json.dumps(record, indent=2, sort_keys=True) + "\n"  # fails (ValueError/TypeError) before writing anything
    out = Path(out_dir)
    with atomic_dir(out) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        processor.save_pretrained(tmp)
        (tmp / PRUNING_FILE).write_text(text)
    return out


def read_pruning(path: str | os.PathLike) -> dict[str, Any]:
    """The `pruning.json` record of an exported pruned checkpoint."""
    return json.loads((Path(path) / PRUNING_FILE).read_text())


__all__ = ["PRUNING_FILE", "choose_layers_to_prune", "export_pruned", "read_pruning", "remap_layers", "remove_layers"]
