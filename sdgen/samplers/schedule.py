"""The training noise schedule a model was trained with ('scaled linear' betas, LDM's register_schedule)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class Schedule:
    linear_start: float = 0.00085
    linear_end: float = 0.012
    timesteps: int = 1000

    def alphas_cumprod(self) -> torch.Tensor:
        import torch

        betas = torch.linspace(self.linear_start**0.5, self.linear_end**0.5, self.timesteps, dtype=torch.float64) ** 2
        return torch.cumprod(1.0 - betas, dim=0).float()


# The x4 upscaler's noise augmentation of its low-resolution input (x4-upscaling.yaml's low_scale_config).
X4_LOW_RES_SCHEDULE = Schedule(linear_start=0.0001, linear_end=0.02)
