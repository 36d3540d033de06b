"""The run's record matches what exists (issue 18, classes 2 and 3): a tune that fails after its MLflow run started
ends that run FAILED with the reason as tag `vr_error` and leaves no metrics file beside a model it did not write; an
output the system refuses to write is one line naming it (exit 2); one writer per output (a lock naming its holder);
outputs, the model weights included, follow the process umask; metrics files are strict JSON.

Through the real entry point, `python -m stages.tune`, on the micro model with the bad-inputs params
(test_bad_inputs.py). As root, chmod cannot make a directory unwritable: the refusal is then injected into the
stage process (the system call that creates the output's temporary directory raises the PermissionError it would)."""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from test_bad_inputs import BASE, REPO, assert_refused, link, params  # noqa: F401 (the `prepared` fixture below)

TUNE_OUTPUTS = ("models/tuned/x", "metrics/tune/x.json", "plots/loss/x.csv")


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Path:
    from pipeline import data

    out = tmp_path_factory.mktemp("prepared") / "prepared"
    data.prepare_all(data.DataConfig(**BASE["data"]), out)
    return out


def tune(ws: Path, run: str, patch: str = "", *, umask: int | None = None, wait: bool = True, **changes):
    """`python -m stages.tune --run <run>` in `ws` (after `patch`, Python source run first in the stage process)."""
    (ws / "bad-params.yaml").write_text(yaml.safe_dump(params(**changes), sort_keys=False))
    env = {**os.environ, "PYTHONPATH": str(REPO), "VR_PARAMS": str(ws / "bad-params.yaml"), "HF_HUB_OFFLINE": "1",
           "DO_NOT_TRACK": "1", "MLFLOW_DISABLE_TELEMETRY": "true", "MLFLOW_TRACKING_URI": f"sqlite:///{ws / 'mlflow.db'}",
           "HF_HUB_DISABLE_PROGRESS_BARS": "1", "TOKENIZERS_PARALLELISM": "false", "VR_PREFECT": "0"}
    for key in ("PREFECT_API_URL", "VR_PIPELINE_RUN_ID"):
        env.pop(key, None)
    code = f"import runpy, sys\n{patch}\nsys.argv = ['stages.tune', '--run', '{run}']\n" \
           "runpy.run_module('stages.tune', run_name='__main__')\n"
    start = dict(cwd=ws, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                 preexec_fn=(lambda: os.umask(umask)) if umask is not None else None)
    proc = subprocess.Popen([sys.executable, "-c", code], **start)
    if not wait:
        return proc
    stdout, stderr = proc.communicate(timeout=600)
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)


def mlflow_runs(ws: Path, run: str) -> list:
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{ws / 'mlflow.db'}")
    experiment = client.get_experiment_by_name(BASE["mlflow"]["experiment"])
    return client.search_runs([experiment.experiment_id], filter_string=f"tags.vr_kind = 'tune' and tags.vr_run = '{run}'")


def workspace(tmp_path: Path, prepared: Path, micro4_dir: Path) -> Path:
    link(tmp_path, "data/prepared", prepared)
    link(tmp_path, "models/projector", micro4_dir)
    stale = tmp_path / "metrics/tune/x.json"  # a previous run's metrics, which must not outlive a failed model write
    stale.parent.mkdir(parents=True)
    stale.write_text('{"final_loss": 1.0}\n')
    return tmp_path


REFUSE_TUNED_DIR = """
import errno, os, tempfile
_mkdtemp = tempfile.mkdtemp
def mkdtemp(suffix=None, prefix=None, dir=None):  # what an unwritable models/tuned does to any non-root writer
    if dir is not None and os.path.normpath(str(dir)) == 'models/tuned':
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), os.path.join(str(dir), prefix or ''))
    return _mkdtemp(suffix, prefix, dir)
tempfile.mkdtemp = mkdtemp
"""

DISK_FULL_AT_METRICS = """
import errno, os, tempfile
_mkstemp = tempfile.mkstemp
def mkstemp(suffix=None, prefix=None, dir=None, text=False):  # the disk is full when the metrics are written
    if dir is not None and os.path.normpath(str(dir)) == 'metrics/tune':
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(dir))
    return _mkstemp(suffix, prefix, dir, text)
tempfile.mkstemp = mkstemp
"""


def test_unwritable_tuned_models_dir_fails_the_run_naming_the_path(tmp_path, prepared, micro4_dir):
    ws = workspace(tmp_path, prepared, micro4_dir)
    patch = REFUSE_TUNED_DIR
    if os.geteuid() != 0:  # a real unwritable directory
        (ws / "models/tuned").mkdir(parents=True)
        (ws / "models/tuned").chmod(0o555)
        patch = ""
    try:
        proc = tune(ws, "x", patch)
    finally:
        if (ws / "models/tuned").exists():
            (ws / "models/tuned").chmod(0o755)
    text = assert_refused(proc, ws, "OutputError: cannot write models/tuned/x: Permission denied", outputs=TUNE_OUTPUTS)
    [run] = mlflow_runs(ws, "x")
    assert run.info.status == "FAILED" and run.data.tags["vr_error"] == text.split(" ERROR stages: ")[1]
    assert list((ws / "checkpoints/tune/x").glob("checkpoint-*")), "the checkpoints stay for the re-run"


def test_disk_full_at_the_metrics_removes_the_model_again(tmp_path, prepared, micro4_dir):
    ws = workspace(tmp_path, prepared, micro4_dir)
    proc = tune(ws, "x", DISK_FULL_AT_METRICS)
    assert_refused(proc, ws, "OutputError: cannot write metrics/tune/x.json: No space left on device",
                   outputs=TUNE_OUTPUTS)
    [run] = mlflow_runs(ws, "x")
    assert run.info.status == "FAILED" and "No space left on device" in run.data.tags["vr_error"]


DISK_FULL_IN_SAFETENSORS = """
import os, resource, safetensors.torch
_save_file = safetensors.torch.save_file
def save_file(tensors, filename, metadata=None):  # the file system refuses the weights: a real write error, in Rust
    if not os.path.normpath(str(filename)).startswith('models/tuned/'):
        return _save_file(tensors, filename, metadata)
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (4096, hard))  # past 4 KiB a write fails with EFBIG (SIGXFSZ ignored)
    try:
        return _save_file(tensors, filename, metadata)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
safetensors.torch.save_file = save_file  # before transformers imports it
"""


def test_a_write_refused_inside_safetensors_is_one_line_naming_the_model(tmp_path, prepared, micro4_dir):
    # safetensors raises its own SafetensorError ("I/O error: File too large (os error 27)"), not an OSError
    ws = workspace(tmp_path, prepared, micro4_dir)
    proc = tune(ws, "x", DISK_FULL_IN_SAFETENSORS)
    assert_refused(proc, ws, "OutputError: cannot write models/tuned/x: File too large", outputs=TUNE_OUTPUTS)
    [run] = mlflow_runs(ws, "x")
    assert run.info.status == "FAILED" and "File too large" in run.data.tags["vr_error"]


TRACKING_DB_READ_ONLY_AFTER_TRAINING = """
import sqlalchemy, sqlalchemy.event
import pipeline.training
read_only = []
@sqlalchemy.event.listens_for(sqlalchemy.engine.Engine, 'before_cursor_execute')
def _refuse_writes(conn, cursor, statement, parameters, context, executemany):
    if read_only:  # SQLite itself refuses every write from here on, as it does for a read-only database file
        cursor.execute('PRAGMA query_only = 1')
_train_visual = pipeline.training.train_visual
def train_visual(*args, **kwargs):  # the tracking database turns read-only once the model is trained
    result = _train_visual(*args, **kwargs)
    read_only.append(True)
    return result
pipeline.training.train_visual = train_visual
"""


def test_a_tracking_database_that_turns_read_only_mid_run_is_one_line_naming_it(tmp_path, prepared, micro4_dir):
    ws = workspace(tmp_path, prepared, micro4_dir)
    proc = tune(ws, "x", TRACKING_DB_READ_ONLY_AFTER_TRAINING)
    assert_refused(proc, ws, f"TrackingError: the MLflow tracking database sqlite:///{ws / 'mlflow.db'} refused a "
                   "write: attempt to write a readonly database", outputs=TUNE_OUTPUTS)
    [run] = mlflow_runs(ws, "x")
    assert run.info.status == "RUNNING", "the run could not be ended: the database refused it"
    proc = tune(ws, "x")  # the database is writable again: the re-run ends the stale run and succeeds
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sorted(r.info.status for r in mlflow_runs(ws, "x")) == ["FINISHED", "KILLED"]


def test_a_second_writer_is_refused_naming_the_first_and_outputs_follow_the_umask(tmp_path, prepared, micro4_dir):
    ws = workspace(tmp_path, prepared, micro4_dir)
    lock = ws / "checkpoints/tune/all.lock"
    first = tune(ws, "all", umask=0o027, wait=False)
    try:
        deadline = time.monotonic() + 300
        while not (lock.exists() and f"pid {first.pid} " in lock.read_text()):
            assert first.poll() is None, first.communicate()[1][-3000:]
            assert time.monotonic() < deadline, "the first writer never took its lock"
            time.sleep(0.05)
        os.kill(first.pid, signal.SIGSTOP)  # it holds the lock for as long as the second one needs
        try:
            second = tune(ws, "all")
        finally:
            os.kill(first.pid, signal.SIGCONT)
        assert_refused(second, ws, "OutputBusyError: tune run 'all' is being written by another process",
                       f"(pid {first.pid} on ", f"lock {lock.relative_to(ws)})")
        _, stderr = first.communicate(timeout=600)
    finally:
        if first.poll() is None:
            first.kill()
    assert first.returncode == 0, stderr[-3000:]
    assert [r.info.status for r in mlflow_runs(ws, "all")] == ["FINISHED"]  # the second never opened one
    # umask 027: files 0640, directories 0750, the weights (which safetensors writes 0600) included
    tuned = ws / "models/tuned/all"
    assert stat.S_IMODE(tuned.stat().st_mode) == 0o750
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in tuned.iterdir()}
    assert modes["model.safetensors"] == 0o640 and set(modes.values()) == {0o640}, modes
    assert stat.S_IMODE((ws / "metrics/tune/all.json").stat().st_mode) == 0o640
    # strict JSON: 1 step with logging_steps 10 logs no loss, so final_loss is null (it was NaN)
    metrics = json.loads((ws / "metrics/tune/all.json").read_text(), parse_constant=_no_constant)
    assert metrics["final_loss"] is None and metrics["steps"] == 1


def _no_constant(name: str):
    raise ValueError(f"{name} is not JSON")


def test_every_metrics_file_of_a_pipeline_run_is_strict_json(tmp_path_factory):
    """The shared micro pipeline run of the fault tests (tests/helpers/fault_workspace.py: built once per session for
    test_resume.py and test_security.py, so no extra run in the suite): every JSON file it wrote under metrics/,
    plots/, models/ and runs/ (the run records) parses with NaN and Infinity refused."""
    from fault_workspace import reference

    ws = reference(tmp_path_factory)["ref"]
    files = [p for folder in ("metrics", "plots", "models", "runs") for p in (ws.path / folder).rglob("*.json")]
    assert any(p.parent.name == "tune" for p in files) and any(p.parts[-3] == "runs" for p in files), files
    for path in files:
        json.loads(path.read_text(), parse_constant=_no_constant)
