"""The out-of-memory ladder: what sdgen gives up, step by step, when the GPU runs out of memory.

0. everything resident on the device (fastest)
1. attention slicing (attention computed a slice of heads at a time)
2. tiled VAE decode (and batch-sliced VAE)
3. model CPU offload: each model (text encoder, UNet, VAE) moves to the GPU only while it runs
4. sequential CPU offload: each layer moves to the GPU only while it runs (slowest, smallest)

``--low-vram`` starts at step 4. On the CPU, steps 3 and 4 change nothing.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

LADDER = (
    "everything on the device",
    "attention slicing",
    "tiled VAE decode",
    "model CPU offload",
    "sequential CPU offload",
)
BOTTOM = len(LADDER) - 1


def is_out_of_memory(error: BaseException) -> bool:
    if isinstance(error, torch.cuda.OutOfMemoryError):
        return True
    return isinstance(error, RuntimeError) and "out of memory" in str(error).lower()


def free_cached_memory() -> None:
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _layer_offload(module: nn.Module, device: torch.device) -> None:
    """Hooks that bring each layer's own weights to ``device`` for its forward and send them back after."""

    def to_device(mod, args):
        mod.to(device)

    def to_cpu(mod, args, output):
        mod.to("cpu")
        return output

    for sub in module.modules():
        if any(True for _ in sub.parameters(recurse=False)) or any(True for _ in sub.buffers(recurse=False)):
            sub.register_forward_pre_hook(to_device)
            sub.register_forward_hook(to_cpu)
    module.to("cpu")


class MemoryPlan:
    """Where a pipeline's models live, and the current rung of the ladder."""

    def __init__(self, models: dict[str, nn.Module], device: torch.device, level: int = 0) -> None:
        self.models = models
        self.device = device
        self.level = 0
        for _ in range(level):
            self.step_down()

    @property
    def offloads_models(self) -> bool:
        return self.level == 3 and self.device.type != "cpu"

    def step_down(self) -> str | None:
        """Go one rung down; return its name, or None at the bottom."""
        if self.level >= BOTTOM:
            return None
        self.level += 1
        unet, vae = self.models["unet"], self.models["vae"]
        if self.level == 1:
            unet.set_attention_slice("auto")
        elif self.level == 2:
            vae.enable_tiling()
            vae.enable_slicing()
        elif self.level == 3 and self.device.type != "cpu":
            for model in self.models.values():
                model.to("cpu")
        elif self.level == 4 and self.device.type != "cpu":
            for model in self.models.values():
                _layer_offload(model, self.device)
        free_cached_memory()
        return LADDER[self.level]

    @contextlib.contextmanager
    def using(self, name: str) -> Iterator[nn.Module]:
        """The model, on the device for the duration (moved there and back under model CPU offload)."""
        model = self.models[name]
        if not self.offloads_models:
            yield model
            return
        model.to(self.device)
        try:
            yield model
        finally:
            model.to("cpu")
            free_cached_memory()
