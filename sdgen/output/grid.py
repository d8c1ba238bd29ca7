"""The reference's grid: all images in rows, 2-pixel black gaps, as torchvision's make_grid."""

from __future__ import annotations

import numpy as np

GAP = 2


def make_grid(images: list[np.ndarray], per_row: int) -> np.ndarray:
    h, w = images[0].shape[:2]
    per_row = max(1, min(per_row, len(images)))
    rows = -(-len(images) // per_row)
    grid = np.zeros((rows * (h + GAP) + GAP, per_row * (w + GAP) + GAP, 3), dtype=np.uint8)
    for i, img in enumerate(images):
        r, c = divmod(i, per_row)
        y, x = GAP + r * (h + GAP), GAP + c * (w + GAP)
        grid[y : y + img.shape[0], x : x + img.shape[1]] = img
    return grid
