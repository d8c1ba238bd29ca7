"""Writing PNGs: numbered names that never overwrite, the watermark, atomic writes.

A sample is written to a hidden temp file in the same folder, then hard-linked to the first free
``NNNNN.png`` (a link fails if the name exists, so two processes can never take the same number and a
reader never sees a half-written PNG), then the temp name is removed.
"""

from __future__ import annotations

import errno
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from sdgen.errors import OutputError
from sdgen.output import watermark
from sdgen.output.grid import make_grid
from sdgen.output.metadata import png_info

SAMPLE_RE = re.compile(r"^(\d{5,})\.png$")
GRID_RE = re.compile(r"^grid-(\d{4,})\.png$")


def _output_error(path: Path, e: OSError) -> OutputError:
    reasons = {
        errno.ENOSPC: "the disk is full",
        errno.EROFS: "the file system is read-only",
        errno.EACCES: "permission denied",
        errno.EPERM: "permission denied",
        errno.EDQUOT: "quota exceeded",
    }
    why = reasons.get(e.errno or 0, e.strerror or str(e))
    return OutputError(f"cannot write to {path}: {why} (--outdir); images written before this are kept")


class ImageWriter:
    """Samples go to OUTDIR/samples/NNNNN.png, grids to OUTDIR/grid-NNNN.png, marked with ``payload``
    (None: no watermark). ``notice`` hears, once, that an image was too small to mark."""

    def __init__(self, outdir: Path, payload: bytes | None, notice: Callable[[str], None]) -> None:
        self.outdir = outdir
        self.samples = outdir / "samples"
        self.payload = payload
        self.notice = notice
        self._told_small = False

    def prepare(self) -> None:
        try:
            self.samples.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise _output_error(self.samples, e) from e
        if not os.access(self.samples, os.W_OK):
            raise OutputError(f"cannot write to {self.samples}: permission denied (--outdir)")

    def _mark(self, rgb: np.ndarray) -> tuple[np.ndarray, bool]:
        if self.payload is None:
            return rgb, False
        h, w = rgb.shape[:2]
        if not watermark.can_mark(w, h):
            if not self._told_small:
                self.notice(
                    f"sdgen: {w}x{h} is too small for the invisible watermark (needs 256x256 pixels); saved without it"
                )
                self._told_small = True
            return rgb, False
        return watermark.apply(rgb, self.payload), True

    def _write_numbered(self, folder: Path, pattern: re.Pattern, fmt: str, image: Image.Image, info: PngInfo) -> Path:
        tmp = folder / f".sdgen-{os.getpid()}-{id(image)}.png.tmp"
        try:
            with open(tmp, "xb") as f:
                image.save(f, format="PNG", pnginfo=info)
                f.flush()
                os.fsync(f.fileno())
            number = self._next_number(folder, pattern)
            while True:
                target = folder / fmt.format(number)
                try:
                    os.link(tmp, target)
                    return target
                except FileExistsError:
                    number += 1
                except OSError as e:
                    if e.errno not in (errno.EPERM, errno.ENOTSUP, errno.EXDEV, errno.EMLINK):
                        raise
                    # no hard links here (some network/FAT file systems): exclusive create instead
                    try:
                        with open(target, "xb") as out, open(tmp, "rb") as src:
                            out.write(src.read())
                        return target
                    except FileExistsError:
                        number += 1
        except OSError as e:
            raise _output_error(folder, e) from e
        finally:
            try:
                tmp.unlink()
            except OSError:
                pass

    @staticmethod
    def _next_number(folder: Path, pattern: re.Pattern) -> int:
        numbers = [int(m.group(1)) for name in os.listdir(folder) if (m := pattern.match(name))]
        return max(numbers, default=-1) + 1

    def save_sample(self, rgb: np.ndarray, meta: dict[str, Any]) -> Path:
        marked, did = self._mark(rgb)
        meta = dict(meta, watermark=did)
        return self._write_numbered(self.samples, SAMPLE_RE, "{:05d}.png", Image.fromarray(marked), png_info(meta))

    def save_grid(self, images: list[np.ndarray], per_row: int, meta: dict[str, Any]) -> Path:
        marked, did = self._mark(make_grid(images, per_row))
        meta = dict(meta, watermark=did, grid=True)
        return self._write_numbered(self.outdir, GRID_RE, "grid-{:04d}.png", Image.fromarray(marked), png_info(meta))
