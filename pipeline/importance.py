"""Layer importance: how much each decoder layer of a LLaVA changes what flows through it.

Two families of scores, one entry point (`layer_importance`):

**Hidden-state metrics** on visual calibration batches (dicts as a `LlavaProcessor` produces them: ``input_ids``,
``attention_mask``, ``pixel_values``). For decoder layer i with input h_in and output h_out, per token t:

    cos_t      = <h_in_t, h_out_t> / (max(|h_in_t|, eps) * max(|h_out_t|, eps)),  clamped to [-1, 1]
    BI_i       = 1 - mean_t cos_t                              (Block Influence, ShortGPT)
    angular_i  = mean_t arccos(cos_t) / pi                     (angular distance, Gromov et al. style)

  Gromov et al. measure the angular distance of the *last* token between layers l and l+n; here, as in the paper's
  visual-region pruning, n = 1 (a layer's input vs its output) and the distance is averaged over all valid tokens
  (``attention_mask == 1``), so image tokens and every text token count, not only the last one.
  ``bi_image`` / ``bi_text`` restrict the mean to image tokens (``input_ids == image_token_id``) / the other valid
  tokens, and the multimodal BI is ``mm_bi = mean(bi_image, bi_text)``.

  Token means are pooled over all batches (every valid token weighs the same, whatever batch it came from).

  Inputs and outputs are captured with forward hooks **on the decoder layers themselves**, not with
  ``output_hidden_states=True``: HF's last "hidden state" is taken *after* the final norm, so with it the last layer
  would be compared against a normalised vector and look spuriously important (ShortGPT pitfall). Hooks give the true
  output of every layer, and the last layer is scored exactly like the others.

  NaN policy: cosines are clamped to [-1, 1]; a zero-norm vector gives cos 0 (eps-guarded denominator), i.e. it counts as
  "changed" and can never make a layer look prunable; a token kind with no tokens (e.g. no image in any batch) gives
  NaN for that kind and ``mm_bi`` falls back to the kind that is present. Nothing here raises because of a NaN.

**Image-attention share** per layer: the fraction of attention mass that text query tokens (valid, non-image, at
positions after the sequence's first image token) put on image-token keys, averaged over heads and over all such
queries of all batches (pooled, like the token means). Needs attention probabilities, so the forward runs with
``output_attentions=True`` under the eager attention implementation (switched for the text model with
``model.set_attn_implementation({"text_config": "eager"})`` and restored afterwards; SDPA returns no weights).

**Checkpoint-delta metrics** between a base model and a tuned one (modules or state dicts of the same architecture),
over the 2-D weights (the linear projections) of each decoder layer:

    param_change_i  = sum_W |W' - W|_F / |W|_F
    param_angular_i = mean_W arccos(<W', W> / (|W'| |W|)) / pi

LoRA-wrapped models must be merged first (``merge_and_unload``): an unmerged adapter leaves the base weight unchanged.


Longer than 400 lines on purpose: every score shares one forward pass with hooks over the calibration batches (or one
pass over the parameters), and keeping them together keeps their definitions side by side and comparable."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, fields
from typing import Any

import torch
from torch import nn

from pipeline.config import HIDDEN_METRICS, METRICS, PARAM_METRICS
from pipeline.data.chat import processor_inputs
from pipeline.model import ModelStructureError, _unwrap, decoder_layers, image_token_id, text_config

EPS = 1e-12
# Keys a calibration batch may carry that are not model inputs for a scoring forward.
_DROP_KEYS = ("labels",)


# --------------------------------------------------------------------------------------------------------------
# Result container
# --------------------------------------------------------------------------------------------------------------
@dataclass
class LayerScores:
    """Per-layer scores, one float per decoder layer (NaN where undefined). Higher = the layer matters more."""

    bi: list[float]
    angular: list[float]
    bi_image: list[float]
    bi_text: list[float]
    mm_bi: list[float]
    image_attention: list[float] | None = None
    param_change: list[float] | None = None
    param_angular: list[float] | None = None
    tokens: dict[str, int] = field(default_factory=dict)  # how many tokens each hidden-state kind pooled

    @property
    def num_layers(self) -> int:
        return len(self.bi)

    def metrics(self) -> list[str]:
        """Names of the metrics that were computed."""
        return [m for m in METRICS if getattr(self, m) is not None]

    def get(self, metric: str) -> list[float]:
        if metric not in METRICS:
            raise ValueError(f"unknown importance metric {metric!r}; expected one of {list(METRICS)}")
        values = getattr(self, metric)
        if values is None:
            raise ValueError(f"importance metric {metric!r} was not computed (available: {self.metrics()})")
        return list(values)

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe: ``{metric: [v0, v1, ...], "tokens": {...}}``; NaN is written as None (null)."""
        out: dict[str, Any] = {m: [_json_float(v) for v in getattr(self, m)] for m in self.metrics()}
        out["tokens"] = dict(self.tokens)
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> LayerScores:
        names = {f.name for f in fields(cls)}
        kwargs: dict[str, Any] = {}
        for key, value in data.items():
            if key == "tokens":
                kwargs[key] = dict(value)
            elif key in names:
                kwargs[key] = [math.nan if v is None else float(v) for v in value]
        return cls(**kwargs)

    def to_rows(self) -> list[dict[str, Any]]:
        """One row per layer, ``{"layer": i, "bi": ..., "angular": ..., ...}`` (a DVC plot's data); NaN -> None."""
        ms = self.metrics()
        return [{"layer": i, **{m: _json_float(getattr(self, m)[i]) for m in ms}} for i in range(self.num_layers)]


def _json_float(v: float) -> float | None:
    return None if v is None or math.isnan(v) else float(v)


# --------------------------------------------------------------------------------------------------------------
# Per-token math
# --------------------------------------------------------------------------------------------------------------
def token_cosine(h_in: torch.Tensor, h_out: torch.Tensor, eps: float = EPS) -> torch.Tensor:
    """Cosine similarity along the last dim, in float64, clamped to [-1, 1]; zero vectors give 0."""
    a, b = h_in.double(), h_out.double()
    denom = a.norm(dim=-1).clamp_min(eps) * b.norm(dim=-1).clamp_min(eps)
    return ((a * b).sum(-1) / denom).clamp(-1.0, 1.0)


def _masked_mean(values: torch.Tensor, mask: torch.Tensor | None) -> float:
    if mask is not None:
        values = values[mask.bool()]
    return float(values.mean()) if values.numel() else math.nan


def block_influence(h_in: torch.Tensor, h_out: torch.Tensor, mask: torch.Tensor | None = None) -> float:
    """BI = 1 - mean cos(h_in, h_out) over the tokens where `mask` is true (all if None); NaN if there are none."""
    return 1.0 - _masked_mean(token_cosine(h_in, h_out), mask)


def angular_distance(h_in: torch.Tensor, h_out: torch.Tensor, mask: torch.Tensor | None = None) -> float:
    """Mean over tokens of arccos(cos(h_in, h_out)) / pi, in [0, 1]; NaN if no token is selected."""
    return _masked_mean(torch.arccos(token_cosine(h_in, h_out)) / math.pi, mask)


def multimodal_bi(bi_image: float, bi_text: float) -> float:
    """mean(BI_image, BI_text); if one is NaN (no tokens of that kind) the other; NaN if both are."""
    present = [v for v in (bi_image, bi_text) if not math.isnan(v)]
    return sum(present) / len(present) if present else math.nan


# --------------------------------------------------------------------------------------------------------------
# Hooks and forward passes
# --------------------------------------------------------------------------------------------------------------
class _Accumulator:
    """Running sums of cos and angle per layer, for all / image / text tokens."""

    KINDS = ("all", "image", "text")

    def __init__(self, num_layers: int) -> None:
        self.cos = {k: [0.0] * num_layers for k in self.KINDS}
        self.ang = {k: [0.0] * num_layers for k in self.KINDS}
        self.count = {k: [0] * num_layers for k in self.KINDS}
        self.masks: dict[str, torch.Tensor] = {}

    def add(self, layer: int, h_in: torch.Tensor, h_out: torch.Tensor) -> None:
        cos = token_cosine(h_in, h_out)
        ang = torch.arccos(cos) / math.pi
        for kind in self.KINDS:
            mask = self.masks[kind].to(cos.device)
            if mask.shape != cos.shape:
                raise ModelStructureError(
                    f"decoder layer {layer} sees hidden states of shape {tuple(h_in.shape)} but the batch's token mask "
                    f"has shape {tuple(mask.shape)}: the model must expand image tokens in input_ids (LLaVA style)"
                )
            self.cos[kind][layer] += float(cos[mask].sum())
            self.ang[kind][layer] += float(ang[mask].sum())
            self.count[kind][layer] += int(mask.sum())

    def mean(self, which: str, kind: str) -> list[float]:
        sums = (self.cos if which == "cos" else self.ang)[kind]
        return [s / n if n else math.nan for s, n in zip(sums, self.count[kind])]


def _first_tensor(x: Any) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x
    if isinstance(x, (tuple, list)) and x and isinstance(x[0], torch.Tensor):
        return x[0]
    if hasattr(x, "last_hidden_state"):
        return x.last_hidden_state
    raise TypeError(f"cannot find the hidden states in a decoder layer's {type(x).__name__}")


def _register_layer_hooks(model: nn.Module, acc: _Accumulator, layers: nn.ModuleList | None = None) -> list[Any]:
    handles = []
    for i, layer in enumerate(decoder_layers(model) if layers is None else layers):
        def hook(module, args, kwargs, output, i=i):
            h_in = args[0] if args else kwargs["hidden_states"]
            acc.add(i, h_in, _first_tensor(output))

        handles.append(layer.register_forward_hook(hook, with_kwargs=True))
    return handles


def _token_masks(batch: Mapping[str, Any], image_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(valid, image, text) boolean masks of shape [B, T], on CPU."""
    ids = batch["input_ids"].cpu()
    attn = batch.get("attention_mask")
    valid = torch.ones_like(ids, dtype=torch.bool) if attn is None else attn.cpu().bool()
    image = (ids == image_id) & valid
    return valid, image, valid & ~image


def _model_inputs(batch: Mapping[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in batch.items() if k not in _DROP_KEYS}


def _text_config_key(model: nn.Module) -> str | None:
    cfg = _unwrap(model).config
    tc = text_config(model)
    for key in getattr(cfg, "sub_configs", {}) or {}:
        if getattr(cfg, key, None) is tc:
            return key
    return None


class eager_attention:  # noqa: N801 - used as a context manager
    """Switch the text model to eager attention (so attention weights exist), restoring the old setting on exit."""

    def __init__(self, model: nn.Module) -> None:
        self.model = _unwrap(model)
        self.key = _text_config_key(self.model)
        self.old: str | None = None

    def _set(self, impl: str) -> None:
        tc = text_config(self.model)
        if hasattr(self.model, "set_attn_implementation"):
            self.model.set_attn_implementation({self.key: impl} if self.key else impl)
        else:  # a bare module tree: set the config directly
            tc._attn_implementation = impl

    def __enter__(self) -> eager_attention:
        self.old = text_config(self.model)._attn_implementation
        if self.old != "eager":
            self._set("eager")
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.old is not None and self.old != "eager":
            self._set(self.old)


def image_attention_share(
    attentions: Iterable[torch.Tensor], input_ids: torch.Tensor, attention_mask: torch.Tensor | None, image_id: int
) -> tuple[list[float], int]:
    """Per layer, the summed share of attention mass on image keys over (text query, head) pairs, and the number of
    such pairs. `attentions` are per-layer probabilities of shape [B, heads, T, T] (rows over keys sum to 1)."""
    ids = input_ids.cpu()
    valid = torch.ones_like(ids, dtype=torch.bool) if attention_mask is None else attention_mask.cpu().bool()
    image = (ids == image_id) & valid
    has_image = image.any(dim=1)
    first = torch.where(has_image, image.float().argmax(dim=1), torch.full_like(has_image, ids.shape[1], dtype=torch.long))
    after = torch.arange(ids.shape[1]).unsqueeze(0) > first.unsqueeze(1)
    queries = valid & ~image & after  # [B, T]
    sums = []
    pairs = 0
    for att in attentions:
        dev = att.device
        on_image = (att.detach().float() * image.to(dev)[:, None, None, :]).sum(-1)  # [B, H, T]: mass on image keys
        q = queries.to(dev)[:, None, :].expand_as(on_image)
        sums.append(float(on_image[q].double().sum()))
        pairs = int(q.sum())  # the same for every layer
    return sums, pairs


# --------------------------------------------------------------------------------------------------------------
# Entry points
# --------------------------------------------------------------------------------------------------------------
@torch.no_grad()
def hidden_state_scores(
    model: nn.Module, batches: Iterable[Mapping[str, Any]], *, attention: bool = True
) -> LayerScores:
    """BI, angular distance, image/text/multimodal BI and (if `attention`) image-attention share, from one forward
    per batch. The model is put in eval mode and left there."""
    model.eval()
    num_layers = len(decoder_layers(model))
    image_id = image_token_id(model)
    device = next(model.parameters()).device
    acc = _Accumulator(num_layers)
    att_sums = [0.0] * num_layers
    att_pairs = 0
    n_batches = 0
    handles = _register_layer_hooks(model, acc)
    ctx = eager_attention(model) if attention else None
    try:
        if ctx is not None:
            ctx.__enter__()
        for batch in batches:
            n_batches += 1
            valid, image, text = _token_masks(batch, image_id)
            acc.masks = {"all": valid, "image": image, "text": text}
            kwargs = {"output_attentions": True} if attention else {}
            out = model(**_model_inputs(batch, device), use_cache=False, **kwargs)
            if attention:
                atts = getattr(out, "attentions", None)
                if not atts or len(atts) != num_layers:
                    raise RuntimeError(
                        f"expected attention weights for {num_layers} decoder layers, got "
                        f"{0 if not atts else len(atts)}: the model did not return them under eager attention"
                    )
                sums, pairs = image_attention_share(atts, batch["input_ids"], batch.get("attention_mask"), image_id)
                att_sums = [a + s for a, s in zip(att_sums, sums)]
                att_pairs += pairs
    finally:
        for h in handles:
            h.remove()
        if ctx is not None:
            ctx.__exit__(None, None, None)
    if n_batches == 0:
        raise ValueError("no calibration batches: layer importance needs at least one batch")
    bi = [1.0 - c for c in acc.mean("cos", "all")]
    bi_image = [1.0 - c for c in acc.mean("cos", "image")]
    bi_text = [1.0 - c for c in acc.mean("cos", "text")]
    return LayerScores(
        bi=bi,
        angular=acc.mean("ang", "all"),
        bi_image=bi_image,
        bi_text=bi_text,
        mm_bi=[multimodal_bi(a, b) for a, b in zip(bi_image, bi_text)],
        image_attention=[s / att_pairs if att_pairs else math.nan for s in att_sums] if attention else None,
        tokens={k: (acc.count[k][0] if num_layers else 0) for k in acc.KINDS},
    )


@torch.no_grad()
def text_block_influence(lm: nn.Module, tokenizer, texts: list[str], *, batch_size: int, max_length: int) -> list[float]:
    """BI per decoder layer of a language model alone (no image) on `texts`, every non-padding token: the base LM's
    depth profile, before any visual tuning. `lm`: a causal LM, or the bare decoder (a VLM's language_model, whose
    `layers` are its own). The model is put in eval mode and left there."""
    lm.eval()
    tokenizer.padding_side = "right"
    layers = next((m.layers for m in (lm, getattr(lm, "model", None)) if isinstance(getattr(m, "layers", None), nn.ModuleList)),
                  None) or decoder_layers(lm)
    acc = _Accumulator(len(layers))
    handles = _register_layer_hooks(lm, acc, layers)
    try:
        for start in range(0, len(texts), batch_size):
            enc = tokenizer(texts[start:start + batch_size], return_tensors="pt", padding=True, truncation=True,
                            max_length=max_length)
            valid = enc["attention_mask"].bool()
            acc.masks = {"all": valid, "image": torch.zeros_like(valid), "text": valid}
            lm(**{k: v.to(lm.device) for k, v in enc.items() if k in ("input_ids", "attention_mask")}, use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return [1.0 - c for c in acc.mean("cos", "all")]


def influence_spread(bi: list[float]) -> dict[str, float]:
    """How a BI profile is spread over the depth. `median_to_max`: the median layer's BI / the largest layer's, the
    depth-independent measure the test-bed gate reads (published LLM profiles: 0.12-0.18, docs/results.md; the tiny
    LM's 0.015: layer 0 does nearly all of the work). `top_share`: the largest layer's share of the summed BI (1/L when
    even). `effective_layers`: exp of the entropy of the shares (L when even, 1 when one layer carries all)."""
    values = sorted(max(v, 0.0) for v in bi if not math.isnan(v))
    total = sum(values)
    if not total:
        return {"median_to_max": math.nan, "top_share": math.nan, "effective_layers": math.nan}
    middle = len(values) // 2
    median = values[middle] if len(values) % 2 else (values[middle - 1] + values[middle]) / 2
    shares = [v / total for v in values]
    return {"median_to_max": median / values[-1], "top_share": max(shares),
            "effective_layers": math.exp(-sum(q * math.log(q) for q in shares if q > 0))}


_LM_PREFIXES = ("model.language_model.", "language_model.model.", "language_model.", "model.text_model.", "model.model.", "model.")


def layer_weights(model_or_state: nn.Module | Mapping[str, torch.Tensor]) -> list[dict[str, torch.Tensor]]:
    """The 2-D weights (linear projections) of each decoder layer: ``[{name_within_layer: tensor}, ...]``.

    A module is searched with `decoder_layers`; a state dict's decoder prefix is the first of the usual LLaVA / causal-LM
    prefixes (``model.language_model.layers.`` ...) present in its keys, so vision-tower layers are never mixed in."""
    if isinstance(model_or_state, nn.Module):
        out = []
        for i, layer in enumerate(decoder_layers(model_or_state)):
            sd = layer.state_dict()
            lora = [k for k in sd if "lora_" in k]
            if lora:
                raise ValueError(
                    f"decoder layer {i} has unmerged LoRA weights ({lora[0]}, ...): merge them first (merge_and_unload)"
                )
            out.append({k: v for k, v in sd.items() if k.endswith("weight") and v.dim() == 2})
        return out
    state = model_or_state
    for prefix in _LM_PREFIXES:
        head = f"{prefix}layers."
        keys = [k for k in state if k.startswith(head)]
        if keys:
            break
    else:
        raise ValueError("state dict has no decoder layers under any of " + ", ".join(f"{p}layers." for p in _LM_PREFIXES))
    per_layer: dict[int, dict[str, torch.Tensor]] = {}
    for k in keys:
        idx, rest = k[len(head):].split(".", 1)
        if "lora_" in rest:
            raise ValueError(f"state dict has unmerged LoRA weights ({k}): merge them first (merge_and_unload)")
        v = state[k]
        per_layer.setdefault(int(idx), {})
        if rest.endswith("weight") and v.dim() == 2:
            per_layer[int(idx)][rest] = v
    n = max(per_layer) + 1
    missing = sorted(set(range(n)) - set(per_layer))
    if missing:
        raise ValueError(f"state dict is missing decoder layers {missing}")
    return [per_layer[i] for i in range(n)]


def weight_change_ratio(w_base: torch.Tensor, w_tuned: torch.Tensor, eps: float = EPS) -> float:
    """|W' - W|_F / |W|_F (eps-guarded)."""
    a, b = w_base.detach().double(), w_tuned.detach().double()
    return float((b - a).norm() / a.norm().clamp_min(eps))


def weight_angular_distance(w_base: torch.Tensor, w_tuned: torch.Tensor, eps: float = EPS) -> float:
    """arccos(<W', W> / (|W'| |W|)) / pi in [0, 1]; the cosine is clamped to [-1, 1], zero weights give 0.5."""
    a, b = w_base.detach().double().flatten(), w_tuned.detach().double().flatten()
    if torch.equal(a, b) and bool(a.any()):
        return 0.0  # exactly unchanged: avoid arccos(1 - rounding) > 0
    cos = (a @ b) / (a.norm().clamp_min(eps) * b.norm().clamp_min(eps))
    return float(torch.arccos(cos.clamp(-1.0, 1.0)) / math.pi)


def param_delta_scores(
    base: nn.Module | Mapping[str, torch.Tensor], tuned: nn.Module | Mapping[str, torch.Tensor]
) -> tuple[list[float], list[float]]:
    """(param_change, param_angular) per decoder layer between a base and a tuned model of the same architecture."""
    wb, wt = layer_weights(base), layer_weights(tuned)
    if len(wb) != len(wt):
        raise ModelStructureError(f"base has {len(wb)} decoder layers but the tuned model has {len(wt)}")
    change, angular = [], []
    for i, (lb, lt) in enumerate(zip(wb, wt)):
        if set(lb) != set(lt):
            raise ModelStructureError(f"decoder layer {i}: weight names differ ({sorted(set(lb) ^ set(lt))})")
        for name in lb:
            if lb[name].shape != lt[name].shape:
                raise ModelStructureError(
                    f"decoder layer {i}: {name} has shape {tuple(lb[name].shape)} vs {tuple(lt[name].shape)}")
        names = sorted(lb)
        change.append(sum(weight_change_ratio(lb[n], lt[n]) for n in names) if names else math.nan)
        angular.append(sum(weight_angular_distance(lb[n], lt[n]) for n in names) / len(names) if names else math.nan)
    return change, angular


def calibration_sample(records, n: int, *, seed: int, source: str = "dataset") -> list[dict]:
    """A seeded sample of `n` image records (text-only ones skipped; a multi-turn record kept whole), in data order."""
    import random

    from pipeline.data.schema import DataError, image_record_indices

    with_image = image_record_indices(records)
    if not with_image:
        raise DataError(f"{source}: no record has an image, so there is nothing to calibrate layer importance on")
    picked = sorted(random.Random(f"calibration/{seed}").sample(with_image, min(n, len(with_image))))
    return [records[i] for i in picked]


def calibration_batches(processor, records, batch_size: int) -> list[dict]:
    """Image + whole conversation (every question and answer), rendered as the model saw them in training."""
    return [processor_inputs(processor, records[start : start + batch_size], with_answers=True, padding_side="right")
            for start in range(0, len(records), batch_size)]


def layer_importance(
    model: nn.Module,
    batches: Iterable[Mapping[str, Any]],
    *,
    base: nn.Module | Mapping[str, torch.Tensor] | None = None,
    attention: bool = True,
) -> LayerScores:
    """All layer scores for `model`: hidden-state metrics and image-attention share on `batches`, plus the
    checkpoint-delta metrics against `base` (the checkpoint before tuning) when it is given."""
    scores = hidden_state_scores(model, batches, attention=attention)
    if base is not None:
        change, angular = param_delta_scores(base, model)
        if len(change) != scores.num_layers:
            raise ValueError(f"base has {len(change)} decoder layers but the model has {scores.num_layers}")
        scores.param_change, scores.param_angular = change, angular
    return scores


__all__ = [
    "EPS", "HIDDEN_METRICS", "METRICS", "PARAM_METRICS", "LayerScores", "angular_distance", "block_influence",
    "calibration_batches", "eager_attention", "hidden_state_scores", "image_attention_share", "layer_importance",
    "layer_weights", "multimodal_bi", "param_delta_scores", "token_cosine", "weight_angular_distance", "weight_change_ratio",
]
