"""The invisible watermark of the reference scripts (imwatermark, dwtDct), guarded in one place. The payload
is the family's (``Family.watermark``)."""

from __future__ import annotations

import numpy as np

MIN_PIXELS = 256 * 256  # imwatermark refuses smaller images


def can_mark(width: int, height: int) -> bool:
    return width * height >= MIN_PIXELS


def apply(rgb: np.ndarray, payload: bytes) -> np.ndarray:
    """Mark an HxWx3 uint8 RGB image as the reference's put_watermark does (it works on BGR)."""
    from imwatermark import WatermarkEncoder

    encoder = WatermarkEncoder()
    encoder.set_watermark("bytes", payload)
    bgr = np.ascontiguousarray(rgb[:, :, ::-1])
    return np.ascontiguousarray(encoder.encode(bgr, "dwtDct")[:, :, ::-1])


def read(rgb: np.ndarray, n_bytes: int) -> bytes:
    """Decode ``n_bytes`` of watermark from an RGB image (used by tests and by curious users)."""
    from imwatermark import WatermarkDecoder

    decoder = WatermarkDecoder("bytes", 8 * n_bytes)
    return decoder.decode(np.ascontiguousarray(rgb[:, :, ::-1]), "dwtDct")
