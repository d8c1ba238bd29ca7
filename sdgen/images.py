"""Reading input images (init images, upscale inputs) with clear errors, and hashing them for metadata."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from sdgen.checkpoints.hashing import file_sha256
from sdgen.errors import InputError
from sdgen.input_files import require_regular_file

Image.MAX_IMAGE_PIXELS = 16384 * 16384  # a decompression bomb beyond this is refused by Pillow


MAX_INPUT_PIXELS = 8192 * 8192  # an input image's pixels, checked from its header before it is decoded
SIXTEEN_BIT = ("I;16", "I;16L", "I;16B", "I;16N", "I")  # I: how Pillow opens some 16-bit files
CONVERTIBLE = ("1", "L", "P", "RGB", "RGBX", "RGBA", "RGBa", "LA", "La", "PA", "CMYK", "YCbCr")


def load_rgb(path: Path, flag: str) -> Image.Image:
    """An 8-bit RGB image with EXIF orientation applied. Transparency becomes white; 16-bit grayscale is
    scaled (>> 8), float images are taken as 0..1 (x 255, clamped); other modes are refused by name."""
    if not path.exists():
        raise InputError(f"{flag} {path}: no such file")
    if path.is_dir():
        raise InputError(f"{flag} {path}: is a folder, not an image")
    require_regular_file(path, flag)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                w, h = img.size
                if w * h > MAX_INPUT_PIXELS:
                    raise InputError(
                        f"{flag} {path}: {w}x{h} is {w * h} pixels, more than the {MAX_INPUT_PIXELS} "
                        "(8192x8192) allowed; scale it down first"
                    )
                img.load()
                return _to_rgb8(ImageOps.exif_transpose(img), path, flag)
    except UnidentifiedImageError:
        raise InputError(f"{flag} {path}: not an image Pillow can read (PNG, JPEG, WebP, ...)") from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise InputError(f"{flag} {path}: damaged or truncated image ({e})") from None


def _to_rgb8(img: Image.Image, path: Path, flag: str) -> Image.Image:
    if img.mode in SIXTEEN_BIT:  # Pillow's own conversion clips at 255 (a 16-bit image turns white)
        gray = np.asarray(img).astype(np.int64).clip(0, 65535) >> 8
        return Image.fromarray(gray.astype(np.uint8)).convert("RGB")
    if img.mode == "F":  # floats in 0..1 (Pillow's conversion would truncate them to 0 and 1: black)
        values = np.nan_to_num(np.asarray(img, dtype=np.float64), nan=0.0) * 255.0
        return Image.fromarray(np.rint(values.clip(0, 255)).astype(np.uint8)).convert("RGB")
    if img.mode not in CONVERTIBLE:
        raise InputError(
            f"{flag} {path}: images of mode {img.mode} are not supported; save it as 8-bit RGB, "
            "grayscale or 16-bit grayscale"
        )
    if img.mode in ("RGBA", "RGBa", "LA", "La", "PA") or (img.mode == "P" and "transparency" in img.info):
        # transparent areas become white, as most editors show them, not black
        rgba = img.convert("RGBA")
        base = Image.new("RGB", img.size, (255, 255, 255))
        base.paste(rgba, mask=rgba.split()[-1])
        return base
    return img.convert("RGB")


def sha256(path: Path) -> str:
    """An input image's SHA-256 (recorded in the metadata)."""
    return file_sha256(path)


def fit_size(
    img: Image.Image, width: int | None, height: int | None, multiple: int = 8
) -> tuple[Image.Image, str | None]:
    """Resize to -W/-H if given, else round the image's own size down to a multiple of 8.
    Returns the image and a sentence saying what was done (None if nothing)."""
    w0, h0 = img.size
    w = width if width is not None else w0 - w0 % multiple
    h = height if height is not None else h0 - h0 % multiple
    if w < multiple or h < multiple:
        raise InputError(f"init image {w0}x{h0} is too small (at least {multiple}x{multiple} pixels)")
    if (w, h) == (w0, h0):
        return img, None
    return img.resize((w, h), resample=Image.Resampling.LANCZOS), f"resized the input from {w0}x{h0} to {w}x{h}"
