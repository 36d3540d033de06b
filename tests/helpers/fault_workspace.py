"""Micro pipeline workspaces for the fault-injection tests (test_resume.py, test_security.py).

A workspace is a copy of the pipeline code + a small params file in a temporary git + DVC repository, as in
tests/stages/test_pipeline_e2e.py. One uninterrupted reference run is built once per test session and snapshotted after
each training stage, so that each fault case starts from the snapshot just before its fault and only re-runs what
it must. Every `dvc` call runs with fake AWS credentials in the environment and its stdout/stderr are kept (see
`Workspace.logs`) for the credential-leak checks.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parents[2]
PY_BIN = str(Path(sys.executable).parent)

FAKE_AWS = {
    "AWS_ACCESS_KEY_ID": "AKIAFAKEFAKEFAKE1234",
    "AWS_SECRET_ACCESS_KEY": "fake/secretKEY+0123456789abcdefFAKEFAKEFAKE",
}

# The micro model with 4 decoder layers; training stages long enough (12 steps, a checkpoint every 4) to leave a window
# between the first checkpoint and the end; `all` (required) + one selective run; tiny evaluation sets.
PARAMS = """\
seed: 0
model: {profile: micro, dtype: float32, spec: {lm_layers: 4}}
data: {seed: 0, image_size: 32, num_captions: 64, num_instruct: 96, num_vqa_test: 20, text_qa_repeats: 2,
       digits_test_fraction: 0.9}
vision_pretrain: {train: {max_steps: 0}}   # the micro tower stays random here
lm_pretrain:
  lr: 0.003
  seq_len: 32
  train: {max_steps: 4, batch_size: 8, save_steps: 4, logging_steps: 2}
pretrain_projector:
  lr: 0.001
  train: {max_steps: 12, batch_size: 8, max_length: 48, save_steps: 4, logging_steps: 2}
tune:
  projector_lr: 0.0002
  lm_lr: 0.001
  embeddings: false
  lm_head: false
  lora: {r: 4, alpha: 8, dropout: 0.0}
  train: {max_steps: 12, batch_size: 8, max_length: 48, save_steps: 4, logging_steps: 2}
  runs:
    all: {strategy: all, language_model: full}
    uniform50: {strategy: uniform, budget: 0.5, language_model: full}
  importance_runs: {}
prune: {num_layers: 1, metric: angular, calibration_samples: 8, batch_size: 4, curve: {runs: [all, uniform50], max_layers: 1}}
evaluate: {max_new_tokens: 3, batch_size: 16, vqa_samples: 12, digits_samples: 8, text_qa_samples: 12, text_ppl_chunks: 8}
mlflow: {experiment: visual-region-faults}
registry: {enabled: true, model_name: visual-region-faults, kinds: [pruned], min_visual_retention: 0.5, min_text_retention: 0.5}
"""


class Workspace:
    def __init__(self, path: Path, logs: Path):
        self.path = path
        self.logs = logs  # stdout/stderr of every command run here (kept outside the workspace)
        self.logs.mkdir(parents=True, exist_ok=True)
        self._n = len(list(self.logs.glob("*.out")))

    @property
    def env(self) -> dict[str, str]:
        env = {
            **os.environ, "PATH": f"{PY_BIN}:{os.environ['PATH']}", "HF_HUB_OFFLINE": "1", "DO_NOT_TRACK": "1",
            "MLFLOW_DISABLE_TELEMETRY": "true", "HF_HUB_DISABLE_PROGRESS_BARS": "1", "TOKENIZERS_PARALLELISM": "false",
            "MLFLOW_TRACKING_URI": f"sqlite:///{self.path / 'mlflow.db'}", "GIT_AUTHOR_NAME": "t",
            "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t", **FAKE_AWS,
        }
        for key in ("VR_PARAMS", "VR_PIPELINE_RUN_ID", "PREFECT_API_URL", "VR_PREFECT"):
            env.pop(key, None)
        return env

    def _log(self, args, stdout: str, stderr: str) -> None:
        self._n += 1
        stem = self.logs / f"{self._n:02d}-{'_'.join(str(a) for a in args[-2:]).replace('/', '_')}"
        stem.with_suffix(".out").write_text(stdout)
        stem.with_suffix(".err").write_text(stderr)

    def run(self, args: list[str], check: bool = True, timeout: float = 900) -> subprocess.CompletedProcess:
        proc = subprocess.run(args, cwd=self.path, env=self.env, capture_output=True, text=True, timeout=timeout)
        self._log(args, proc.stdout, proc.stderr)
        if check and proc.returncode != 0:
            raise AssertionError(f"{args} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
        return proc

    def dvc(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        return self.run([sys.executable, "-m", "dvc", *args], check=check)

    def repro_killed_when(self, target: str, ready: Callable[[int], bool], timeout: float = 600) -> dict:
        """Start `dvc repro target` in its own process group and SIGKILL the whole group (dvc and the stage process
        it runs) as soon as `ready(group_id)` is true. Returns the pids that were killed."""
        args = [sys.executable, "-m", "dvc", "repro", target]
        out, err = (self.logs / "killed.out").open("w"), (self.logs / "killed.err").open("w")
        proc = subprocess.Popen(args, cwd=self.path, env=self.env, stdout=out, stderr=err, start_new_session=True)
        deadline = time.monotonic() + timeout
        try:
            while not ready(proc.pid):
                if proc.poll() is not None:
                    raise AssertionError(f"`dvc repro {target}` ended ({proc.returncode}) before the kill point")
                if time.monotonic() > deadline:
                    raise AssertionError(f"`dvc repro {target}`: kill point not reached in {timeout} s")
                time.sleep(0.05)
            group = [p.pid for p in psutil.process_iter() if _pgid(p.pid) == proc.pid]
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            for pid in group:  # the stage process too (it is in the same group), not just dvc
                with _suppress_gone():
                    psutil.Process(pid).wait(timeout=30)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            out.close()
            err.close()
        (self.logs / "killed.out").rename(self.logs / f"{self._n + 1:02d}-killed-{target}.out")
        (self.logs / "killed.err").rename(self.logs / f"{self._n + 1:02d}-killed-{target}.err")
        self._n += 1
        return {"dvc_pid": proc.pid, "group": group}

    def copy(self, dest: Path) -> Workspace:
        shutil.copytree(self.path, dest, symlinks=True)
        return Workspace(dest, dest.parent / f"{dest.name}-logs")

    def read_json(self, rel: str):
        return json.loads((self.path / rel).read_text())


def _pgid(pid: int) -> int | None:
    try:
        return os.getpgid(pid)
    except (ProcessLookupError, PermissionError):
        return None


class _suppress_gone:
    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        return exc_type is not None and issubclass(exc_type, (psutil.NoSuchProcess, psutil.TimeoutExpired))


def stage_running_for(module: str, seconds: float) -> Callable[[int], bool]:
    """True once a `python -m stages.<module>` process of the process group has been running for `seconds`."""

    def ready(group: int) -> bool:
        for p in psutil.process_iter(["cmdline", "create_time"]):
            if f"stages.{module}" in (p.info["cmdline"] or []) and _pgid(p.pid) == group:
                return time.time() - p.info["create_time"] >= seconds
        return False

    return ready


def checkpoint_saved(ws: Workspace, stage_dir: str) -> Callable[[int], bool]:
    """True once a checkpoint under checkpoints/<stage_dir>/ is complete (trainer_state.json, written last, parses)."""

    def ready(group: int) -> bool:
        for state in (ws.path / "checkpoints" / stage_dir).glob("checkpoint-*/trainer_state.json"):
            try:
                json.loads(state.read_text())
                return True
            except (OSError, ValueError):
                continue
        return False

    return ready


# ---------------------------------------------------------------------------------------------- the shared runs
_SESSION: dict = {}


def _init(root: Path) -> Workspace:
    ws = Workspace(root / "base", root / "base-logs")
    ws.path.mkdir()
    for name in ("pipeline", "stages", "flows"):  # flows: the stages import flows/stages.py (under Prefect)
        shutil.copytree(REPO / name, ws.path / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("dvc.yaml", ".dvcignore"):
        shutil.copy(REPO / name, ws.path / name)
    (ws.path / "params.yaml").write_text(PARAMS)
    ws.run(["git", "init", "-q"])
    ws.dvc("init", "-q")
    ws.dvc("config", "core.analytics", "false")
    ws.run(["git", "add", "-A"])
    ws.run(["git", "commit", "-qm", "init"])
    return ws


def reference(tmp_path_factory) -> dict:
    """The uninterrupted reference run of `dvc repro evaluate@uniform50`, built once per session, with snapshots:
    `base` (prepare + build_base done), `projector` (+ pretrain_projector), `tuned` (+ tune@uniform50) and `ref`
    (+ prune@uniform50, evaluate@uniform50). Each is a Workspace; copy it before changing anything."""
    if "ref" not in _SESSION:
        root = tmp_path_factory.mktemp("faults")
        ws = _init(root)
        started = time.perf_counter()
        ws.dvc("repro", "build_base")
        _SESSION["base"] = ws.copy(root / "snap-base")
        ws.dvc("repro", "pretrain_projector")
        _SESSION["projector"] = ws.copy(root / "snap-projector")
        ws.dvc("repro", "tune@uniform50")
        _SESSION["tuned"] = ws.copy(root / "snap-tuned")
        ws.dvc("repro", "evaluate@uniform50")
        _SESSION["ref"] = ws
        _SESSION["root"] = root
        _SESSION["seconds"] = time.perf_counter() - started
    return _SESSION


def full_run(tmp_path_factory) -> Workspace:
    """The reference workspace after a plain `dvc repro` (every stage, register included)."""
    shared = reference(tmp_path_factory)
    if "full" not in _SESSION:
        ws = shared["ref"]
        ws.dvc("repro")
        _SESSION["full"] = ws
    return _SESSION["full"]
