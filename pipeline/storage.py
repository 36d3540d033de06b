"""Local artifact writing: every output appears whole or not at all (write to a temporary path, then rename).

Temporary paths sit beside the destination and are named `.<name>.tmp-<pid>-<random>` (the replaced previous
version, for the instant of the swap: `.<name>.old-<pid>-<random>`). A process killed mid-write (SIGKILL, OOM,
pre-emption) leaves such a path behind but never a half-written destination; the next write of the same destination
removes the leftovers of writers that are no longer running (`sweep_stale`).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def temp_prefix(out: str | os.PathLike, kind: str = "tmp") -> str:
    """The name prefix of this process's temporary (`tmp`) or replaced (`old`) paths for `out`."""
    return f".{Path(out).name}.{kind}-{os.getpid()}-"


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def sweep_stale(out: str | os.PathLike) -> list[Path]:
    """Remove the temporary and replaced paths that dead writers left beside `out`; returns what was removed.
    Paths of running processes (a concurrent writer) are left alone."""
    out = Path(out)
    if not out.parent.is_dir():
        return []
    pattern = re.compile(rf"^\.{re.escape(out.name)}\.(?:tmp|old)-(\d+)-")
    removed = []
    for path in out.parent.iterdir():
        m = pattern.match(path.name)
        if m is None or _pid_alive(int(m.group(1))):
            continue
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
        removed.append(path)
    return removed


@contextlib.contextmanager
def atomic_dir(out_dir: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary directory beside `out_dir`; on success it replaces `out_dir`, on error it is removed."""
    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    sweep_stale(out)
    tmp = Path(tempfile.mkdtemp(prefix=temp_prefix(out), dir=out.parent))
    os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp creates 0700
    try:
        yield tmp
        old = None
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=temp_prefix(out, "old"), dir=out.parent))
            old.rmdir()
            os.replace(out, old)
        try:
            os.replace(tmp, out)
        except BaseException:
            if old is not None:  # the previous version goes back: a failed swap leaves out_dir as it was
                os.replace(old, out)
            raise
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sweep_stale(path)
    fd, tmp = tempfile.mkstemp(prefix=temp_prefix(path), dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp creates 0600
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_json(path: str | os.PathLike, data: Any) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=True) + "\n")
