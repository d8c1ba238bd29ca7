"""Reading input images (init images, upscale inputs) with clear errors, and hashing them for metadata."""

from __future__ import annotations

import warnings
from pathlib import Path

from PIL import Image, ImageOps, UnidentifiedImageError

from sdgen.checkpoints.hashing import file_sha256
from sdgen.errors import InputError

Image.MAX_IMAGE_PIXELS = 16384 * 16384  # a decompression bomb beyond this is refused by Pillow


def load_rgb(path: Path, flag: str) -> Image.Image:
    """An RGB image with EXIF orientation applied; RGBA, palette and grayscale are converted."""
    if not path.exists():
        raise InputError(f"{flag} {path}: no such file")
    if path.is_dir():
        raise InputError(f"{flag} {path}: is a folder, not an image")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                img.load()
                img = ImageOps.exif_transpose(img)
                if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
                    # transparent areas become white, as most editors show them, not black
                    base = Image.new("RGB", img.size, (255, 255, 255))
                    base.paste(img.convert("RGBA"), mask=img.convert("RGBA").split()[-1])
                    return base
                return img.convert("RGB")
    except UnidentifiedImageError:
        raise InputError(f"{flag} {path}: not an image Pillow can read (PNG, JPEG, WebP, ...)") from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise InputError(f"{flag} {path}: damaged or truncated image ({e})") from None


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
