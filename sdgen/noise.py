"""Starting noise and the random generators samplers draw from, in the two seed modes.

reference: one generator on the generation device, seeded once per run; each batch's noise is drawn in
    one call (or once for the whole run with --fixed_code), in the reference scripts' order, so the same
    seed gives the reference's images.
per-image: image k of a run uses seed + k on a CPU generator, so any image can be made again alone, on
    any machine, from the seed written in its PNG. For one image the two modes coincide on the CPU.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch


@dataclass
class NoiseSource:
    seed: int
    mode: str  # "reference" or "per-image"
    device: torch.device
    shape: tuple[int, int, int]  # latent C, h, w
    fixed_code: bool = False

    def __post_init__(self) -> None:
        self._generator: torch.Generator | None = None
        self._fixed: torch.Tensor | None = None
        if self.mode == "reference":
            self._generator = torch.Generator(device=self.device).manual_seed(self.seed)

    def start(self, n_samples: int) -> None:
        """Called once before the first batch: --fixed_code draws its start code here, as the reference."""
        if self.fixed_code and self.mode == "reference":
            self._fixed = self._draw_reference(n_samples)

    def _draw_reference(self, batch: int) -> torch.Tensor:
        return torch.randn((batch, *self.shape), generator=self._generator, device=self.device)

    def batch(self, first_index: int, batch: int) -> tuple[torch.Tensor, Any, list[int]]:
        """Noise for images first_index .. first_index+batch-1, the generator(s) for the sampler's own draws,
        and each image's seed as written in its metadata."""
        if self.mode == "reference":
            noise = self._fixed[:batch] if self._fixed is not None else self._draw_reference(batch)
            return noise, self._generator, [self.seed] * batch
        # per-image; with --fixed_code every batch reuses the seeds of the first one
        base = 0 if self.fixed_code else first_index
        seeds = [self.seed + base + i for i in range(batch)]
        generators = [torch.Generator().manual_seed(s) for s in seeds]
        noise = torch.cat([torch.randn((1, *self.shape), generator=g) for g in generators])
        return noise.to(self.device), generators, seeds
