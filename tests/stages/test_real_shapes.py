"""Real-shape dry run: every stage of the paper's pipeline on LLaVA-1.5-7B's shapes, offline, on CPU.

The `hf` profile composes, from local directories (tests/helpers/real_shapes.py):

* vision: a random CLIPVisionModel shaped like openai/clip-vit-large-patch14-336 (336 px, patch 14: 576 image
  tokens, hidden 1024, 16 heads, MLP 4096) with that checkpoint's CLIP image processor (PIL class); **cut from 24 to
  2 layers**.
* language model: a random LlamaForCausalLM with Llama-2-7B's config (vocab 32,000, 4096 positions, RMSNorm eps
  1e-5, RoPE theta 1e4, untied head) and a Llama-2-shaped tokenizer (32,000 tokens, <unk>/<s>/</s> = 0/1/2, byte
  fallback, "▁" prefix; BPE trained on CPython's own text) with Vicuna v1's chat template. Cut: **4 layers instead
  of 32** (prune needs room: `uniform25` protects 1 of 4, and prune must leave an unprotected layer, so with 2 layers
  `prune.num_layers: 1` is refused for it), and **width 512 instead of 4096: 4 heads of 128 (head_dim kept), MLP
  1376 = 11008 / 8**. Measured on the 2-core CPU machine (shared, so noisy): one forward + backward of one
  653-token sample (576 image tokens) took 35 s at width 4096 with 2 layers (composing alone 50 s, each checkpoint
  2.7 GB), 9 s at 1024 with 4 layers, 5 s at 512 with 4 layers; the whole run took 385 s at 1024 (tune@all 97 s)
  and 200 s at 512. Vocabulary, image-token count, pixel size, max_length (2048) and processors stay real.

Data: LLaVA-format JSON written by the test (captions as LLaVA-Pretrain's, instructions as LLaVA-665K's: JPEG photos
at 640x480 / 500x375 / portrait, multi-turn conversations with <image> in the first human turn only, before or after
the text, text-only records without an image). Params follow params/llava-1.5-7b.yaml (LoRA r 128 / alpha 256 on
`all` and `uniform25`, max_length 2048, gradient checkpointing) with tiny budgets: projector 2 steps of 2 samples,
each tune 1 step of 4 (4 of the 24 records: most such batches mix image and text-only records; all 24 are encoded).

Every stage runs as `python -m stages.<stage>` in a temporary workspace (VR_PARAMS, VR_PREFECT=0, MLflow on a
sqlite file there). A failing stage does not stop the others that do not need its outputs;
test_every_stage_exits_zero reports every failure with the first lines of its error.
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from pathlib import Path

import pytest
import yaml

from fault_workspace import REPO, Workspace
import real_shapes

pytestmark = pytest.mark.slow

LM_SHAPE = dict(layers=4, hidden=512, intermediate=1376, heads=4)
RUNS = ("all", "uniform25")
N_PRETRAIN, N_INSTRUCT = 16, 24
# stage -> the outputs of earlier stages it reads (a stage whose inputs are missing is not run)
STAGES = [("prepare", (), ()), ("build_base", (), ("data/prepared",)),
          ("pretrain_projector", (), ("models/base",))]
for _run in RUNS:
    STAGES.append(("tune", ("--run", _run), ("models/projector",)))
for _run in RUNS:
    STAGES.append(("prune", ("--run", _run), (f"models/tuned/{_run}",)))
for _run in RUNS:
    STAGES.append(("evaluate", ("--run", _run), (f"models/tuned/{_run}", f"models/pruned/{_run}")))


def params(vision: Path, lm: Path, data: dict) -> dict:
    # Lazy samples in a DataLoader worker: the path real datasets take (pipeline/data/encoding.py).
    train = dict(max_length=2048, bf16=False, save_steps=500, logging_steps=1, preprocess="lazy",
                 dataloader_num_workers=1)
    return {
        "seed": 0,
        "model": {"profile": "hf", "vision": str(vision), "language_model": str(lm), "dtype": "float32",
                  "trust_remote_code": False},
        "data": {"seed": 0, "image_size": 336, "num_captions": 0, "num_instruct": 0, "num_vqa_test": 4,
                 "llava_on_error": "raise", **data},
        "vision_pretrain": {"train": {"max_steps": 0}},
        "lm_pretrain": {"lr": 0.003, "seq_len": 128, "train": {"max_steps": 0}},
        "pretrain_projector": {"lr": 0.001,
                               "train": {**train, "max_steps": 2, "batch_size": 2, "global_batch_size": 2}},
        "tune": {
            "projector_lr": 2e-5, "lm_lr": 2e-4, "embeddings": False, "lm_head": False,
            "lora": {"r": 128, "alpha": 256, "dropout": 0.05},
            "train": {**train, "max_steps": 1, "batch_size": 4, "global_batch_size": 4, "gradient_checkpointing": True},
            "runs": {"all": {"strategy": "all", "language_model": "lora"},
                     "uniform25": {"strategy": "uniform", "budget": 0.25, "language_model": "lora"}},
            "importance_runs": {},
        },
        "prune": {"num_layers": 1, "metric": "angular", "calibration_samples": 4, "batch_size": 2,
                  "curve": {"runs": list(RUNS), "max_layers": 1}},
        "evaluate": {"max_new_tokens": 4, "batch_size": 2, "vqa_samples": 2, "digits_samples": 2,
                     "text_qa_samples": 2, "text_ppl_chunks": 2},
        "mlflow": {"experiment": "visual-region-real-shapes"},
        "registry": {"enabled": False, "model_name": "visual-region-real-shapes", "kinds": ["pruned"]},
    }


class StageWorkspace(Workspace):
    """fault_workspace's Workspace, running stage modules directly: VR_PARAMS names the params file, no Prefect."""

    def __init__(self, path: Path, logs: Path, params_file: Path):
        super().__init__(path, logs)
        self.params_file = params_file

    @property
    def env(self) -> dict[str, str]:
        return {**super().env, "VR_PARAMS": str(self.params_file), "VR_PREFECT": "0"}


def first_error_lines(stderr: str, n: int = 6) -> str:
    """The error of a failed stage: the logged `ERROR` line (known errors), else the traceback's last lines."""
    lines = [l for l in stderr.splitlines() if l.strip()]
    errors = [l for l in lines if " ERROR " in l]
    if errors:
        return "\n".join(errors[:n])
    if "Traceback (most recent call last):" in stderr:
        tb = stderr[stderr.rindex("Traceback (most recent call last):"):].splitlines()
        return "\n".join(tb[-n:])
    return "\n".join(lines[-n:])


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("real_shapes")
    started = time.perf_counter()
    tokenizer = real_shapes.build_tokenizer()
    vision = real_shapes.build_vision(root / "parts" / "clip-vit-large-patch14-336-2l", layers=2)
    lm = real_shapes.build_language_model(root / "parts" / "llama-2-7b-shaped", tokenizer, **LM_SHAPE)
    data = real_shapes.write_llava_data(root / "llava", n_pretrain=N_PRETRAIN, n_instruct=N_INSTRUCT)
    built = time.perf_counter() - started

    ws_dir = root / "ws"
    ws_dir.mkdir()
    for name in ("pipeline", "stages"):
        shutil.copytree(REPO / name, ws_dir / name, ignore=shutil.ignore_patterns("__pycache__"))
    params_file = root / "params.yaml"
    params_file.write_text(yaml.safe_dump(params(vision, lm, data), sort_keys=False))
    ws = StageWorkspace(ws_dir, root / "logs", params_file)

    results = []  # (command, returncode | None when skipped, error lines, seconds)
    for stage, args, needs in STAGES:
        command = " ".join([f"stages.{stage}", *args])
        missing = [n for n in needs if not (ws_dir / n).exists()]
        if missing:
            results.append((command, None, f"not run: {missing} missing", 0.0))
            continue
        t0 = time.perf_counter()
        proc = ws.run([sys.executable, "-m", f"stages.{stage}", *args], check=False, timeout=900)
        results.append((command, proc.returncode, first_error_lines(proc.stderr) if proc.returncode else "",
                        time.perf_counter() - t0))
    summary = "\n".join(f"{c:28s} rc={rc!s:4s} {s:6.1f}s" for c, rc, _, s in results)
    print(f"\nreal-shape dry run: parts built in {built:.1f}s, total {time.perf_counter() - started:.1f}s\n{summary}")
    yield ws, tokenizer, results
    for weights in root.rglob("*.safetensors"):  # ~0.3 GB per checkpoint; logs, configs and metrics stay
        weights.unlink()


def strict_json(path: Path):
    def refuse(constant):
        raise ValueError(f"{path}: non-standard JSON constant {constant}")

    return json.loads(path.read_text(), parse_constant=refuse)


# ---------------------------------------------------------------------------------------------------- the parts
def test_parts_have_the_real_shapes(dry_run):
    _, tokenizer, _ = dry_run
    assert len(tokenizer) == 32000
    assert (tokenizer.unk_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id) == (0, 1, 2)
    assert tokenizer.convert_ids_to_tokens([3, 13, 258]) == ["<0x00>", "<0x0A>", "<0xFF>"]
    ids = tokenizer("Hello world\n日本")["input_ids"]
    assert ids[0] == 1 and 13 in ids  # BOS; the newline by byte fallback, as in Llama-2
    assert tokenizer.convert_ids_to_tokens(ids[1]).startswith("▁")
    assert tokenizer.decode(ids, skip_special_tokens=True) == "Hello world\n日本"


# ---------------------------------------------------------------------------------------------------- the stages
def test_every_stage_exits_zero(dry_run):
    _, _, results = dry_run
    failed = [(c, rc, err) for c, rc, err, _ in results if rc != 0]
    assert not failed, "stages that failed or could not run:\n" + "\n".join(
        f"- {c} (rc={rc}):\n    " + err.replace("\n", "\n    ") for c, rc, err in failed)


def _need(ws: Workspace, *rels: str) -> None:
    missing = [r for r in rels if not (ws.path / r).exists()]
    if missing:
        pytest.skip(f"{missing} not produced (see test_every_stage_exits_zero)")


def test_prepared_data_keeps_every_record(dry_run):
    ws, _, _ = dry_run
    _need(ws, "metrics/data.json")
    counts = strict_json(ws.path / "metrics/data.json")
    assert counts["visual/caption_train"] == N_PRETRAIN and counts["visual/instruct_train"] == N_INSTRUCT


def test_composed_model_has_the_real_vocabulary_and_image_tokens(dry_run):
    ws, _, _ = dry_run
    _need(ws, "models/base/config.json")
    cfg = strict_json(ws.path / "models/base/config.json")
    text, vision = cfg["text_config"], cfg["vision_config"]
    image_token = cfg.get("image_token_id", cfg.get("image_token_index"))
    assert text["vocab_size"] == 32001 and image_token == 32000 and cfg["image_seq_length"] == 576  # 32,000 + <image>
    assert (text["hidden_size"], text["num_hidden_layers"], text["max_position_embeddings"]) == (512, 4, 4096)
    assert (vision["image_size"], vision["patch_size"], vision["hidden_size"]) == (336, 14, 1024)
    assert cfg["vision_feature_layer"] == -2 and cfg["vision_feature_select_strategy"] == "default"


@pytest.mark.parametrize("run", RUNS)
def test_tuned_and_pruned_models_keep_the_shapes(dry_run, run):
    ws, _, _ = dry_run
    _need(ws, f"models/tuned/{run}/config.json", f"models/pruned/{run}/config.json")
    tuned = strict_json(ws.path / f"models/tuned/{run}/config.json")
    pruned = strict_json(ws.path / f"models/pruned/{run}/config.json")
    assert tuned["text_config"]["vocab_size"] == pruned["text_config"]["vocab_size"] == 32001
    assert tuned["text_config"]["num_hidden_layers"] == 4 and pruned["text_config"]["num_hidden_layers"] == 3
    assert not any("lora" in k for k in _weight_names(ws.path / f"models/tuned/{run}"))  # merged before export
    selection = strict_json(ws.path / f"models/tuned/{run}/selection.json")
    assert selection["layers"] == ([0, 1, 2, 3] if run == "all" else [3])


def _weight_names(model_dir: Path) -> list[str]:
    from safetensors import safe_open

    names = []
    for f in sorted(model_dir.glob("*.safetensors")):
        with safe_open(str(f), "pt") as st:
            names += list(st.keys())
    return names


def test_processor_gives_576_image_tokens_at_336_px_in_vicuna_format(dry_run):
    from PIL import Image
    from transformers import AutoProcessor

    ws, _, _ = dry_run
    _need(ws, "models/tuned/all/config.json")
    processor = AutoProcessor.from_pretrained(ws.path / "models/tuned/all")
    tokenizer = processor.tokenizer
    assert len(tokenizer) == 32001 and tokenizer.convert_tokens_to_ids("<image>") == 32000
    images = [Image.new("RGB", size, (120, 60, 30)) for size in ((640, 480), (375, 500))]
    out = processor(images=images, text=["USER: <image>\nWhat is it? ASSISTANT:"] * 2, padding=True,
                    return_tensors="pt")
    assert tuple(out["pixel_values"].shape) == (2, 3, 336, 336)
    assert ((out["input_ids"] == 32000).sum(dim=1) == 576).all()
    messages = [{"role": "user", "content": "<image>\nWhat is it?"}, {"role": "assistant", "content": "A cat."},
                {"role": "user", "content": "What colour?"}, {"role": "assistant", "content": "Black."}]
    rendered = tokenizer.apply_chat_template(messages, tokenize=False)
    assert rendered == (f"<s>{real_shapes.VICUNA_SYSTEM} USER: <image>\nWhat is it? ASSISTANT: A cat.</s>"
                        "USER: What colour? ASSISTANT: Black.</s>")


def test_metrics_are_strict_json(dry_run):
    ws, _, _ = dry_run
    expected = ["metrics/data.json", "metrics/base.json", "metrics/projector.json"]
    for run in RUNS:
        expected += [f"metrics/tune/{run}.json", f"metrics/prune/{run}.json", f"plots/importance/{run}.json",
                     f"metrics/eval/{run}.json"]
    missing = [e for e in expected if not (ws.path / e).exists()]
    for rel in expected:
        if rel not in missing:
            strict_json(ws.path / rel)  # raises on NaN / Infinity
    assert not missing, f"metrics files not written: {missing}"
    for run in RUNS:
        if f"metrics/eval/{run}.json" in missing:
            continue
        ev = strict_json(ws.path / f"metrics/eval/{run}.json")
        assert ev["tuned"]["num_decoder_layers"] == 4 and ev["pruned"]["num_decoder_layers"] == 3
        tune = strict_json(ws.path / f"metrics/tune/{run}.json")
        assert tune["steps"] == 1 and tune["truncated_samples"] is None  # lazy samples: each is cut as it is read
