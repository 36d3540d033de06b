"""Bad inputs through the real stage entry points: `python -m stages.<stage>` with VR_PARAMS pointing at a params
file that carries the fault. Each must exit with code 2 and log one error naming the input (file, record, field or
params key; a params error is a header naming the file and one line per bad key), never a traceback, and leave no
output behind (nor a temporary one). That exit is for the project's own errors (pipeline.errors.ProjectError) only:
anything else is a bug, and exits 1 with its traceback (the last tests).

The library-level checks of the same faults are in test_data.py (importer), test_config.py (params schema),
test_selection.py, test_pruning.py and test_model.py; these tests add the stage contract on top. Not repeated here:
budget 1.5 through `stages.tune` (test_pipeline_e2e.py::test_bad_params_fail_cleanly_naming_the_key) and a protected
layer named for pruning, which no params key can express (the prune stage picks the layers itself, outside the
region); `pruning.remove_layers` refuses it (test_pruning.py::test_remove_layers_refusals).

Longer than 400 lines on purpose: one table of faults per stage, kept together so that a new fault finds its class.
"""

from __future__ import annotations

import copy
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

REPO = Path(__file__).resolve().parents[2]

BASE = {
    "seed": 0,
    "model": {"profile": "micro", "spec": {"lm_layers": 4}},
    "data": {"image_size": 32, "num_captions": 4, "num_instruct": 5, "num_vqa_test": 5, "text_qa_repeats": 1,
             "digits_test_fraction": 0.95},
    "pretrain_projector": {"train": {"max_steps": 1, "batch_size": 2, "max_length": 48, "save_steps": 1}},
    "tune": {
        "runs": {"all": {"strategy": "all"}, "x": {"strategy": "uniform", "budget": 0.5}},
        "train": {"max_steps": 1, "batch_size": 2, "max_length": 48, "save_steps": 1},
    },
    "prune": {"num_layers": 1, "calibration_samples": 2, "batch_size": 2, "curve": {"runs": ["all"], "max_layers": 1}},
    "evaluate": {"max_new_tokens": 2, "batch_size": 4, "vqa_samples": 2, "digits_samples": 2, "text_qa_samples": 2,
                 "text_ppl_chunks": 2},
    "mlflow": {"experiment": "bad-inputs"},
}


def params(**changes) -> dict:
    """BASE with dotted-key changes, e.g. params(**{"tune.runs.x.budget": 0.0})."""
    raw = copy.deepcopy(BASE)
    for dotted, value in changes.items():
        node, *path, last = [raw, *dotted.split(".")]
        for key in path:
            node = node.setdefault(key, {})
        node[last] = value
    return raw


def stage(ws: Path, module: str, raw: dict, *args: str) -> subprocess.CompletedProcess:
    bad = ws / "bad-params.yaml"
    bad.write_text(yaml.safe_dump(raw, sort_keys=False))
    env = {**os.environ, "PYTHONPATH": str(REPO), "VR_PARAMS": str(bad), "HF_HUB_OFFLINE": "1", "DO_NOT_TRACK": "1",
           "MLFLOW_DISABLE_TELEMETRY": "true", "MLFLOW_TRACKING_URI": f"sqlite:///{ws / 'mlflow.db'}",
           "HF_HUB_DISABLE_PROGRESS_BARS": "1", "TOKENIZERS_PARALLELISM": "false"}
    for key in ("PREFECT_API_URL", "VR_PREFECT", "VR_PIPELINE_RUN_ID"):
        env.pop(key, None)
    return subprocess.run([sys.executable, "-m", f"stages.{module}", *args], cwd=ws, env=env, capture_output=True,
                          text=True, timeout=600)


def error_message(proc) -> list[str]:
    """The logged error: its first line (`... ERROR stages: <Type>: <message>`) and any continuation lines."""
    lines = proc.stderr.splitlines()
    starts = [i for i, line in enumerate(lines) if " ERROR stages: " in line]
    assert len(starts) == 1, f"expected one error record:\n{proc.stderr[-3000:]}"
    return lines[starts[0]:]


def assert_refused(proc, ws: Path, *needles: str, outputs: tuple[str, ...] = (), params_error: bool = False) -> str:
    assert proc.returncode == 2, f"exit code {proc.returncode}:\n{proc.stderr[-4000:]}"
    assert "Traceback" not in proc.stderr, proc.stderr[-4000:]
    msg = error_message(proc)
    if params_error:  # the header names the file, each bad key gets an indented line
        assert msg[0].endswith(f"ParamsError: invalid params in {ws / 'bad-params.yaml'}:")
        assert all(line.startswith("  ") for line in msg[1:]) and len(msg) >= 2, msg
    else:
        assert len(msg) == 1, "a one-line message, got:\n" + "\n".join(msg)
    text = "\n".join(msg)
    print(text)  # shown by `pytest -rP`: the messages quoted in docs/reliability.md
    for needle in needles:
        assert needle in text, f"{needle!r} not in the error:\n{text}"
    for out in outputs:
        path = ws / out
        assert not path.exists(), f"{out} was written although the stage failed"
        if path.parent.exists():
            assert not [p.name for p in path.parent.iterdir() if p.name.startswith(f".{path.name}.")], \
                f"temporary files of {out} left behind"
    return text


# --------------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Path:
    """A small data/prepared (synthetic scenes, digits, text) for the stages that read it."""
    from pipeline import data

    out = tmp_path_factory.mktemp("prepared") / "prepared"
    data.prepare_all(data.DataConfig(**BASE["data"]), out)
    return out


def link(ws: Path, rel: str, target: Path) -> None:
    (ws / rel).parent.mkdir(parents=True, exist_ok=True)
    (ws / rel).symlink_to(target, target_is_directory=True)


def png(img: Image.Image, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def record(rid: str, image: str | None = "img.png", question: str = "<image>\nWhat colour?", answer: str = "red"):
    rec = {"id": rid, "conversations": [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]}
    if image is not None:
        rec["image"] = image
    return rec


# ------------------------------------------------------------------------------------------- data: stage prepare
PREPARE_OUTPUTS = ("data/prepared", "metrics/data.json")

MODE_IMAGES = {  # mode -> (file name, bytes)
    "CMYK": ("cmyk.tiff", lambda: png(Image.new("CMYK", (8, 8), (0, 255, 255, 0)), "TIFF")),
    "I;16": ("sixteen.png", lambda: png(Image.fromarray(np.full((8, 8), 40000, dtype=np.uint16)))),
    "L": ("gray.png", lambda: png(Image.new("L", (8, 8), 100))),
}


def llava_case(ws: Path, case: str) -> tuple[Path, tuple[str, ...]]:
    """A LLaVA-format file with one good record then the bad one; returns (file, what the error must name)."""
    images = ws / "images"
    images.mkdir()
    (images / "good.png").write_bytes(png(Image.new("RGB", (8, 8), (255, 0, 0))))
    bad = record("bad-1")
    needles = ("field 'image'",)
    suffix = ".json"
    if case == "corrupt_image":
        (images / "img.png").write_bytes(b"\x89PNG\r\n\x1a\nthis is not an image")
    elif case == "missing_image":
        bad["image"] = "nope.png"
        needles = ("field 'image'", "nope.png")
    elif case == "zero_size_image":
        (images / "img.png").write_bytes(b"")
    elif case.startswith("refuse-"):
        name, make = MODE_IMAGES[case.removeprefix("refuse-")]
        (images / name).write_bytes(make())
        bad["image"] = name
        needles = ("field 'image'", repr(case.removeprefix("refuse-")), "image_mode")
    else:
        (images / "img.png").write_bytes(png(Image.new("RGB", (8, 8))))
        if case == "no_human_turn":
            bad["conversations"] = [{"from": "gpt", "value": "<image>\nred"}]
            needles = ("field 'conversations'", "no 'human' turn")
        elif case == "no_gpt_turn":
            bad["conversations"] = bad["conversations"][:1]
            needles = ("field 'conversations'", "no 'gpt' turn")
        elif case == "image_token_count":
            bad["conversations"][0]["value"] = "<image>\n<image>\nWhat colour?"
            needles = ("field 'conversations'", "found 2 '<image>' tokens but the record has 1 image(s)")
        elif case == "empty_answer":
            bad["conversations"][1]["value"] = "   "
            needles = ("field 'conversations[1].value'", "empty gpt answer")
        elif case == "malformed_json_line":
            suffix = ".jsonl"
            needles = ("line 2", "malformed JSON")
        else:
            raise AssertionError(case)
    path = ws / f"llava{suffix}"
    if suffix == ".jsonl":
        path.write_text(json.dumps(record("good-0", "good.png")) + '\n{"id": "bad-1", "conversations": [\n')
    else:
        path.write_text(json.dumps([record("good-0", "good.png"), bad]))
    reason = case.split("-")[0] if case.startswith("refuse") else case
    tag = {"refuse": "[image_mode]", "no_human_turn": "[missing_turn]", "no_gpt_turn": "[missing_turn]",
           "image_token_count": "[image_token_mismatch]", "malformed_json_line": "[malformed_json]"}.get(reason, f"[{reason}]")
    ident = () if case == "malformed_json_line" else ("record 1", "id='bad-1'")
    return path, (str(path), *ident, tag, *needles)


@pytest.mark.parametrize("case", [
    "corrupt_image", "missing_image", "zero_size_image", "refuse-CMYK", "refuse-I;16", "refuse-L",
    "malformed_json_line", "no_human_turn", "no_gpt_turn", "image_token_count", "empty_answer",
])
def test_prepare_refuses_a_bad_llava_record(tmp_path, case):
    path, needles = llava_case(tmp_path, case)
    raw = params(**{"data.llava_json": str(path), "data.llava_image_dir": str(tmp_path / "images"),
                    "data.llava_image_mode": "refuse" if case.startswith("refuse-") else "convert"})
    assert_refused(stage(tmp_path, "prepare", raw), tmp_path, "DataError", *needles, outputs=PREPARE_OUTPUTS)


def test_prepare_converts_cmyk_16bit_and_grayscale_when_params_say_convert(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    records = []
    for mode, (name, make) in MODE_IMAGES.items():
        (images / name).write_bytes(make())
        records.append(record(f"m-{mode}", name))
    (tmp_path / "llava.json").write_text(json.dumps(records))
    raw = params(**{"data.llava_json": str(tmp_path / "llava.json"), "data.llava_image_dir": str(images),
                    "data.llava_image_mode": "convert"})
    proc = stage(tmp_path, "prepare", raw)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "converted to RGB {'CMYK': 1, 'I;16': 1, 'L': 1}" in proc.stderr
    import datasets

    imported = datasets.load_from_disk(str(tmp_path / "data/prepared/visual"))["imported"]
    from pipeline.data import to_rgb

    assert sorted(im.mode for im in imported["image"]) == ["CMYK", "I;16", "L"]  # stored as they were
    assert [to_rgb(im).mode for im in imported["image"]] == ["RGB"] * 3  # converted when read
    assert json.loads((tmp_path / "metrics/data.json").read_text())["visual/imported"] == 3


# ----------------------------------------------------------------------------------- over-long samples (training)
def test_sample_over_max_length_refused_when_on_overflow_is_refuse(tmp_path, prepared, micro4_dir):
    link(tmp_path, "data/prepared", prepared)
    link(tmp_path, "models/base", micro4_dir)
    raw = params(**{"pretrain_projector.train.max_length": 25, "pretrain_projector.train.on_overflow": "refuse"})
    assert_refused(stage(tmp_path, "pretrain_projector", raw), tmp_path,
                   "DataError: data/prepared/visual, split 'caption_train': record 0, id='caption-000000': ",
                   " tokens exceed max_length 25 (on_overflow: refuse)",
                   "raise pretrain_projector.train.max_length, or set pretrain_projector.train.on_overflow: truncate",
                   outputs=("models/projector", "metrics/projector.json", "checkpoints/pretrain_projector"))


def test_sample_over_max_length_refused_by_tune_names_the_tune_key(tmp_path, prepared, micro4_dir):
    link(tmp_path, "data/prepared", prepared)
    link(tmp_path, "models/projector", micro4_dir)
    raw = params(**{"tune.train.max_length": 25, "tune.train.on_overflow": "refuse"})
    assert_refused(stage(tmp_path, "tune", raw, "--run", "x"), tmp_path,
                   "DataError: data/prepared/visual, split 'instruct_train': record 0, id=",
                   "raise tune.train.max_length, or set tune.train.on_overflow: truncate",
                   outputs=("models/tuned/x", "metrics/tune/x.json", "checkpoints/tune/x"))


def test_sample_over_max_length_truncated_and_counted_by_default(tmp_path, prepared, micro4_dir):
    link(tmp_path, "data/prepared", prepared)
    link(tmp_path, "models/projector", micro4_dir)
    proc = stage(tmp_path, "tune", params(**{"tune.train.max_length": 36}), "--run", "x")
    assert proc.returncode == 0, proc.stderr[-4000:]
    n = json.loads((tmp_path / "metrics/tune/x.json").read_text())["truncated_samples"]
    total = len(__import__("datasets").load_from_disk(str(prepared / "visual"))["instruct_train"])
    assert 0 < n <= total  # cut, but every sample keeps answer tokens (at 28 none would: refused, above)
    assert (f"{n} of {total} samples of data/prepared/visual, split 'instruct_train' were longer than "
            "tune.train.max_length 36 and were truncated") in proc.stderr


# ------------------------------------------------------------------------- runs that would learn nothing (issue 18)
NO_TUNE_OUTPUTS = ("models/tuned/x", "metrics/tune/x.json", "plots/loss/x.csv", "checkpoints/tune/x", "mlflow.db")


@pytest.mark.parametrize("preprocess", ["eager", "lazy"])
def test_max_length_that_cuts_every_answer_is_refused_before_mlflow(tmp_path, prepared, micro4_dir, preprocess):
    """max_length 28 leaves 16 image tokens + the prompt: no answer token survives, the loss would be 0 or NaN."""
    link(tmp_path, "data/prepared", prepared)
    link(tmp_path, "models/projector", micro4_dir)
    raw = params(**{"tune.train.max_length": 28, "tune.train.preprocess": preprocess})
    total = len(__import__("datasets").load_from_disk(str(prepared / "visual"))["instruct_train"])
    scope = f"all {total} records" if preprocess == "eager" else f"{total} records sampled evenly from {total}"
    assert_refused(stage(tmp_path, "tune", raw, "--run", "x"), tmp_path,
                   "ParamsError: tune.train.max_length 28 leaves no answer token to learn from in data/prepared/visual, "
                   f"split 'instruct_train' ({scope}): every answer is cut off", outputs=NO_TUNE_OUTPUTS)


@pytest.mark.parametrize("module, key, outputs", [
    ("tune", "tune.train", NO_TUNE_OUTPUTS),
    ("pretrain_projector", "pretrain_projector.train",
     ("models/projector", "metrics/projector.json", "plots/loss/projector.csv", "checkpoints/pretrain_projector")),
])
def test_zero_steps_are_refused(tmp_path, prepared, micro4_dir, module, key, outputs):
    link(tmp_path, "data/prepared", prepared)
    link(tmp_path, "models/projector" if module == "tune" else "models/base", micro4_dir)
    raw = params(**{f"{key}.max_steps": 0})
    assert_refused(stage(tmp_path, module, raw, *(["--run", "x"] if module == "tune" else [])), tmp_path,
                   f"ParamsError: {key}.max_steps is 0: nothing would be trained", outputs=outputs)


@pytest.fixture(scope="module")
def text_only_prepared(tmp_path_factory, prepared) -> Path:
    """`prepared` with every record of every visual split stripped of its image (a "visual" tune on text only)."""
    import datasets

    out = tmp_path_factory.mktemp("text-only") / "prepared"
    shutil.copytree(prepared, out)
    visual = datasets.load_from_disk(str(prepared / "visual"))
    stripped = datasets.DatasetDict({split: ds.map(lambda r: {"image": None}, features=ds.features)
                                     for split, ds in visual.items()})
    shutil.rmtree(out / "visual")
    stripped.save_to_disk(str(out / "visual"))
    return out


@pytest.mark.parametrize("module", ["tune", "pretrain_projector"])
def test_visual_stage_over_data_without_images_is_refused(tmp_path, text_only_prepared, micro4_dir, module):
    link(tmp_path, "data/prepared", text_only_prepared)
    link(tmp_path, "models/projector" if module == "tune" else "models/base", micro4_dir)
    split, key = ("instruct_train", "tune.train") if module == "tune" else ("caption_train", "pretrain_projector.train")
    proc = stage(tmp_path, module, params(), *(["--run", "x"] if module == "tune" else []))
    assert_refused(proc, tmp_path, f"DataError: data/prepared/visual, split '{split}': no record has an image "
                   f"(field 'image', all ", f"a visual stage ({key}) would train on text only",
                   outputs=NO_TUNE_OUTPUTS if module == "tune" else ("models/projector", "metrics/projector.json"))


@pytest.mark.parametrize("change", [
    {"tune.lm_lr": 1e30, "tune.projector_lr": 1e30},  # the weights blow up within a few steps
    {"tune.train.max_length": 30},  # 2 answer tokens left in 95 samples: a batch without any has a NaN loss
], ids=["lr-1e30", "max_length-30"])
def test_a_non_finite_loss_stops_training_naming_the_step(tmp_path, prepared, micro4_dir, change):
    link(tmp_path, "data/prepared", prepared)
    link(tmp_path, "models/projector", micro4_dir)
    raw = params(**change, **{"tune.train.max_steps": 6, "tune.train.logging_steps": 1, "tune.train.save_steps": 100})
    assert_refused(stage(tmp_path, "tune", raw, "--run", "x"), tmp_path, "NonFiniteLossError: the training loss is ",
                   "training diverged", "nothing was written", outputs=("models/tuned/x", "metrics/tune/x.json"))


# --------------------------------------------------------------------------------------- params: stage tune
@pytest.mark.parametrize("change, needles", [
    ({"tune.runs.x.strategy": "zigzag"}, ("tune.runs.x.strategy", "unknown strategy 'zigzag'")),
    ({"tune.runs.x.budget": 0.0}, ("tune.runs.x.budget", "budget ratio must be in (0, 1], got 0.0")),
    ({"tune.runs.x.strategy": [1, 1]}, ("tune.runs.x.strategy", "duplicate layer indices [1]")),
    ({"tune.train.max_stepz": 5}, ("tune.train.max_stepz", "unknown key")),
    ({"tune.train.max_steps": "many"}, ("tune.train.max_steps", "valid integer")),
], ids=["unknown-strategy", "ratio-0", "duplicate-layers", "unknown-key", "wrong-type"])
def test_bad_params_stop_the_stage_naming_the_key(tmp_path, change, needles):
    proc = stage(tmp_path, "tune", params(**change), "--run", "x")
    assert_refused(proc, tmp_path, *needles, outputs=("models/tuned/x", "metrics/tune/x.json", "mlflow.db"),
                   params_error=True)


def test_out_of_range_layer_index_is_refused_once_the_depth_is_known(tmp_path, prepared, micro4_dir):
    link(tmp_path, "data/prepared", prepared)
    link(tmp_path, "models/projector", micro4_dir)
    proc = stage(tmp_path, "tune", params(**{"tune.runs.x.strategy": [0, 7]}), "--run", "x")
    assert_refused(proc, tmp_path, "ParamsError: tune.runs.x:", "layer index 7 is out of range for 4 layers",
                   outputs=("models/tuned/x", "metrics/tune/x.json", "checkpoints/tune/x", "mlflow.db"))


# ------------------------------------------------------------------------------------------ params: stage prune
def test_prune_count_not_below_the_unprotected_layers_is_refused(tmp_path, prepared, micro4_dir):
    link(tmp_path, "data/prepared", prepared)
    link(tmp_path, "models/projector", micro4_dir)
    tuned = tmp_path / "models/tuned/x"
    shutil.copytree(micro4_dir, tuned)
    (tuned / "selection.json").write_text(json.dumps({"run": "x", "layers": [1, 3]}))  # 2 of 4 layers protected
    proc = stage(tmp_path, "prune", params(**{"prune.num_layers": 2}), "--run", "x")
    assert_refused(proc, tmp_path, "prune.num_layers=2 for run 'x'", "only 2 of 4 layers are unprotected",
                   outputs=("models/pruned/x", "metrics/prune/x.json", "plots/importance/x.json",
                            "plots/importance/x.csv"))


# ------------------------------------------------------------------------------------------------------ models
def test_model_directory_without_weights(tmp_path, prepared, micro4_dir):
    link(tmp_path, "data/prepared", prepared)
    base = tmp_path / "models/base"
    base.mkdir(parents=True)
    for f in micro4_dir.iterdir():  # config, processor, tokenizer: everything but the weights
        if f.suffix != ".safetensors":
            shutil.copy(f, base / f.name)
    proc = stage(tmp_path, "pretrain_projector", params())
    assert_refused(proc, tmp_path, "MissingInputError", "model directory models/base has no weights",
                   outputs=("models/projector", "metrics/projector.json", "checkpoints/pretrain_projector"))


@pytest.fixture(scope="module")
def foreign_models(tmp_path_factory, micro4_dir) -> dict[str, Path]:
    """A BLIP-2 checkpoint (OPT decoder at language_model.model.decoder.layers) and a GPT-2 causal LM (.transformer.h),
    tiny and built offline: model classes whose decoder layer list this project cannot find."""
    from transformers import (AutoTokenizer, Blip2Config, Blip2ForConditionalGeneration, GPT2Config, GPT2LMHeadModel,
                              OPTConfig)

    root = tmp_path_factory.mktemp("foreign")
    blip = Blip2ForConditionalGeneration(Blip2Config(
        vision_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
                       "image_size": 32, "patch_size": 8},
        qformer_config={"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 64,
                        "encoder_hidden_size": 32},
        text_config=OPTConfig(hidden_size=32, num_hidden_layers=2, ffn_dim=64, num_attention_heads=2, vocab_size=512,
                              word_embed_proj_dim=32).to_dict(),
        num_query_tokens=4,
    ))
    blip.save_pretrained(root / "blip2")
    tokenizer = AutoTokenizer.from_pretrained(micro4_dir)
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), n_embd=32, n_layer=2, n_head=2, n_positions=128,
                                      bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id))
    gpt2.save_pretrained(root / "gpt2")
    tokenizer.save_pretrained(root / "gpt2")
    # a CLIP vision encoder with its image processor, to compose with
    from transformers import AutoImageProcessor, LlavaForConditionalGeneration

    llava = LlavaForConditionalGeneration.from_pretrained(micro4_dir)
    llava.model.vision_tower.save_pretrained(root / "vision")
    AutoImageProcessor.from_pretrained(micro4_dir).save_pretrained(root / "vision")
    return {"blip2": root / "blip2", "gpt2": root / "gpt2", "vision": root / "vision"}


def test_llava_checkpoint_of_a_class_without_a_decoder_layer_list(tmp_path, foreign_models):
    raw = params(model={"profile": "hf", "checkpoint": str(foreign_models["blip2"])})
    proc = stage(tmp_path, "build_base", raw)
    assert_refused(proc, tmp_path, "ModelStructureError", "Blip2ForConditionalGeneration has no decoder layer list",
                   outputs=("models/base", "metrics/base.json"))


def test_composing_with_a_language_model_without_a_decoder_layer_list(tmp_path, foreign_models):
    raw = params(model={"profile": "hf", "vision": str(foreign_models["vision"]),
                        "language_model": str(foreign_models["gpt2"])})
    proc = stage(tmp_path, "build_base", raw)
    assert_refused(proc, tmp_path, "ModelStructureError", str(foreign_models["gpt2"]), "GPT2LMHeadModel",
                   "no decoder layer list at `.model.layers`", outputs=("models/base", "metrics/base.json"))


def test_a_base_lm_whose_depth_is_not_used_fails_the_depth_gate(tmp_path, prepared):
    """lm_pretrain.min_bi_median_to_max (issue 20): a gate no LM can pass (the median layer's BI is at most the
    largest's) refuses the built LM in one line naming the key and the layer, and writes no base model."""
    link(tmp_path, "data/prepared", prepared)
    raw = params(lm_pretrain={"seq_len": 16, "min_bi_median_to_max": 1.0,
                              "train": {"max_steps": 1, "batch_size": 2, "save_steps": 1}})
    proc = stage(tmp_path, "build_base", raw)
    assert_refused(proc, tmp_path, "DepthProfileError", "lm_pretrain.min_bi_median_to_max 1.0: the pretrained LM's median",
                   "its depth is not used", outputs=("models/base", "metrics/base.json"))


# ------------------------------------------------------------------------------------------------ missing inputs
def test_params_file_that_is_not_utf8(tmp_path):
    bad = tmp_path / "bad-params.yaml"
    bad.write_bytes("tune: {runs: {all: {strategy: all}}}\n# caf\xe9\n".encode("latin-1"))
    env = {**os.environ, "PYTHONPATH": str(REPO), "VR_PARAMS": str(bad), "HF_HUB_OFFLINE": "1"}
    env.pop("PREFECT_API_URL", None)
    proc = subprocess.run([sys.executable, "-m", "stages.prepare"], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=300)
    assert_refused(proc, tmp_path, f"ParamsError: params file {bad} is not UTF-8 text", outputs=PREPARE_OUTPUTS)


@pytest.mark.parametrize("module", ["tune", "prune", "evaluate"])
def test_run_name_not_in_params(tmp_path, module):
    proc = stage(tmp_path, module, params(), "--run", "nope")
    assert_refused(proc, tmp_path, "ParamsError: --run 'nope': no such entry in tune.runs or tune.importance_runs",
                   "['all', 'x']")


def test_missing_tuned_model(tmp_path, prepared, micro4_dir):
    link(tmp_path, "data/prepared", prepared)
    link(tmp_path, "models/projector", micro4_dir)
    assert_refused(stage(tmp_path, "prune", params(), "--run", "x"), tmp_path,
                   "MissingInputError: models/tuned/x is missing: `dvc repro tune@x` writes it",
                   outputs=("models/pruned/x", "metrics/prune/x.json"))


def test_missing_pruned_model(tmp_path, prepared, micro4_dir):
    link(tmp_path, "data/prepared", prepared)
    link(tmp_path, "models/tuned/x", micro4_dir)
    assert_refused(stage(tmp_path, "evaluate", params(), "--run", "x"), tmp_path,
                   "MissingInputError: models/pruned/x is missing: `dvc repro prune@x` writes it",
                   outputs=("metrics/eval/x.json",))


def test_missing_prepared_dataset(tmp_path, micro4_dir):
    link(tmp_path, "models/base", micro4_dir)
    assert_refused(stage(tmp_path, "pretrain_projector", params()), tmp_path,
                   "MissingInputError: data/prepared/visual is missing: `dvc repro prepare` writes it",
                   outputs=("models/projector", "metrics/projector.json"))


def test_missing_importance_scores_of_an_importance_run(tmp_path, prepared, micro4_dir):
    link(tmp_path, "data/prepared", prepared)
    link(tmp_path, "models/projector", micro4_dir)
    raw = params(**{"tune.importance_runs": {"bi1": {"strategy": "importance", "budget": 1, "importance_metric": "bi",
                                                     "importance_from": "all"}}})
    assert_refused(stage(tmp_path, "tune", raw, "--run", "bi1"), tmp_path,
                   "MissingInputError: plots/importance/all.json is missing: `dvc repro prune@all` writes it",
                   outputs=("models/tuned/bi1", "metrics/tune/bi1.json", "mlflow.db"))


def test_unreadable_metrics_of_another_stage(tmp_path):
    (tmp_path / "metrics/eval").mkdir(parents=True)
    (tmp_path / "metrics/eval/all.json").write_text('{"tuned": ')
    assert_refused(stage(tmp_path, "report", params()), tmp_path,
                   "DataError: metrics/eval/all.json is not valid JSON", "re-run `dvc repro evaluate@all`",
                   outputs=("reports/summary.md", "metrics/summary.json"))
    (tmp_path / "metrics/eval/all.json").write_text('{"tuned": {}}')
    assert_refused(stage(tmp_path, "report", params()), tmp_path,
                   "DataError: metrics/eval/all.json has no field 'pruned'", outputs=("reports/summary.md",))


# ------------------------------------------------------------------------------------- bugs keep their traceback
def patched_stage(ws: Path, module: str, patch: str, **env_changes: str) -> subprocess.CompletedProcess:
    """`python -m stages.<module>` after `patch` (Python source) has replaced a library function the stage calls."""
    bad = ws / "params.yaml"
    bad.write_text(yaml.safe_dump(params(), sort_keys=False))
    env = {**os.environ, "PYTHONPATH": str(REPO), "VR_PARAMS": str(bad), "HF_HUB_OFFLINE": "1", "DO_NOT_TRACK": "1",
           "VR_PREFECT": "0", **env_changes}
    env.pop("PREFECT_API_URL", None)
    code = f"import runpy, sys\n{patch}\nsys.argv = ['{module}']\nrunpy.run_module('stages.{module}', run_name='__main__')\n"
    return subprocess.run([sys.executable, "-c", code], cwd=ws, env=env, capture_output=True, text=True, timeout=600)


BUG = """
from pipeline import data
def prepare_all(cfg, out_dir):
    raise ValueError("a bug: not an input's fault")
data.prepare_all = prepare_all
"""


def test_a_bug_exits_1_with_its_traceback(tmp_path):
    proc = patched_stage(tmp_path, "prepare", BUG)
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "Traceback (most recent call last)" in proc.stderr and "in prepare_all" in proc.stderr
    assert proc.stderr.rstrip().endswith("ValueError: a bug: not an input's fault")
    assert " ERROR stages: " not in proc.stderr  # not reported as a bad input


def test_a_project_error_exits_2_as_one_line(tmp_path):
    patch = BUG.replace('raise ValueError("a bug: not an input\'s fault")',
                        'raise MissingInputError("data/raw is missing: fetch it first")')
    proc = patched_stage(tmp_path, "prepare", "from pipeline.errors import MissingInputError\n" + patch)
    assert_refused(proc, tmp_path, "MissingInputError: data/raw is missing: fetch it first", outputs=PREPARE_OUTPUTS)


def test_a_bug_under_prefect_exits_1_with_its_traceback(tmp_path):
    """The same bug in a stage run as a Prefect flow (an ephemeral server: VR_PREFECT=1) is not a known error."""
    proc = patched_stage(tmp_path, "prepare", BUG, VR_PREFECT="1")
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "Traceback (most recent call last)" in proc.stderr and "ValueError: a bug: not an input's fault" in proc.stderr
    assert " ERROR stages: " not in proc.stderr
