"""Choose the device and dtype once, and say so.

auto: CUDA in fp16, else Apple MPS in fp16, else the CPU in fp32. Half precision is never used on the CPU
(the reference scripts fail there with "slow_conv2d_cpu not implemented for 'Half'"); bf16 on the CPU is
allowed when asked for. A device asked for by name that is absent is an error, never a silent fallback.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from sdgen.errors import DeviceError, UsageError

DEVICE_CHOICES = ("auto", "cuda", "mps", "cpu")  # plus cuda:N
PRECISIONS = ("auto", "fp32", "fp16", "bf16")
PRECISION_ALIASES = {"full": "fp32", "autocast": "auto"}  # the reference scripts' spellings
PRECISION_CHOICES = PRECISIONS + tuple(PRECISION_ALIASES)


@dataclass(frozen=True)
class Placement:
    device: str  # "cuda:0", "mps", "cpu"
    precision: str  # "fp32", "fp16", "bf16"

    @property
    def torch_device(self):
        import torch

        return torch.device(self.device)

    @property
    def dtype(self):
        import torch

        return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[self.precision]

    def describe(self) -> str:
        return f"{self.device}, {self.precision}"


M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters
TUNED_MMAP_THRESHOLD = 1 << 30
LARGE_BUFFER = 32 << 20  # glibc's own largest mmap threshold: larger blocks are mapped, and unmapped when freed
_tuned = False  # whether tune_cpu_allocator changed glibc's allocator


@functools.cache
def libc() -> Any:
    """The C library through ctypes (glibc's malloc tuning, madvise), or None where it cannot be loaded."""
    import ctypes
    import ctypes.util

    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    except OSError:
        return None


def tune_cpu_allocator() -> None:
    """Keep freed activation buffers in glibc's heap instead of returning them to the OS: the UNet's
    32 MiB-class activations otherwise cross the mmap threshold and are page-faulted in again on every call
    (measured: 18% of CPU time in the kernel during a tiled upscale). Numerics are unchanged."""
    global _tuned
    import sys

    c = libc()
    if not sys.platform.startswith("linux") or not (hasattr(c, "mallopt") and hasattr(c, "malloc_trim")):
        return  # not glibc (e.g. musl): nothing to tune
    c.mallopt(M_MMAP_THRESHOLD, TUNED_MMAP_THRESHOLD)
    c.mallopt(M_TRIM_THRESHOLD, TUNED_MMAP_THRESHOLD)
    _tuned = True


@contextlib.contextmanager
def large_buffers_returned() -> Iterator[None]:
    """For a step of few, large buffers (the VAE decode: 256 MiB tensors at 512 px in fp32): hand the heap's
    free memory back first, and map blocks over 32 MiB separately so that each goes back to the OS when freed.
    With the tuned allocator the decode's large blocks pile up in the heap instead (measured on the 2-core
    EPYC, SD 1.5 fp32 512 px decode: +1.26 GiB peak against +0.79 GiB, for 1 s more of page faults)."""
    if not _tuned:
        yield
        return
    c = libc()
    c.malloc_trim(0)
    c.mallopt(M_MMAP_THRESHOLD, LARGE_BUFFER)
    try:
        yield
    finally:
        c.mallopt(M_MMAP_THRESHOLD, TUNED_MMAP_THRESHOLD)


def validate_device_name(name: str) -> str:
    """Syntax only (no torch import): auto, cpu, mps, cuda or cuda:N."""
    name = name.strip().lower()
    if name in DEVICE_CHOICES:
        return name
    if name.startswith("cuda:") and name[5:].isdigit():
        return name
    raise UsageError(f"--device {name!r}: expected one of auto, cuda, cuda:N, mps, cpu")


def choose(device: str = "auto", precision: str = "auto") -> Placement:
    import torch

    device = validate_device_name(device)
    precision = PRECISION_ALIASES.get(precision, precision)
    if precision not in PRECISIONS:
        raise UsageError(f"--precision {precision!r}: expected one of auto, fp32, fp16, bf16 (or full, autocast)")
    has_mps = getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "mps" if has_mps else "cpu"
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise DeviceError(
                f"--device {device}: CUDA is not available here (torch {torch.__version__}); use --device cpu"
            )
        index = int(device[5:]) if ":" in device else torch.cuda.current_device()
        if index >= torch.cuda.device_count():
            raise DeviceError(f"--device {device}: only {torch.cuda.device_count()} CUDA device(s) here")
        device = f"cuda:{index}"
    elif device == "mps" and not has_mps:
        raise DeviceError("--device mps: Apple MPS is not available here; use --device cpu")
    if precision == "auto":
        precision = "fp32" if device == "cpu" else "fp16"
    if device == "cpu" and precision == "fp16":
        raise DeviceError(
            "--precision fp16 is not supported on the CPU (no half-precision convolutions); use fp32 or bf16"
        )
    return Placement(device=device, precision=precision)
