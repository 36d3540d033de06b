"""The sweep's exchange area in the DVC remote, for the small files DVC itself does not move: the uncached outputs
(metrics, loss and importance plots: `cache: false` in dvc.yaml, so `dvc push` leaves them out), and the params.yaml
and dvc.lock a child starts from. Each transfer is one gzipped tarball at
`<remote>/sweeps/<sweep flow run id>/<selection>/<name>.tar.gz`, written and read through DVC's own filesystem for the
remote (the same credentials, endpoint and remote types as `dvc push`); Prefect carries only its key.

    <remote>/sweeps/<sweep>/<selection>/inputs.tar.gz             parent -> child: params.yaml, dvc.lock, inputs
    <remote>/sweeps/<sweep>/<selection>/outputs-<run id>.tar.gz   child -> parent: its stages' uncached outputs
                                                                  and run records (runs/)

The parent removes its sweep's area when it ends. (`dvc gc --cloud` leaves it alone: it only deletes what looks like
a cache object.)"""

from __future__ import annotations

import os
import tarfile
import tempfile
from pathlib import Path, PurePosixPath

from prefect import task

from flows.workspace import RETRY_TRANSIENT, PipelineError, TransientError, is_transient, run_logger

AREA = "sweeps"
RUN_RECORDS = "runs"  # the stages' run records (stages/_paths.RUNS): a child sends its own back with its outputs


def pack(workspace: Path, paths: list[str], tarball: Path) -> list[str]:
    """Write every file at or under `paths` (relative to the workspace; all must exist) into a gzipped tarball;
    returns the files' relative paths."""
    files: list[str] = []
    for rel in paths:
        path = workspace / rel
        if path.is_file():
            found = [path]
        elif path.is_dir():
            found = sorted(f for f in path.rglob("*") if f.is_file())
        else:
            raise PipelineError(f"{path} is missing: a stage should have written it")
        files += [f.relative_to(workspace).as_posix() for f in found]
    with tarfile.open(tarball, "w:gz") as tar:
        for rel in files:
            tar.add(workspace / rel, arcname=rel, recursive=False)
    return files


def is_allowed(rel: str, allowed: list[str]) -> bool:
    """Whether `rel` is one of the `allowed` workspace paths or inside one (never absolute, never through `..`)."""
    parts = PurePosixPath(rel).parts
    if rel.startswith("/") or ".." in parts or not parts:
        return False
    return any(rel == a.rstrip("/") or rel.startswith(a.rstrip("/") + "/") for a in allowed)


def unpack(tarball: Path, workspace: Path, allowed: list[str], source: str) -> list[str]:
    """Write the tarball's files into the workspace, byte for byte, each atomically; only regular files at or under
    the `allowed` paths (anything else, and nothing is written). Returns their relative paths."""
    with tarfile.open(tarball, "r:gz") as tar:
        members = tar.getmembers()
        for member in members:
            if not member.isfile() or not is_allowed(member.name, allowed):
                raise PipelineError(f"{source} sent {member.name!r}, which is not one of its files {allowed}")
        for member in members:
            dest = workspace / member.name
            dest.parent.mkdir(parents=True, exist_ok=True)
            tmp = dest.with_name(f".{dest.name}.sweep-tmp")
            tmp.write_bytes(tar.extractfile(member).read())
            os.replace(tmp, dest)
    return [member.name for member in members]


def key(sweep_id: str, selection: str, name: str) -> str:
    """Where a transfer lies, relative to the remote's root."""
    if not sweep_id or not selection or "/" in sweep_id + selection + name:
        raise PipelineError(f"bad exchange key parts {(sweep_id, selection, name)!r}")
    return f"{AREA}/{sweep_id}/{selection}/{name}.tar.gz"


def _remote(workspace: Path, remote: str | None):
    """DVC's filesystem of the remote and the remote's root path in it."""
    from dvc.repo import Repo

    with Repo(str(workspace)) as repo:
        found = repo.cloud.get_remote(remote, "sweep")
    return found.fs, found.path


def _transfer_error(what: str, err: Exception) -> PipelineError:
    text = f"{type(err).__name__}: {err}"
    if isinstance(err, (FileNotFoundError, PermissionError)) or not is_transient(text):
        return PipelineError(f"{what}: {text}")
    return TransientError(f"{what}: {text}")


@task(**RETRY_TRANSIENT)
def send_files(workspace: Path, remote: str | None, exchange_key: str, paths: list[str]) -> list[str]:
    """Pack `paths` of the workspace and upload them to `exchange_key` in the remote; returns the files sent."""
    fs, root = _remote(workspace, remote)
    with tempfile.TemporaryDirectory(prefix="vr-sweep-") as tmp:
        tarball = Path(tmp) / "files.tar.gz"
        files = pack(workspace, paths, tarball)
        try:
            fs.put_file(str(tarball), fs.join(root, exchange_key))
        except Exception as err:  # noqa: BLE001 (classified: transient or not)
            raise _transfer_error(f"uploading {exchange_key} to the DVC remote", err) from None
    run_logger().info("sent %d file(s) as %s", len(files), exchange_key)
    return files


@task(**RETRY_TRANSIENT)
def receive_files(workspace: Path, remote: str | None, exchange_key: str, allowed: list[str],
                  source: str) -> list[str]:
    """Download `exchange_key` from the remote and write its files into the workspace (only at or under `allowed`)."""
    fs, root = _remote(workspace, remote)
    with tempfile.TemporaryDirectory(prefix="vr-sweep-") as tmp:
        tarball = Path(tmp) / "files.tar.gz"
        try:
            fs.get_file(fs.join(root, exchange_key), str(tarball))
        except Exception as err:  # noqa: BLE001 (classified: transient or not)
            raise _transfer_error(f"downloading {exchange_key} from the DVC remote", err) from None
        files = unpack(tarball, workspace, allowed, source)
    run_logger().info("received %d file(s) from %s", len(files), exchange_key)
    return files


def remove_area(workspace: Path, remote: str | None, sweep_id: str) -> None:
    """Remove the sweep's exchange area (best effort: what is left is small, and the next sweep has its own)."""
    if not sweep_id:
        return
    try:
        fs, root = _remote(workspace, remote)
        path = fs.join(root, AREA, sweep_id)
        if fs.exists(path):
            fs.rm(path, recursive=True)
    except Exception as err:  # noqa: BLE001 (a leftover is harmless)
        run_logger().warning("could not remove the sweep's exchange area %s/%s in the DVC remote: %s", AREA, sweep_id,
                             err)
