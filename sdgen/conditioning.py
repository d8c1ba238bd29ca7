"""What the UNet is conditioned on, as one object: the prompts' text features (and the negative prompt's,
for guidance), plus the extra inputs some families take: image channels concatenated to the latents (the
x4 upscaler's low-resolution image; inpainting's mask later) and class labels (the x4 noise level)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from sdgen.tokenizer import CONTEXT_LENGTH

if TYPE_CHECKING:
    import torch

    from sdgen.model import LoadedModel


@dataclass(frozen=True)
class Conditioning:
    cond: torch.Tensor  # [b, 77, d] cross-attention features of the prompts
    uncond: torch.Tensor | None  # the negative prompt's, or None when the scale is 1 (no unconditional pass)
    concat: torch.Tensor | None = None  # [1 or b, c, h, w] channels concatenated to the latents
    class_labels: torch.Tensor | None = None  # [1 or b] class labels

    def window(self, window: tuple) -> Conditioning:
        """The conditioning of a spatial tile of the latents (its part of the concatenated image)."""
        return self if self.concat is None else replace(self, concat=self.concat[window])


def encode_prompts(
    model: LoadedModel, prompts: list[str], negative_prompt: str, scale: float, warn: Callable[[str], None]
) -> Conditioning:
    """The text features of a batch, the unconditional ones first as the reference (neither draws random
    numbers, but the order is the reference's). ``warn`` hears of prompts cut to 77 tokens."""
    uncond = model.encode_text([negative_prompt] * len(prompts))[0] if scale != 1.0 else None
    cond, lengths = model.encode_text(list(prompts))
    for prompt, n in zip(prompts, lengths, strict=True):
        if n > CONTEXT_LENGTH:
            warn(f"prompt cut to {CONTEXT_LENGTH - 2} of its {n - 2} tokens: {prompt[:60]!r}...")
    return Conditioning(cond=cond, uncond=uncond)
