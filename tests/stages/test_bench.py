"""The benchmark scripts run on a micro shape and print sane numbers (the speed targets themselves are benchmark
results, not unit tests); the training bench's FLOP model gives the textbook limits where it should."""

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
BENCH = REPO / "bench"
MICRO = ["--preset", "micro"]


def run(script: str, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run([sys.executable, str(BENCH / script), *args], capture_output=True, text=True, env=env,
                          timeout=600, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def positive(x) -> bool:
    return isinstance(x, (int, float)) and x > 0 and x == x and x != float("inf")


def test_train_bench_micro(tmp_path):
    out = tmp_path / "train.json"
    proc = run("train_bench.py", *MICRO, "--steps", "2", "--warmup", "1", "--mem-steps", "1", "--json", str(out))
    result = json.loads(out.read_text())
    rows = {r["mode"]: r for r in result["rows"]}
    assert list(rows) == ["all_full", "uniform25_full", "all_lora", "uniform25_lora", "projector_only",
                          "top25_full_projector_frozen"]
    for mode, r in rows.items():
        for key in ("step_s", "step_cpu_s", "step_ratio", "flop_limit", "measured_over_limit", "trainable_params",
                    "optimizer_state_bytes", "peak_memory_bytes", "model_gflops_per_s", "state_ratio"):
            assert positive(r[key]), (mode, key, r[key])
        assert len(r["wall_s"]) == 2 and all(positive(t) for t in r["wall_s"])
        assert r["trainable_params"] <= r["total_params"]
        assert r["fused_adamw"]
        assert 0 < r["flop_limit"] <= 1.0 + 1e-9
        assert r["flops"]["vision_fwd"] > 0 and r["flops"]["head_fwd"] > 0
        assert r["mode"] in proc.stdout  # one markdown row each
    ref = rows["all_full"]
    assert ref["step_ratio"] == 1.0 and ref["flop_limit"] == 1.0 and ref["state_ratio"] == 1.0
    assert rows["uniform25_full"]["layers"] == [3] and ref["layers"] == [0, 1, 2, 3]
    assert rows["projector_only"]["layers"] == []
    # selective rows hold less trainable state than all layers, and their FLOP limit is below 1
    for mode in ("uniform25_full", "all_lora", "uniform25_lora", "projector_only", "top25_full_projector_frozen"):
        assert rows[mode]["state_ratio"] < 1 and rows[mode]["flop_limit"] < 1, mode
    assert set(result["targets"]) == {"uniform25_full_step_ratio", "uniform25_full_state_ratio"}
    assert "| row | layers | step ms |" in proc.stdout and result["markdown"] in proc.stdout


def test_infer_bench_micro(tmp_path):
    out = tmp_path / "infer.json"
    proc = run("infer_bench.py", *MICRO, "--layers", "8", "--max-removed", "3", "--new-tokens", "3", "--repeats", "2",
               "--via-export", "--json", str(out))
    result = json.loads(out.read_text())
    rows = result["rows"]
    assert [r["k"] for r in rows] == [0, 1, 2, 3]
    assert [r["layers"] for r in rows] == [8, 7, 6, 5]
    for r in rows:
        assert not set(r["removed"]) & {1, 7}, r["removed"]  # the visual region (uniform 25% of 8: 1, 7) stays
        assert r["ideal_ratio"] == pytest.approx((8 - r["k"]) / 8)
        for key in ("prefill_ms", "decode_ms_per_token", "total_ms", "decode_tokens_per_s", "e2e_tokens_per_s",
                    "prefill_ratio", "decode_ratio", "total_ratio", "prefill_cpu_ms", "decode_cpu_ms"):
            assert positive(r[key]), (r["k"], key, r[key])
        assert len(r["samples"]["prefill_wall_s"]) == 2
    assert rows[1]["removed"] == [6] and rows[3]["removed"] == [4, 5, 6]  # deepest unprotected first, nested
    assert rows[0]["prefill_ratio"] == 1.0
    assert isinstance(result["targets_met"], bool)
    assert "| removed k | layers |" in proc.stdout and result["markdown"] in proc.stdout


def test_infer_bench_refuses_pruning_into_the_region():
    proc = subprocess.run([sys.executable, str(BENCH / "infer_bench.py"), *MICRO, "--max-removed", "3"],
                          capture_output=True, text=True, cwd=REPO)
    assert proc.returncode != 0 and "--max-removed must be in 1..2" in proc.stderr


# ---------------------------------------------------------------------------------------------------- FLOP model
@pytest.fixture(scope="module")
def tb():
    sys.path.insert(0, str(BENCH))
    try:
        import train_bench

        yield train_bench
    finally:
        sys.path.remove(str(BENCH))


def limits(tb, shape, gradient_checkpointing=False) -> dict[str, float]:
    args = tb.parse(["--preset", "micro", "--lora-r", "4"])
    flops = {}
    for mode in tb.MODES:
        model, _, _ = tb.setup(mode, shape, args)
        flops[mode] = tb.flop_model(model, shape, gradient_checkpointing)
    return {m: f["executed_flops"] / flops["all_full"]["executed_flops"] for m, f in flops.items()}, flops


def test_flop_model_textbook_limits(tb):
    """Decoder layers dominating (tiny vocab, short sequence, tiny vision tower): uniform 25% full-parameter ->
    (0.25*3 + 0.75*2)/3 = 0.75; projector only -> 2/3; top 25% with the projector frozen -> about
    (6*1 + 2*3)/(8*3) = 0.5 (layers below the lowest trainable one run forward only)."""
    import _llava

    shape = dataclasses.replace(_llava.PRESETS["micro"], layers=8, hidden=256, heads=4, kv_heads=4, intermediate=688,
                                vocab=8, seq=24, image_size=16, patch=8)
    lim, flops = limits(tb, shape)
    assert lim["uniform25_full"] == pytest.approx(0.75, abs=0.01)
    assert lim["projector_only"] == pytest.approx(2 / 3, abs=0.01)
    assert lim["top25_full_projector_frozen"] == pytest.approx(0.5, abs=0.02)
    assert lim["top25_full_projector_frozen"] < 0.5  # layer 6 computes no input gradient for q, k, v
    assert 2 / 3 < lim["all_lora"] < lim["all_full"] and lim["uniform25_lora"] < lim["uniform25_full"]
    assert flops["uniform25_full"]["trained_layer_fraction"] == pytest.approx(0.25)
    assert flops["all_full"]["trained_layer_fraction"] == pytest.approx(1.0)
    # checkpointing recomputes the forward of every layer that backward passes through
    _, gc = limits(tb, shape, gradient_checkpointing=True)
    assert gc["all_full"]["layers_recompute"] == gc["all_full"]["layers_fwd"]
    assert gc["top25_full_projector_frozen"]["layers_recompute"] == pytest.approx(gc["all_full"]["layers_fwd"] / 4)
    assert gc["all_full"]["model_flops"] == flops["all_full"]["model_flops"]


# ---------------------------------------------------------------------------------------------------- data scaling
def test_data_bench_source_images_separate_or_shared(tmp_path):
    """The bench's caption records have images of their own by default (LLaVA-Pretrain's are not LLaVA-665K's), and
    the instruct records' with --images shared; the source image bytes count every image referenced, once."""
    sys.path.insert(0, str(BENCH))
    try:
        import data_bench
    finally:
        sys.path.remove(str(BENCH))
    for images in ("separate", "shared"):
        root = tmp_path / images
        src = data_bench.generate_source(root, seed=0, sizes=[6], procs=1, images=images)
        instruct = json.loads((root / "instruct_6.json").read_text())
        captions = json.loads((root / "pretrain_6.json").read_text())
        instruct_images = {r["image"] for r in instruct if "image" in r}
        caption_images = {r["image"] for r in captions}
        assert len(caption_images) == len(captions) == len(instruct_images) > 0
        assert (caption_images.isdisjoint(instruct_images) if images == "separate"
                else caption_images == instruct_images)
        on_disk = {str(f.relative_to(root)): f.stat().st_size for f in root.rglob("*.jpg")}
        assert set(on_disk) == instruct_images | caption_images
        assert src["sizes"][6]["image_bytes"] == sum(on_disk.values())


@pytest.mark.slow
def test_data_bench_tiny(tmp_path):
    """The data-scaling bench runs the real stages on two tiny LLaVA-format datasets (~1.5 min on 2 cores)."""
    out = tmp_path / "data.json"
    proc = run("data_bench.py", "--sizes", "12", "24", "--max-steps", "2", "--input-batches", "6", "--preprocess", "lazy",
               "--workdir", str(tmp_path / "work"), "--json", str(out))
    result = json.loads(out.read_text())
    stages = ["prepare", "build_base", "pretrain_projector", "tune"]
    rows = {(r["stage"], r["size"]): r for r in result["rows"]}
    assert set(rows) == {(s, n) for s in stages for n in (12, 24)}
    for key, r in rows.items():
        assert r["status"] == "ok", (key, r.get("log_tail"))
        for field in ("seconds", "peak_rss_main_bytes", "peak_rss_hwm_bytes", "peak_rss_tree_bytes"):
            assert positive(r[field]), (key, field, r[field])
        assert r["peak_rss_tree_bytes"] >= r["peak_rss_main_bytes"]
    assert rows[("tune", 24)]["records"] == 24 and positive(rows[("tune", 24)]["records_per_s"])
    for s in result["per_size"]:
        assert s["instruct_records"] > s["caption_records"] > 0  # ~10% text-only records
        assert positive(s["image_bytes"]) and positive(s["prepared_bytes"])
        assert s["input_pipeline"]["available"] is True and positive(s["input_pipeline"]["samples_per_s"])
    assert set(result["scaling"]) == set(stages) and result["scaling"]["tune"]["available"]
    assert not (tmp_path / "work" / "ws-12").exists()  # workspaces are removed without --keep
    assert "| stage | N | status | seconds |" in proc.stdout and result["markdown"] in proc.stdout
