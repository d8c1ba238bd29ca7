"""Reading a file a user names: only a regular file (a FIFO or a device could block forever or never end),
and, where sdgen reads it whole, only up to a size limit."""

from __future__ import annotations

import os
import stat
from pathlib import Path

from sdgen.errors import InputError, SdgenError


def require_regular_file(path: Path, flag: str, error: type[SdgenError] = InputError) -> os.stat_result:
    """``path``'s stat, or ``error`` naming the flag when it is missing, a folder, a pipe, socket or device."""
    try:
        info = path.stat()
    except FileNotFoundError:
        raise error(f"{flag} {path}: no such file") from None
    if stat.S_ISDIR(info.st_mode):
        raise error(f"{flag} {path}: is a folder, not a file")
    if not stat.S_ISREG(info.st_mode):
        raise error(f"{flag} {path}: not a regular file (a pipe, socket or device); give a file")
    return info


def read_regular_file(path: Path, flag: str, limit: int, error: type[SdgenError] = InputError) -> bytes:
    """The bytes of ``path``, a regular file of at most ``limit`` bytes (checked before it is opened)."""
    info = require_regular_file(path, flag, error)
    if info.st_size > limit:
        raise error(f"{flag} {path}: {info.st_size} bytes, more than the {limit} allowed")
    with path.open("rb") as f:
        data = f.read(limit + 1)  # the file may have grown since stat
    if len(data) > limit:
        raise error(f"{flag} {path}: more than the {limit} bytes allowed")
    return data
