"""What each generation mode adds to the engine's one loop: txt2img nothing but a size; img2img the init
image's latents and the strength's step; upscale the low-resolution image the x4 UNet is conditioned on,
its tiles, and the crop back to exactly 4x the input."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sdgen import images
from sdgen.conditioning import Conditioning
from sdgen.families.x4 import UNET_MULTIPLE, augment_low_res
from sdgen.jobs import WorkItem
from sdgen.model import LoadedModel
from sdgen.noise import BatchNoise, NoiseSource
from sdgen.samplers.schedule import X4_LOW_RES_SCHEDULE
from sdgen.specs import GenerationSpec


class Txt2ImgInputs:
    """txt2img: latents of -H x -W (default the model's native size) from pure noise."""

    t_enc: int | None = None  # how many steps img2img runs; None: all
    tile: int = 0  # latent pixels per UNet/VAE tile; 0: untiled
    makes_grid = True
    noise_per_item = False  # the reference draws one run's noise from one generator

    def __init__(self, model: LoadedModel, spec: GenerationSpec, inform: Callable[[str], None]) -> None:
        self.model, self.spec = model, spec
        self.width = spec.width or model.native_size
        self.height = spec.height or model.native_size

    def noise_source(self, item: WorkItem) -> NoiseSource:
        f, spec = self.model.vae_factor, self.spec
        shape = (self.model.latent_channels, self.height // f, self.width // f)
        source = NoiseSource(
            spec.seed,
            spec.seed_mode,
            self.model.placement.torch_device,
            shape,
            spec.fixed_code,
            self._extra_noise_shape(shape),
        )
        source.start(spec.n_samples)
        return source

    def _extra_noise_shape(self, latent_shape: tuple[int, ...]) -> tuple[int, ...] | None:
        return None

    def prepare(self, item: WorkItem, cond: Conditioning, noise: BatchNoise) -> tuple[Conditioning, Any]:
        """The conditioning and the clean latents to start from (None: from noise alone)."""
        return cond, None

    def finish(self, item: WorkItem, rgbs: list[np.ndarray]) -> list[np.ndarray]:
        return rgbs

    def metadata(self, item: WorkItem) -> dict[str, Any]:
        return {"width": self.width, "height": self.height}


class Img2ImgInputs(Txt2ImgInputs):
    """The reference img2img: the init image's VAE posterior, sampled with the run's noise, noised to the
    strength's step; then the remaining steps."""

    def __init__(self, model: LoadedModel, spec: GenerationSpec, inform: Callable[[str], None]) -> None:
        assert spec.img2img is not None
        self.path = spec.img2img.init_image
        image, resized = images.fit_size(images.load_rgb(self.path, "--init-img"), spec.width, spec.height)
        if resized:
            inform(f"sdgen: {resized}")
        super().__init__(model, spec, inform)
        self.width, self.height = image.size
        self.sha256 = images.sha256(self.path)
        self.strength = spec.img2img.strength
        self.t_enc = int(self.strength * spec.steps)  # the reference's number of denoising steps
        pixels = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)[None] * 2.0 - 1.0
        self.mean, self.std = model.encode_image(pixels)

    def _extra_noise_shape(self, latent_shape: tuple[int, ...]) -> tuple[int, ...] | None:
        return latent_shape  # the VAE posterior sample, drawn before the start noise

    def prepare(self, item: WorkItem, cond: Conditioning, noise: BatchNoise) -> tuple[Conditioning, Any]:
        # the reference's get_first_stage_encoding: a posterior sample, times the latent scale factor
        assert noise.extra is not None
        return cond, (self.mean + self.std * noise.extra) * self.model.latent_scale

    def metadata(self, item: WorkItem) -> dict[str, Any]:
        return dict(
            super().metadata(item), strength=self.strength, init_image_sha256=self.sha256, init_image=str(self.path)
        )


class UpscaleInputs(Txt2ImgInputs):
    """The x4 upscaler: per input, the latents have the input's size (padded to a multiple of 8; VAE factor 4,
    so the output is 4x), the UNet sees them with the noise-augmented input concatenated."""

    makes_grid = False
    noise_per_item = True  # every input has its own size; in reference mode every input uses the seed

    def __init__(self, model: LoadedModel, spec: GenerationSpec, inform: Callable[[str], None]) -> None:
        assert spec.upscale is not None
        super().__init__(model, spec, inform)
        self.settings = spec.upscale
        self.tile = spec.upscale.tile
        self.low_ac = (model.low_res_schedule or X4_LOW_RES_SCHEDULE).alphas_cumprod().to(model.placement.device)
        # every input was read once when the spec was made; it is read again here, by the run that uses it
        self.inputs: list[tuple[Path, np.ndarray, str]] = [
            (p, np.asarray(images.load_rgb(p, "INPUT")), images.sha256(p)) for p in spec.upscale.images
        ]

    def _padded(self, item: WorkItem) -> np.ndarray:
        rgb = self.inputs[item.input_index][1]  # type: ignore[index]
        h, w = rgb.shape[:2]
        ph, pw = (-h) % UNET_MULTIPLE, (-w) % UNET_MULTIPLE
        return np.pad(rgb, ((0, ph), (0, pw), (0, 0)), mode="edge") if ph or pw else rgb

    def noise_source(self, item: WorkItem) -> NoiseSource:
        h, w = self._padded(item).shape[:2]
        source = NoiseSource(
            self.spec.seed,
            self.spec.seed_mode,
            self.model.placement.torch_device,
            (self.model.latent_channels, h, w),
            extra_shape=(3, h, w),
        )
        source.start(1)
        return source

    def prepare(self, item: WorkItem, cond: Conditioning, noise: BatchNoise) -> tuple[Conditioning, Any]:
        device = self.model.placement.torch_device
        padded = self._padded(item)
        low_res = torch.from_numpy(padded.astype(np.float32) / 255.0).permute(2, 0, 1)[None].to(device) * 2.0 - 1.0
        level = self.settings.noise_level
        assert noise.extra is not None
        augmented = augment_low_res(low_res, noise.extra, level, self.low_ac)
        labels = torch.tensor([level], dtype=torch.long, device=device)
        return Conditioning(cond.cond, cond.uncond, concat=augmented, class_labels=labels), None

    def finish(self, item: WorkItem, rgbs: list[np.ndarray]) -> list[np.ndarray]:
        h0, w0 = self.inputs[item.input_index][1].shape[:2]  # type: ignore[index]
        return [rgb[: 4 * h0, : 4 * w0] for rgb in rgbs]

    def metadata(self, item: WorkItem) -> dict[str, Any]:
        path, rgb, digest = self.inputs[item.input_index]  # type: ignore[index]
        h0, w0 = rgb.shape[:2]
        return {
            "width": 4 * w0,
            "height": 4 * h0,
            "noise_level": self.settings.noise_level,
            "input_image": str(path),
            "input_image_sha256": digest,
            "input_size": f"{w0}x{h0}",
            "tile": self.tile,
        }


MODE_INPUTS: dict[str, type[Txt2ImgInputs]] = {
    "txt2img": Txt2ImgInputs,
    "img2img": Img2ImgInputs,
    "upscale": UpscaleInputs,
}
