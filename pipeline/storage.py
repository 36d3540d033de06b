"""Local artifact writing: every output appears whole or not at all (write to a temporary path, then rename).

Temporary paths sit beside the destination and are named `.<name>.tmp-<pid>-<random>` (the replaced previous
version, for the instant of the swap: `.<name>.old-<pid>-<random>`). A process killed mid-write (SIGKILL, OOM,
pre-emption) leaves such a path behind but never a half-written destination; the next write of the same destination
removes the leftovers of writers that are no longer running (`sweep_stale`).

Every file written follows the process umask (0644 under the usual 022), the model weights included (safetensors
writes them 0600). An OSError writing an output (permission denied, disk full, read-only), or safetensors' error carrying one, is an
`OutputError` naming the output. Metrics files are strict JSON: a non-finite float is written as `null`, never `NaN`. One writer per
output: a stage holds `exclusive_lock` on its outputs for its whole run.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import math
import os
import re
import shutil
import socket
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from pipeline.errors import OutputBusyError, OutputError

# What an OSError while writing an output says about the output's place (not a bug, not a missing input).
OUTPUT_ERRNOS = {errno.EACCES, errno.EPERM, errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EFBIG, errno.ENOTDIR}


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
    with writing(out):
        out.parent.mkdir(parents=True, exist_ok=True)
        sweep_stale(out)
        tmp = Path(tempfile.mkdtemp(prefix=temp_prefix(out), dir=out.parent))
    try:
        with writing(out):
            yield tmp
            follow_umask(tmp)
        old = None
        with writing(out):
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
    with writing(path):
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
    except BaseException as err:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        if _refused(err):
            raise _output_error(path, _as_os_error(err)) from err
        raise


def finite_or_null(data: Any) -> Any:
    """`data` with every non-finite float (NaN, +-inf) replaced by None: JSON has no NaN, so it is written `null`."""
    if isinstance(data, float):
        return data if math.isfinite(data) else None
    if isinstance(data, dict):
        return {key: finite_or_null(value) for key, value in data.items()}
    if isinstance(data, (list, tuple)):
        return [finite_or_null(value) for value in data]
    return data


def atomic_write_json(path: str | os.PathLike, data: Any) -> None:
    """`data` as strict JSON (non-finite floats as null, see `finite_or_null`), written atomically."""
    atomic_write_text(path, json.dumps(finite_or_null(data), indent=2, sort_keys=True, allow_nan=False) + "\n")


def remove_output(path: str | os.PathLike) -> None:
    """Remove a stale output (a file or a directory) before its stage writes it again; an OutputError if it cannot."""
    path = Path(path)
    with writing(path):
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()


def write_together(writes: dict[Path, Callable[[], None]]) -> None:
    """Write a stage's outputs: each `path` by its `write()` (itself atomic), in order; when one fails, the ones
    already written are removed again, so the outputs appear all together or not at all."""
    done: list[Path] = []
    try:
        for path, write in writes.items():
            write()
            done.append(path)
    except BaseException:
        for path in reversed(done):
            with contextlib.suppress(OSError):
                remove_output(path)
        raise


def follow_umask(root: Path) -> None:
    """chmod every file and directory under `root` (itself included) to what the umask gives a new one: 0644 / 0755
    under umask 022 (executables keep their x bits). Writers that make their files 0600 (safetensors, tempfile) would
    otherwise leave a model that the rest of the group cannot read."""
    mask = _umask()
    for path in [root, *root.rglob("*")]:
        if path.is_symlink():
            continue
        mode = path.stat().st_mode
        full = 0o777 if path.is_dir() or mode & 0o111 else 0o666
        os.chmod(path, full & ~mask)


# ---------------------------------------------------------------------------------------------- refusals, locks
# safetensors (Rust) reports a failed write as SafetensorError("Error while serializing: I/O error: No space left on
# device (os error 28)"), not as an OSError: the OS error it carries is read back from its message.
_OS_ERROR_IN_MESSAGE = re.compile(r"I/O error: (?P<strerror>.*?) \(os error (?P<errno>\d+)\)")


def _as_os_error(err: BaseException) -> OSError | None:
    """`err` itself if it is an OSError; the OS error a writer library's own error carries (safetensors'); else None."""
    if isinstance(err, OSError):
        return err
    if type(err).__name__ == "SafetensorError":
        m = _OS_ERROR_IN_MESSAGE.search(str(err))
        if m:
            return OSError(int(m.group("errno")), m.group("strerror"))
    return None


def _refused(err: BaseException) -> bool:
    err = _as_os_error(err)
    return err is not None and not isinstance(err, OutputError) and err.errno in OUTPUT_ERRNOS


def _output_error(out: Path, err: OSError) -> OutputError:
    where = f" ({err.filename})" if err.filename and str(err.filename) != str(out) else ""
    return OutputError(f"cannot write {out}: {err.strerror or err}{where}")


@contextlib.contextmanager
def writing(out: str | os.PathLike) -> Iterator[None]:
    """Turn an OSError that refuses writing `out` (permission denied, disk full, read-only; see OUTPUT_ERRNOS) into
    one OutputError naming it. Other errors pass unchanged (a missing input is not the output's fault)."""
    try:
        yield
    except Exception as err:
        if _refused(err):
            raise _output_error(Path(out), _as_os_error(err)) from err
        raise


@contextlib.contextmanager
def exclusive_lock(path: str | os.PathLike, what: str,
                   busy: Callable[[str], Exception] | None = None) -> Iterator[None]:
    """Hold an exclusive lock on `path` (created if needed; it names its holder) while the block runs: the one writer
    of `what` (a stage's outputs). A second process fails at once with an OutputBusyError naming the holder's pid, or
    with `busy(holder)` when given (the pipeline flow's workspace lock). flock: the kernel releases the lock when the
    holder exits, even killed, so a stale file never blocks."""
    path = Path(path)
    with writing(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 512, 0).decode(errors="replace").strip() or "an unknown process"
            if busy is not None:
                raise busy(holder) from None
            raise OutputBusyError(f"{what} is being written by another process ({holder}; lock {path}): wait for it "
                                  "to finish, or stop it") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}".encode(), 0)
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the lock
