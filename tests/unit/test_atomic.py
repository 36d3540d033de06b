"""Atomic outputs: a process killed (SIGKILL) in the middle of writing a model directory, a dataset or a metrics file
leaves the destination absent or at its previous complete version, never half-written; what the kill left beside it
(`.<name>.tmp-<pid>-*`, `.<name>.old-<pid>-*`) is removed by the next successful write (pipeline/storage.py).

Each case runs the writer in a subprocess whose write is slowed down (a monkeypatched step that signals "mid-write"
through a marker file, then sleeps), kills it there, and inspects the files.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from pipeline import storage

REPO = Path(__file__).resolve().parents[2]


def kill_mid_write(code: str, tmp_path: Path, cwd: Path | None = None, timeout: float = 120) -> int:
    """Run `code` (which must create the file named by MARKER at its mid-write point, then block) in a new Python
    process; SIGKILL it once the marker exists. Returns the killed pid."""
    marker = tmp_path / f"mid-write-{time.monotonic_ns()}"
    env = {**os.environ, "PYTHONPATH": str(REPO), "MARKER": str(marker), "HF_HUB_OFFLINE": "1"}
    env.pop("VR_PARAMS", None)
    prelude = "import os, time\ndef mid_write():\n    open(os.environ['MARKER'], 'w').close()\n    time.sleep(600)\n"
    proc = subprocess.Popen([sys.executable, "-c", prelude + textwrap.dedent(code)], cwd=cwd or tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + timeout
    try:
        while not marker.exists():
            if proc.poll() is not None:
                raise AssertionError(f"writer exited ({proc.returncode}) before its mid-write point:\n{proc.stdout.read()}")
            assert time.monotonic() < deadline, "writer never reached its mid-write point"
            time.sleep(0.02)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        proc.stdout.close()
    assert proc.returncode == -signal.SIGKILL
    return proc.pid


def leftovers(out: Path) -> list[str]:
    return sorted(p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}."))


def tree(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): p.read_text() for p in sorted(root.rglob("*")) if p.is_file()}


# ---------------------------------------------------------------------------------------------- storage helpers
@pytest.mark.parametrize("previous", [False, True], ids=["first-write", "overwrite"])
def test_atomic_dir_killed_while_writing(tmp_path, previous):
    out = tmp_path / "models" / "tuned"
    if previous:
        with storage.atomic_dir(out) as d:
            (d / "config.json").write_text("old config")
            (d / "model.safetensors").write_text("old weights")
    before = tree(out) if previous else None

    pid = kill_mid_write(f"""
        from pipeline.storage import atomic_dir
        with atomic_dir({str(out)!r}) as d:
            (d / "config.json").write_text("new config")
            mid_write()  # killed here: weights not written yet
            (d / "model.safetensors").write_text("new weights")
    """, tmp_path)

    if previous:
        assert tree(out) == before, "the previous complete version must survive a kill mid-write"
    else:
        assert not out.exists(), "no half-written output"
    assert [n.rsplit("-", 1)[0] for n in leftovers(out)] == [f".tuned.tmp-{pid}"]  # the kill leaves its temp dir

    with storage.atomic_dir(out) as d:  # the next successful write
        (d / "config.json").write_text("next config")
        (d / "model.safetensors").write_text("next weights")
    assert tree(out) == {"config.json": "next config", "model.safetensors": "next weights"}
    assert leftovers(out) == [], "the next write removes what the killed writer left"


def test_atomic_dir_killed_between_the_two_renames(tmp_path):
    """The one moment the destination is missing: the old version was moved aside, the new not yet moved in. The
    destination is then absent (never partial) and the old version is whole under `.<name>.old-<pid>-*`."""
    out = tmp_path / "prepared"
    with storage.atomic_dir(out) as d:
        (d / "a.txt").write_text("old")
    kill_mid_write(f"""
        import os
        from pipeline import storage
        real_replace, calls = os.replace, []
        def replace(src, dst):
            calls.append(src)
            real_replace(src, dst)
            if len(calls) == 1:  # out -> .old: stop before tmp -> out
                mid_write()
        storage.os.replace = replace
        with storage.atomic_dir({str(out)!r}) as d:
            (d / "a.txt").write_text("new")
    """, tmp_path)
    assert not out.exists()
    (old,) = [tmp_path / n for n in leftovers(out) if ".old-" in n]
    assert tree(old) == {"a.txt": "old"}
    with storage.atomic_dir(out) as d:
        (d / "a.txt").write_text("next")
    assert tree(out) == {"a.txt": "next"} and leftovers(out) == []


@pytest.mark.parametrize("previous", [False, True], ids=["first-write", "overwrite"])
def test_atomic_write_json_killed_while_writing(tmp_path, previous):
    path = tmp_path / "metrics" / "eval" / "all.json"
    if previous:
        storage.atomic_write_json(path, {"visual_score": 0.5})
    kill_mid_write(f"""
        import os
        from pipeline import storage
        real_fsync = os.fsync
        def fsync(fd):  # the bytes are in the temp file, not yet renamed
            mid_write()
        storage.os.fsync = fsync
        storage.atomic_write_json({str(path)!r}, {{"visual_score": 0.9, "per_type": {{"digit": 1.0}}}})
    """, tmp_path)
    if previous:
        assert json.loads(path.read_text()) == {"visual_score": 0.5}
    else:
        assert not path.exists()
    assert len(leftovers(path)) == 1
    storage.atomic_write_json(path, {"visual_score": 0.7})
    assert json.loads(path.read_text()) == {"visual_score": 0.7} and leftovers(path) == []
    assert oct(path.stat().st_mode & 0o777) == oct(0o666 & ~_umask())  # not mkstemp's 0600


def test_a_running_writers_temp_is_left_alone(tmp_path):
    """Two processes writing the same destination: the sweep removes only dead writers' leftovers."""
    out = tmp_path / "out"
    live = tmp_path / f".out.tmp-{os.getppid()}-abc"  # the parent process (pytest's parent) is alive
    dead = tmp_path / ".out.tmp-999999999-abc"
    live.mkdir()
    dead.mkdir()
    storage.atomic_write_text(out, "x")
    assert live.exists() and not dead.exists()


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


# ----------------------------------------------------------------------------------------- a model, a dataset
def test_save_vlm_killed_while_saving_keeps_the_previous_model(tmp_path, micro_dir):
    """A real model directory (safetensors + processor) killed after the weights, before the processor files."""
    import pipeline.model

    out = tmp_path / "models" / "projector"
    model, processor = pipeline.model.load_vlm(micro_dir)
    pipeline.model.save_vlm(model, processor, out, extra_json={"selection.json": {"layers": [0]}})
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    kill_mid_write(f"""
        import pipeline.model
        model, processor = pipeline.model.load_vlm({str(micro_dir)!r})
        def slow_save(*args, **kwargs):
            mid_write()
        processor.save_pretrained = slow_save
        pipeline.model.save_vlm(model, processor, {str(out)!r}, extra_json={{"selection.json": {{"layers": [1]}}}})
    """, tmp_path)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert len(leftovers(out)) == 1

    pipeline.model.save_vlm(model, processor, out, extra_json={"selection.json": {"layers": [1]}})
    assert leftovers(out) == [] and json.loads((out / "selection.json").read_text()) == {"layers": [1]}
    pipeline.model.load_vlm(out)  # whole and loadable
    assert not list(out.glob("*.bin")) and list(out.glob("*.safetensors"))


def test_prepare_stage_killed_while_saving_the_dataset(tmp_path):
    """`python -m stages.prepare` killed while writing data/prepared (one split written, the next in progress): no
    data/prepared, no metrics/data.json; the next `python -m stages.prepare` writes them and leaves no temp dir."""
    params = tmp_path / "params.yaml"
    params.write_text("model: {profile: micro}\ndata: {image_size: 32, num_captions: 4, num_instruct: 5, "
                      "num_vqa_test: 5, text_qa_repeats: 1}\ntune: {runs: {all: {strategy: all}}}\n")
    pid = kill_mid_write("""
        import datasets, runpy, sys
        real = datasets.DatasetDict.save_to_disk
        def save(self, path, **kw):
            real(self, path, **kw)
            if path.endswith("visual"):
                mid_write()  # visual written, text not yet
        datasets.DatasetDict.save_to_disk = save
        sys.argv = ["stages.prepare"]
        runpy.run_module("stages.prepare", run_name="__main__")
    """, tmp_path, cwd=tmp_path)
    data = tmp_path / "data"
    assert not (data / "prepared").exists() and not (tmp_path / "metrics").exists()
    assert [n.split("-")[1] for n in leftovers(data / "prepared")] == [str(pid)]

    env = {**os.environ, "PYTHONPATH": str(REPO), "VR_PARAMS": str(params), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-m", "stages.prepare"], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (data / "prepared" / "visual").is_dir() and (tmp_path / "metrics" / "data.json").exists()
    assert sorted(p.name for p in data.iterdir()) == ["prepared"], "no temporary directory left behind"
