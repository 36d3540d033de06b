"""The training stages under a multi-process launcher, on CPU: 2 processes under torchrun with the gloo backend.

Equivalence. `distributed_worker.py` trains each case on 2 processes with batch 2 per process; here the same case is
trained in this single process with batch 4. Both have global batch 4 (`global_batch_size: 4`, so grad_accum 1 in
both), 4 optimizer steps over the same 16 records, and see the same global batches in the same order: the Trainer's
sampler is seeded (data_seed) and so draws the same permutation in every process, and accelerate deals the
consecutive per-process batches of that permutation out to the ranks, so step k uses samples 4k..4k+3 in both runs.
The loss is the mean over the label tokens of the whole global batch in both (the Trainer passes
num_items_in_batch, gathered across processes; the answers differ in length on purpose). DDP averages gradients
in another summation order, so the weights agree to float rounding, not bit for bit: the tolerance is
ATOL = 1e-5 (measured: 1.5e-7), against updates of ~1e-3. Frozen weights must come back bit-identical.

The FSDP cases run torch's FSDP2 on CPU: accelerate refuses FSDP on CPU processes and falls back to DDP, so the
worker lets it through with a test-only patch (see `_allow_fsdp_on_cpu`). Real FSDP runs on GPUs; this checks our
glue (wrap classes, optimizer hand-over, gathering the shards, rebuilding the model on rank 0, LoRA merge).

The stage test runs the real `stages.tune` entry as dvc.yaml does, relaunched under `accelerate launch` by
$VR_LAUNCHER, in a micro workspace: one MLflow run, one set of outputs, both processes exit 0.
"""

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

import distributed_worker
from pipeline import distributed
import pipeline.model
from pipeline import tuning

REPO = Path(__file__).resolve().parents[2]
ATOL = 1e-5


def torchrun_env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                            "MASTER_PORT", "PREFECT_API_URL", "VR_PARAMS")}
    env.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", HF_HUB_DISABLE_PROGRESS_BARS="1", TQDM_DISABLE="1",
               VR_PREFECT="0", MLFLOW_DISABLE_TELEMETRY="true", DO_NOT_TRACK="1",
               PYTHONPATH=os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep), **extra)
    return env


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def torchrun(args: list[str], cwd: Path, env: dict, timeout: int = 300) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *args]
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(f"{cmd} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-8000:]}")
    return proc


# ------------------------------------------------------------------------------------------ library: 2 vs 1 process
@pytest.fixture(scope="module")
def two_processes(micro4_dir, tmp_path_factory):
    """Every case of distributed_worker.CASES (+ the resume cases) trained by one 2-process launch (~25 s on 2
    cores): (out dir, the ranks' reports, seconds)."""
    out = tmp_path_factory.mktemp("ddp")
    start = time.perf_counter()
    torchrun([str(REPO / "tests" / "helpers" / "distributed_worker.py"), str(micro4_dir), str(out)], cwd=out, env=torchrun_env())
    reports = json.loads((out / "report.json").read_text())
    return out, reports, time.perf_counter() - start


@pytest.fixture(scope="module")
def one_process(micro4_dir, tmp_path_factory):
    """The reference cases trained in this process with batch 4 (name -> state dict)."""
    out = tmp_path_factory.mktemp("single")
    refs = {}
    for name in ("uniform", "lora", "stopped"):
        merged, result = distributed_worker.train_case(name, micro4_dir, out / name, processes=1)
        assert result.steps == distributed_worker.STEPS
        refs[name] = {k: v.detach().clone() for k, v in merged.state_dict().items()}
    return refs


@pytest.fixture(scope="module")
def initial(micro4_dir):
    model, _ = pipeline.model.load_vlm(micro4_dir)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def trainable_bytes(micro4_dir, spec) -> int:
    model, _ = pipeline.model.load_vlm(micro4_dir)
    model = tuning.apply_trainability(model, spec)
    return sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)


@pytest.mark.parametrize(
    "case", ["uniform", "lora", "stopped", "resume", "fsdp_uniform", "fsdp_lora", "fsdp_stopped", "fsdp_resume"])
def test_two_processes_train_the_same_weights_as_one(two_processes, one_process, initial, case):
    out, _, _ = two_processes
    ref = one_process[distributed_worker.REFERENCE.get(case, case)]
    got = torch.load(out / f"{case}.pt")
    assert got.keys() == ref.keys() == initial.keys()  # LoRA merged away: a plain LLaVA state dict
    diff = {k: (got[k] - ref[k]).abs().max().item() for k in ref}
    moved = {k: (ref[k] - initial[k]).abs().max().item() for k in ref}
    assert max(diff.values()) <= ATOL, sorted(diff.items(), key=lambda kv: -kv[1])[:3]
    assert max(moved.values()) > 100 * ATOL  # training moved the weights far more than the tolerance
    for k, m in moved.items():
        if m == 0.0:  # frozen in the reference: bit-identical after distributed training too
            assert torch.equal(got[k], initial[k]), k
    spec = distributed_worker.CASES[distributed_worker.REFERENCE.get(case, case)][0]
    for k in ref:
        parts = k.split(".")
        if "language_model" in parts and "layers" in parts and int(parts[parts.index("layers") + 1]) not in spec.layers:
            assert torch.equal(got[k], initial[k]), k  # a frozen decoder layer
        if "multi_modal_projector" in parts:
            assert torch.equal(got[k], initial[k]) == (spec.projector == "frozen"), k


@pytest.mark.parametrize("case", ["uniform", "lora", "stopped"])
def test_ddp_reduces_only_trainable_parameters(two_processes, micro4_dir, case):
    """DDP registered exactly the parameters that require grad (its reducer's byte count), with
    find_unused_parameters off, and no unused-parameter error stopped the run."""
    _, reports, _ = two_processes
    for rank_report in reports:
        info = rank_report[case]
        assert info["wrapper"] == "DistributedDataParallel" and not info["fsdp"]
        assert info["ddp_find_unused_parameters"] is False
        assert info["ddp_param_bytes"] == trainable_bytes(micro4_dir, distributed_worker.CASES[case][0])
        assert info["steps"] == distributed_worker.STEPS and info["returned_model"]


def test_fsdp_cases_were_sharded_and_only_rank0_gets_the_model(two_processes):
    _, reports, _ = two_processes
    for case in ("fsdp_uniform", "fsdp_lora", "fsdp_stopped"):
        assert [r[case]["fsdp"] for r in reports] == [True, True]
        assert reports[0][case]["wrapper"].startswith("FSDP")
        assert [r[case]["returned_model"] for r in reports] == [True, False]


@pytest.mark.parametrize("case", ["resume", "fsdp_resume"])
def test_two_processes_resume_after_an_interruption(two_processes, case):
    """DDP (trainable-weights checkpoint written by rank 0) and FSDP (sharded checkpoint, one shard per rank):
    interrupted at step 3 with checkpoint-2 on disk, the rerun ran only steps 3 and 4 on both ranks and ended with
    the uninterrupted weights (test_two_processes_train_the_same_weights_as_one[resume / fsdp_resume])."""
    _, reports, _ = two_processes
    for r in reports:
        assert r[case]["checkpoints_after_interruption"] == ["checkpoint-2"]
        assert r[case]["steps"] == distributed_worker.STEPS
        assert r[case]["steps_run_after_resume"] == distributed_worker.STEPS - 2


@pytest.mark.parametrize("case", ["lora"])  # DDP covers `uniform` (test_two_processes_resume_after_an_interruption)
def test_one_process_resume_is_exact(micro4_dir, one_process, tmp_path, monkeypatch, case):
    """Without a launcher too: the resumed run ends bit-identical to the uninterrupted one. (The Trainer's own
    checkpoint format did not reload LLaVA's weights, nor a LoRA run's projector: see training._trainer_class.)"""
    import pipeline.training

    crash_at, made = {}, []
    monkeypatch.setattr(pipeline.training, "_trainer_class", distributed_worker.recording_factory(pipeline.training._trainer_class, crash_at, made))
    merged, info = distributed_worker.interrupted_then_resumed(case, micro4_dir, tmp_path / "ckpt", processes=1, crash_at=crash_at,
                                              made=made)
    assert info == {"checkpoints_after_interruption": ["checkpoint-2"], "steps": distributed_worker.STEPS,
                    "steps_run_after_resume": distributed_worker.STEPS - 2}
    files = sorted(p.name for p in (tmp_path / "ckpt" / "checkpoint-4").iterdir())
    assert pipeline.training.TRAINABLE_WEIGHTS in files and "model.safetensors" not in files
    ref = one_process[case]
    got = merged.state_dict()
    assert all(torch.equal(got[k], ref[k]) for k in ref)



# ------------------------------------------------------------------------------------------ rank gating helpers
def test_rank_helpers_read_the_launcher_environment(monkeypatch):
    for var in ("RANK", "WORLD_SIZE", "PMI_RANK", "PMI_SIZE", "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE",
                "MV2_COMM_WORLD_RANK", "MV2_COMM_WORLD_SIZE"):
        monkeypatch.delenv(var, raising=False)
    assert (distributed.rank(), distributed.world_size(), distributed.is_main(), distributed.is_distributed()) == (0, 1, True, False)
    distributed.barrier(), distributed.shutdown()  # no process group: no-ops
    assert distributed.broadcast_from_main("x") == "x"
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert (distributed.rank(), distributed.world_size(), distributed.is_main(), distributed.is_distributed()) == (1, 2, False, True)
    monkeypatch.delenv("RANK")
    monkeypatch.setenv("OMPI_COMM_WORLD_RANK", "3")
    assert distributed.rank() == 3 and not distributed.is_main()


def test_launcher_command(monkeypatch):
    for var in ("VR_LAUNCHER", "VR_LAUNCHED", "RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    assert distributed.launcher_command("stages.tune", ["--run", "x"]) is None  # no launcher: run in this process
    monkeypatch.setenv("VR_LAUNCHER", "torchrun --standalone --nproc_per_node 8")
    assert distributed.launcher_command("stages.tune", ["--run", "x"]) == [
        "torchrun", "--standalone", "--nproc_per_node", "8", "-m", "stages.tune", "--", "--run", "x"]
    monkeypatch.setenv("LOCAL_RANK", "0")  # already one of the launched processes: never again
    assert distributed.launcher_command("stages.tune", []) is None
    monkeypatch.delenv("LOCAL_RANK")
    monkeypatch.setenv("VR_LAUNCHED", "1")  # a 1-process `accelerate launch` sets no rank variables
    assert distributed.launcher_command("stages.tune", []) is None


def test_trainer_kwargs_single_process_is_empty(micro4_dir, monkeypatch):
    from pipeline.config import DistributedParams

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    model, _ = pipeline.model.load_vlm(micro4_dir)
    assert distributed.trainer_kwargs(DistributedParams(strategy="fsdp"), model) == {}  # one process: as before


def test_trainer_kwargs_per_strategy(micro4_dir, monkeypatch):
    from pipeline.config import DistributedParams

    monkeypatch.setenv("WORLD_SIZE", "8")
    model, _ = pipeline.model.load_vlm(micro4_dir)
    assert distributed.trainer_kwargs(DistributedParams(), model) == {"ddp_timeout": 1800, "ddp_find_unused_parameters": False}
    fsdp = distributed.trainer_kwargs(DistributedParams(strategy="fsdp"), model)
    assert fsdp["fsdp"] is True and fsdp["fsdp_config"]["version"] == 2
    wrap = fsdp["fsdp_config"]["transformer_layer_cls_to_wrap"]
    assert wrap[0] == type(pipeline.model.decoder_layers(model)[0]).__name__ == "LlamaDecoderLayer"
    assert "CLIPEncoderLayer" in wrap
    assert distributed.trainer_kwargs(DistributedParams(strategy="fsdp", fsdp_wrap=["X"]), model)["fsdp_config"][
        "transformer_layer_cls_to_wrap"] == ["X"]
    ds = distributed.trainer_kwargs(DistributedParams(strategy="deepspeed", deepspeed_config="configs/deepspeed/zero3.json"), model)
    assert ds["deepspeed"] == "configs/deepspeed/zero3.json"


def test_global_batch_size_sets_grad_accum():
    from pipeline.config import ParamsError, TrainParams, validate

    p = TrainParams(batch_size=16, global_batch_size=128)
    assert [p.grad_accum_for(n) for n in (1, 2, 8)] == [8, 4, 1]
    with pytest.raises(ValueError, match=r"not a multiple of batch_size 16 x 3 processes"):
        p.grad_accum_for(3)
    assert TrainParams(grad_accum=4).grad_accum_for(8) == 4  # without global_batch_size: as given
    base = {"tune": {"runs": {"all": {"strategy": "all"}}}}
    for train, match in [({"grad_accum": 2, "global_batch_size": 8}, "not both"),
                         ({"batch_size": 3, "global_batch_size": 8}, "not a multiple"),
                         ({"distributed": {"strategy": "deepspeed"}}, "deepspeed_config is needed"),
                         ({"distributed": {"strategy": "zero"}}, r"tune\.train\.distributed\.strategy")]:
        with pytest.raises(ParamsError, match=match):
            validate({"tune": {**base["tune"], "train": train}}, "x.yaml")


# ------------------------------------------------------------------------------------------ the real stage entry
@pytest.fixture(scope="module")
def stage_workspace(micro4_dir, tmp_path_factory):
    """A micro workspace for `stages.tune`: params, data/prepared/visual, models/projector."""
    import datasets

    ws = tmp_path_factory.mktemp("stage")
    params = yaml.safe_load((REPO / "params" / "micro.yaml").read_text())
    params["tune"]["train"] = {"max_steps": 2, "batch_size": 2, "global_batch_size": 4, "max_length": 64,
                               "save_steps": 1, "logging_steps": 1}
    (ws / "params.yaml").write_text(yaml.safe_dump(params))
    datasets.DatasetDict({"instruct_train": distributed_worker.dataset()}).save_to_disk(str(ws / "data" / "prepared" / "visual"))
    (ws / "data" / "prepared" / "manifest.json").write_text('{"content_hash": "hand-made"}')  # what prepare writes
    shutil.copytree(micro4_dir, ws / "models" / "projector")
    return ws


def test_stage_under_a_launcher_only_rank0_writes(stage_workspace):
    """dvc.yaml's own command, `python -m stages.tune --run uniform50`, with
    VR_LAUNCHER="accelerate launch --multi_gpu --num_processes 2 ..." (CPU processes: gloo): the stage relaunches
    itself under accelerate; one MLflow run (rank 0's), the stage outputs once, checkpoints cleaned up, exit 0."""
    import mlflow

    ws = stage_workspace
    db = f"sqlite:///{ws / 'mlflow.db'}"
    launcher = (f"{Path(sys.executable).parent / 'accelerate'} launch --multi_gpu --num_processes 2 --num_machines 1 "
                f"--mixed_precision no --dynamo_backend no --main_process_port {free_port()}")
    proc = subprocess.run([sys.executable, "-m", "stages.tune", "--run", "uniform50"], cwd=ws, timeout=300,
                          env=torchrun_env(MLFLOW_TRACKING_URI=db, VR_LAUNCHER=launcher), capture_output=True, text=True)
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-8000:]}"
    assert "running under VR_LAUNCHER" in proc.stderr
    out = ws / "models" / "tuned" / "uniform50"
    assert list(out.glob("*.safetensors"))
    selection = json.loads((out / "selection.json").read_text())
    assert selection["layers"] == [1, 3] and selection["data_hash"] and "git_commit" not in selection
    assert selection["processes"] == 2
    metrics = json.loads((ws / "metrics" / "tune" / "uniform50.json").read_text())
    record = json.loads((ws / "runs" / "tune" / "uniform50.json").read_text())  # the run's identity (issue 22)
    assert metrics["steps"] == 2 and record["git_commit"] and "git_commit" not in metrics
    assert (ws / "plots" / "loss" / "uniform50.csv").read_text().startswith("step,loss\n")
    assert not (ws / "checkpoints" / "tune" / "uniform50").exists()
    assert not list((ws / "models" / "tuned").glob(".*"))  # no temporary directory left behind by a second writer

    client = mlflow.tracking.MlflowClient(tracking_uri=db)
    exp = client.get_experiment_by_name(yaml.safe_load((ws / "params.yaml").read_text())["mlflow"]["experiment"])
    runs = client.search_runs([exp.experiment_id], filter_string="tags.vr_run = 'uniform50'")
    assert len(runs) == 1 and runs[0].info.run_id == record["mlflow_run_id"]
    assert runs[0].data.params["layers"] == "1,3" and runs[0].data.params["processes"] == "2"
    assert len(client.search_runs([exp.experiment_id], filter_string="tags.vr_kind = 'pipeline'")) == 1
