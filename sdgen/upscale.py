"""sdgen upscale: the SD x4 upscaler, with tiling so that big inputs fit in memory.

The x4 UNet sees the latents concatenated with the low-resolution image after noise augmentation (the
reference's ImageConcatWithNoiseAugmentation: q_sample on its own linear schedule at ``noise_level``, which
is also the UNet's class label). The latents have the input's size (VAE factor 4, output 4x).

Large inputs are denoised with the UNet evaluated on overlapping tiles at every step, the tiles' outputs
blended with linear ramps over the overlap (so there is one latent, one sampler, and no tile grid), and the
VAE decodes the same tiles, blended the same way. Inputs no larger than one tile run untiled.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from sdgen import images
from sdgen.generate import RunResult, _progress, base_metadata, checked_latents, with_fallbacks
from sdgen.noise import NoiseSource
from sdgen.output import ImageWriter
from sdgen.pipeline import Pipeline, to_uint8
from sdgen.request import GenerationRequest, OutputRequest
from sdgen.samplers import X4_LOW_RES_SCHEDULE, scheduler_steps

DEFAULT_NOISE_LEVEL = 20  # the reference superresolution script's default
MAX_NOISE_LEVEL = 350  # the x4 yaml's max_noise_level
DEFAULT_UPSCALE_STEPS = 75
DEFAULT_TILE = 128  # input pixels (= latent pixels) per UNet tile; fits an 8 GiB card in fp16
TILE_OVERLAP = 32
UNET_MULTIPLE = 8  # the x4 UNet downsamples 3 times


@dataclass(frozen=True)
class UpscaleSettings:
    noise_level: int = DEFAULT_NOISE_LEVEL
    tile: int = DEFAULT_TILE  # 0: never tile
    overlap: int = TILE_OVERLAP


def tile_origins(size: int, tile: int, overlap: int) -> list[int]:
    if size <= tile:
        return [0]
    stride = tile - overlap
    return list(range(0, size - tile, stride)) + [size - tile]


def ramp(n: int, overlap: int, device) -> torch.Tensor:
    """1 in the middle, rising linearly over ``overlap`` pixels at both ends (never 0)."""
    i = torch.arange(n, device=device, dtype=torch.float32)
    return torch.clamp(torch.minimum(i + 1, n - i) / (overlap + 1), max=1.0)


def make_model(pipe: Pipeline, cond, uncond, scale: float, low_res: torch.Tensor, noise_level: int,
               settings: UpscaleSettings):
    def unet_guided(x: torch.Tensor, t: torch.Tensor, lr: torch.Tensor) -> torch.Tensor:
        unet, dtype = pipe.unet, pipe.unet.dtype
        b = x.shape[0]
        x_in = torch.cat([x, lr.expand(b, -1, -1, -1)], dim=1)
        if uncond is None:
            c_in, t_in = cond, t
        else:
            x_in, c_in, t_in = torch.cat([x_in, x_in]), torch.cat([uncond, cond]), torch.cat([t, t])
        labels = torch.full((x_in.shape[0],), noise_level, dtype=torch.long, device=x.device)
        out = unet(x_in.to(dtype), t_in, encoder_hidden_states=c_in.to(dtype), class_labels=labels,
                   return_dict=False)[0]
        out = out.float()
        if uncond is None:
            return out
        out_uncond, out_cond = out.chunk(2)
        return out_uncond + scale * (out_cond - out_uncond)

    def call(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        t = t.to(x.device).reshape(-1)
        if t.numel() == 1:
            t = t.expand(x.shape[0])
        h, w = x.shape[-2:]
        tile = settings.tile
        if tile <= 0 or (h <= tile and w <= tile):
            return unet_guided(x, t, low_res)
        acc = torch.zeros_like(x)
        weight = torch.zeros((1, 1, h, w), device=x.device)
        for y0 in tile_origins(h, tile, settings.overlap):
            for x0 in tile_origins(w, tile, settings.overlap):
                th, tw = min(tile, h), min(tile, w)
                window = (..., slice(y0, y0 + th), slice(x0, x0 + tw))
                out = unet_guided(x[window], t, low_res[window])
                wgt = ramp(th, settings.overlap, x.device)[:, None] * ramp(tw, settings.overlap, x.device)[None, :]
                acc[window] += out * wgt
                weight[window] += wgt
        return acc / weight

    return call


def decode_tiled(pipe: Pipeline, latents: torch.Tensor, settings: UpscaleSettings) -> torch.Tensor:
    """The VAE decode in overlapping latent tiles blended with the same ramps as the UNet tiles
    (the x4 VAE's mid-block attention over a whole 512x512 latent would need ~0.5 TB)."""
    h, w = latents.shape[-2:]
    tile, overlap = settings.tile, settings.overlap
    if tile <= 0 or (h <= tile and w <= tile):
        return pipe.decode_float(latents).cpu()
    f = pipe.vae_factor
    out = torch.zeros((latents.shape[0], 3, h * f, w * f))
    weight = torch.zeros((1, 1, h * f, w * f))
    th, tw = min(tile, h), min(tile, w)
    wgt = ramp(th * f, overlap * f, "cpu")[:, None] * ramp(tw * f, overlap * f, "cpu")[None, :]
    for y0 in tile_origins(h, tile, overlap):
        for x0 in tile_origins(w, tile, overlap):
            pixels = pipe.decode_float(latents[..., y0 : y0 + th, x0 : x0 + tw]).cpu()
            window = (..., slice(y0 * f, (y0 + th) * f), slice(x0 * f, (x0 + tw) * f))
            out[window] += pixels * wgt
            weight[window] += wgt
    return out / weight


def _pad_to_multiple(img: np.ndarray, multiple: int) -> np.ndarray:
    h, w = img.shape[:2]
    ph, pw = (-h) % multiple, (-w) % multiple
    return np.pad(img, ((0, ph), (0, pw), (0, 0)), mode="edge") if ph or pw else img


def upscale(pipe: Pipeline, gen: GenerationRequest, out: OutputRequest, settings: UpscaleSettings,
            inputs: list[tuple[Path, np.ndarray, str]], say, emit) -> RunResult:
    """Upscale each input (path, HxWx3 uint8, sha256) 4x; one image per input, written as soon as it exists."""
    scale = gen.scale if gen.scale is not None else 9.0
    prompt = gen.batches[0][0]
    writer = ImageWriter(out.outdir, pipe.family, out.watermark, say=say)
    writer.prepare()
    # the low-resolution image's noise-augmentation schedule (the yaml's low_scale_config)
    low_ac = (pipe.low_res_schedule or X4_LOW_RES_SCHEDULE).alphas_cumprod().to(pipe.placement.device)
    result = RunResult()
    with torch.no_grad():
        cond = pipe.encode([prompt])
        uncond = pipe.encode([gen.negative_prompt]) if scale != 1.0 else None
    bar = _progress(len(inputs) * scheduler_steps(gen.sampler, gen.steps), out.quiet)
    try:
        for k, (path, rgb, digest) in enumerate(inputs):
            h0, w0 = rgb.shape[:2]
            padded = _pad_to_multiple(rgb, UNET_MULTIPLE)
            h, w = padded.shape[:2]
            device = pipe.placement.torch_device
            lr = torch.from_numpy(padded.astype(np.float32) / 255.0).permute(2, 0, 1)[None].to(device) * 2.0 - 1.0
            def make_image():
                # per input: the low-res augmentation noise first (as the reference), then the starting latents
                noise = NoiseSource(gen.seed + (k if gen.seed_mode == "per-image" else 0), gen.seed_mode, device,
                                    (pipe.latent_channels, h, w), extra_shape=(3, h, w))
                noise.start(1)
                batch = noise.batch(0, 1)
                a = low_ac[settings.noise_level]
                lr_aug = torch.sqrt(a) * lr + torch.sqrt(1.0 - a) * batch.extra
                model = make_model(pipe, cond, uncond, scale, lr_aug, settings.noise_level, settings)
                latents = pipe.denoise(batch.start, model, gen.sampler, gen.steps, gen.eta, batch.generators,
                                       lambda: bar.update(1))
                pixels = decode_tiled(pipe, checked_latents(pipe, latents), settings)
                return to_uint8(pixels)[0][: 4 * h0, : 4 * w0], batch.seeds[0]

            rgb_out, seed = with_fallbacks(pipe, None, make_image, say)
            meta = dict(base_metadata(pipe, gen, "upscale", scale, 4 * w0, 4 * h0), prompt=prompt,
                        seed=seed, noise_level=settings.noise_level, input_image=str(path),
                        input_image_sha256=digest, input_size=f"{w0}x{h0}", tile=settings.tile,
                        notes=list(pipe.notes))
            saved = writer.save_sample(rgb_out, meta)
            result.paths.append(saved)
            result.images += 1
            emit(saved)
    finally:
        bar.close()
    return result


def load_inputs(paths: list[Path]) -> list[tuple[Path, np.ndarray, str]]:
    """Read every input before any weights load, so a bad file fails fast."""
    loaded = []
    for path in paths:
        img = images.load_rgb(path, "INPUT")
        loaded.append((path, np.asarray(img), images.sha256(path)))
    return loaded
