"""Atomic file writes: everything the workbench writes for the user goes through here.

A file is written under a temporary name in its own folder and renamed over the target, so a crash or
an interrupted run leaves either the old file or the new one, never a half-written one.
"""
from __future__ import annotations

import os
import tempfile
from typing import Any, Callable


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(path: str | os.PathLike, write: Callable[[Any], None], *, mode: str | None = None) -> str:
    """Write ``path`` atomically and return it as a string.

    ``write`` receives the temporary file's path when ``mode`` is None (for writers that open files
    themselves: ``torch.save``, ``zipfile``), else a file object opened with ``mode`` ('w', 'wb', ...;
    text is UTF-8). The folder is created when missing. On any exception the temporary file is removed
    and the exception propagates; the previous content of ``path`` is untouched.
    """
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    try:
        # mkstemp creates 0600; results and checkpoints should get the user's usual permissions.
        os.fchmod(fd, 0o666 & ~_umask())
        if mode is None:
            os.close(fd)
            write(tmp)
        else:
            encoding = None if "b" in mode else "utf-8"
            with os.fdopen(fd, mode, encoding=encoding) as fh:
                write(fh)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> str:
    """Write ``data`` to ``path`` atomically."""
    return atomic_write(path, lambda fh: fh.write(data), mode="wb")


def atomic_write_text(path: str | os.PathLike, text: str) -> str:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    return atomic_write(path, lambda fh: fh.write(text), mode="w")
