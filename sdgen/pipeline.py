"""A loaded model and the three things it does: encode prompts, denoise latents, decode latents to pixels.

Numerics follow the reference scripts: the text encoder's last (SD 1.x) or penultimate+ln_final (SD 2.x)
hidden states, classifier-free guidance as ``uc + scale * (c - uc)`` on a ``[uc, c]`` batch (no
unconditional pass at scale 1), and pixels as ``uint8(255 * clamp((x + 1) / 2))``, truncating as numpy's
``astype(np.uint8)`` does in the reference, not rounding.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from sdgen.compiling import before_compiled_call, unet_output
from sdgen.device import Placement
from sdgen.errors import ModelOutputError
from sdgen.memory import MemoryPlan
from sdgen.noise import drawer
from sdgen.samplers import (
    Schedule,
    make_scheduler,
    reference_timesteps,
    run_scheduler,
    sample_ddim,
    sample_dpm_solver,
    sample_plms,
    scheduler_init_sigma,
)
from sdgen.tokenizer import CONTEXT_LENGTH, tokenize


@dataclass
class Pipeline:
    family: str  # "sd1", "sd2", "x4"
    unet: Any
    vae: Any
    text_encoder: Any
    pad_id: int
    v_prediction: bool
    schedule: Schedule
    native_size: int
    placement: Placement
    model_name: str
    model_hash: str | None
    config_source: str
    notes: list[str] = field(default_factory=list)  # what had to be done differently (fp32 fallbacks)
    memory: MemoryPlan | None = None
    low_res_schedule: Schedule | None = None  # x4 upscaler: the noise augmentation's schedule
    cuda_graphs: bool = False  # set by compiling.compile_pipeline: UNet/VAE outputs live in a graph's pool

    def __post_init__(self) -> None:
        if self.memory is None:
            models = {"text_encoder": self.text_encoder, "unet": self.unet, "vae": self.vae}
            self.memory = MemoryPlan(models, self.placement.torch_device)

    def upcast_unet(self) -> None:
        """After a half-precision overflow in the UNet: run it (and the text features) in fp32 from now on."""
        self.unet.to(torch.float32)
        self.notes.append("UNet ran in fp32 after a half-precision overflow")

    @property
    def latent_channels(self) -> int:
        return int(self.unet.config.out_channels)

    @property
    def vae_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    # 1. Text ------------------------------------------------------------------------------------------
    @torch.no_grad()
    def encode(self, prompts: list[str], warn: Callable[[str], None] | None = None) -> torch.Tensor:
        ids, lengths = tokenize(prompts, self.pad_id)
        if warn:
            for prompt, n in zip(prompts, lengths, strict=True):
                if n > CONTEXT_LENGTH:
                    warn(f"prompt cut to {CONTEXT_LENGTH - 2} of its {n - 2} tokens: {prompt[:60]!r}...")
        tokens = torch.tensor(ids, device=self.placement.device)
        with self.memory.using("text_encoder") as text_encoder:
            hidden = text_encoder(input_ids=tokens).last_hidden_state
        return hidden.float()

    # 2. Denoise -----------------------------------------------------------------------------------------
    def model_fn(self, cond: torch.Tensor, uncond: torch.Tensor | None, scale: float, extra: dict | None = None):
        """Model output for latents x at timestep t, with classifier-free guidance."""
        extra = extra or {}

        def call(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            unet, dtype = self.unet, self.unet.dtype
            t = t.to(x.device).reshape(-1)
            if t.numel() == 1:
                t = t.expand(x.shape[0])
            if uncond is None:
                x_in, t_in, c_in = x, t, cond
            else:
                x_in, t_in, c_in = torch.cat([x, x]), torch.cat([t, t]), torch.cat([uncond, cond])
            kwargs = {k: (torch.cat([v, v]) if uncond is not None else v) for k, v in extra.items()}
            before_compiled_call(self)
            out = unet(x_in.to(dtype), t_in, encoder_hidden_states=c_in.to(dtype), return_dict=False, **kwargs)[0]
            out = unet_output(self, out)
            if uncond is None:
                return out
            out_uncond, out_cond = out.chunk(2)
            return out_uncond + scale * (out_cond - out_uncond)

        return call

    @torch.no_grad()
    def denoise(
        self, noise: torch.Tensor, model: Callable, sampler: str, steps: int, eta: float, generator: Any,
        progress: Callable[[], None],
    ) -> torch.Tensor:
        with self.memory.using("unet"):
            return self._denoise(noise, model, sampler, steps, eta, generator, progress)

    def _denoise(self, noise, model, sampler, steps, eta, generator, progress) -> torch.Tensor:
        ac = self.schedule.alphas_cumprod()
        if sampler == "ddim":
            draw = drawer(generator, noise.device)
            return sample_ddim(model, noise, ac, steps, eta, self.v_prediction, draw, progress)
        if sampler == "plms":
            return sample_plms(model, noise, ac, steps, self.v_prediction, drawer(generator, noise.device), progress)
        if sampler == "dpm":
            return sample_dpm_solver(model, noise, ac, steps, self.v_prediction, progress)
        x = noise * scheduler_init_sigma(sampler, self.schedule, self.v_prediction, steps)
        return run_scheduler(sampler, model, x, steps, self.schedule, self.v_prediction, eta, generator, progress)

    @torch.no_grad()
    def encode_image(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The VAE posterior's mean and std for images in [-1, 1] (sampled by the caller, whose noise it is)."""
        with self.memory.using("vae") as vae:
            dist = vae.encode(pixels.to(vae.dtype)).latent_dist
        return dist.mean.float(), dist.std.float()

    @torch.no_grad()
    def denoise_from(
        self, x0: torch.Tensor, noise: torch.Tensor, model: Callable, sampler: str, steps: int, t_enc: int,
        eta: float, generator: Any, progress: Callable[[], None],
    ) -> torch.Tensor:
        """img2img: noise the clean latents x0 to the strength's step and denoise the last t_enc steps."""
        with self.memory.using("unet"):
            return self._denoise_from(x0, noise, model, sampler, steps, t_enc, eta, generator, progress)

    def _denoise_from(self, x0, noise, model, sampler, steps, t_enc, eta, generator, progress) -> torch.Tensor:
        ac = self.schedule.alphas_cumprod().to(x0.device)
        if t_enc <= 0:
            return x0  # strength 0: the init image's round trip through the VAE
        if t_enc >= steps:
            return self._denoise(noise, model, sampler, steps, eta, generator, progress)  # strength 1
        if sampler == "ddim":
            # The reference: noise to the alpha of DDIM step t_enc, then denoise from step t_enc - 1.
            a = ac[reference_timesteps(steps, ac.shape[0])[t_enc]]
            x = torch.sqrt(a) * x0 + torch.sqrt(1.0 - a) * noise
            return sample_ddim(model, x, ac, steps, eta, self.v_prediction, drawer(generator, x.device), progress,
                               start=t_enc)
        if sampler == "dpm":
            return sample_dpm_solver(model, noise, ac, steps, self.v_prediction, progress, x0=x0,
                                     strength=t_enc / steps)
        sched = make_scheduler(sampler, self.schedule, self.v_prediction)
        sched.set_timesteps(steps, device=x0.device)
        start = (steps - t_enc) * sched.order
        x = sched.add_noise(x0, noise, sched.timesteps[start : start + 1])
        return run_scheduler(sampler, model, x, steps, self.schedule, self.v_prediction, eta, generator, progress,
                             start_step=start)

    # 3. Decode ------------------------------------------------------------------------------------------
    def decode(self, latents: torch.Tensor) -> list[np.ndarray]:
        """Latents -> HxWx3 uint8 images. A half-precision VAE that overflows is redone in fp32."""
        return to_uint8(self.decode_float(latents))

    @torch.no_grad()
    def decode_float(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents -> float32 pixels in [-1, 1] (not yet clamped), on the device."""
        z = latents / self.vae.config.scaling_factor
        with self.memory.using("vae") as vae:
            before_compiled_call(self)
            x = vae.decode(z.to(vae.dtype), return_dict=False)[0]
            if not torch.isfinite(x).all() and vae.dtype != torch.float32:
                self.notes.append("VAE decoded in fp32 after a half-precision overflow")
                print("sdgen: the VAE overflowed in half precision; decoding in fp32 from now on", file=sys.stderr)
                vae.to(torch.float32)
                x = vae.decode(z.float(), return_dict=False)[0]
        if not torch.isfinite(x).all():
            raise ModelOutputError("the VAE produced NaN/inf values even in fp32: the checkpoint's VAE weights "
                                   "are broken")
        return x.float()


def to_uint8(x: torch.Tensor) -> list[np.ndarray]:
    """The reference's conversion: 255 * clamp((x + 1) / 2), truncated by astype(np.uint8)."""
    x = torch.clamp((x.float() + 1.0) / 2.0, 0.0, 1.0)
    return list((255.0 * x.permute(0, 2, 3, 1).cpu().numpy()).astype(np.uint8))
