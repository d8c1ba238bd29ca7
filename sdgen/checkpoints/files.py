"""Read a single-file checkpoint into a flat ``{name: tensor}`` dict without running code from the file.

The tensors are views of the file mapped into memory (nothing is read until a tensor's data is used), so
the loader can copy them one at a time into the modules, in the run's dtype, and hand each one's pages back
(:meth:`MappedStateDict.release`): the peak memory of a load is the weights plus one tensor, not the file
plus the weights.

``.safetensors`` headers are checked by :func:`parse_safetensors_header` before the file is mapped,
so a header that lies about sizes or offsets ends in a clear message. ``.ckpt`` files (PyTorch pickles) are
read with torch's weights-only unpickler: only tensors, storages, plain containers, numbers and strings are
rebuilt, plus inert stand-ins for the PyTorch Lightning bookkeeping classes that original SD checkpoints name.
Anything else (``os.system``, ``eval``, an unknown module) stops the load before it is called.
"""

from __future__ import annotations

import ctypes
import json
import math
import mmap
import pickle
import re
import struct
import warnings
import zipfile
from pathlib import Path
from typing import Any

from sdgen.errors import CheckpointError, UnsafeCheckpointError
from sdgen.input_files import require_regular_file
from sdgen.runtime.device import libc

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
# safetensors dtype -> torch dtype name
TORCH_DTYPES = {
    "BOOL": "bool",
    "U8": "uint8",
    "I8": "int8",
    "F8_E4M3": "float8_e4m3fn",
    "F8_E5M2": "float8_e5m2",
    "I16": "int16",
    "U16": "uint16",
    "F16": "float16",
    "BF16": "bfloat16",
    "I32": "int32",
    "U32": "uint32",
    "F32": "float32",
    "I64": "int64",
    "U64": "uint64",
    "F64": "float64",
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


class MappedStateDict(dict):
    """A checkpoint's ``{name: tensor}``, the tensors being views of the file mapped read-only (or, for a
    pickle that cannot be mapped, ordinary tensors). It keeps the mapping alive for as long as it lives, so
    :meth:`release` never touches memory that is not the file's."""

    def __init__(self, tensors: dict[str, Any], mapped: list[tuple[int, int]], keep: list[Any]) -> None:
        super().__init__(tensors)
        self._mapped = mapped  # [start, end) address ranges that belong to file mappings
        self._keep = keep  # the objects that own those mappings

    def release(self, tensor: Any) -> None:
        """Hand back the resident pages behind ``tensor`` (a view of the mapped file; anything else is left
        alone). The data stays valid: touched again, it is read from the page cache."""
        start = tensor.data_ptr()
        end = start + tensor.numel() * tensor.element_size()
        if not any(a <= start and end <= b for a, b in self._mapped):
            return
        page = mmap.PAGESIZE
        first, last = -(-start // page) * page, end // page * page  # whole pages inside the tensor only
        if last > first:
            _madvise_dontneed(first, last - first)


def _madvise_dontneed(address: int, length: int) -> None:
    c = libc()
    if c is None or not hasattr(c, "madvise"):
        return  # not glibc-like: the pages stay resident until the mapping goes (more memory, same pixels)
    madv_dontneed = 4  # the same value on Linux and the BSDs
    c.madvise(ctypes.c_void_p(address), ctypes.c_size_t(length), madv_dontneed)


def _read_safetensors(path: Path) -> MappedStateDict:
    """Map the file and view each tensor in place: the header is validated first, the data not read."""
    import torch

    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) == 8:
            (n,) = struct.unpack("<Q", head)
            head += f.read(min(n, MAX_SAFETENSORS_HEADER))
        try:
            header = parse_safetensors_header(head, size)
            mapping = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        except (ValueError, OSError) as e:
            raise CheckpointError(f"{path}: damaged safetensors file: {e}") from e
    with warnings.catch_warnings():  # torch warns that the buffer is read-only: it is, and stays so
        warnings.simplefilter("ignore")
        data = torch.frombuffer(mapping, dtype=torch.uint8)
    base = 8 + struct.unpack("<Q", head[:8])[0]
    tensors = {}
    for name, info in header.items():
        begin, end = info["data_offsets"]
        raw = data[base + begin : base + end]
        dtype = getattr(torch, TORCH_DTYPES[info["dtype"]])
        try:
            flat = raw.view(dtype)
        except RuntimeError:  # an offset not aligned to the element size: this tensor is copied
            flat = raw.clone().view(dtype)
        tensors[name] = flat.reshape(info["shape"])
    start = data.data_ptr()
    return MappedStateDict(tensors, [(start, start + size)], [data, mapping])


FIRST_PROTOCOL_4_OPCODE = 0x8C  # SHORT_BINUNICODE; then BINUNICODE8, ..., STACK_GLOBAL, MEMOIZE, FRAME (0x95)


def _read_pickle(path: Path) -> Any:
    import torch

    try:
        with torch.serialization.safe_globals(_safe_globals()), warnings.catch_warnings():
            # torch's note on a newer pickle protocol: the error below says what matters, in one line
            warnings.filterwarnings("ignore", message="Detected pickle protocol", category=UserWarning)
            return torch.load(path, map_location="cpu", weights_only=True, mmap=_mappable(path))
    except pickle.UnpicklingError as e:
        message = str(e)
        operand = re.search(r"Unsupported operand (\d+)", message)
        if operand and int(operand.group(1)) >= FIRST_PROTOCOL_4_OPCODE:
            raise CheckpointError(
                f"{path}: saved with pickle protocol 4 or later, which torch's safe loader cannot read (nothing "
                "from it was run); use a .safetensors copy, or re-save it with torch.save(..., pickle_protocol=2)"
            ) from e
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


def _mappable(path: Path) -> bool:
    """Whether torch can map the file instead of reading it: a zip whose members are all stored, not
    compressed (a checkpoint re-packed by ``zip -r`` deflates them, and a mapped view of deflated bytes is
    garbage; torch reads those correctly without mmap)."""
    try:
        with zipfile.ZipFile(path) as z:
            return all(info.compress_type == zipfile.ZIP_STORED for info in z.infolist())
    except (zipfile.BadZipFile, OSError, ValueError):
        return False


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


def read_state_dict(path: Path) -> MappedStateDict:
    """The flat tensor dict of a single-file checkpoint (the ``state_dict`` entry of a Lightning pickle)."""
    import torch

    if not path.exists():
        raise CheckpointError(f"--ckpt {path}: no such file")
    if path.is_dir():
        raise CheckpointError(f"--ckpt {path}: is a folder but not a diffusers model folder (no model_index.json)")
    try:
        size = require_regular_file(path, "--ckpt", CheckpointError).st_size
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
    if isinstance(loaded, MappedStateDict):
        return MappedStateDict(tensors, loaded._mapped, loaded._keep)
    if fmt == "torch-zip" and _mappable(path):
        # torch.load mapped the file: every tensor's storage is a slice of that one mapping
        storages = {id(s): s for s in (t.untyped_storage() for t in tensors.values())}.values()
        spans = [(s.data_ptr(), s.data_ptr() + s.nbytes()) for s in storages]
        return MappedStateDict(tensors, spans, list(storages))
    return MappedStateDict(tensors, [], [])
