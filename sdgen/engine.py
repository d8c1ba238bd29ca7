"""One loop for every mode: a spec's work items -> conditioning -> noise -> sampler -> pixels -> PNGs.

The loop never prints: it tells its sink (:mod:`sdgen.events`) and checks its cancel token at every model
evaluation. Each image is written as soon as it exists, so an error, a cancel or a signal loses none of the
earlier ones. What a mode adds (an init image, the upscaler's input and tiles) is in :mod:`sdgen.modes`.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sdgen import jobs, samplers
from sdgen.conditioning import encode_prompts
from sdgen.errors import Cancelled, CheckpointError, ModelOutputError, OutOfMemory
from sdgen.events import CancelToken, Finished, Notice, Saved, Sink, Started, Step, Stopped, ignore
from sdgen.model import HalfOverflow, LoadedModel
from sdgen.modes import MODE_INPUTS, Txt2ImgInputs
from sdgen.noise import NoiseSource
from sdgen.output.metadata import run_metadata
from sdgen.output.writer import ImageWriter
from sdgen.specs import GenerationSpec, OutputSpec
from sdgen.tiling import decode_tiled, tiled_guided


@dataclass
class RunResult:
    paths: list[Path] = field(default_factory=list)  # every file written, in order
    images: int = 0  # images made (also those not saved with skip_save)


class RunNotes:
    """What this run had to do differently (each later PNG lists it under 'notes'), and its notices, each
    told once. Per run, never per model: a later run on the same model starts with none."""

    def __init__(self, sink: Sink) -> None:
        self.sink = sink
        self.items: list[str] = []
        self._told: set[str] = set()

    def tell(self, message: str, informational: bool = False) -> None:
        if message not in self._told:
            self._told.add(message)
            self.sink(Notice(message, informational))

    def inform(self, message: str) -> None:
        self.tell(message, informational=True)

    def record(self, note: str, message: str) -> None:
        self.items.append(note)
        self.sink(Notice(message))


def run(
    model: LoadedModel, spec: GenerationSpec, out: OutputSpec, sink: Sink = ignore, cancel: CancelToken | None = None
) -> RunResult:
    """Make every image ``spec`` asks for on ``model`` and write them as ``out`` says."""
    cancel = cancel or CancelToken()
    if spec.mode not in model.family.modes:
        raise CheckpointError(f"{model.name}: a {model.family.label} model cannot run {spec.mode}")
    # 1. The plan: work items, guidance scale, the mode's inputs, where the images go
    items = jobs.plan(spec)
    scale = spec.scale if spec.scale is not None else model.family.default_scale[spec.mode]
    notes = RunNotes(sink)
    inputs = MODE_INPUTS[spec.mode](model, spec, notes.inform)
    saver = _Saver(model, spec, out, scale, notes, sink)
    n = samplers.evaluations(spec.sampler, spec.steps, inputs.t_enc)
    why = samplers.evaluations_note(spec.sampler, spec.steps, n)
    sink(Started(spec.seed, spec.seed_mode, spec.sampler, spec.steps, n, len(items), spec.image_count, why))
    try:
        run_noise = None if inputs.noise_per_item else inputs.noise_source(items[0])
        for item in items:
            cancel.check()
            noise = run_noise or inputs.noise_source(item)

            def make_batch() -> tuple[list[np.ndarray], list[int]]:
                callback = _step_callback(sink, cancel, n, item.batch)
                return _make_batch(model, spec, item, inputs, noise, scale, callback, notes)

            rgbs, seeds = redo_after_failure(model, noise, make_batch, notes)
            for i, rgb in enumerate(rgbs):
                saver.image(rgb, item, i, seeds[i], inputs.metadata(item), inputs.makes_grid)
        saver.grid(out.n_rows or spec.n_samples, inputs.metadata(items[0]))
    except BaseException as e:  # the sink hears how the run ended; the caller gets the exception
        reason = "cancelled" if isinstance(e, Cancelled) else "error" if isinstance(e, Exception) else "interrupted"
        sink(Stopped(reason, str(e) or type(e).__name__, saver.result.images, tuple(saver.result.paths)))
        raise
    sink(Finished(images=saver.result.images, paths=tuple(saver.result.paths)))
    return saver.result


class _Saver:
    """Step 5: each image written as soon as it exists, with its metadata; the grid at the end."""

    def __init__(
        self, model: LoadedModel, spec: GenerationSpec, out: OutputSpec, scale: float, notes: RunNotes, sink: Sink
    ) -> None:
        self.model, self.spec, self.out, self.notes, self.sink = model, spec, out, notes, sink
        self.writer = ImageWriter(out.outdir, model.family.watermark if out.watermark else None, notes.inform)
        if not (out.skip_save and out.skip_grid):
            self.writer.prepare()
        self.meta = run_metadata(model, spec, scale)
        self.result = RunResult()
        self.grid_images: list[tuple[np.ndarray, str, int]] = []

    def _metadata(self, mode_meta: dict[str, Any], **fields: Any) -> dict[str, Any]:
        """The run's fields, the model's state now, the mode's, and this file's; notes so far in this run."""
        return dict(self.meta, **self.model.state(), **mode_meta, **fields, notes=list(self.notes.items))

    def _saved(self, path: Path, meta: dict[str, Any], grid: bool = False) -> None:
        self.result.paths.append(path)
        self.sink(Saved(path=path, metadata=meta, grid=grid))

    def image(self, rgb: np.ndarray, item: jobs.WorkItem, i: int, seed: int, mode_meta: dict, grid: bool) -> None:
        prompt = item.prompts[i]
        meta = self._metadata(mode_meta, prompt=prompt, seed=seed, batch=item.batch, batch_index=i)
        if not self.out.skip_save:
            self._saved(self.writer.save_sample(rgb, meta), meta)
        if grid and not self.out.skip_grid:
            self.grid_images.append((rgb, prompt, seed))
        self.result.images += 1

    def grid(self, per_row: int, mode_meta: dict[str, Any]) -> None:
        """The reference's grid of a run of several images. It records every image's prompt and seed; its
        'parameters' prompt lists each distinct prompt."""
        if len(self.grid_images) < 2:
            return
        prompts = [p for _, p, _ in self.grid_images]
        meta = self._metadata(
            mode_meta,
            prompt="\n".join(dict.fromkeys(prompts)),
            prompts=prompts,
            seeds=[s for _, _, s in self.grid_images],
            seed=self.spec.seed,
        )
        self._saved(self.writer.save_grid([rgb for rgb, _, _ in self.grid_images], per_row, meta), meta, grid=True)


@torch.no_grad()
def _make_batch(
    model: LoadedModel,
    spec: GenerationSpec,
    item: jobs.WorkItem,
    inputs: Txt2ImgInputs,
    noise: NoiseSource,
    scale: float,
    callback: samplers.Callback,
    notes: RunNotes,
) -> tuple[list[np.ndarray], list[int]]:
    # 1. Conditioning: the prompts' text features (the negative prompt's first), then the mode's image inputs
    cond = encode_prompts(model, list(item.prompts), spec.negative_prompt, scale, notes.tell)
    # 2. Noise: the batch's starting noise, and what is drawn before it (img2img's posterior sample)
    batch = noise.batch(item.seeds)
    cond, x0 = inputs.prepare(item, cond, batch)
    # 3. Sampling, tile by tile when the mode tiles and the latents are larger than a tile
    params = samplers.SamplingParams(
        steps=spec.steps,
        schedule=model.schedule,
        v_prediction=model.v_prediction,
        eta=spec.eta,
        generators=batch.generators,
        x0=x0,
        t_enc=inputs.t_enc,
    )
    with model.memory.using("unet"):
        latents = samplers.sample(
            spec.sampler, tiled_guided(model, cond, scale, inputs.tile), batch.start, params, callback
        )
    # 4. Pixels
    pixels = _decode(model, _finite(model, latents), inputs.tile, notes)
    return inputs.finish(item, to_uint8(pixels)), batch.seeds


def _step_callback(sink: Sink, cancel: CancelToken, n: int, batch: int) -> samplers.Callback:
    counter = itertools.count(1)

    def callback(x: torch.Tensor) -> None:
        cancel.check()
        sink(Step(i=next(counter), n=n, batch=batch, latents=x))

    return callback


def _finite(model: LoadedModel, latents: torch.Tensor) -> torch.Tensor:
    if torch.isfinite(latents).all():
        return latents
    if model.unet.dtype != torch.float32:
        raise HalfOverflow("unet")
    raise ModelOutputError("the UNet produced NaN/inf values even in fp32: the checkpoint's weights are broken")


def _decode(model: LoadedModel, latents: torch.Tensor, tile: int, notes: RunNotes) -> torch.Tensor:
    """Latents -> float pixels; a half-precision VAE that overflows decodes the same latents again in fp32."""
    try:
        return decode_tiled(model, latents, tile)
    except HalfOverflow:
        notes.record(
            "VAE decoded in fp32 after a half-precision overflow",
            "sdgen: the VAE overflowed in half precision; decoding in fp32 from now on",
        )
        model.upcast("vae")
        return decode_tiled(model, latents, tile)


def redo_after_failure(model: LoadedModel, noise: NoiseSource, make_batch: Callable[[], Any], notes: RunNotes) -> Any:
    """Run one batch; on CUDA out-of-memory step down the memory ladder, on a half-precision UNet overflow move
    the UNet to fp32, and redo the batch with the same random numbers. Images already saved stay saved."""
    from sdgen.runtime.memory import free_cached_memory, is_out_of_memory

    while True:
        state = noise.snapshot()
        try:
            return make_batch()
        except HalfOverflow:
            notes.record(
                "UNet ran in fp32 after a half-precision overflow",
                f"sdgen: the UNet overflowed in {model.placement.precision}; redoing this batch with the UNet in fp32",
            )
            model.upcast("unet")
        except Exception as e:
            if not is_out_of_memory(e):
                raise
            del e  # drop the traceback's references to the big tensors before freeing memory
            free_cached_memory()
            rung = model.memory.step_down()
            if rung is None:
                raise OutOfMemory(
                    "out of GPU memory even with sequential CPU offload; try a smaller -H/-W, -n 1, "
                    "--tile 64 for upscale, or --device cpu"
                ) from None
            notes.record(f"out of memory: used {rung}", f"sdgen: out of GPU memory; retrying this batch with {rung}")
        noise.restore(state)


def to_uint8(x: torch.Tensor) -> list[np.ndarray]:
    """The reference's conversion: 255 * clamp((x + 1) / 2), truncated by astype(np.uint8), not rounded."""
    x = torch.clamp((x.float() + 1.0) / 2.0, 0.0, 1.0)
    return list((255.0 * x.permute(0, 2, 3, 1).cpu().numpy()).astype(np.uint8))
