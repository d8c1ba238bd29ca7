"""Runs on a loaded pipeline: batches, seeds, progress, and saving each image as soon as it exists."""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from sdgen import __version__
from sdgen.errors import ModelOutputError, OutOfMemory
from sdgen.noise import NoiseSource
from sdgen.output import ImageWriter
from sdgen.pipeline import Pipeline
from sdgen.request import DEFAULT_IMG2IMG_SCALE, DEFAULT_SCALE, GenerationRequest, OutputRequest
from sdgen.samplers import SAMPLERS, scheduler_steps


@dataclass
class RunResult:
    paths: list[Path] = field(default_factory=list)  # every file written, in order
    images: int = 0  # images made (also those not saved with --skip_save)


def _progress(total: int, quiet: bool):
    from tqdm import tqdm

    return tqdm(total=total, file=sys.stderr, disable=quiet, unit="step", dynamic_ncols=True, leave=False)


def _once(say: Callable[[str], None]) -> Callable[[str], None]:
    seen: set[str] = set()

    def tell(message: str) -> None:
        if message not in seen:
            seen.add(message)
            say(message)

    return tell


class _HalfOverflow(Exception):
    """The UNet's half-precision output overflowed (NaN/inf latents)."""


def checked_latents(pipe: Pipeline, latents):
    import torch

    if torch.isfinite(latents).all():
        return latents
    if pipe.unet.dtype != torch.float32:
        raise _HalfOverflow()
    raise ModelOutputError("the UNet produced NaN/inf values even in fp32: the checkpoint's weights are broken")


def with_fallbacks(
    pipe: Pipeline, noise: NoiseSource | None, make_batch: Callable[[], Any], say: Callable[[str], None]
):
    """Run one batch; on CUDA out-of-memory step down the memory ladder, on a half-precision overflow move
    the UNet to fp32, and redo the batch with the same random numbers. Images already saved stay saved."""
    from sdgen.memory import free_cached_memory, is_out_of_memory

    while True:
        state = noise.snapshot() if noise is not None else None
        try:
            return make_batch()
        except _HalfOverflow:
            say(f"sdgen: the UNet overflowed in {pipe.placement.precision}; redoing this batch with the UNet in fp32")
            pipe.upcast_unet()
        except Exception as e:
            if not is_out_of_memory(e):
                raise
            del e  # drop the traceback's references to the big tensors before freeing memory
            free_cached_memory()
            step = pipe.memory.step_down()
            if step is None:
                raise OutOfMemory(
                    "out of GPU memory even with sequential CPU offload; try a smaller -H/-W, -n 1, "
                    "--tile 64 for upscale, or --device cpu"
                ) from None
            say(f"sdgen: out of GPU memory; retrying this batch with {step}")
            pipe.notes.append(f"out of memory: used {step}")
        if noise is not None:
            noise.restore(state)


def base_metadata(pipe: Pipeline, gen: GenerationRequest, mode: str, scale: float, width: int, height: int) -> dict:
    return {
        "mode": mode, "negative_prompt": gen.negative_prompt, "steps": gen.steps, "sampler": gen.sampler,
        "sampler_label": SAMPLERS[gen.sampler].label, "scale": scale, "eta": gen.eta, "width": width,
        "height": height, "seed_mode": gen.seed_mode, "base_seed": gen.seed, "fixed_code": gen.fixed_code,
        "model": pipe.model_name, "model_hash": pipe.model_hash, "config": pipe.config_source,
        "family": pipe.family, "v_prediction": pipe.v_prediction, "device": pipe.placement.device,
        "precision": pipe.placement.precision, "sdgen_version": __version__,
    }


def run_batches(
    pipe: Pipeline,
    gen: GenerationRequest,
    out: OutputRequest,
    mode: str,
    size: tuple[int, int],
    make_latents: Callable[..., Any],  # (model, BatchNoise, tick) -> latents
    meta_extra: dict,
    say: Callable[[str], None],
    emit: Callable[[Path], None],
    ticks_per_batch: int,
    extra_noise_shape: tuple[int, ...] | None = None,
    default_scales: dict[str, float] = DEFAULT_SCALE,
) -> RunResult:
    """The loop shared by txt2img and img2img: per batch encode, make latents, decode, save."""
    width, height = size
    scale = gen.scale if gen.scale is not None else default_scales[pipe.family]
    writer = ImageWriter(out.outdir, pipe.family, out.watermark, say=say)
    if not (out.skip_save and out.skip_grid):
        writer.prepare()
    f = pipe.vae_factor
    noise = NoiseSource(gen.seed, gen.seed_mode, pipe.placement.torch_device,
                        (pipe.latent_channels, height // f, width // f), gen.fixed_code, extra_noise_shape)
    noise.start(gen.n_samples)
    meta = dict(base_metadata(pipe, gen, mode, scale, width, height), **meta_extra)
    warn_once = _once(say)
    result, grid_images = RunResult(), []
    bar = _progress(len(gen.batches) * ticks_per_batch, out.quiet)
    try:
        for iteration, prompts in enumerate(gen.batches):
            b = len(prompts)
            def make_batch():
                # 1. Conditioning, unconditional first as the reference (it draws no random numbers either way)
                uncond = pipe.encode([gen.negative_prompt] * b) if scale != 1.0 else None
                cond = pipe.encode(list(prompts), warn=warn_once)
                # 2. Noise and sampling
                batch_noise = noise.batch(result.images, b)
                latents = make_latents(pipe.model_fn(cond, uncond, scale), batch_noise, lambda: bar.update(1))
                # 3. Pixels
                return pipe.decode(checked_latents(pipe, latents)), batch_noise.seeds

            rgbs, seeds = with_fallbacks(pipe, noise, make_batch, say)
            # 4. Saved one by one as soon as they exist
            for i, rgb in enumerate(rgbs):
                image_meta = dict(meta, prompt=prompts[i], seed=seeds[i], batch=iteration, batch_index=i,
                                  notes=list(pipe.notes))
                if not out.skip_save:
                    path = writer.save_sample(rgb, image_meta)
                    result.paths.append(path)
                    emit(path)
                if not out.skip_grid:
                    grid_images.append(rgb)
                result.images += 1
        if not out.skip_grid and len(grid_images) > 1:
            n_rows = out.n_rows or gen.n_samples
            grid_meta = dict(meta, prompt=gen.batches[0][0], seed=gen.seed, notes=list(pipe.notes))
            path = writer.save_grid(grid_images, n_rows, grid_meta)
            result.paths.append(path)
            emit(path)
    finally:
        bar.close()
    return result


def txt2img(pipe: Pipeline, gen: GenerationRequest, out: OutputRequest, say, emit) -> RunResult:
    width = gen.width or pipe.native_size
    height = gen.height or pipe.native_size

    def make_latents(model, noise, tick):
        return pipe.denoise(noise.start, model, gen.sampler, gen.steps, gen.eta, noise.generators, tick)

    ticks = scheduler_steps(gen.sampler, gen.steps)
    return run_batches(pipe, gen, out, "txt2img", (width, height), make_latents, {}, say, emit, ticks)


def img2img(pipe: Pipeline, gen: GenerationRequest, out: OutputRequest, say, emit) -> RunResult:
    """The reference img2img: encode the init image (VAE posterior sample), noise it to the strength's
    step, denoise the remaining steps."""
    import torch

    init = gen.extras["init_image"]  # PIL RGB, already sized
    strength = gen.extras["strength"]
    width, height = init.size
    f = pipe.vae_factor
    pixels = torch.from_numpy(np.asarray(init, dtype=np.float32) / 255.0).permute(2, 0, 1)[None] * 2.0 - 1.0
    with torch.no_grad():
        mean, std = pipe.encode_image(pixels.to(pipe.placement.device))
    t_enc = int(strength * gen.steps)  # the reference's number of denoising steps

    def make_latents(model, noise, tick):
        # the reference's get_first_stage_encoding: a posterior sample, times the latent scale factor
        x0 = (mean + std * noise.extra) * pipe.vae.config.scaling_factor
        return pipe.denoise_from(x0, noise.start, model, gen.sampler, gen.steps, t_enc, gen.eta,
                                 noise.generators, tick)

    meta = {"strength": strength, "init_image_sha256": gen.extras["init_sha256"],
            "init_image": str(gen.extras["init_path"])}
    ticks = scheduler_steps(gen.sampler, gen.steps) if t_enc >= gen.steps else t_enc
    return run_batches(pipe, gen, out, "img2img", (width, height), make_latents, meta, say, emit, ticks,
                       extra_noise_shape=(pipe.latent_channels, height // f, width // f),
                       default_scales=DEFAULT_IMG2IMG_SCALE)
