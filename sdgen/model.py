"""The loaded model: its components, where they live, and the four things they do (encode text, run the UNet,
encode an image, decode latents). It holds no per-job state: what a run had to do differently is the run's
(see :mod:`sdgen.engine`); what stays changed for later runs (a UNet upcast to fp32, a lower memory rung)
is visible in :meth:`LoadedModel.state`.

Numerics follow the reference scripts: the text encoder's last (SD 1.x) or penultimate + ln_final (SD 2.x)
hidden states, and the UNet and VAE in the run's precision with float32 results.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from sdgen.checkpoints.hashing import ModelHash
from sdgen.errors import ModelOutputError
from sdgen.families import Family
from sdgen.runtime.device import Placement, large_buffers_returned
from sdgen.runtime.memory import LADDER, MemoryPlan
from sdgen.samplers.schedule import Schedule
from sdgen.tokenizer import tokenize


class HalfOverflow(Exception):
    """A half-precision component produced NaN/inf; ``part`` is "unet" or "vae"."""

    def __init__(self, part: str) -> None:
        super().__init__(part)
        self.part = part


@dataclass
class LoadedModel:
    family: Family
    unet: Any
    vae: Any
    text_encoder: Any
    v_prediction: bool
    schedule: Schedule
    native_size: int  # pixels: the default -H/-W
    placement: Placement
    name: str  # the file or folder name without suffix (A1111's 'Model')
    hash_source: ModelHash | None  # A1111's 'Model hash', maybe still being computed (None: diffusers folder)
    config_source: str
    memory: MemoryPlan
    low_res_schedule: Schedule | None = None  # x4 upscaler: the noise augmentation's schedule
    compiled: str | None = None  # the torch.compile mode, set by runtime.compiling

    @property
    def hash(self) -> str | None:
        """A1111's 'Model hash' (waits for the background hash of a file the cache did not know)."""
        return None if self.hash_source is None else self.hash_source.value()

    @property
    def latent_channels(self) -> int:
        return int(self.unet.config.out_channels)

    @property
    def vae_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def latent_scale(self) -> float:
        return float(self.vae.config.scaling_factor)

    def describe(self) -> str:
        kind = "v-prediction" if self.v_prediction else "epsilon"
        return f"{self.family.label} ({kind}), config {self.config_source}, on {self.placement.describe()}"

    def state(self) -> dict[str, Any]:
        """What a PNG records about the model as it is now."""
        names = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
        return {
            "unet_precision": names.get(self.unet.dtype, str(self.unet.dtype)),
            "vae_precision": names.get(self.vae.dtype, str(self.vae.dtype)),
            "memory": LADDER[self.memory.level],
            "compiled": self.compiled,
        }

    def upcast(self, part: str) -> None:
        """After a half-precision overflow: run the UNet or the VAE in fp32 from now on."""
        getattr(self, part).to(torch.float32)

    # 1. Text ------------------------------------------------------------------------------------------
    @torch.no_grad()
    def encode_text(self, prompts: list[str]) -> tuple[torch.Tensor, list[int]]:
        """The text features [b, 77, d] in float32, and each prompt's untruncated token count."""
        text = self.family.text
        ids, lengths = tokenize(prompts, text.pad_id, text.unescape_html)
        tokens = torch.tensor(ids, device=self.placement.device)
        with self.memory.using("text_encoder") as text_encoder:
            hidden = text_encoder(input_ids=tokens).last_hidden_state
        return hidden.float(), lengths

    # 2. UNet ------------------------------------------------------------------------------------------
    def unet_output(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor, **extra: Any) -> torch.Tensor:
        """One UNet call in its own precision, the output in float32. The caller holds memory.using('unet')."""
        dtype = self.unet.dtype
        out = self.unet(x.to(dtype), t, encoder_hidden_states=context.to(dtype), return_dict=False, **extra)[0]
        return out.float()

    # 3. Images ----------------------------------------------------------------------------------------
    @torch.no_grad()
    def encode_image(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The VAE posterior's mean and std for images in [-1, 1] (sampled by the caller, whose noise it is)."""
        with self.memory.using("vae") as vae:
            dist = vae.encode(pixels.to(self.placement.device, vae.dtype)).latent_dist
        return dist.mean.float(), dist.std.float()

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents -> float32 pixels in [-1, 1] (not yet clamped), on the device. Raises HalfOverflow('vae')
        when a half-precision VAE overflows (the engine upcasts it and decodes again)."""
        z = latents / self.latent_scale
        with self.memory.using("vae") as vae, large_buffers_returned():
            x = vae.decode(z.to(vae.dtype), return_dict=False)[0]
        if not torch.isfinite(x).all():
            if self.vae.dtype != torch.float32:
                raise HalfOverflow("vae")
            raise ModelOutputError(
                "the VAE produced NaN/inf values even in fp32: the checkpoint's VAE weights are broken"
            )
        return x.float()
