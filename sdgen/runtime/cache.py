"""sdgen's cache folder (model hashes, compiled graphs): $XDG_CACHE_HOME/sdgen or ~/.cache/sdgen."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "sdgen"
