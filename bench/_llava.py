"""Shared by the bench scripts: a LLaMA-shaped LLaVA of any size built from configs (random weights, no tokenizer,
no files), synthetic batches, memory probes and the environment record.

The model mirrors what `pipeline.model.compose_llava` builds: a CLIP vision tower, a 2-layer GELU projector, image
features from the vision tower's second-to-last layer with the CLS token dropped (`default`), a Llama decoder with
untied LM head.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
from dataclasses import asdict, dataclass, fields
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

import torch  # noqa: E402


@dataclass(frozen=True)
class Shape:
    layers: int = 8
    hidden: int = 512
    heads: int = 8
    kv_heads: int = 8
    intermediate: int = 1376  # LLaMA's ~8/3 * hidden, rounded to a multiple of 32
    vocab: int = 2048
    seq: int = 128  # total tokens per sample, image tokens included
    batch: int = 1
    image_size: int = 64
    patch: int = 8
    vision_hidden: int = 256
    vision_layers: int = 4
    vision_heads: int = 4
    vision_intermediate: int = 1024

    @property
    def image_tokens(self) -> int:
        return (self.image_size // self.patch) ** 2

    def validate(self) -> None:
        if self.hidden % self.heads or self.heads % self.kv_heads:
            raise SystemExit(f"hidden {self.hidden} / heads {self.heads} / kv_heads {self.kv_heads} do not divide")
        if self.vision_hidden % self.vision_heads:
            raise SystemExit(f"vision_hidden {self.vision_hidden} is not divisible by vision_heads {self.vision_heads}")
        if self.image_size % self.patch:
            raise SystemExit(f"image_size {self.image_size} is not a multiple of patch {self.patch}")
        if self.seq < self.image_tokens + 4:
            raise SystemExit(f"seq {self.seq} leaves no room for text after {self.image_tokens} image tokens")
        if self.vision_layers < 2:
            raise SystemExit("vision_layers must be >= 2 (features come from the second-to-last layer)")


# LLaMA-like shapes. `cpu` (training bench): decoder layers dominate the FLOPs as in real models (the LM head is ~4%
# of the forward, LLaVA-1.5-7B's ~2%; the vision tower ~2%); one full-parameter step ~0.5 s on one core.
# `cpu-infer` (inference bench): 16 wider layers, so that per-token decode time is dominated by the decoder layers
# (reading their weights) rather than by the fixed per-token cost of `generate` and the LM head, as in real models.
# `1b`: TinyLlama/LLaMA-3.2-1B-class decoder (16 x 2048, GQA 32/8,
# vocab 32000: ~1.1B parameters) behind a CLIP ViT-L/14-336 tower, LLaVA-1.5's 576 image tokens.
PRESETS: dict[str, Shape] = {
    "cpu": Shape(),
    "cpu-infer": Shape(layers=16, hidden=768, heads=12, kv_heads=12, intermediate=2048),
    "micro": Shape(layers=4, hidden=32, heads=2, kv_heads=2, intermediate=64, vocab=256, seq=32, batch=1,
                   image_size=16, patch=8, vision_hidden=32, vision_layers=2, vision_heads=2, vision_intermediate=64),
    "1b": Shape(layers=16, hidden=2048, heads=32, kv_heads=8, intermediate=8192, vocab=32000, seq=1024, batch=8,
                image_size=336, patch=14, vision_hidden=1024, vision_layers=24, vision_heads=16,
                vision_intermediate=4096),
}


def add_shape_args(parser: argparse.ArgumentParser, default_preset: str = "cpu") -> None:
    g = parser.add_argument_group("model shape (a preset, then any field overridden)")
    g.add_argument("--preset", choices=sorted(PRESETS), default=None,
                   help=f"base shape (default: {default_preset}; 1b on a GPU machine)")
    for f in fields(Shape):
        g.add_argument(f"--{f.name.replace('_', '-')}", type=int, default=None, dest=f"shape_{f.name}")
    parser.set_defaults(_default_preset=default_preset)


def shape_from_args(args: argparse.Namespace) -> Shape:
    preset = args.preset or args._default_preset
    base = asdict(PRESETS[preset])
    for name in base:
        value = getattr(args, f"shape_{name}")
        if value is not None:
            base[name] = value
    shape = Shape(**base)
    shape.validate()
    return shape


def shape_argv(shape: Shape) -> list[str]:
    """Command-line flags that rebuild `shape` (for worker subprocesses)."""
    out = []
    for name, value in asdict(shape).items():
        out += [f"--{name.replace('_', '-')}", str(value)]
    return out


def llava_config(shape: Shape):
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    vision = CLIPVisionConfig(
        hidden_size=shape.vision_hidden, intermediate_size=shape.vision_intermediate,
        num_hidden_layers=shape.vision_layers, num_attention_heads=shape.vision_heads, image_size=shape.image_size,
        patch_size=shape.patch,
    )
    text = LlamaConfig(
        vocab_size=shape.vocab, hidden_size=shape.hidden, intermediate_size=shape.intermediate,
        num_hidden_layers=shape.layers, num_attention_heads=shape.heads, num_key_value_heads=shape.kv_heads,
        max_position_embeddings=max(shape.seq + 512, 2048), tie_word_embeddings=False, bos_token_id=1, eos_token_id=2,
        pad_token_id=0,
    )
    return LlavaConfig(
        vision_config=vision, text_config=text, image_token_id=shape.vocab - 1, projector_hidden_act="gelu",
        vision_feature_layer=-2, vision_feature_select_strategy="default",
    )


def build_model(shape: Shape, *, device: str = "cpu", dtype: torch.dtype = torch.float32, seed: int = 0):
    """A seeded random LlavaForConditionalGeneration of the given shape on `device`."""
    from transformers import LlavaForConditionalGeneration

    torch.manual_seed(seed)
    with torch.device(device):
        model = LlavaForConditionalGeneration(llava_config(shape))
    model.to(dtype)
    model.generation_config.pad_token_id = 0
    model.generation_config.eos_token_id = None  # never stop early: every run decodes the same number of tokens
    return model


def batch(shape: Shape, *, device: str = "cpu", seq: int | None = None, batch_size: int | None = None,
          seed: int = 0, labels: bool = True) -> dict[str, torch.Tensor]:
    """<bos> <image>*n text...: random text tokens; loss on the text tokens (image tokens and bos are -100)."""
    seq = seq or shape.seq
    b = batch_size or shape.batch
    g = torch.Generator().manual_seed(seed)
    n_img = shape.image_tokens
    ids = torch.randint(3, shape.vocab - 1, (b, seq), generator=g)
    ids[:, 0] = 1
    ids[:, 1 : 1 + n_img] = shape.vocab - 1
    out = {
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "pixel_values": torch.randn(b, 3, shape.image_size, shape.image_size, generator=g),
    }
    if labels:
        lab = ids.clone()
        lab[:, : 1 + n_img] = -100
        out["labels"] = lab
    return {k: v.to(device) for k, v in out.items()}


# --------------------------------------------------------------------------------------------------------------
# Memory and environment
# --------------------------------------------------------------------------------------------------------------
def _status_kib(key: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def rss_bytes() -> int:
    kib = _status_kib("VmRSS")
    if kib is None:
        import resource

        return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024
    return kib * 1024


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark (VmHWM) to the current RSS (Linux >= 4.0). False if not possible."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def peak_rss_bytes() -> int:
    kib = _status_kib("VmHWM")
    if kib is None:
        import resource

        return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # Linux: KiB
    return kib * 1024


def set_threads(threads: int | None) -> int:
    n = threads or len(os.sched_getaffinity(0))
    torch.set_num_threads(n)
    return n


def environment(device: str) -> dict:
    import transformers

    env = {
        "device": device,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "loadavg_1m": os.getloadavg()[0],
    }
    if device == "cuda":
        env["gpu"] = torch.cuda.get_device_name()
    else:
        try:
            model = next(
                (line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                 if line.startswith("model name")), platform.processor())
        except OSError:
            model = platform.processor()
        env["cpu"] = model
    return env


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


class no_gc:
    """Python's cyclic garbage collector off while timing (as `timeit` does): a full collection over a heap of
    model objects costs ~0.2 s and would land in a random sample."""

    def __enter__(self):
        import gc

        gc.collect()
        self._was = gc.isenabled()
        gc.disable()

    def __exit__(self, *exc):
        import gc

        if self._was:
            gc.enable()


def median(values: list[float]) -> float:
    import statistics

    return float(statistics.median(values))


def md_table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def publish(result: dict, text: str, path) -> dict:
    """Print the markdown table and write the whole result (table included) as JSON, atomically."""
    from pipeline.storage import atomic_write_json

    result["markdown"] = text
    atomic_write_json(path, result)
    print(text)
    print(f"\nJSON: {path}")
    return result
