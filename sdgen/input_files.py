"""Reading a file a user names (a prompt file, a yaml): only a regular file, and only up to a size limit."""

from __future__ import annotations

import stat
from pathlib import Path

from sdgen.errors import InputError


def read_regular_file(path: Path, flag: str, limit: int) -> bytes:
    """The bytes of ``path``, which must be a regular file of at most ``limit`` bytes: a FIFO, a device or a
    folder is refused before it is opened (reading one could block forever or never end)."""
    try:
        info = path.stat()
    except FileNotFoundError:
        raise InputError(f"{flag} {path}: no such file") from None
    if stat.S_ISDIR(info.st_mode):
        raise InputError(f"{flag} {path}: is a folder, not a file") from None
    if not stat.S_ISREG(info.st_mode):
        raise InputError(f"{flag} {path}: not a regular file (a pipe, socket or device); give a file")
    if info.st_size > limit:
        raise InputError(f"{flag} {path}: {info.st_size} bytes, more than the {limit} allowed")
    with path.open("rb") as f:
        data = f.read(limit + 1)  # the file may have grown since stat
    if len(data) > limit:
        raise InputError(f"{flag} {path}: more than the {limit} bytes allowed")
    return data
