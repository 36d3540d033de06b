"""Local stand-ins with the real shapes of LLaVA-1.5-7B's parts, for tests/stages/test_real_shapes.py (no hub, no download).

* ``build_vision``: a seeded random CLIPVisionModel shaped like openai/clip-vit-large-patch14-336 (336 px, patch 14:
  576 patch tokens + CLS, hidden 1024, 16 heads, MLP 4096), cut to `layers` layers, saved with that checkpoint's
  image processor config (shortest edge 336, centre crop 336, CLIP mean/std, bicubic, RGB conversion) as the
  PIL-based ``CLIPImageProcessorPil`` that pipeline/model.py uses (no torchvision).
* ``build_tokenizer``: a ``LlamaTokenizer`` (transformers' fast tokenizer: BPE, byte fallback, "▁" Metaspace word
  prefix, BOS added) with Llama-2's layout: exactly 32,000 tokens, ``<unk>``=0, ``<s>``=1, ``</s>``=2, the 256 byte
  tokens ``<0x00>``..``<0xFF>`` at 3..258 as in Llama-2's sentencepiece model, then BPE merges trained offline on
  the text that ships with CPython (the pydoc topics and the standard library's top-level modules), padded with
  filler tokens should that text not yield enough merges. No pad token (Llama-2 has none). Its chat template is
  Vicuna v1's, LLaVA-1.5's conversation format.
* ``build_language_model``: a seeded random LlamaForCausalLM with Llama-2-7B's config (vocab 32,000, 4096 positions,
  RMSNorm eps 1e-5, RoPE theta 10,000, SiLU, untied head) at a given depth and width, saved with the tokenizer.
* ``write_llava_data``: LLaVA-format JSON (a caption set like LLaVA-Pretrain-558K's, an instruction list like
  LLaVA-665K's with multi-turn and text-only records) with JPEG photos at the sizes COCO / LAION images come in.
"""

from __future__ import annotations

import json
import random
import sysconfig
from pathlib import Path

VICUNA_SYSTEM = (
    "A chat between a curious human and an artificial intelligence assistant. The assistant gives helpful, "
    "detailed, and polite answers to the human's questions."
)
# LLaVA-1.5's `vicuna_v1`: "<s>{system} USER: {q} ASSISTANT: {a}</s>USER: {q} ASSISTANT: {a}</s>..."
VICUNA_V1_TEMPLATE = (
    "{{ bos_token }}" + VICUNA_SYSTEM + " "
    "{% for message in messages %}{% if message['role'] == 'user' %}USER: {{ message['content'] }} ASSISTANT:"
    "{% else %} {{ message['content'] }}{{ eos_token }}{% endif %}{% endfor %}"
)

# openai/clip-vit-large-patch14-336: config.json (vision_config) and preprocessor_config.json.
CLIP_L_336 = dict(
    hidden_size=1024, intermediate_size=4096, num_attention_heads=16, num_hidden_layers=24, image_size=336,
    patch_size=14, projection_dim=768, hidden_act="quick_gelu", layer_norm_eps=1e-5, num_channels=3,
)
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]

# meta-llama/Llama-2-7b-hf (and lmsys/vicuna-7b-v1.5, which LLaVA-1.5-7B starts from): config.json.
LLAMA2_7B = dict(
    vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
    num_key_value_heads=32, max_position_embeddings=4096, rms_norm_eps=1e-5, rope_theta=10000.0, hidden_act="silu",
    bos_token_id=1, eos_token_id=2, tie_word_embeddings=False, attention_bias=False,
)
VOCAB_SIZE = 32000
NUM_BYTE_TOKENS = 256


# ---------------------------------------------------------------------------------------------------- tokenizer
def corpus() -> list[str]:
    """Local English + Python text: the pydoc topics, then the standard library's top-level modules (sorted).
    Newlines become spaces, so that, as in Llama-2's vocabulary, no piece holds one and '\\n' is the byte <0x0A>."""
    from pydoc_data.topics import topics

    texts = [topics[name] for name in sorted(topics)]
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    texts += [p.read_text(encoding="utf-8", errors="replace") for p in sorted(stdlib.glob("*.py"))]
    return [t.replace("\r", " ").replace("\n", " ") for t in texts]


def build_tokenizer(chat_template: str = VICUNA_V1_TEMPLATE):
    """A Llama-2-shaped tokenizer (see the module docstring)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import LlamaTokenizer

    specials = ["<unk>", "<s>", "</s>"]
    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=True)
    trainer = trainers.BpeTrainer(vocab_size=VOCAB_SIZE - NUM_BYTE_TOKENS, special_tokens=specials, show_progress=False)
    bpe.train_from_iterator(corpus(), trainer=trainer)
    trained = json.loads(bpe.to_str())["model"]

    vocab = {tok: i for i, tok in enumerate(specials)}
    for b in range(NUM_BYTE_TOKENS):
        vocab[f"<0x{b:02X}>"] = len(vocab)
    for tok, _ in sorted(trained["vocab"].items(), key=lambda kv: kv[1]):
        if tok not in vocab and len(vocab) < VOCAB_SIZE:
            vocab[tok] = len(vocab)
    filler = 0
    while len(vocab) < VOCAB_SIZE:  # only if the corpus yields too few merges (never reached by any merge)
        vocab[f"<filler_{filler:05d}>"] = len(vocab)
        filler += 1
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in trained["merges"]]
    merges = [m for m in merges if m[0] in vocab and m[1] in vocab and m[0] + m[1] in vocab]
    tokenizer = LlamaTokenizer(
        vocab=vocab, merges=merges, unk_token="<unk>", bos_token="<s>", eos_token="</s>", add_bos_token=True,
        add_eos_token=False, model_max_length=4096, padding_side="right", legacy=False,
    )
    tokenizer.chat_template = chat_template
    assert len(tokenizer) == VOCAB_SIZE, len(tokenizer)
    return tokenizer


# ---------------------------------------------------------------------------------------------------- models
def image_processor():
    """openai/clip-vit-large-patch14-336's preprocessor_config.json, as the PIL-based processor class."""
    from PIL import Image
    from transformers import CLIPImageProcessorPil

    return CLIPImageProcessorPil(
        do_resize=True, size={"shortest_edge": 336}, resample=Image.Resampling.BICUBIC, do_center_crop=True,
        crop_size={"height": 336, "width": 336}, do_rescale=True, rescale_factor=1 / 255, do_normalize=True,
        image_mean=CLIP_MEAN, image_std=CLIP_STD, do_convert_rgb=True,
    )


def build_vision(out_dir: Path, *, layers: int = 2, seed: int = 0) -> Path:
    import torch
    from transformers import CLIPVisionConfig, CLIPVisionModel

    torch.manual_seed(seed)
    model = CLIPVisionModel(CLIPVisionConfig(**{**CLIP_L_336, "num_hidden_layers": layers}))
    out_dir = Path(out_dir)
    model.save_pretrained(out_dir)
    image_processor().save_pretrained(out_dir)
    return out_dir


def build_language_model(out_dir: Path, tokenizer, *, layers: int = 2, hidden: int = 4096, intermediate: int = 11008,
                         heads: int = 32, seed: int = 1) -> Path:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    if hidden % heads:
        raise ValueError(f"hidden {hidden} is not divisible by heads {heads}")
    config = LlamaConfig(**{
        **LLAMA2_7B, "num_hidden_layers": layers, "hidden_size": hidden, "intermediate_size": intermediate,
        "num_attention_heads": heads, "num_key_value_heads": heads,
    })
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    out_dir = Path(out_dir)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir


# ---------------------------------------------------------------------------------------------------- data
PHOTO_SIZES = ((640, 480), (500, 375), (480, 640), (640, 427), (375, 500))  # COCO / LAION-like, both orientations
CAPTION_PROMPTS = (  # LLaVA-Pretrain-558K's prompts come with <image> before or after the instruction
    "<image>\nDescribe the image concisely.",
    "Give a brief description of the image.\n<image>",
    "<image>\nRender a clear and concise summary of the photo.",
    "Share a concise interpretation of the image provided.\n<image>",
)
OBJECTS = ("circle", "square", "triangle", "bar", "ring")
COLOURS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 80, 230), "yellow": (240, 210, 30),
           "white": (240, 240, 240), "purple": (140, 60, 180)}


def photo(rng: random.Random, size: tuple[int, int]):
    """A noisy gradient with a few filled shapes: photo-like JPEG statistics. Returns (image, [(colour, shape)])."""
    import numpy as np
    from PIL import Image, ImageDraw

    w, h = size
    gen = np.random.default_rng(rng.randrange(1 << 30))
    base = np.linspace(0, 1, w)[None, :, None] * gen.uniform(40, 200, 3) + np.linspace(0, 1, h)[:, None, None] * 50
    pixels = np.clip(base + gen.normal(0, 12, (h, w, 3)), 0, 255).astype(np.uint8)
    img = Image.fromarray(pixels, "RGB")
    draw = ImageDraw.Draw(img)
    objects = []
    for _ in range(rng.randint(1, 3)):
        colour, kind = rng.choice(sorted(COLOURS)), rng.choice(OBJECTS)
        x0, y0 = rng.randrange(0, w - w // 4), rng.randrange(0, h - h // 4)
        x1, y1 = x0 + rng.randint(w // 8, w // 4), y0 + rng.randint(h // 8, h // 4)
        fill = COLOURS[colour]
        if kind in ("circle", "ring"):
            draw.ellipse((x0, y0, x1, y1), fill=None if kind == "ring" else fill, outline=fill, width=6)
        elif kind == "triangle":
            draw.polygon([((x0 + x1) / 2, y0), (x0, y1), (x1, y1)], fill=fill)
        else:
            draw.rectangle((x0, y0, x1, y0 + (y1 - y0) // (3 if kind == "bar" else 1)), fill=fill)
        objects.append((colour, kind))
    return img, objects


def _describe(objects) -> str:
    parts = [f"a {c} {k}" for c, k in objects]
    return (", ".join(parts[:-1]) + " and " + parts[-1] if len(parts) > 1 else parts[0]) + " on a textured background"


def _long_answer(rng: random.Random, objects, sentences: int) -> str:
    """A detailed-description style answer (LLaVA's `detail_23k` answers run to a few hundred tokens)."""
    lines = [f"The image shows {_describe(objects)}."]
    for i in range(sentences):
        c, k = rng.choice(objects)
        lines.append(rng.choice((
            f"The {c} {k} stands out against the background, whose colour shifts gradually from one side to the other.",
            "There is some visible grain across the whole picture, as in a photograph taken in low light.",
            f"The {k} has clean edges, and its {c} colour is uniform: it was drawn rather than photographed.",
            f"Nothing else in the scene overlaps the {c} {k}; the composition is simple and uncluttered.",
        )))
    return " ".join(lines)


def write_llava_data(root: Path, *, n_pretrain: int = 16, n_instruct: int = 24, seed: int = 0) -> dict[str, str]:
    """LLaVA-format data under `root`: `pretrain/blip_laion_cc_sbu.json` (+ images/00000/*.jpg) and
    `instruct/llava_mix.json` (+ images/coco/train2017/*.jpg). The instruction list cycles through: a single-turn
    image question, a multi-turn image conversation (<image> in the first human turn only, before or after its
    text), a text-only single turn, a detailed description, a text-only multi-turn conversation. Returns the
    data.* params."""
    rng = random.Random(f"real-shapes/{seed}")
    root = Path(root)
    pre_dir, ins_dir = root / "pretrain" / "images", root / "instruct" / "images"

    def save(img, directory: Path, rel: str) -> str:
        path = directory / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        img.save(path, format="JPEG", quality=90)
        return rel

    pretrain = []
    for i in range(n_pretrain):
        img, objects = photo(rng, PHOTO_SIZES[i % len(PHOTO_SIZES)])
        rel = save(img, pre_dir, f"00000/{i:09d}.jpg")
        pretrain.append({"id": f"{i:09d}", "image": rel, "conversations": [
            {"from": "human", "value": CAPTION_PROMPTS[i % len(CAPTION_PROMPTS)]},
            {"from": "gpt", "value": _describe(objects)},
        ]})

    instruct = []
    for i in range(n_instruct):
        kind = i % 5
        if kind in (2, 4):  # text-only (ShareGPT-like): no image key at all
            a, b = rng.randint(2, 99), rng.randint(2, 99)
            turns = [("human", f"What is {a} plus {b}?"), ("gpt", f"{a} plus {b} is {a + b}.")]
            if kind == 4:
                turns += [("human", "And times two?"), ("gpt", f"That is {2 * (a + b)}."),
                          ("human", "Write it as a Python expression."), ("gpt", f"`({a} + {b}) * 2`")]
            instruct.append({"id": f"sharegpt-{i:06d}", "conversations": [{"from": f, "value": v} for f, v in turns]})
            continue
        img, objects = photo(rng, PHOTO_SIZES[i % len(PHOTO_SIZES)])
        rel = save(img, ins_dir, f"coco/train2017/{i:012d}.jpg")
        colour, shape = objects[0]
        if kind == 0:
            turns = [("human", "<image>\nWhat colour is the " + shape + "?\nAnswer the question using a single word "
                      "or phrase."), ("gpt", colour.capitalize())]
        elif kind == 1:
            turns = [("human", "How many shapes are in the picture?\n<image>"), ("gpt", f"There are {len(objects)}."),
                     ("human", f"What colour is the {shape}?"), ("gpt", f"The {shape} is {colour}."),
                     ("human", "Is the background plain?"), ("gpt", "No, it is a noisy gradient.")]
        else:
            turns = [("human", "<image>\nDescribe the following image in detail."),
                     ("gpt", _long_answer(rng, objects, sentences=12))]
        instruct.append({"id": f"{i:012d}", "image": rel,
                         "conversations": [{"from": f, "value": v} for f, v in turns]})

    (root / "pretrain" / "blip_laion_cc_sbu.json").write_text(json.dumps(pretrain, indent=1))
    (root / "instruct" / "llava_mix.json").write_text(json.dumps(instruct, indent=1))
    return {
        "pretrain_json": str(root / "pretrain" / "blip_laion_cc_sbu.json"), "pretrain_image_dir": str(pre_dir),
        "instruct_json": str(root / "instruct" / "llava_mix.json"), "instruct_image_dir": str(ins_dir),
    }
