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

from sdgen.device import Placement
from sdgen.samplers import SAMPLERS, Schedule, run_scheduler, sample_dpm_solver, scheduler_init_sigma
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
            for prompt, n in zip(prompts, lengths):
                if n > CONTEXT_LENGTH:
                    warn(f"prompt cut to {CONTEXT_LENGTH - 2} of its {n - 2} tokens: {prompt[:60]!r}...")
        tokens = torch.tensor(ids, device=self.placement.device)
        hidden = self.text_encoder(input_ids=tokens).last_hidden_state
        return hidden.to(self.unet.dtype)

    # 2. Denoise -----------------------------------------------------------------------------------------
    def model_fn(self, cond: torch.Tensor, uncond: torch.Tensor | None, scale: float, extra: dict | None = None):
        """Model output for latents x at timestep t, with classifier-free guidance."""
        unet, dtype = self.unet, self.unet.dtype
        extra = extra or {}

        def call(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            t = t.to(x.device).reshape(-1)
            if t.numel() == 1:
                t = t.expand(x.shape[0])
            if uncond is None:
                x_in, t_in, c_in = x, t, cond
            else:
                x_in, t_in, c_in = torch.cat([x, x]), torch.cat([t, t]), torch.cat([uncond, cond])
            kwargs = {k: (torch.cat([v, v]) if uncond is not None else v) for k, v in extra.items()}
            out = unet(x_in.to(dtype), t_in, encoder_hidden_states=c_in, return_dict=False, **kwargs)[0].float()
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
        if SAMPLERS[sampler].scheduler is None:
            return sample_dpm_solver(model, noise, self.schedule.alphas_cumprod(), steps, self.v_prediction, progress)
        x = noise * scheduler_init_sigma(sampler, self.schedule, self.v_prediction, steps)
        return run_scheduler(sampler, model, x, steps, self.schedule, self.v_prediction, eta, generator, progress)

    # 3. Decode ------------------------------------------------------------------------------------------
    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> list[np.ndarray]:
        """Latents -> HxWx3 uint8 images. A half-precision VAE that overflows is redone in fp32."""
        z = latents / self.vae.config.scaling_factor
        x = self.vae.decode(z.to(self.vae.dtype), return_dict=False)[0]
        if not torch.isfinite(x).all() and self.vae.dtype != torch.float32:
            self.notes.append("VAE decoded in fp32 after a half-precision overflow")
            print("sdgen: the VAE overflowed in half precision; decoding this batch in fp32", file=sys.stderr)
            self.vae.to(torch.float32)
            x = self.vae.decode(z.float(), return_dict=False)[0]
        x = torch.clamp((x.float() + 1.0) / 2.0, 0.0, 1.0)
        arrays = (255.0 * x.permute(0, 2, 3, 1).cpu().numpy()).astype(np.uint8)
        return list(arrays)
