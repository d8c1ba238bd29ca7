"""Runs on a loaded pipeline: batches, seeds, progress, and saving each image as soon as it exists."""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sdgen import __version__
from sdgen.noise import NoiseSource
from sdgen.output import ImageWriter
from sdgen.pipeline import Pipeline
from sdgen.request import DEFAULT_SCALE, GenerationRequest, OutputRequest
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
    make_latents: Callable[..., Any],  # (model, noise, generators, tick, batch number) -> latents
    meta_extra: dict,
    say: Callable[[str], None],
    emit: Callable[[Path], None],
    ticks_per_batch: int,
) -> RunResult:
    """The loop shared by txt2img and img2img: per batch encode, make latents, decode, save."""
    width, height = size
    scale = gen.scale if gen.scale is not None else DEFAULT_SCALE[pipe.family]
    writer = ImageWriter(out.outdir, pipe.family, out.watermark, say=say)
    if not (out.skip_save and out.skip_grid):
        writer.prepare()
    f = pipe.vae_factor
    noise = NoiseSource(gen.seed, gen.seed_mode, pipe.placement.torch_device,
                        (pipe.latent_channels, height // f, width // f), gen.fixed_code)
    noise.start(gen.n_samples)
    meta = dict(base_metadata(pipe, gen, mode, scale, width, height), **meta_extra)
    warn_once = _once(say)
    result, grid_images = RunResult(), []
    bar = _progress(len(gen.batches) * ticks_per_batch, out.quiet)
    try:
        for iteration, prompts in enumerate(gen.batches):
            b = len(prompts)
            # 1. Conditioning, unconditional first as the reference (it draws no random numbers either way)
            uncond = pipe.encode([gen.negative_prompt] * b) if scale != 1.0 else None
            cond = pipe.encode(list(prompts), warn=warn_once)
            # 2. Noise and sampling
            x_noise, generators, seeds = noise.batch(result.images, b)
            model = pipe.model_fn(cond, uncond, scale)
            latents = make_latents(model, x_noise, generators, lambda: bar.update(1), iteration)
            # 3. Pixels, saved one by one as soon as they exist
            for i, rgb in enumerate(pipe.decode(latents)):
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

    def make_latents(model, x_noise, generators, tick, _batch):
        return pipe.denoise(x_noise, model, gen.sampler, gen.steps, gen.eta, generators, tick)

    ticks = scheduler_steps(gen.sampler, gen.steps)
    return run_batches(pipe, gen, out, "txt2img", (width, height), make_latents, {}, say, emit, ticks)
