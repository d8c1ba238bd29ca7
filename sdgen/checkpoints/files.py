"""Read a single-file checkpoint into a flat ``{name: tensor}`` dict without running code from the file.

``.safetensors`` headers are checked by :func:`parse_safetensors_header` before the library maps the file,
so a header that lies about sizes or offsets ends in a clear message. ``.ckpt`` files (PyTorch pickles) are
read with torch's weights-only unpickler: only tensors, storages, plain containers, numbers and strings are
rebuilt, plus inert stand-ins for the PyTorch Lightning bookkeeping classes that original SD checkpoints name.
Anything else (``os.system``, ``eval``, an unknown module) stops the load before it is called.
"""

from __future__ import annotations

import json
import math
import pickle
import struct
import zipfile
from pathlib import Path
from typing import Any

from sdgen.errors import CheckpointError, UnsafeCheckpointError

SAFETENSORS_DTYPE_SIZES = {
    "BOOL": 1,
    "U8": 1,
    "I8": 1,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
    "I16": 2,
    "U16": 2,
    "F16": 2,
    "BF16": 2,
    "I32": 4,
    "U32": 4,
    "F32": 4,
    "I64": 8,
    "U64": 8,
    "F64": 8,
}
# A real SD header is ~100 KiB; the format caps it at 100 MB.
MAX_SAFETENSORS_HEADER = 100_000_000


class _LightningBookkeeping:
    """Inert stand-in for PyTorch Lightning objects pickled in original checkpoints (callbacks, loggers).

    The unpickler may create it and fill its ``__dict__``; it has no behaviour, so nothing runs.
    """


# Paths that original SD checkpoints name besides tensors. They map to inert objects, so a checkpoint
# loads the same with or without pytorch_lightning installed, and Lightning's code is never imported.
_LIGHTNING_NAMES = [
    f"{package}.callbacks.{module}.{cls}"
    for package in ("pytorch_lightning", "lightning.pytorch")
    for module, cls in (
        ("model_checkpoint", "ModelCheckpoint"),
        ("early_stopping", "EarlyStopping"),
        ("lr_monitor", "LearningRateMonitor"),
        ("progress", "TQDMProgressBar"),
    )
]


def _safe_globals() -> list[Any]:
    import numpy as np

    allowed: list[Any] = [(_LightningBookkeeping, name) for name in _LIGHTNING_NAMES]
    # numpy scalars (e.g. a float64 'best score') rebuild from raw bytes: no code, just data.
    scalar = np._core.multiarray.scalar if hasattr(np, "_core") else np.core.multiarray.scalar  # type: ignore[attr-defined]
    allowed += [(scalar, "numpy.core.multiarray.scalar"), (scalar, "numpy._core.multiarray.scalar"), np.dtype]
    allowed += [type(np.dtype(t)) for t in ("float64", "float32", "float16", "int64", "int32", "bool")]
    return allowed


def parse_safetensors_header(head: bytes, file_size: int) -> dict[str, dict[str, Any]]:
    """Validate a safetensors header (``head`` = the file's first bytes) against the file size.

    Returns ``{name: {"dtype", "shape", "data_offsets"}}``; raises ValueError naming the first lie found.
    """
    if file_size < 8 or len(head) < 8:
        raise ValueError("file is shorter than the 8-byte safetensors header length")
    (n,) = struct.unpack("<Q", head[:8])
    if n == 0 or n > MAX_SAFETENSORS_HEADER or 8 + n > file_size:
        raise ValueError(f"header length {n} does not fit in a file of {file_size} bytes")
    if len(head) < 8 + n:
        raise ValueError("header is truncated")
    try:
        header = json.loads(head[8 : 8 + n].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"header is not valid JSON ({e})") from None
    if not isinstance(header, dict):
        raise ValueError("header is not a JSON object")
    data_size = file_size - 8 - n
    spans = []
    tensors = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if not isinstance(info, dict):
            raise ValueError(f"tensor {name!r}: entry is not an object")
        dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
        if dtype not in SAFETENSORS_DTYPE_SIZES:
            raise ValueError(f"tensor {name!r}: unknown dtype {dtype!r}")
        if not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
            raise ValueError(f"tensor {name!r}: bad shape {shape!r}")
        if (
            not isinstance(offsets, list)
            or len(offsets) != 2
            or not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)
        ):
            raise ValueError(f"tensor {name!r}: bad data_offsets {offsets!r}")
        begin, end = offsets
        expected = math.prod(shape) * SAFETENSORS_DTYPE_SIZES[dtype]
        if not 0 <= begin <= end <= data_size:
            raise ValueError(f"tensor {name!r}: data_offsets {offsets} lie outside the {data_size} data bytes")
        if end - begin != expected:
            raise ValueError(f"tensor {name!r}: {end - begin} bytes stored for shape {shape} of {dtype}")
        spans.append((begin, end, name))
        tensors[name] = info
    spans.sort()
    for (_b0, e0, n0), (b1, _e1, n1) in zip(spans, spans[1:], strict=False):
        if b1 < e0:
            raise ValueError(f"tensors {n0!r} and {n1!r} overlap")
    return tensors


def _read_safetensors(path: Path) -> dict[str, Any]:
    from safetensors.torch import load_file

    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) == 8:
            (n,) = struct.unpack("<Q", head)
            head += f.read(min(n, MAX_SAFETENSORS_HEADER))
    try:
        parse_safetensors_header(head, size)
        return load_file(str(path), device="cpu")
    except Exception as e:  # the library's errors are not one class; name the file either way
        raise CheckpointError(f"{path}: damaged safetensors file: {e}") from e


def _read_pickle(path: Path) -> Any:
    import torch

    is_zip = zipfile.is_zipfile(path)
    try:
        with torch.serialization.safe_globals(_safe_globals()):
            return torch.load(path, map_location="cpu", weights_only=True, mmap=is_zip)
    except pickle.UnpicklingError as e:
        message = str(e)
        if "global" in message.lower() or "unsupported operand" in message.lower():
            what = _unsafe_name(message)
            raise UnsafeCheckpointError(
                f"{path}: refused: the pickle asks to run or build {what}, which a checkpoint never needs; "
                "nothing from it was run. Use a .safetensors copy of this model."
            ) from e
        raise CheckpointError(f"{path}: damaged checkpoint: {message.splitlines()[0]}") from e
    except Exception as e:  # torch raises many kinds (RuntimeError, EOFError, SafetensorError, ...) on junk
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise CheckpointError(f"{path}: damaged or truncated checkpoint ({first})") from e


def _unsafe_name(message: str) -> str:
    # torch says e.g. "Unsupported global: GLOBAL posix.system was not an allowed global by default."
    for line in message.splitlines():
        if "GLOBAL " in line:
            rest = line.split("GLOBAL ", 1)[1]
            return "'" + rest.split()[0] + "'"
    return "an object outside the allow-list"


def sniff_format(path: Path) -> str:
    """'safetensors', 'torch-zip', 'torch-pickle' or 'unknown', from the first bytes, not the suffix."""
    with open(path, "rb") as f:
        head = f.read(9)
    if head[:4] == b"PK\x03\x04":
        return "torch-zip"
    if len(head) == 9 and head[8:9] == b"{":
        return "safetensors"
    if head[:1] == b"\x80":
        return "torch-pickle"
    return "unknown"


def read_state_dict(path: Path) -> dict[str, Any]:
    """The flat tensor dict of a single-file checkpoint (the ``state_dict`` entry of a Lightning pickle)."""
    import torch

    if not path.exists():
        raise CheckpointError(f"--ckpt {path}: no such file")
    if path.is_dir():
        raise CheckpointError(f"--ckpt {path}: is a folder but not a diffusers model folder (no model_index.json)")
    try:
        size = path.stat().st_size
        fmt = sniff_format(path) if size else "empty"
    except OSError as e:
        raise CheckpointError(f"--ckpt {path}: cannot be read ({e.strerror})") from e
    if fmt == "empty":
        raise CheckpointError(f"--ckpt {path}: file is empty (0 bytes)")
    if fmt == "unknown":
        raise CheckpointError(f"--ckpt {path}: not a checkpoint (neither safetensors nor a PyTorch file)")
    if fmt == "safetensors":
        loaded: Any = _read_safetensors(path)
    else:
        loaded = _read_pickle(path)
    if isinstance(loaded, dict) and isinstance(loaded.get("state_dict"), dict):
        loaded = loaded["state_dict"]
    if not isinstance(loaded, dict):
        raise CheckpointError(f"--ckpt {path}: holds a {type(loaded).__name__}, not a dict of weights")
    tensors = {k: v for k, v in loaded.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}
    if not tensors:
        raise CheckpointError(f"--ckpt {path}: holds no weights")
    return tensors
