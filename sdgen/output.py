"""Everything about files: numbered names that never overwrite, grids, watermark, metadata, atomic writes.

A sample is written to a hidden temp file in the same folder, then hard-linked to the first free
``NNNNN.png`` (a link fails if the name exists, so two processes can never take the same number and a
reader never sees a half-written PNG), then the temp name is removed.
"""

from __future__ import annotations

import errno
import json
import os
import re
import sys
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from sdgen import __version__, watermark
from sdgen.errors import OutputError

SAMPLE_RE = re.compile(r"^(\d{5,})\.png$")
GRID_RE = re.compile(r"^grid-(\d{4,})\.png$")


def parameters_text(meta: dict[str, Any]) -> str:
    """The A1111-style 'parameters' chunk that other tools (A1111, ComfyUI, civitai) read."""
    fields = [
        ("Steps", meta["steps"]), ("Sampler", meta["sampler_label"]), ("CFG scale", meta["scale"]),
        ("Seed", meta["seed"]), ("Size", f"{meta['width']}x{meta['height']}"),
        ("Model hash", meta.get("model_hash")), ("Model", meta.get("model")),
        ("Denoising strength", meta.get("strength")), ("Noise level", meta.get("noise_level")),
        ("Eta", meta.get("eta") or None), ("Version", f"sdgen {__version__}"),
    ]
    lines = [meta["prompt"]]
    if meta.get("negative_prompt"):
        lines.append(f"Negative prompt: {meta['negative_prompt']}")
    lines.append(", ".join(f"{k}: {v}" for k, v in fields if v is not None))
    return "\n".join(lines)


def _png_info(meta: dict[str, Any]) -> PngInfo:
    info = PngInfo()
    info.add_text("parameters", parameters_text(meta))
    info.add_text("sdgen", json.dumps(meta, sort_keys=True))
    return info


def _output_error(path: Path, e: OSError) -> OutputError:
    reasons = {errno.ENOSPC: "the disk is full", errno.EROFS: "the file system is read-only",
               errno.EACCES: "permission denied", errno.EPERM: "permission denied", errno.EDQUOT: "quota exceeded"}
    why = reasons.get(e.errno, e.strerror or str(e))
    return OutputError(f"cannot write to {path}: {why} (--outdir); images written before this are kept")


class ImageWriter:
    def __init__(self, outdir: Path, family: str, use_watermark: bool, say=print) -> None:
        self.outdir = outdir
        self.samples = outdir / "samples"
        self.family = family
        self.use_watermark = use_watermark
        self.say = say
        self._told_small = False

    def prepare(self) -> None:
        try:
            self.samples.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise _output_error(self.samples, e) from e
        if not os.access(self.samples, os.W_OK):
            raise OutputError(f"cannot write to {self.samples}: permission denied (--outdir)")

    def _mark(self, rgb: np.ndarray) -> tuple[np.ndarray, bool]:
        if not self.use_watermark:
            return rgb, False
        h, w = rgb.shape[:2]
        if not watermark.can_mark(w, h):
            if not self._told_small:
                self.say(f"sdgen: {w}x{h} is too small for the invisible watermark (needs 256x256 pixels); "
                         "saved without it")
                self._told_small = True
            return rgb, False
        return watermark.apply(rgb, self.family), True

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
        return self._write_numbered(self.samples, SAMPLE_RE, "{:05d}.png", Image.fromarray(marked), _png_info(meta))

    def save_grid(self, images: list[np.ndarray], n_rows: int, meta: dict[str, Any]) -> Path:
        """All images in rows of ``n_rows``, 2-pixel black gaps, as torchvision's make_grid in the reference."""
        h, w = images[0].shape[:2]
        per_row = max(1, min(n_rows, len(images)))
        rows = -(-len(images) // per_row)
        pad = 2
        grid = np.zeros((rows * (h + pad) + pad, per_row * (w + pad) + pad, 3), dtype=np.uint8)
        for i, img in enumerate(images):
            r, c = divmod(i, per_row)
            y, x = pad + r * (h + pad), pad + c * (w + pad)
            grid[y : y + img.shape[0], x : x + img.shape[1]] = img
        marked, did = self._mark(grid)
        meta = dict(meta, watermark=did, grid=True)
        return self._write_numbered(self.outdir, GRID_RE, "grid-{:04d}.png", Image.fromarray(marked), _png_info(meta))


def warn(message: str) -> None:
    print(f"sdgen: {message}", file=sys.stderr)
