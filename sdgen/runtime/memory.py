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
from typing import Any

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
    """Each layer's weights on ``device`` only while it runs. Every weight keeps one CPU copy, pinned on CUDA
    so that the copy to the GPU is asynchronous (queued on the compute stream: no host synchronisation per
    layer); after the layer runs its GPU copy is dropped, never copied back (the weights did not change)."""
    module.to("cpu")

    def host_copy(t: torch.Tensor) -> torch.Tensor:
        return t.pin_memory() if device.type == "cuda" else t

    for sub in module.modules():
        names = [n for n, _ in sub.named_parameters(recurse=False)] + [n for n, _ in sub.named_buffers(recurse=False)]
        if not names:
            continue
        host = {n: host_copy(getattr(sub, n).data) for n in names}
        for n, t in host.items():
            getattr(sub, n).data = t  # the pinned copy is the only CPU copy from now on

        def onload(mod, args, host=host):
            for n, t in host.items():
                current = getattr(mod, n)
                if current.dtype != t.dtype:  # cast since the last call (the UNet upcast to fp32 after an overflow)
                    host[n] = t = host_copy(current.data)
                current.data = t.to(device, non_blocking=True)

        def offload(mod, args, output, host=host):
            for n, t in host.items():
                getattr(mod, n).data = t
            return output

        sub.register_forward_pre_hook(onload)
        sub.register_forward_hook(offload)


class MemoryPlan:
    """Where a pipeline's models live, and the current rung of the ladder."""

    def __init__(self, models: dict[str, Any], device: torch.device, level: int = 0) -> None:
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
    def using(self, name: str) -> Iterator[Any]:
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
