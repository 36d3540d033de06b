"""Security: credentials in the environment leave no trace, remote code stays off unless asked for, weights are
safetensors, torch.load is weights-only, local services bind the loopback interface.

The credential check runs a whole micro pipeline (`dvc repro`, every stage through `register`) with fake AWS keys in
the environment of every command (tests/helpers/fault_workspace.py; it reuses the reference run of test_resume.py when both
run in one session) and scans everything that run produced.
"""

from __future__ import annotations

import ast
import os
import re
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

import fault_workspace

REPO = fault_workspace.REPO
CODE_DIRS = ("pipeline", "stages", "flows", "bench")
SECRETS = [fault_workspace.FAKE_AWS["AWS_ACCESS_KEY_ID"], fault_workspace.FAKE_AWS["AWS_SECRET_ACCESS_KEY"],
           fault_workspace.FAKE_AWS["AWS_SECRET_ACCESS_KEY"].split("/", 1)[1]]  # also a fragment of the secret


@pytest.fixture(scope="module")
def full(tmp_path_factory) -> fault_workspace.Workspace:
    return fault_workspace.full_run(tmp_path_factory)


def code_files() -> list[Path]:
    return sorted(p for d in CODE_DIRS if (REPO / d).is_dir() for p in (REPO / d).rglob("*.py")
                  if "__pycache__" not in p.parts)


# ------------------------------------------------------------------------------------------------- credentials
def test_fake_aws_keys_in_the_environment_leave_no_trace(full):
    """Every file of every fault-test workspace (outputs, metrics, plots, dvc.lock, the DVC cache, the MLflow store
    and its artifacts) and every captured stdout/stderr of their `dvc` commands."""
    root = fault_workspace._SESSION["root"]
    assert "Running stage 'register'" in "".join(p.read_text() for p in root.glob("base-logs/*.out"))
    scanned, hits = 0, []
    for path in root.rglob("*"):
        if path.is_file() and not path.is_symlink():
            data = path.read_bytes()
            scanned += 1
            hits += [(str(path.relative_to(root)), s) for s in SECRETS if s.encode() in data]
    assert scanned > 100 and not hits, hits
    assert any(root.glob("base-logs/*.err")) and (full.path / "dvc.lock").exists()


def test_mlflow_params_and_tags_hold_no_credentials(full):
    db = sqlite3.connect(full.path / "mlflow.db")
    rows = []
    for table, cols in (("params", "key, value"), ("tags", "key, value"), ("experiment_tags", "key, value"),
                        ("runs", "name, run_uuid"), ("registered_model_tags", "key, value"),
                        ("model_version_tags", "key, value")):
        rows += [(table, *r) for r in db.execute(f"select {cols} from {table}")]
    assert len([r for r in rows if r[0] == "params"]) > 20, "the run logged its params"
    assert any(r[0] == "model_version_tags" for r in rows), "the register stage tagged model versions"
    leaks = [r for r in rows for s in SECRETS if s in " ".join(map(str, r))]
    assert not leaks, leaks
    assert not [r for r in rows if re.search(r"aws_|secret|access_key|password|credential", str(r[1]), re.I)], \
        "no credential-looking keys"


def test_no_credentials_in_the_repository():
    """Params, DVC and Prefect config, code: no AWS key ids and no secret assignments (the fake keys of the tests
    are the exception, by name)."""
    skip = {".venv", ".git", ".dvc", "__pycache__", ".pytest_cache", "data", "models", "checkpoints", "mlruns",
            "mlartifacts", ".services"}
    files = [p for p in REPO.rglob("*") if p.is_file() and not skip & set(p.relative_to(REPO).parts)
             and p.suffix in {".py", ".yaml", ".yml", ".toml", ".cfg", ".ini", ".json", ".md", ".sh", ".txt", ""}
             and p.stat().st_size < 2_000_000]
    files += [REPO / ".dvc" / "config"]
    key_id = re.compile(r"\b(AKIA|ASIA)[0-9A-Z]{16}\b")
    assignment = re.compile(r"(aws_secret_access_key|secret_access_key|secret_key|password)\s*[=:]\s*['\"]?[A-Za-z0-9/+]{30,}", re.I)
    hits = []
    for path in files:
        text = path.read_text(errors="ignore")
        hits += [(str(path.relative_to(REPO)), m.group(0)) for m in key_id.finditer(text)
                 if m.group(0) != fault_workspace.FAKE_AWS["AWS_ACCESS_KEY_ID"]]
        hits += [(str(path.relative_to(REPO)), m.group(0)) for m in assignment.finditer(text)
                 if fault_workspace.FAKE_AWS["AWS_SECRET_ACCESS_KEY"] not in m.group(0)]
    assert not hits, hits
    def keys(node, prefix=""):
        if isinstance(node, dict):
            for k, v in node.items():
                yield f"{prefix}{k}"
                yield from keys(v, f"{prefix}{k}.")

    for params_file in [REPO / "params.yaml", *sorted((REPO / "params").glob("*.yaml"))]:
        named = [k for k in keys(yaml.safe_load(params_file.read_text()))
                 if re.search(r"(?i)aws|secret|password|credential|access_key|api_key|token$", k)]
        assert not named, (params_file, named)


# ------------------------------------------------------------------------------------------- trust_remote_code
def test_trust_remote_code_is_off_unless_params_turn_it_on(full):
    from pipeline import config

    assert config.validate({"tune": {"runs": {"all": {"strategy": "all"}}}}).model.trust_remote_code is False
    for params_file in [REPO / "params.yaml", *sorted((REPO / "params").glob("*.yaml"))]:
        assert (yaml.safe_load(params_file.read_text()).get("model") or {}).get("trust_remote_code", False) is False
    logs = "".join(p.read_text() for p in fault_workspace._SESSION["root"].glob("*-logs/*.err"))
    assert "trust_remote_code=True" not in logs  # the whole pipeline ran without it
    # no call in the code hard-wires trust_remote_code=True
    for path in code_files():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.keyword) and node.arg == "trust_remote_code":
                assert not (isinstance(node.value, ast.Constant) and node.value.value is True), path


def test_trust_remote_code_from_params_logs_a_warning(tmp_path, micro4_dir):
    bad = tmp_path / "params.yaml"
    bad.write_text(yaml.safe_dump({"model": {"profile": "hf", "checkpoint": str(micro4_dir), "trust_remote_code": True},
                                   "tune": {"runs": {"all": {"strategy": "all"}}}}))
    env = {**os.environ, "PYTHONPATH": str(REPO), "VR_PARAMS": str(bad), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-m", "stages.build_base"], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "trust_remote_code=True: code shipped with the checkpoint will run on this machine" in proc.stderr


# ------------------------------------------------------------------------------------------------ serialization
def test_every_model_is_saved_as_safetensors_only(full):
    model_dirs = {p.parent for p in (full.path / "models").rglob("config.json")}
    assert len(model_dirs) >= 6  # base, projector, tuned/{all,uniform50}, pruned/{all,uniform50}
    for d in model_dirs:
        assert list(d.glob("*.safetensors")), d
    pickled = [p for p in (full.path / "models").rglob("*") if p.suffix in {".bin", ".pt", ".pth", ".pkl", ".ckpt"}]
    assert not pickled, pickled


def torch_load_calls(source: str) -> list[ast.Call]:
    tree = ast.parse(source)
    names = {"torch.load"}
    for node in ast.walk(tree):  # `from torch import load [as x]`
        if isinstance(node, ast.ImportFrom) and node.module == "torch":
            names |= {a.asname or a.name for a in node.names if a.name == "load"}
    calls = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            f = node.func
            dotted = f.id if isinstance(f, ast.Name) else (
                f"{f.value.id}.{f.attr}" if isinstance(f, ast.Attribute) and isinstance(f.value, ast.Name) else "")
            if dotted in names:
                calls.append(node)
    return calls


def weights_only(call: ast.Call) -> bool:
    return any(k.arg == "weights_only" and isinstance(k.value, ast.Constant) and k.value.value is True
               for k in call.keywords)


def test_every_torch_load_is_weights_only():
    # the checker itself: it finds both spellings and tells them apart
    sample = "import torch\nfrom torch import load as L\ntorch.load('a', weights_only=True)\nL('b')\n"
    assert [weights_only(c) for c in torch_load_calls(sample)] == [True, False]
    unsafe = [(str(p.relative_to(REPO)), c.lineno) for p in code_files() for c in torch_load_calls(p.read_text())
              if not weights_only(c)]
    assert not unsafe, f"torch.load without weights_only=True: {unsafe}"
    pickles = [str(p.relative_to(REPO)) for p in code_files() if re.search(r"\bpickle\.loads?\(", p.read_text())]
    assert not pickles, pickles


# -------------------------------------------------------------------------------------------------- services
def test_local_services_bind_loopback_by_default():
    """flows/services.py (read only): the bind address is 127.0.0.1 and every server command line uses it."""
    path = REPO / "flows" / "services.py"
    if not path.exists():
        pytest.skip("flows/services.py is not in this checkout")
    source = path.read_text()
    tree = ast.parse(source)
    hosts = [n.value for n in ast.walk(tree) if isinstance(n, ast.Assign)
             and any(isinstance(t, ast.Name) and t.id == "HOST" for t in n.targets)]
    assert len(hosts) == 1 and isinstance(hosts[0], ast.Constant) and hosts[0].value == "127.0.0.1"
    for f in sorted((REPO / "flows").glob("*.py")):
        assert "0.0.0.0" not in f.read_text(), f"{f.name} mentions 0.0.0.0"
    flags = 0
    for node in ast.walk(tree):
        if isinstance(node, ast.List):
            items = node.elts
            for i, item in enumerate(items):
                if isinstance(item, ast.Constant) and item.value in ("--host", "--bind", "-ip", "-ip.bind"):
                    assert i + 1 < len(items), ast.unparse(node)[:200]
                    nxt = items[i + 1]
                    assert (isinstance(nxt, ast.Name) and nxt.id == "HOST") or (
                        isinstance(nxt, ast.Constant) and nxt.value == "127.0.0.1"), ast.unparse(node)[:200]
                    flags += 1
                if isinstance(item, ast.JoinedStr) and re.match(r"-ip(\.bind)?=", ast.unparse(item).strip("f'\"")):
                    assert "{HOST}" in ast.unparse(item), ast.unparse(item)
                    flags += 1
    assert flags >= 3, "expected the SeaweedFS, MLflow and Prefect command lines to name their bind address"
