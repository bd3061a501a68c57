"""File modes of what mixq writes: every output is an ordinary file (``0o666 & ~umask``, i.e. 0644 under the
usual umask 022) or directory (``0o777 & ~umask``), readable by other users like the rest of a directory.

Files written through ``tempfile.mkstemp`` / ``mkdtemp`` and ``safetensors.torch.save_file`` start private
(0600 / 0700); the atomic writers (:mod:`mixq.jsonio`, :mod:`mixq.atomic`, the GGUF writer, walk and
fine-tune checkpoints) call :func:`publish` on the temporary before renaming it into place.
"""
from __future__ import annotations

import os
from pathlib import Path


def umask() -> int:
    """The process umask, read without changing it where Linux allows (``/proc/self/status``)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)  # not thread-safe, but only where /proc is missing
    os.umask(mask)
    return mask


def file_mode() -> int:
    return 0o666 & ~umask()


def dir_mode() -> int:
    return 0o777 & ~umask()


def publish(path: str | os.PathLike) -> None:
    """Give ``path`` the mode of an ordinary new file, or, for a directory, give it and everything below it the
    modes of ordinary new directories and files (symlinks are left alone)."""
    p = Path(path)
    fmode, dmode = file_mode(), dir_mode()
    if not p.is_dir():
        os.chmod(p, fmode)
        return
    os.chmod(p, dmode)
    for root, dirs, files in os.walk(p):
        for d in dirs:
            q = os.path.join(root, d)
            if not os.path.islink(q):
                os.chmod(q, dmode)
        for f in files:
            q = os.path.join(root, f)
            if not os.path.islink(q):
                os.chmod(q, fmode)
