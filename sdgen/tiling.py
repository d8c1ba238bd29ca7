"""Big latents in overlapping tiles, blended with linear ramps, so that memory stays bounded.

The UNet is evaluated on overlapping tiles at every step and the tiles' guided outputs are blended (so there
is one latent, one sampler, and no tile grid); the VAE decodes the same tiles, blended the same way. Latents
no larger than one tile run untiled. The x4 upscale uses both.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from sdgen.guidance import batch_timesteps, guided_output

if TYPE_CHECKING:
    from sdgen.conditioning import Conditioning
    from sdgen.model import LoadedModel
    from sdgen.samplers import ModelFn

MAX_OVERLAP = 32


def overlap_for(tile: int) -> int:
    return min(MAX_OVERLAP, tile // 4)


def tile_origins(size: int, tile: int, overlap: int) -> list[int]:
    if size <= tile:
        return [0]
    stride = tile - overlap
    return list(range(0, size - tile, stride)) + [size - tile]


def ramp(n: int, overlap: int, device) -> torch.Tensor:
    """1 in the middle, rising linearly over ``overlap`` pixels at both ends (never 0)."""
    i = torch.arange(n, device=device, dtype=torch.float32)
    return torch.clamp(torch.minimum(i + 1, n - i) / (overlap + 1), max=1.0)


def tiled_guided(model: LoadedModel, c: Conditioning, scale: float, tile: int) -> ModelFn:
    """The guided model function, evaluated tile by tile when the latents are larger than ``tile``."""
    overlap = overlap_for(tile)

    def call(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        t = batch_timesteps(t, x)
        h, w = x.shape[-2:]
        if tile <= 0 or (h <= tile and w <= tile):
            return guided_output(model, x, t, c, scale)
        acc = torch.zeros_like(x)
        weight = torch.zeros((1, 1, h, w), device=x.device)
        th, tw = min(tile, h), min(tile, w)
        wgt = ramp(th, overlap, x.device)[:, None] * ramp(tw, overlap, x.device)[None, :]
        for y0 in tile_origins(h, tile, overlap):
            for x0 in tile_origins(w, tile, overlap):
                window = (..., slice(y0, y0 + th), slice(x0, x0 + tw))
                acc[window] += guided_output(model, x[window], t, c.window(window), scale) * wgt
                weight[window] += wgt
        return acc / weight

    return call


def decode_tiled(model: LoadedModel, latents: torch.Tensor, tile: int) -> torch.Tensor:
    """The VAE decode in overlapping latent tiles blended with the same ramps as the UNet tiles (the x4 VAE's
    mid-block attention over a whole 512x512 latent would need ~0.5 TB). Float32 pixels on the CPU."""
    h, w = latents.shape[-2:]
    if tile <= 0 or (h <= tile and w <= tile):
        return model.decode(latents).cpu()
    overlap, f = overlap_for(tile), model.vae_factor
    out = torch.zeros((latents.shape[0], 3, h * f, w * f))
    weight = torch.zeros((1, 1, h * f, w * f))
    th, tw = min(tile, h), min(tile, w)
    wgt = ramp(th * f, overlap * f, "cpu")[:, None] * ramp(tw * f, overlap * f, "cpu")[None, :]
    for y0 in tile_origins(h, tile, overlap):
        for x0 in tile_origins(w, tile, overlap):
            pixels = model.decode(latents[..., y0 : y0 + th, x0 : x0 + tw]).cpu()
            window = (..., slice(y0 * f, (y0 + th) * f), slice(x0 * f, (x0 + tw) * f))
            out[window] += pixels * wgt
            weight[window] += wgt
    return out / weight
