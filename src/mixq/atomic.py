"""Writing an output so that nobody ever sees half of it, and nothing is left behind by a run that died: the one
place mixq writes files and directories atomically (:func:`atomic_file`, :func:`write_bytes_atomic`,
:func:`atomic_dir`) and keeps one writer per output (:func:`lock_output`).

Temporaries live beside the output and carry their writer: ``.OUT.tmp-<pid>@<host>-XXXXXXXX`` (and
``.OUT.old-…`` while an existing ``OUT`` is being replaced).  An error or a signal turned into an exception
(``mixq.cli`` turns SIGTERM/SIGHUP into one) removes them on the way out; what a SIGKILL or a power cut leaves is
removed by the next write of the same output (:func:`remove_stale`): a temporary of this host whose process is
gone.  Temporaries of live processes and of other hosts (a shared file system) are never touched.
"""
from __future__ import annotations

import logging
import os
import re
import shutil
import socket
import tempfile
from contextlib import contextmanager
from pathlib import Path

from .fsmode import publish

log = logging.getLogger(__name__)


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9.]", "_", socket.gethostname()) or "host"


def temp_prefix(out: Path, kind: str = "tmp") -> str:
    """``.OUT.tmp-<pid>@<host>-``: the prefix of this process's temporaries for ``out`` (``kind``: tmp or old)."""
    return f".{Path(out).name}.{kind}-{os.getpid()}@{_host()}-"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def remove_stale(out: Path) -> list[Path]:
    """Remove the temporaries of ``out`` left by dead processes of this host; returns what was removed."""
    out = Path(out)
    if not out.parent.is_dir():
        return []
    pat = re.compile(rf"^\.{re.escape(out.name)}\.(?:tmp|old)-(\d+)@([^/]+)-[^-]+$")
    host, removed = _host(), []
    try:
        entries = list(out.parent.iterdir())
    except OSError:
        return []
    for p in entries:
        m = pat.match(p.name)
        if not m or m.group(2) != host or _alive(int(m.group(1))):
            continue
        try:
            shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
        except FileNotFoundError:
            pass  # another run cleaned it first
        except OSError as e:
            log.warning("cannot remove the stale temporary %s: %s", p, e)
            continue
        log.warning("removed %s, left by process %s that no longer runs", p, m.group(1))
        removed.append(p)
    return removed


@contextmanager
def atomic_file(out: Path):
    """Yield the path of a fresh, empty temporary sibling of ``out``; on success it is flushed to disk, given an
    ordinary file's mode and renamed over ``out`` in one step; on any error (or interrupt) it is deleted and ``out``
    is left as it was.  The caller decides beforehand whether replacing an existing ``out`` is allowed.
    Temporaries of ``out`` left by dead processes are removed first (:func:`remove_stale`)."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_stale(out)
    fd, name = tempfile.mkstemp(prefix=temp_prefix(out), dir=out.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        publish(tmp)  # mkstemp (and safetensors) make the file private; the result is an ordinary file
        os.replace(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_bytes_atomic(path: str | Path, data: bytes, *, overwrite: bool = False) -> Path:
    """Write ``data`` to ``path`` through :func:`atomic_file`; an existing file is replaced only with
    ``overwrite=True`` (CLI: ``--force``)."""
    p = Path(path)
    if p.exists() and not overwrite:
        raise FileExistsError(f"{p} already exists: choose another path or pass --force to replace it")
    with atomic_file(p) as tmp:
        tmp.write_bytes(data)
    return p


@contextmanager
def atomic_dir(out: Path):
    """Yield a fresh temporary sibling of ``out``; on success it replaces ``out`` in one rename.

    An existing ``out`` is moved aside first and removed only after the new directory is in place;
    on any error (or interrupt) the temporary directory is deleted and ``out`` is left as it was.
    The caller decides beforehand whether replacing an existing ``out`` is allowed.  Temporaries of
    ``out`` left by dead processes are removed first (:func:`remove_stale`).
    """
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_stale(out)
    tmp = Path(tempfile.mkdtemp(prefix=temp_prefix(out), dir=out.parent))
    try:
        yield tmp
        publish(tmp)  # mkdtemp, mkstemp and safetensors make things private; the result is an ordinary directory
        if out.exists():
            backup = Path(tempfile.mkdtemp(prefix=temp_prefix(out, "old"), dir=out.parent))
            os.replace(out, backup / "d")
            os.replace(tmp, out)
            shutil.rmtree(backup, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


# ---------------------------------------------------------------------------- one writer per output
class OutputBusy(OSError):
    """Another live process holds the lock of this output (``holder``: what it wrote into the lock file)."""


_held: dict[Path, int] = {}


def lock_path(out: Path) -> Path:
    return Path(out).parent / f".{Path(out).name}.lock"


def lock_output(out: Path) -> Path:
    """Take the lock of ``out`` (``.OUT.lock`` beside it, ``flock``) for the rest of this process or until
    :func:`release_outputs`; raises :class:`OutputBusy` at once, naming the holder, when another process has it.

    The kernel drops the lock when its process dies (SIGKILL included), so a lock is never stale; everything
    named from ``OUT`` (the walk checkpoint, the scratch measurement, the temporaries) is covered by it.
    """
    import fcntl
    import sys
    import time

    out = Path(out).absolute()
    if out in _held:
        return lock_path(out)
    path = lock_path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 4096, 0).decode(errors="replace").strip() or "a process that has not said"
            os.close(fd)
            raise OutputBusy(f"{out} is being written by another mixq run ({holder}): wait for it to finish, or "
                             "choose another --out") from None
        try:
            same = os.fstat(fd).st_ino == os.stat(path).st_ino  # not a lock file its last holder just removed
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    os.ftruncate(fd, 0)
    os.pwrite(fd, (f"pid {os.getpid()} on {socket.gethostname()}, since {time.strftime('%H:%M:%S')}: "
                   + " ".join(["mixq", *sys.argv[1:]])[:300]).encode(), 0)
    _held[out] = fd
    return path


def release_outputs() -> None:
    """Drop every lock :func:`lock_output` took (the lock files are removed while still held)."""
    while _held:
        out, fd = _held.popitem()
        try:
            lock_path(out).unlink(missing_ok=True)
        except OSError:
            pass
        os.close(fd)
