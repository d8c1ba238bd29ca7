"""sdgen: local Stable Diffusion from checkpoint files.

The public API (see :mod:`sdgen.api`) is importable from here; importing ``sdgen`` itself imports no torch,
the names are resolved when first used.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_PUBLIC = {
    "load_model": "sdgen.api",
    "run": "sdgen.api",
    "RunResult": "sdgen.engine",
    "LoadSpec": "sdgen.specs",
    "GenerationSpec": "sdgen.specs",
    "OutputSpec": "sdgen.specs",
    "Img2ImgInput": "sdgen.specs",
    "UpscaleInput": "sdgen.specs",
    "CancelToken": "sdgen.events",
    "Loaded": "sdgen.events",
    "Started": "sdgen.events",
    "Step": "sdgen.events",
    "Notice": "sdgen.events",
    "Saved": "sdgen.events",
    "Finished": "sdgen.events",
    "Stopped": "sdgen.events",
    "SdgenError": "sdgen.errors",
    "Cancelled": "sdgen.errors",
}
__all__ = ["__version__", *_PUBLIC]


def __getattr__(name: str) -> Any:
    if name in _PUBLIC:
        return getattr(importlib.import_module(_PUBLIC[name]), name)
    raise AttributeError(f"module 'sdgen' has no attribute {name!r}")
