"""Model assembly: load a LLaVA-style checkpoint, compose one from a vision encoder + causal LM, or build the
offline tiny / micro profiles; find the decoder layers of any supported model.

Everything here is offline-safe: nothing is downloaded unless a hub id is given *and* the hub is reachable.
"""

from __future__ import annotations

import logging
import math
import os
import warnings
from collections.abc import Iterable
from pathlib import Path

import torch
from torch import nn

from pipeline.config import PROFILES, ProfileSpec  # noqa: F401  (re-exported: the shapes live in the params schema)
from pipeline.data.chat import IMAGE_TOKEN, set_chat_template
from pipeline.errors import MissingInputError, ProjectError
from pipeline.storage import atomic_dir

log = logging.getLogger(__name__)

SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>", IMAGE_TOKEN]


class ModelStructureError(ProjectError, ValueError):
    """The model has no decoder layer list this project knows how to find."""


# --------------------------------------------------------------------------------------------------------------
# Profiles: the tiny default and the micro test model, built entirely from configs.
# --------------------------------------------------------------------------------------------------------------
# Their shapes, ProfileSpec and PROFILES, are part of the params schema (pipeline/config.py); imported above, so
# `pipeline.model.PROFILES` still names them.


def vision_config(spec: ProfileSpec):
    from transformers import CLIPVisionConfig, SiglipVisionConfig

    cls = CLIPVisionConfig if spec.vision_type == "clip" else SiglipVisionConfig
    return cls(
        hidden_size=spec.vision_hidden, intermediate_size=4 * spec.vision_hidden, num_hidden_layers=spec.vision_layers,
        num_attention_heads=spec.vision_heads, image_size=spec.image_size, patch_size=spec.patch_size,
    )


def lm_config(spec: ProfileSpec, tokenizer):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=spec.lm_hidden, intermediate_size=spec.lm_intermediate,
        num_hidden_layers=spec.lm_layers, num_attention_heads=spec.lm_heads, num_key_value_heads=spec.lm_kv_heads,
        max_position_embeddings=spec.max_position, tie_word_embeddings=False, initializer_range=spec.lm_init_std,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )


def image_processor(spec: ProfileSpec):
    """A PIL/numpy image processor (no torchvision needed) matching the vision tower's input size."""
    from transformers import CLIPImageProcessorPil, SiglipImageProcessorPil

    size = spec.image_size
    if spec.vision_type == "clip":
        return CLIPImageProcessorPil(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
    return SiglipImageProcessorPil(size={"height": size, "width": size})


def train_tokenizer(texts: Iterable[str], vocab_size: int):
    """A byte-level BPE tokenizer trained offline, with LLaVA's `<image>` as a special token."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    bos = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos)])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="<pad>",
        extra_special_tokens={"image_token": IMAGE_TOKEN}, padding_side="right", model_max_length=4096,
    )
    set_chat_template(fast, "plain")  # the tiny and micro profiles' conversation format (data/chat.py)
    return fast


POSITION_EMBEDDING_STD = 0.5


def build_vision_tower(spec: ProfileSpec, seed: int):
    """A randomly initialised (seeded) CLIP/SigLIP vision model: the tiny stand-in for a pretrained encoder."""
    from transformers import CLIPVisionModel, SiglipVisionModel

    torch.manual_seed(seed)
    cls = CLIPVisionModel if spec.vision_type == "clip" else SiglipVisionModel
    tower = cls(vision_config(spec))
    # At the default init (std 0.02) the position embeddings are drowned by the patch embeddings (std ~1), so a
    # random tower's tokens do not say where they are (a linear probe finds a token's position at near chance).
    # A trained ViT's tokens do; giving them the patch embeddings' scale restores that.
    position = next(m for name, m in tower.named_modules() if name.endswith("position_embedding"))
    with torch.no_grad():
        position.weight.normal_(0.0, POSITION_EMBEDDING_STD)
    return tower


def build_language_model(spec: ProfileSpec, tokenizer, seed: int):
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(lm_config(spec, tokenizer))


def contrastive_model(tower, tokenizer, *, text_layers: int, max_length: int):
    """CLIP around a CLIP tower (SigLIP around a SigLIP one) with a new small text encoder, for contrastive
    pretraining on image-text pairs. The tower *is* the model's vision_model (shared, not copied): training the
    model trains the tower in place. Returns (model, end_id).

    The text encoder knows the tokenizer's ids plus one more, `end_id`, that ends every caption: CLIP pools a
    caption at its `eos_token_id`, and with the tokenizer's own </s> (id 2) transformers takes the config for a
    legacy one and pools at the largest id instead (SigLIP pools the last position: captions are padded to
    max_length)."""
    from transformers import CLIPConfig, CLIPModel, CLIPTextConfig, SiglipConfig, SiglipModel, SiglipTextConfig

    vcfg = tower.config
    end_id = len(tokenizer)
    text = dict(
        vocab_size=end_id + 1, hidden_size=vcfg.hidden_size, intermediate_size=4 * vcfg.hidden_size,
        num_hidden_layers=text_layers, num_attention_heads=vcfg.num_attention_heads, max_position_embeddings=max_length,
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id, eos_token_id=end_id,
    )
    if vcfg.model_type == "clip_vision_model":
        config = CLIPConfig(text_config=CLIPTextConfig(**text).to_dict(), vision_config=vcfg.to_dict(),
                            projection_dim=vcfg.hidden_size)
        model = CLIPModel(config)
    elif vcfg.model_type == "siglip_vision_model":
        model = SiglipModel(SiglipConfig(text_config=SiglipTextConfig(**text).to_dict(), vision_config=vcfg.to_dict()))
        with torch.no_grad():  # the SigLIP paper's start (temperature 10, bias -10); transformers starts at 1 and 0
            model.logit_scale.fill_(math.log(10.0))
            model.logit_bias.fill_(-10.0)
    else:
        raise ModelStructureError(f"contrastive pretraining needs a CLIP or SigLIP vision tower, got {vcfg.model_type!r}")
    model.vision_model = tower
    return model, end_id


def save_vision_encoder(model, processor, out_dir: Path) -> None:
    with atomic_dir(out_dir) as tmp:
        model.save_pretrained(tmp)
        processor.save_pretrained(tmp)


def save_language_model(model, tokenizer, out_dir: Path) -> None:
    with atomic_dir(out_dir) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)


# --------------------------------------------------------------------------------------------------------------
# Composing a LLaVA from parts (how LLaVA-1.5 and Bunny begin stage 1)
# --------------------------------------------------------------------------------------------------------------
def _warn_remote_code(trust_remote_code: bool) -> None:
    if trust_remote_code:
        warnings.warn("trust_remote_code=True: code shipped with the checkpoint will run on this machine", stacklevel=3)


def compose_llava(vision_path: str, lm_path: str, *, dtype: torch.dtype = torch.float32, trust_remote_code: bool = False,
                  chat_template: str = "tokenizer"):
    """A fresh LlavaForConditionalGeneration: the given vision encoder + causal LM, a new 2-layer GELU projector,
    features from the vision tower's second-to-last layer. Returns (model, processor). `chat_template` (a name of
    data/chat.py): the conversation format the tokenizer gets; ``tokenizer`` keeps the LM's own."""
    from transformers import (
        AutoImageProcessor,
        AutoModelForCausalLM,
        AutoTokenizer,
        CLIPVisionModel,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
        SiglipVisionModel,
    )
    from transformers.models.llava.modeling_llava import LlavaMultiModalProjector

    _warn_remote_code(trust_remote_code)
    vcfg = _config(vision_path, trust_remote_code)
    kind = vcfg.model_type
    if kind in ("clip", "clip_vision_model"):
        vision_cls, strategy, extra = CLIPVisionModel, "default", 1  # drop CLIP's CLS token, as LLaVA-1.5 does
    elif kind in ("siglip", "siglip_vision_model"):
        vision_cls, strategy, extra = SiglipVisionModel, "full", 0
    else:
        raise ModelStructureError(f"vision encoder {vision_path!r} has model_type {kind!r}; expected a CLIP or SigLIP model")
    vision = vision_cls.from_pretrained(vision_path, dtype=dtype)
    _config(lm_path, trust_remote_code)  # a missing model: one error naming it
    lm = AutoModelForCausalLM.from_pretrained(lm_path, dtype=dtype, trust_remote_code=trust_remote_code)
    if not isinstance(getattr(getattr(lm, "model", None), "layers", None), nn.ModuleList):
        # LLaVA adopts `lm.model` as its language model (a Llama-style decoder with a `.layers` list); GPT-2-style
        # models (`.transformer.h`) would fail deep inside transformers with an AttributeError.
        raise ModelStructureError(
            f"language model {lm_path!r} is a {type(lm).__name__}: it has no decoder layer list at `.model.layers`; "
            "composing a LLaVA needs a Llama-style causal LM (Llama, Mistral, Qwen2, Vicuna, ...)"
        )
    tokenizer = AutoTokenizer.from_pretrained(lm_path, trust_remote_code=trust_remote_code)
    set_chat_template(tokenizer, chat_template)
    if IMAGE_TOKEN not in tokenizer.get_vocab():
        tokenizer.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.unk_token or tokenizer.eos_token
    if len(tokenizer) > lm.get_input_embeddings().weight.shape[0]:
        lm.resize_token_embeddings(len(tokenizer))

    config = LlavaConfig(
        vision_config=vision.config, text_config=lm.config, image_token_id=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        projector_hidden_act="gelu", vision_feature_layer=-2, vision_feature_select_strategy=strategy,
    )
    with torch.device("meta"):
        model = LlavaForConditionalGeneration(config)
    # Adopt the loaded modules as they are (no copy, no second allocation); only the projector is new.
    model.model.vision_tower = vision
    model.model.language_model = lm.model
    model.lm_head = lm.lm_head
    model.model.multi_modal_projector = LlavaMultiModalProjector(config).to(dtype)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id

    processor = LlavaProcessor(
        image_processor=AutoImageProcessor.from_pretrained(vision_path), tokenizer=tokenizer,
        patch_size=vision.config.patch_size, vision_feature_select_strategy=strategy, num_additional_image_tokens=extra,
    )
    return model, processor


def save_vlm(model, processor, out_dir: Path, extra_json: dict[str, dict] | None = None) -> None:
    """Save model (safetensors) + processor (+ small JSON side files) atomically: the directory appears whole."""
    import json

    with atomic_dir(out_dir) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        processor.save_pretrained(tmp)
        for name, content in (extra_json or {}).items():
            (tmp / name).write_text(json.dumps(content, indent=2, sort_keys=True, default=str) + "\n")


# --------------------------------------------------------------------------------------------------------------
# Loading any supported checkpoint
# --------------------------------------------------------------------------------------------------------------
def _config(path: str | os.PathLike, trust_remote_code: bool):
    """The model config at `path` (a directory or a hub id); a MissingInputError naming it where there is none."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    except OSError as err:  # neither a model directory nor a model the hub (or, offline, its cache) has
        raise MissingInputError(f"model {str(path)!r} cannot be loaded: {str(err).strip().splitlines()[0]}") from err


def load_vlm(path: str | os.PathLike, *, dtype: torch.dtype = torch.float32, trust_remote_code: bool = False):
    """Load a LLaVA (or any AutoModelForImageTextToText model with a findable decoder layer list) + its processor."""
    from transformers import AutoModelForImageTextToText, AutoProcessor, LlavaForConditionalGeneration

    _warn_remote_code(trust_remote_code)
    path = str(path)
    if Path(path).is_dir():
        has_weights = any(Path(path).glob("*.safetensors")) or any(Path(path).glob("*.bin"))
        if not has_weights:
            raise MissingInputError(f"model directory {path} has no weights (*.safetensors): nothing to load")
    config = _config(path, trust_remote_code)
    cls = LlavaForConditionalGeneration if config.model_type == "llava" else AutoModelForImageTextToText
    model = cls.from_pretrained(path, dtype=dtype, trust_remote_code=trust_remote_code, use_safetensors=True)
    decoder_layers(model)  # fail early, naming the class, if we cannot find the layers
    processor = AutoProcessor.from_pretrained(path, trust_remote_code=trust_remote_code)
    return model, processor


# --------------------------------------------------------------------------------------------------------------
# Structure: where the parts are
# --------------------------------------------------------------------------------------------------------------
_LM_PATHS = ("model.language_model", "language_model.model", "language_model", "model.text_model", "model.model")
_VISION_PATHS = ("model.vision_tower", "vision_tower", "model.vision_model", "vision_model")
_PROJECTOR_PATHS = ("model.multi_modal_projector", "multi_modal_projector", "model.connector", "model.mm_projector")


def _unwrap(model: nn.Module) -> nn.Module:
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _get(model: nn.Module, dotted: str) -> nn.Module | None:
    obj = model
    for part in dotted.split("."):
        obj = getattr(obj, part, None) if isinstance(obj, nn.Module) else None
        if obj is None:
            return None
    return obj if isinstance(obj, nn.Module) else None


def module_path(model: nn.Module, candidates: tuple[str, ...], what: str) -> str:
    base = _unwrap(model)
    for path in candidates:
        if _get(base, path) is not None:
            return path
    raise ModelStructureError(f"{type(base).__name__} has no {what} at any of {list(candidates)}")


def language_model(model: nn.Module) -> nn.Module:
    """The decoder stack (the module that owns `.layers`)."""
    base = _unwrap(model)
    for path in _LM_PATHS:
        lm = _get(base, path)
        if lm is not None and isinstance(getattr(lm, "layers", None), nn.ModuleList):
            return lm
    raise ModelStructureError(
        f"{type(base).__name__} has no decoder layer list: looked for `.layers` under {list(_LM_PATHS)}"
    )


def language_model_path(model: nn.Module) -> str:
    base = _unwrap(model)
    lm = language_model(base)
    return next(name for name, mod in base.named_modules() if mod is lm)


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    return language_model(model).layers


def num_decoder_layers(model: nn.Module) -> int:
    return len(decoder_layers(model))


def vision_tower(model: nn.Module) -> nn.Module:
    return _get(_unwrap(model), module_path(model, _VISION_PATHS, "vision tower"))


def projector(model: nn.Module) -> nn.Module:
    return _get(_unwrap(model), module_path(model, _PROJECTOR_PATHS, "multimodal projector"))


def text_config(model: nn.Module):
    cfg = _unwrap(model).config
    return getattr(cfg, "text_config", None) or cfg


def image_token_id(model: nn.Module) -> int:
    cfg = _unwrap(model).config
    for name in ("image_token_id", "image_token_index"):
        if getattr(cfg, name, None) is not None:
            return int(getattr(cfg, name))
    raise ModelStructureError(f"{type(_unwrap(model)).__name__} config has no image token id")


def build_offline_parts(spec: ProfileSpec, texts: Iterable[str], out_dir: Path, seed: int = 0) -> tuple[Path, Path]:
    """Tokenizer + seeded random vision tower + seeded random Llama LM, saved as `out_dir/vision` and `out_dir/lm`
    like any hub checkpoint. Returns (vision_dir, lm_dir)."""
    tokenizer = train_tokenizer(texts, spec.vocab_size)
    vision_dir, lm_dir = Path(out_dir) / "vision", Path(out_dir) / "lm"
    save_vision_encoder(build_vision_tower(spec, seed), image_processor(spec), vision_dir)
    save_language_model(build_language_model(spec, tokenizer, seed + 1), tokenizer, lm_dir)
    return vision_dir, lm_dir
