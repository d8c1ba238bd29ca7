"""Classifier-free guidance (Ho & Salimans, 2022): the one place where ``uncond + scale * (cond - uncond)``
is written. The UNet sees ``[uncond, cond]`` as one batch, as the reference scripts run it; at scale 1 there
is no unconditional pass at all."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from sdgen.conditioning import Conditioning
    from sdgen.model import LoadedModel
    from sdgen.samplers import ModelFn


def cfg(out_uncond: torch.Tensor, out_cond: torch.Tensor, scale: float) -> torch.Tensor:
    return out_uncond + scale * (out_cond - out_uncond)


def batch_timesteps(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """A sampler's timestep (a scalar or one per image) as one per image, on the latents' device."""
    t = t.to(x.device).reshape(-1)
    return t.expand(x.shape[0]) if t.numel() == 1 else t


def guided_output(model: LoadedModel, x: torch.Tensor, t: torch.Tensor, c: Conditioning, scale: float) -> torch.Tensor:
    """The guided model output for latents x at per-image timesteps t."""
    b = x.shape[0]
    x_in = x if c.concat is None else torch.cat([x, c.concat.expand(b, -1, -1, -1)], dim=1)
    labels = None if c.class_labels is None else c.class_labels.expand(b)
    if c.uncond is None:
        extra = {} if labels is None else {"class_labels": labels}
        return model.unet_output(x_in, t, c.cond, **extra)
    extra = {} if labels is None else {"class_labels": torch.cat([labels, labels])}
    out = model.unet_output(torch.cat([x_in, x_in]), torch.cat([t, t]), torch.cat([c.uncond, c.cond]), **extra)
    out_uncond, out_cond = out.chunk(2)
    return cfg(out_uncond, out_cond, scale)


def guided(model: LoadedModel, c: Conditioning, scale: float) -> ModelFn:
    """The sampler's model function: guided output for latents x at timestep t."""

    def call(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return guided_output(model, x, batch_timesteps(t, x), c, scale)

    return call
