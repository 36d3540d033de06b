"""Kill -9 the pipeline at three points; `dvc repro` again resumes and ends with the uninterrupted run's results.

Micro profile in a temporary workspace (tests/helpers/fault_workspace.py): training stages of 12 steps with a checkpoint every
4 (checkpoints/<stage>/checkpoint-N), so there is a window to kill in after the first checkpoint. One uninterrupted
reference run is shared by the three cases; each case starts from the reference's snapshot just before its fault.

Tolerance: the resumed run must give the reference's weights and metrics to 1e-6 (absolute on weights, relative on
metrics); on this CPU they are bitwise identical (seeded Trainer, RNG/optimizer/scheduler state restored, same data
order). Timings and memory (train_seconds, peak_memory_bytes, generation speed) are not compared.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

import fault_workspace

RESUMED = "resuming from the latest checkpoint"
VOLATILE = {"mlflow_run_id", "train_seconds", "peak_memory_bytes", "generation_ms_per_sample", "generation_tokens_per_s"}
ATOL_WEIGHTS = 1e-6
RTOL_METRICS = 1e-6


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    return fault_workspace.reference(tmp_path_factory)


# ------------------------------------------------------------------------------------------------------- helpers
def weights(model_dir: Path) -> dict:
    from safetensors.torch import load_file

    state = {}
    for f in sorted(model_dir.glob("*.safetensors")):
        state |= load_file(f)
    assert state, f"no weights in {model_dir}"
    return state


def assert_same_model(got: fault_workspace.Workspace, ref: fault_workspace.Workspace, rel: str) -> float:
    a, b = weights(got.path / rel), weights(ref.path / rel)
    assert a.keys() == b.keys(), rel
    diff = max((a[k].double() - b[k].double()).abs().max().item() for k in a)
    assert diff <= ATOL_WEIGHTS, f"{rel}: resumed weights differ from the uninterrupted run's by up to {diff:.3g}"
    return diff


def assert_same_metrics(got, ref, where: str = "") -> None:
    if isinstance(ref, dict):
        assert isinstance(got, dict) and set(got) == set(ref), where
        for k in ref:
            if k not in VOLATILE:
                assert_same_metrics(got[k], ref[k], f"{where}.{k}")
    elif isinstance(ref, list):
        assert isinstance(got, list) and len(got) == len(ref), where
        for i, (g, r) in enumerate(zip(got, ref)):
            assert_same_metrics(g, r, f"{where}[{i}]")
    elif isinstance(ref, float) and not isinstance(got, bool):
        assert (math.isnan(got) and math.isnan(ref)) or got == pytest.approx(ref, rel=RTOL_METRICS, abs=1e-12), \
            f"{where}: {got} != {ref}"
    else:
        assert got == ref, f"{where}: {got!r} != {ref!r}"


def assert_same_files(got: fault_workspace.Workspace, ref: fault_workspace.Workspace, *rels: str) -> None:
    for rel in rels:
        if rel.endswith(".json"):
            assert_same_metrics(got.read_json(rel), ref.read_json(rel), rel)
        else:
            assert (got.path / rel).read_text() == (ref.path / rel).read_text(), rel


def assert_clean_kill(ws: fault_workspace.Workspace, killed: dict) -> None:
    """Every process of the killed group is gone, and DVC's lock file still names the dead `dvc repro` (the stale
    lock that the next `dvc repro` has to cope with)."""
    import psutil

    alive = [pid for pid in killed["group"] if psutil.pid_exists(pid) and psutil.Process(pid).status() != "zombie"]
    assert not alive, f"processes of the killed run still alive: {alive}"
    rwlock = ws.path / ".dvc" / "tmp" / "rwlock"
    assert rwlock.exists() and f'"pid": {killed["dvc_pid"]}' in rwlock.read_text()


def assert_recovered(ws: fault_workspace.Workspace, proc) -> None:
    """The re-run went through the stale lock on its own: DVC drops the entries of dead pids it meets, with a
    warning (entries for paths the re-run does not touch stay in the file, harmlessly)."""
    assert "had been killed. Auto removed it from the lock file" in proc.stderr + proc.stdout


# --------------------------------------------------------------------------------------------------------- cases
def test_kill_during_projector_pretraining_resumes_from_its_checkpoint(shared):
    """Kill -9 once pretrain_projector has written checkpoint-4 (of 12 steps): the re-run resumes from it."""
    ws = shared["base"].copy(shared["root"] / "case-projector")
    ckpt = ws.path / "checkpoints" / "pretrain_projector"
    killed = ws.repro_killed_when("pretrain_projector", fault_workspace.checkpoint_saved(ws, "pretrain_projector"))
    assert_clean_kill(ws, killed)
    assert (ckpt / "checkpoint-4" / "trainer_state.json").exists() and not (ws.path / "models/projector").exists()

    again = ws.dvc("repro", "pretrain_projector")
    assert "Running stage 'pretrain_projector'" in again.stdout
    assert RESUMED in again.stderr
    assert_recovered(ws, again)
    assert not ckpt.exists(), "checkpoints are dropped once the stage's output is written"
    ref = shared["projector"]
    assert_same_model(ws, ref, "models/projector")
    assert_same_files(ws, ref, "metrics/projector.json", "plots/loss/projector.csv")
    assert ws.read_json("metrics/projector.json")["steps"] == 12


def test_kill_mid_selective_tuning_resumes_and_ends_with_the_same_metrics(shared):
    """Kill -9 once tune@uniform50 has written checkpoint-4 (of 12 steps); `dvc repro evaluate@uniform50` resumes the
    tuning there (the projector stage, complete, is not re-run) and ends with the reference's final metrics."""
    ws = shared["projector"].copy(shared["root"] / "case-tune")
    killed = ws.repro_killed_when("evaluate@uniform50", fault_workspace.checkpoint_saved(ws, "tune/uniform50"))
    assert_clean_kill(ws, killed)
    assert not (ws.path / "models/tuned/uniform50").exists()

    again = ws.dvc("repro", "evaluate@uniform50")
    assert RESUMED in again.stderr
    assert "Running stage 'pretrain_projector'" not in again.stdout
    assert "Running stage 'tune@uniform50'" in again.stdout and "Running stage 'evaluate@uniform50'" in again.stdout
    assert_recovered(ws, again)
    ref = shared["ref"]
    assert_same_model(ws, ref, "models/tuned/uniform50")
    assert_same_model(ws, ref, "models/pruned/uniform50")
    assert_same_files(ws, ref, "metrics/tune/uniform50.json", "plots/loss/uniform50.csv",
                      "metrics/prune/uniform50.json", "metrics/eval/uniform50.json")
    selection = json.loads((ws.path / "models/tuned/uniform50/selection.json").read_text())
    assert selection["layers"] == [1, 3]
    # the killed tune's MLflow run, left RUNNING, was set to KILLED by the re-run; the re-run's own run finished
    import mlflow

    client = mlflow.MlflowClient(ws.env["MLFLOW_TRACKING_URI"])
    exp = client.get_experiment_by_name("visual-region-faults")
    runs = client.search_runs([exp.experiment_id], filter_string="tags.vr_kind = 'tune' and tags.vr_run = 'uniform50'",
                              order_by=["attributes.start_time ASC"])
    assert [r.info.status for r in runs] == ["KILLED", "FINISHED"]
    assert runs[1].info.run_id == ws.read_json("runs/tune/uniform50.json")["mlflow_run_id"]
    assert f"MLflow run {runs[0].info.run_id} (tune uniform50) was left RUNNING" in again.stderr


def test_kill_during_pruning_reruns_only_the_unfinished_stages(shared):
    """Kill -9 while prune@uniform50 runs: its outputs are absent, the tuned model (a finished stage) is kept; the
    re-run starts at prune (the last checkpoint is the tuned model DVC recorded) and ends with the same metrics."""
    ws = shared["tuned"].copy(shared["root"] / "case-prune")
    killed = ws.repro_killed_when("evaluate@uniform50", fault_workspace.stage_running_for("prune", 2.5))
    assert_clean_kill(ws, killed)
    assert not (ws.path / "models/pruned/uniform50").exists() and not (ws.path / "metrics/prune/uniform50.json").exists()

    again = ws.dvc("repro", "evaluate@uniform50")
    assert "Stage 'tune@uniform50' didn't change, skipping" in again.stdout
    assert "Running stage 'prune@uniform50'" in again.stdout and "Running stage 'evaluate@uniform50'" in again.stdout
    assert_recovered(ws, again)
    ref = shared["ref"]
    assert_same_model(ws, ref, "models/pruned/uniform50")
    assert_same_files(ws, ref, "metrics/prune/uniform50.json", "metrics/eval/uniform50.json")


# ------------------------------------------------------------------------------- a checkpoint cut short by a kill
def test_a_checkpoint_cut_short_by_a_kill_is_skipped_on_resume(tmp_path, micro_dir, caplog):
    """A kill while the Trainer writes checkpoint-N leaves its files cut short and no trainer_state.json (written
    last). A real kill hits that window (milliseconds for the micro model) only by chance, so it is built by hand:
    a run stopped after checkpoint-2, then checkpoint-3 cut short. The next run must resume from checkpoint-2 (not
    fail on checkpoint-3, nor start over) and drop the broken checkpoint."""
    import logging

    import torch
    from transformers import AutoTokenizer, LlamaForCausalLM

    from conftest import MICRO_TEXTS
    from pipeline import training
    from pipeline.config import TrainParams

    lm_dir = micro_dir.parent / "lm"  # the micro Llama the LLaVA was composed from
    tokenizer = AutoTokenizer.from_pretrained(lm_dir)
    blocks = training.text_blocks(MICRO_TEXTS * 4, tokenizer, 16)
    ckpt = tmp_path / "checkpoints"

    def run(max_steps: int):
        lm = LlamaForCausalLM.from_pretrained(lm_dir)
        lm.requires_grad_(True)
        optimizer = torch.optim.AdamW(lm.parameters(), lr=1e-2)
        params = TrainParams(max_steps=max_steps, batch_size=2, save_steps=2, logging_steps=1)
        return training.train(lm, blocks, collator=None, optimizer=optimizer, params=params, ckpt_dir=ckpt, seed=0,
                       fingerprint={"test": "partial-checkpoint"})

    run(2)  # "killed" after its checkpoint-2
    partial = ckpt / "checkpoint-3"
    partial.mkdir()
    for f in (ckpt / "checkpoint-2").iterdir():
        if f.name != "trainer_state.json":
            (partial / f.name).write_bytes(f.read_bytes()[:100])

    with caplog.at_level(logging.INFO, logger="pipeline.training"):
        result = run(4)
    assert RESUMED in caplog.text and not partial.exists()
    assert result.steps == 4 and [h["step"] for h in result.loss_history] == [1, 2, 3, 4]
