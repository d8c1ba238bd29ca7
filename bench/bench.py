#!/usr/bin/env python
"""Benchmark sdgen against stock diffusers on FULL-SIZE Stable Diffusion architectures with random weights.

Speed does not depend on the weights' values, so no real checkpoint is needed: the script writes a random
state dict in the ORIGINAL LDM key layout (the layout functions of sdgen.testing.ldm_layout applied to
sdgen's shipped full-size yamls) as a .safetensors file in a cache folder (reused when present), and loads
it through sdgen's real loader (sdgen.api.load_model). Then, in one process and interleaved (sdgen,
diffusers, sdgen, diffusers, ...):

  sdgen      sdgen.engine.run on the LoadedModel (txt2img, ddim, nothing saved: skip_save/skip_grid)
  diffusers  a stock diffusers StableDiffusionPipeline of the SAME file (diffusers' UNet2DConditionModel,
             AutoencoderKL and transformers' CLIPTextModel made by diffusers' own single-file conversion,
             placed in sdgen's device, dtype and layout), with a stock DDIMScheduler (scaled_linear
             0.00085..0.012, steps_offset 1, set_alpha_to_one False, epsilon or v_prediction), output_type="np"

Same prompt, steps, size, batch and guidance (7.5). Timings come from the same hooks on both pipelines'
modules: per-step time = (end of the last UNet call - start of the first) / steps, fixed cost = total -
denoising span (text encoder, latents, VAE decode, post-processing). On the CPU run few steps (--steps 2)
and read the extrapolation: s/image(N) = per-step x N + fixed.

--upscale (or --model x4) times sdgen's tiled x4 upscale (sdgen.engine.run in upscale mode, as `sdgen
upscale` runs it: PNG with watermark written) of a --size input (default 512 -> 2048) and extrapolates to 75
steps; --single-tile times only one UNet tile call and one VAE decode of one tile (the engine's
sdgen.tiling tiles) and extrapolates from them.

Examples:
  python bench/bench.py --model sd15 --device cpu --steps 2 --repeats 2
  python bench/bench.py --model sd15 --device cpu --precision bf16 --steps 2
  python bench/bench.py --model sd2v --device cuda --precision fp16 --steps 50 --repeats 5
  python bench/bench.py --model sd15 --device cuda --memory-fraction 0.25     # simulate a ~20 GiB card on 80
  python bench/bench.py --model sd15 --device cuda --compile                  # sdgen --compile vs stock eager
  python bench/bench.py --model sd15 --device cuda --compile --diffusers-compile  # vs diffusers' compile recipe
  python bench/bench.py --model sd15 --device cuda --low-vram --memory-fraction 0.0125 --only sdgen  # 1 GiB cap
  python bench/bench.py --upscale --device cuda --memory-fraction 0.1         # x4 upscale under 8 GiB of 80
  python bench/bench.py --upscale --device cpu --steps 1
  python bench/bench.py --upscale --device cpu --single-tile

Peak memory: CUDA torch.cuda.max_memory_allocated (reset before each run); CPU the process's peak RSS during
the run (VmHWM, reset before each run through /proc/self/clear_refs; where that is not possible, a sampling
thread, else resource.getrusage's lifetime peak, marked as such). Each pipeline has its own copy of the
weights, so the CPU figure is both copies + that run's working memory.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import resource
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from sdgen.specs import DEFAULT_TILE  # imports no torch: --help stays instant

MODELS = {  # bench name -> (sdgen family, v-prediction, native size)
    "sd15": ("sd1", False, 512),
    "sd2v": ("sd2", True, 768),
    "x4": ("x4", True, 512),
}
# text encoders of the real checkpoints: (layout, width, layers); MLP = 4 x width
TEXT_ENCODERS = {"sd1": ("clip", 768, 12), "sd2": ("openclip", 1024, 24), "x4": ("openclip", 1024, 24)}
GUIDANCE = 7.5


# ---- random full-size checkpoints ---------------------------------------------------------------------


def _layouts():
    """The original-layout generators, shared with sdgen's tests (one source of truth for key names)."""
    from sdgen.testing import ldm_layout

    return ldm_layout


def _shipped_params(model: str) -> dict:
    """The model params of sdgen's shipped full-size yaml for ``model``."""
    from sdgen.checkpoints.ldm_config import shipped_config
    from sdgen.families import family_named

    family, v, _ = MODELS[model]
    config, _ = shipped_config(family_named(family), v)
    return config["model"]["params"]


def checkpoint_shapes(model: str) -> dict[str, tuple]:
    tc = _layouts()
    family, _, _ = MODELS[model]
    params = _shipped_params(model)
    shapes: dict[str, tuple] = {}
    shapes.update({"model.diffusion_model." + k: s for k, s in tc.unet_layout(params["unet_config"]["params"]).items()})
    ddconfig = params["first_stage_config"]["params"]["ddconfig"]
    embed_dim = params["first_stage_config"]["params"].get("embed_dim", 4)
    shapes.update({"first_stage_model." + k: s for k, s in tc.vae_layout(ddconfig, embed_dim).items()})
    kind, width, layers = TEXT_ENCODERS[family]
    if kind == "clip":
        shapes.update({"cond_stage_model.transformer." + k: s for k, s in tc.clip_layout(width, layers).items()})
    else:
        shapes.update({"cond_stage_model.model." + k: s for k, s in tc.openclip_layout(width, layers).items()})
    return shapes


def ensure_checkpoint(model: str, cache: Path, dtype_name: str, log) -> Path:
    """The random full-size checkpoint for ``model``, written once (its name hashes the layout)."""
    import torch

    shapes = checkpoint_shapes(model)
    digest = hashlib.sha256(json.dumps(sorted((k, list(v)) for k, v in shapes.items())).encode()).hexdigest()[:10]
    tag = "-768-v" if model == "sd2v" else ""
    path = cache / f"bench-{model}{tag}-random-{dtype_name}-{digest}.safetensors"
    if path.is_file():
        return path
    from safetensors.torch import save_file

    tc = _layouts()
    dtype = {"fp16": torch.float16, "fp32": torch.float32, "bf16": torch.bfloat16}[dtype_name]
    n_params = sum(int(torch.Size(s).numel()) for s in shapes.values())
    log(f"bench: writing {path.name}: {len(shapes)} tensors, {n_params / 1e6:.0f}M parameters ({dtype_name})")
    g = torch.Generator().manual_seed(0)
    sd = {}
    for name, shape in shapes.items():
        # as sdgen.testing.ldm_layout.random_state_dict: norms ~1, biases ~0, weights ~N(0, 1/fan_in): finite
        # activations through the full depth (sdgen rejects NaN/inf latents or pixels)
        if name.endswith("bias") or len(shape) <= 1:
            base = 1.0 if (name.endswith("weight") and len(shape) == 1) else 0.0
            t = base + 0.02 * torch.randn(shape, generator=g)
        else:
            fan_in = int(torch.Size(shape[1:]).numel())
            t = torch.randn(shape, generator=g) / max(fan_in, 1) ** 0.5
        sd[name] = t.to(dtype).contiguous()
    params = _shipped_params(model)
    sd.update(tc.schedule_buffers(params))
    if "low_scale_config" in params:
        low = params["low_scale_config"]["params"]["noise_schedule_config"]
        sd.update({f"low_scale_model.{k}": t for k, t in tc.schedule_buffers(dict(low)).items()})
    cache.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    save_file(sd, str(tmp))
    os.replace(tmp, path)
    return path


def bench_input_png(cache: Path, size: int) -> Path:
    """A deterministic, smooth-ish RGB test image (content does not change the speed)."""
    import numpy as np
    from PIL import Image

    path = cache / f"bench-input-{size}.png"
    if not path.is_file():
        rng = np.random.default_rng(0)
        small = rng.integers(0, 256, (max(size // 16, 1), max(size // 16, 1), 3), dtype=np.uint8)
        img = Image.fromarray(small).resize((size, size), Image.BICUBIC)
        cache.mkdir(parents=True, exist_ok=True)
        img.save(path)
    return path


# ---- measuring -------------------------------------------------------------------------------------------


def _proc_status_kb(field_name: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field_name + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def rss_bytes() -> int | None:
    kb = _proc_status_kb("VmRSS")
    return None if kb is None else kb * 1024


class CpuPeak:
    """The process's peak RSS over a block: VmHWM reset through /proc/self/clear_refs, else a sampler thread,
    else getrusage's lifetime peak (``exact`` says which)."""

    def __enter__(self):
        self.before = rss_bytes()
        self.method = "VmHWM"
        self._stop = None
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
        except OSError:
            if self.before is not None:
                self.method = "sampled RSS (10 ms)"
                self._max = self.before
                self._stop = threading.Event()
                self._thread = threading.Thread(target=self._sample, daemon=True)
                self._thread.start()
            else:
                self.method = "ru_maxrss (process lifetime)"
        return self

    def _sample(self):
        while not self._stop.wait(0.01):
            self._max = max(self._max, rss_bytes() or 0)

    def __exit__(self, *exc):
        if self.method == "VmHWM":
            self.peak = (_proc_status_kb("VmHWM") or 0) * 1024
        elif self._stop is not None:
            self._stop.set()
            self._thread.join()
            self.peak = max(self._max, rss_bytes() or 0)
        else:
            r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            self.peak = r if sys.platform == "darwin" else r * 1024
        return False


class CudaPeak:
    def __init__(self, device):
        self.device = device
        self.method = "torch.cuda.max_memory_allocated"

    def __enter__(self):
        import torch

        torch.cuda.synchronize(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        self.before = torch.cuda.memory_allocated(self.device)
        return self

    def __exit__(self, *exc):
        import torch

        torch.cuda.synchronize(self.device)
        self.peak = torch.cuda.max_memory_allocated(self.device)
        return False


class Probe:
    """Wall-clock intervals of the modules' calls: UNet forward, text encoder forward, VAE decode.
    The same hooks on both pipelines' modules, so both are measured the same way. On CUDA every
    boundary synchronizes (a few microseconds per call, the same for both)."""

    def __init__(self, unet, text_encoder, vae, cuda: bool):
        import torch

        self.cuda = cuda
        self._sync = torch.cuda.synchronize if cuda else (lambda: None)
        self.events: dict[str, list[tuple[float, float]]] = {}
        self._open: dict[str, list[float]] = {}
        self.attach(unet, text_encoder, vae)

    def attach(self, unet, text_encoder, vae):
        """Hook one pipeline's modules (a compiled UNet: its torch.compile wrapper, so that the hooks run
        outside the compiled graph)."""
        for name, module in (("unet", unet), ("text_encoder", text_encoder)):
            module.register_forward_pre_hook(self._pre(name))
            module.register_forward_hook(self._post(name))
        original = vae.decode

        def decode(*args, **kwargs):
            self._pre("vae_decode")(None, None)
            try:
                return original(*args, **kwargs)
            finally:
                self._post("vae_decode")(None, None, None)

        vae.decode = decode  # instance attribute: sdgen and diffusers both call vae.decode(...)

    def _pre(self, name):
        def hook(module, args):
            self._sync()
            self._open.setdefault(name, []).append(time.perf_counter())

        return hook

    def _post(self, name):
        def hook(module, args, output):
            self._sync()
            start = self._open[name].pop()
            self.events.setdefault(name, []).append((start, time.perf_counter()))

        return hook

    def reset(self):
        self.events, self._open = {}, {}

    def total(self, name) -> float:
        return sum(b - a for a, b in self.events.get(name, []))

    def calls(self, name) -> int:
        return len(self.events.get(name, []))

    def span(self, name) -> float:
        ev = self.events.get(name, [])
        return ev[-1][1] - ev[0][0] if ev else 0.0


@dataclass
class Run:
    pipeline: str
    total_s: float
    images: int
    steps: int  # denoising iterations (UNet evaluations of the whole latent batch)
    denoise_s: float  # first UNet call start -> last UNet call end
    unet_s: float  # time inside UNet calls
    encode_s: float
    decode_s: float
    peak_bytes: int
    before_bytes: int | None
    memory_method: str
    error: str | None = None
    extra: dict = field(default_factory=dict)

    @property
    def per_step_s(self) -> float:
        return self.denoise_s / self.steps if self.steps else float("nan")

    @property
    def fixed_s(self) -> float:
        return self.total_s - self.denoise_s


def timed(name: str, fn, probe: Probe, ctx, images: int, steps_of=lambda p: p.calls("unet")) -> Run:
    import torch

    from sdgen.runtime.memory import is_out_of_memory

    probe.reset()
    error = None
    with ctx as mem:
        if probe.cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        try:
            fn()
        except Exception as e:  # an OOM under --memory-fraction is a result, not a crash
            if not is_out_of_memory(e):
                raise
            error = "out of memory"
            del e
            if probe.cuda:
                torch.cuda.empty_cache()
        if probe.cuda:
            torch.cuda.synchronize()
        t1 = time.perf_counter()
    return Run(
        name,
        t1 - t0,
        images,
        steps_of(probe),
        probe.span("unet"),
        probe.total("unet"),
        probe.total("text_encoder"),
        probe.total("vae_decode"),
        mem.peak,
        mem.before,
        mem.method,
        error,
    )


# ---- the two pipelines ---------------------------------------------------------------------------------


def diffusers_modules(model, ckpt: Path, v_prediction: bool | None) -> tuple:
    """Stock diffusers/transformers UNet, VAE and text encoder made from ``ckpt`` by diffusers' own single-file
    conversion (sdgen.checkpoints.build), placed as sdgen placed its modules: the same device, dtype (the VAE
    in fp32 where the family needs it) and memory layout."""
    import torch

    from sdgen.checkpoints import build
    from sdgen.checkpoints.files import read_state_dict
    from sdgen.checkpoints.ldm_config import resolve
    from sdgen.checkpoints.load import sibling_yaml

    sd = read_state_dict(ckpt)
    arch = resolve(sd, ckpt, sibling_yaml(ckpt), v_prediction)
    parts = [build.build_unet(arch, sd, str(ckpt)), build.build_vae(arch, sd, str(ckpt))]
    parts.append(build.build_text_encoder(arch, sd, str(ckpt)))
    half = model.placement.precision != "fp32"  # sdgen's rule: channels-last convolutions in half precision
    for ours, theirs in zip((model.unet, model.vae, model.text_encoder), parts, strict=True):
        weight = next(ours.parameters())
        layout = {"memory_format": torch.channels_last} if half and ours is not model.text_encoder else {}
        theirs.to(weight.device, weight.dtype, **layout).requires_grad_(False)
    return tuple(parts)


def diffusers_pipeline(model, ckpt: Path, v_prediction: bool | None):
    """A stock diffusers StableDiffusionPipeline of ``ckpt``, with modules of its own (diffusers_modules)."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    from sdgen.tokenizer import hf_clip_tokenizer

    unet, vae, text_encoder = diffusers_modules(model, ckpt, v_prediction)
    tokenizer = hf_clip_tokenizer()
    tokenizer.model_max_length = 77
    if model.family.text.pad_id == 0:  # SD 2.x's diffusers tokenizer pads with "!" (id 0), as open_clip.tokenize
        tokenizer.pad_token = "!"
    scheduler = DDIMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        prediction_type="v_prediction" if model.v_prediction else "epsilon",
    )
    dpipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    dpipe.set_progress_bar_config(disable=True)
    return dpipe


def compile_diffusers_stock(dpipe) -> None:
    """diffusers' own torch.compile recipe: channels-last, fused QKV, UNet and VAE decode compiled with
    mode="reduce-overhead" (CUDA graphs) and fullgraph."""
    import torch

    dpipe.unet.to(memory_format=torch.channels_last)
    dpipe.vae.to(memory_format=torch.channels_last)
    dpipe.fuse_qkv_projections()
    dpipe.unet = torch.compile(dpipe.unet, mode="reduce-overhead", fullgraph=True)
    dpipe.vae.decode = torch.compile(dpipe.vae.decode, mode="reduce-overhead", fullgraph=True)


def event_sink(log, notes: list[str] | None = None, echo: bool = False):
    """A sink for sdgen's events (sdgen.events): the Loaded description and every Notice go to ``log``;
    with ``notes``, the Notice messages are collected there instead (and also logged with ``echo``): the
    loaded model keeps no notes, a run tells them to its sink."""
    from sdgen.events import Loaded, Notice

    def sink(event) -> None:
        if isinstance(event, Notice):
            if notes is not None:
                notes.append(event.message)
            if notes is None or echo:
                log(event.message)
        elif isinstance(event, Loaded):
            log(f"sdgen: {event.model}: {event.description}")

    return sink


def load_sdgen(args, ckpt: Path, v: bool | None, modes: tuple[str, ...], log, low_vram: bool = False):
    """sdgen's loader on ``ckpt`` (never compiling: --compile is applied by the caller, after any copies)."""
    from sdgen.api import load_model
    from sdgen.specs import LoadSpec

    spec = LoadSpec(
        ckpt=ckpt, v_prediction=v, device=args.device, precision=args.precision, low_vram=low_vram, compile=False
    )
    return load_model(spec, modes=modes, sink=event_sink(log))


def run_txt2img(args, log) -> dict:
    import torch

    from sdgen import engine
    from sdgen.specs import GenerationSpec, OutputSpec

    _, v, native = MODELS[args.model]
    size = args.size or native
    ckpt = ensure_checkpoint(args.model, args.cache_dir, args.ckpt_dtype, log)
    t = time.perf_counter()
    # --compile is applied below, as the bench applies diffusers' recipe to the stock side
    model = load_sdgen(args, ckpt, True if v else None, ("txt2img",), log, low_vram=args.low_vram)
    load_s = time.perf_counter() - t
    cuda = model.placement.torch_device.type == "cuda"
    compiled = bool(args.compile or args.diffusers_compile)
    dpipe = diffusers_pipeline(model, ckpt, True if v else None) if args.only != "sdgen" else None
    if args.compile:
        from sdgen.runtime.compiling import compile_model

        log(f"bench: sdgen --compile ({compile_model(model, args.compile_mode)})")
    if args.diffusers_compile and dpipe is not None:
        compile_diffusers_stock(dpipe)
        log("bench: diffusers compiled (reduce-overhead, channels-last, fused QKV, UNet + VAE decode)")
    probe = Probe(model.unet, model.text_encoder, model.vae, cuda)
    if dpipe is not None:
        probe.attach(dpipe.unet, dpipe.text_encoder, dpipe.vae)
    prompt = args.prompt
    gen = GenerationSpec(
        prompts=(prompt,),
        mode="txt2img",
        steps=args.steps,
        sampler="ddim",
        scale=GUIDANCE,
        height=size,
        width=size,
        seed=1,
        n_samples=args.batch,
    )  # validated on construction
    outdir = Path(tempfile.mkdtemp(prefix="sdgen-bench-"))
    out = OutputSpec(outdir=outdir, skip_grid=True, skip_save=True, watermark=False)
    notes: list[str] = []
    sink = event_sink(log, notes)

    images: dict[str, list] = {}  # the last run's uint8 images of each pipeline, to compare them
    decode = model.decode

    def decode_and_keep(latents):
        pixels = decode(latents)
        images["sdgen"] = engine.to_uint8(pixels)
        return pixels

    # instance attribute: the engine decodes through sdgen.tiling.decode_tiled, which calls model.decode(latents)
    model.decode = decode_and_keep

    def sdgen_once():
        engine.run(model, gen, out, sink)

    def diffusers_once():
        if dpipe is None or model.memory.offloads_models or model.memory.level >= 4:
            raise RuntimeError("skipped")
        g = torch.Generator("cpu").manual_seed(1)
        result = dpipe(
            [prompt] * args.batch,
            height=size,
            width=size,
            num_inference_steps=args.steps,
            guidance_scale=GUIDANCE,
            generator=g,
            output_type="np",
        )
        images["diffusers"] = list((255.0 * result.images).astype("uint8"))  # truncated, as sdgen and the reference

    def memctx():
        return CudaPeak(model.placement.torch_device) if cuda else CpuPeak()

    runners = [("sdgen", sdgen_once), ("diffusers", diffusers_once)]
    if args.only != "both":
        runners = [r for r in runners if r[0] == args.only]
    runs: list[Run] = []
    for rep in range(args.warmup + args.repeats):
        for name, fn in runners:
            try:
                run = timed(name, fn, probe, memctx(), args.batch)
            except RuntimeError as e:
                if str(e) != "skipped":
                    raise
                run = Run(name, float("nan"), args.batch, 0, 0, 0, 0, 0, 0, None, "", "skipped: sdgen offloads")
            run.extra["warmup"] = rep < args.warmup
            run.extra["sdgen_memory_level"] = model.memory.level
            runs.append(run)
            log(
                f"bench: {'warmup ' if rep < args.warmup else ''}{name}: {run.total_s:.2f} s, {run.steps} steps, "
                f"per step {run.per_step_s:.3f} s, decode {run.decode_s:.2f} s, peak {_gib(run.peak_bytes)}"
                + (f" [{run.error}]" if run.error else "")
            )
    return {
        "kind": "txt2img",
        "model": args.model,
        "size": size,
        "load_s": load_s,
        "ckpt": str(ckpt),
        "placement": model.placement.describe(),
        "notes": list(dict.fromkeys(notes)),  # each run tells its notices again
        "memory_level": model.memory.level,
        "runs": runs,
        "agreement": agreement(images),
        "compiled": compiled,
    }


def agreement(images: dict[str, list]) -> dict | None:
    """PSNR and max difference between sdgen's and diffusers' images of the same seed (per-image seeds: both
    draw seed 1's CPU noise; ddim with the same timesteps), or None when one of them did not run."""
    import numpy as np

    if "sdgen" not in images or "diffusers" not in images:
        return None
    a = np.stack(images["sdgen"]).astype(np.float64)
    b = np.stack(images["diffusers"]).astype(np.float64)
    mse = float(((a - b) ** 2).mean())
    psnr = float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)
    return {"psnr_db": psnr, "max_abs": int(np.abs(a - b).max()), "mean_abs": float(np.abs(a - b).mean())}


def run_upscale(args, log) -> dict:
    import torch

    from sdgen import engine
    from sdgen.families.x4 import DEFAULT_NOISE_LEVEL, UNET_MULTIPLE
    from sdgen.samplers import evaluations
    from sdgen.specs import GenerationSpec, OutputSpec, UpscaleInput
    from sdgen.tiling import overlap_for, tile_origins

    size = args.size or 512
    ckpt = ensure_checkpoint("x4", args.cache_dir, args.ckpt_dtype, log)
    png = bench_input_png(args.cache_dir, size)
    t = time.perf_counter()
    model = load_sdgen(args, ckpt, None, ("upscale",), log)
    load_s = time.perf_counter() - t
    cuda = model.placement.torch_device.type == "cuda"
    probe = Probe(model.unet, model.text_encoder, model.vae, cuda)
    tile, noise_level = args.tile, DEFAULT_NOISE_LEVEL
    padded = size + (-size) % UNET_MULTIPLE  # the x4 latents have the (padded) input's size
    tiled = tile > 0 and padded > tile
    # sdgen.tiling: the UNet (tiled_guided) and the VAE decode (decode_tiled) use the same tiles of
    # min(tile, side) latents at tile_origins(side, tile, overlap_for(tile)); every tile has the full size
    unet_tiles = len(tile_origins(padded, tile, overlap_for(tile))) ** 2 if tiled else 1
    th = min(tile, padded) if tiled else padded
    vae_tiles = unet_tiles
    memctx = (lambda: CudaPeak(model.placement.torch_device)) if cuda else CpuPeak
    info = {
        "kind": "upscale",
        "model": "x4",
        "size": size,
        "out_size": 4 * size,
        "tile": tile,
        "unet_tiles_per_step": unet_tiles,
        "vae_tiles": vae_tiles,
        "load_s": load_s,
        "ckpt": str(ckpt),
        "placement": model.placement.describe(),
    }

    if args.single_tile:
        # one UNet call on one tile with the CFG batch of 2, and one VAE decode of one tile; then extrapolate
        dtype = model.unet.dtype
        dev = model.placement.torch_device
        with torch.no_grad():
            cond = model.encode_text([args.prompt])[0].to(dtype)
            x = torch.randn(2, model.latent_channels + 3, th, th, device=dev, dtype=dtype)  # latents + low-res
            c = torch.cat([cond, cond])
            t_in = torch.full((2,), 500, device=dev)
            labels = torch.full((2,), noise_level, dtype=torch.long, device=dev)
            unet_runs, vae_runs = [], []
            for i in range(args.warmup + args.repeats):
                r = timed(
                    "unet tile",
                    lambda: model.unet(x, t_in, encoder_hidden_states=c, class_labels=labels, return_dict=False),
                    probe,
                    memctx(),
                    1,
                )
                log(
                    f"bench: {'warmup ' if i < args.warmup else ''}UNet tile {th}x{th} (batch 2): {r.total_s:.2f} s, "
                    f"peak {_gib(r.peak_bytes)}"
                )
                if i >= args.warmup:
                    unet_runs.append(r)
            z = torch.randn(1, model.latent_channels, th, th, device=dev)
            for _ in range(max(args.repeats, 1)):  # no warmup: one VAE tile decode is long on a CPU
                r = timed("vae tile", lambda: model.decode(z), probe, memctx(), 1)  # as decode_tiled per tile
                log(f"bench: VAE decode tile {th}x{th} latents: {r.total_s:.2f} s, peak {_gib(r.peak_bytes)}")
                vae_runs.append(r)
                if not cuda:
                    break
        info.update(mode="single-tile", unet_tile_runs=unet_runs, vae_tile_runs=vae_runs)
        return info

    gen = GenerationSpec(
        prompts=(args.prompt,),
        mode="upscale",
        steps=args.steps,
        sampler="ddim",
        scale=9.0,
        seed=1,
        upscale=UpscaleInput(images=(png,), noise_level=noise_level, tile=tile),
    )  # validated on construction (the input image is read there)
    steps_run = evaluations("ddim", args.steps)
    notes: list[str] = []
    sink = event_sink(log, notes, echo=True)  # the notices logged, as `sdgen upscale` prints them, and kept
    runs = []
    for i in range(args.warmup + args.repeats):
        outdir = Path(tempfile.mkdtemp(prefix="sdgen-bench-up-"))
        out = OutputSpec(outdir=outdir, skip_grid=True, watermark=True)
        r = timed(
            "sdgen upscale",
            lambda: engine.run(model, gen, out, sink),
            probe,
            memctx(),
            1,
            steps_of=lambda p: steps_run,
        )
        r.extra.update(
            warmup=i < args.warmup,
            unet_calls=probe.calls("unet"),
            tile_call_median_s=statistics.median([b - a for a, b in probe.events.get("unet", [(0, 0)])]),
        )
        log(
            f"bench: {'warmup ' if i < args.warmup else ''}upscale: {r.total_s:.1f} s, {r.steps} steps x "
            f"{unet_tiles} tiles, per step {r.per_step_s:.1f} s, VAE decode {r.decode_s:.1f} s, "
            f"peak {_gib(r.peak_bytes)}" + (f" [{r.error}]" if r.error else "")
        )
        runs.append(r)
    info.update(
        mode="full", steps=args.steps, runs=runs, notes=list(dict.fromkeys(notes)), memory_level=model.memory.level
    )
    return info


# ---- report ---------------------------------------------------------------------------------------------


def _gib(n: int | None) -> str:
    return "n/a" if not n else f"{n / 2**30:.2f} GiB"


def _med(xs):
    xs = [x for x in xs if x == x]
    return statistics.median(xs) if xs else float("nan")


def environment(args) -> str:
    import diffusers
    import torch
    import transformers

    if args.device.startswith("cuda") and torch.cuda.is_available():
        dev = torch.cuda.get_device_name()
        if args.memory_fraction:
            dev += f", memory fraction {args.memory_fraction}"
    else:
        cpu = platform.processor() or ""
        try:
            cpu = next(
                line.split(":", 1)[1].strip()
                for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")
            )
        except (OSError, StopIteration):
            pass
        dev = f"CPU {cpu}, {os.cpu_count()} logical cores, torch threads {torch.get_num_threads()}"
    return (
        f"{dev}; torch {torch.__version__}, diffusers {diffusers.__version__}, "
        f"transformers {transformers.__version__}, Python {platform.python_version()}"
    )


def report_txt2img(res: dict, args) -> str:
    runs = [r for r in res["runs"] if not r.extra.get("warmup")]
    n = args.extrapolate_to
    lines = [
        f"### {res['model']} txt2img, {res['size']}x{res['size']}, batch {args.batch}, {args.steps} steps (ddim), "
        f"guidance {GUIDANCE}, {res['placement']}",
        "",
        f"Environment: {environment(args)}. Load through sdgen.api.load_model: {res['load_s']:.1f} s. "
        f"Median of {args.repeats} interleaved runs after {args.warmup} warm-up each.",
        "",
        f"| pipeline | s/image ({args.steps} steps) | it/s | s/step | fixed s (text+decode+other) | VAE decode s "
        f"| est. s/image @ {n} steps | peak memory | first run s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    labels = {
        "sdgen": "sdgen" + (" --compile" if args.compile else "") + (" --low-vram" if args.low_vram else ""),
        "diffusers": "diffusers" + (" compiled" if args.diffusers_compile else ""),
    }
    first = {name: next((r.total_s for r in res["runs"] if r.pipeline == name), float("nan")) for name in labels}
    summary = {}
    for name in ("sdgen", "diffusers"):
        rs = [r for r in runs if r.pipeline == name and r.error is None]
        if not rs:
            if any(r.pipeline == name for r in runs):
                errs = {r.error for r in runs if r.pipeline == name}
                lines.append(f"| {labels[name]} | {', '.join(sorted(errs))} | | | | | | | |")
            continue
        s_img = _med([r.total_s / r.images for r in rs])
        per_step = _med([r.per_step_s for r in rs])
        fixed = _med([r.fixed_s for r in rs])
        decode = _med([r.decode_s for r in rs])
        est = (per_step * n + fixed) / args.batch
        peak = max(r.peak_bytes for r in rs)
        summary[name] = (s_img, per_step, est, peak, fixed)
        lines.append(
            f"| {labels[name]} | {s_img:.2f} | {1 / per_step:.3f} | {per_step:.3f} | {fixed:.2f} | "
            f"{decode:.2f} | {est:.1f} | {_gib(peak)} | {first[name]:.1f} |"
        )
    if len(summary) == 2:
        a, b = summary["sdgen"], summary["diffusers"]
        lines.append(
            f"| **sdgen / diffusers** | {a[0] / b[0]:.3f} | {b[1] / a[1]:.3f} | {a[1] / b[1]:.3f} | "
            f"{a[4] / b[4]:.3f} | | {a[2] / b[2]:.3f} | {a[3] / b[3]:.3f} | |"
        )
    method = next((r.memory_method for r in runs if r.memory_method), "")
    lines += [
        "",
        f"it/s = denoising iterations per second (one UNet call on the CFG batch of {2 * args.batch}). "
        f"Extrapolation: est. s/image @ {n} = (s/step x {n} + fixed) / batch, fixed = total - denoising span. "
        f"Peak memory: {method}"
        + ("." if "cuda" in method else " (process RSS, includes both pipelines' own weights).")
        + " First run s: the first (warm-up) run of each pipeline"
        + (", compile included." if res["compiled"] else "."),
    ]
    if res.get("agreement"):
        g = res["agreement"]
        lines.append(
            f"Same seed, {labels['sdgen']} vs {labels['diffusers']}: PSNR {g['psnr_db']:.1f} dB, max "
            f"difference {g['max_abs']} levels, mean {g['mean_abs']:.2f} (uint8 images of the last runs)."
        )
    if res["notes"] or res["memory_level"]:
        lines.append(f"sdgen notes: {res['notes']}; OOM ladder level {res['memory_level']}.")
    return "\n".join(lines)


def report_upscale(res: dict, args) -> str:
    n = args.extrapolate_to
    head = (
        f"### x4 upscale {res['size']}x{res['size']} -> {res['out_size']}x{res['out_size']}, tile {res['tile']} "
        f"({res['unet_tiles_per_step']} UNet tiles/step, CFG batch 2; {res['vae_tiles']} VAE decode tiles), "
        f"{res['placement']}"
    )
    lines = [
        head,
        "",
        f"Environment: {environment(args)}. Load through sdgen.api.load_model: {res['load_s']:.1f} s.",
        "",
    ]
    if res["mode"] == "single-tile":
        u = _med([r.total_s for r in res["unet_tile_runs"]])
        v = _med([r.total_s for r in res["vae_tile_runs"]])
        step = u * res["unet_tiles_per_step"]
        decode = v * res["vae_tiles"]
        peak = max(r.peak_bytes for r in res["unet_tile_runs"] + res["vae_tile_runs"])
        lines += [
            "| measured | s | extrapolated | s |",
            "|---|---|---|---|",
            f"| one UNet tile call (batch 2) | {u:.2f} | one step = {res['unet_tiles_per_step']} tiles | {step:.1f} |",
            f"| one VAE decode tile | {v:.2f} | tiled decode = {res['vae_tiles']} tiles (the UNet's tiles, each of "
            f"the full tile size) | {decode:.1f} |",
            f"| peak memory | {_gib(peak)} | {n} steps + decode | {step * n + decode:.0f} |",
            "",
            f"Extrapolation: {n} x {res['unet_tiles_per_step']} x UNet tile + {res['vae_tiles']} x VAE tile "
            "(text encoder, blending and PNG writing not included).",
        ]
        return "\n".join(lines)
    runs = [r for r in res["runs"] if not r.extra.get("warmup")] or res["runs"]
    per_step = _med([r.per_step_s for r in runs])
    tile = _med([r.extra["tile_call_median_s"] for r in runs])
    decode = _med([r.decode_s for r in runs])
    fixed = _med([r.fixed_s for r in runs])
    total = _med([r.total_s for r in runs])
    peak = max(r.peak_bytes for r in runs)
    lines += [
        f"| steps run | total s | s/step | s/UNet tile call | VAE decode s | other fixed s | est. s @ {n} steps "
        "| peak memory |",
        "|---|---|---|---|---|---|---|---|",
        f"| {runs[0].steps} | {total:.1f} | {per_step:.1f} | {tile:.2f} | {decode:.1f} | {fixed - decode:.1f} | "
        f"{per_step * n + fixed:.0f} | {_gib(peak)} |",
        "",
        f"Extrapolation: est. = s/step x {n} + fixed; fixed = total - denoising span = VAE decode + other (text "
        "encoder, noise, PNG + watermark). Peak memory: " + runs[0].memory_method + ".",
    ]
    if res.get("notes") or res.get("memory_level"):
        lines.append(f"sdgen notes: {res['notes']}; OOM ladder level {res['memory_level']}.")
    return "\n".join(lines)


# ---- main -----------------------------------------------------------------------------------------------


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        prog="bench.py",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Time sdgen against stock diffusers on full-size SD architectures with random weights "
        "(weights written once to a cache folder, loaded through sdgen's loader).",
        epilog="Examples:" + __doc__.split("Examples:", 1)[1].split("Peak memory:")[0].rstrip(),
    )
    p.add_argument(
        "--model",
        choices=sorted(MODELS),
        default="sd15",
        help="sd15 (SD 1.5: UNet 860M, VAE, CLIP-L), sd2v (SD 2.x 768-v, OpenCLIP-H), x4 (implies "
        "--upscale). Default sd15.",
    )
    p.add_argument("--upscale", action="store_true", help="Time sdgen's tiled x4 upscale instead of txt2img.")
    p.add_argument(
        "--single-tile",
        action="store_true",
        help="--upscale: time one UNet tile call and one VAE decode of one tile only, and extrapolate.",
    )
    p.add_argument("--device", default=None, help="cpu or cuda (cuda:N). Default: cuda if available, else cpu.")
    p.add_argument(
        "--precision",
        choices=("fp32", "bf16", "fp16"),
        default=None,
        help="Default fp16 on CUDA, fp32 on the CPU (sdgen refuses fp16 on the CPU).",
    )
    p.add_argument(
        "--steps",
        type=int,
        default=None,
        help="Denoising steps timed. Default: txt2img 50 on CUDA, 2 on CPU; upscale 75 on CUDA, 1 on CPU.",
    )
    p.add_argument(
        "--extrapolate-to", type=int, default=None, help="Steps to extrapolate to (default 50 txt2img, 75 upscale)."
    )
    p.add_argument(
        "--size",
        type=int,
        default=None,
        help="Image side in pixels (txt2img; default the model's native 512/768) or the upscale input "
        "side (default 512 -> 2048).",
    )
    p.add_argument("--batch", type=int, default=1, help="Images per batch (txt2img). Default 1.")
    p.add_argument(
        "--repeats", type=int, default=None, help="Timed runs per pipeline (default 3 CUDA, 2 CPU; upscale 1)."
    )
    p.add_argument(
        "--warmup", type=int, default=None, help="Untimed runs per pipeline first (default 1; CPU upscale 0)."
    )
    p.add_argument(
        "--tile", type=int, default=DEFAULT_TILE, help=f"Upscale tile in input pixels (sdgen's default {DEFAULT_TILE})."
    )
    p.add_argument(
        "--compile",
        action="store_true",
        help="Time sdgen --compile (sdgen.runtime.compiling). diffusers then runs on its own copies of the "
        "modules, uncompiled unless --diffusers-compile. The warm-up run includes the compile.",
    )
    p.add_argument(
        "--compile-mode",
        default=None,
        choices=("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"),
        help="torch.compile mode for sdgen --compile (default: sdgen's own choice for the device).",
    )
    p.add_argument(
        "--diffusers-compile",
        action="store_true",
        help="Give diffusers its stock torch.compile recipe (reduce-overhead, channels-last, fused "
        "QKV, UNet + VAE decode), on its own copies of the modules.",
    )
    p.add_argument(
        "--low-vram",
        action="store_true",
        help="Load sdgen with --low-vram (diffusers is skipped: it would run on offloaded modules).",
    )
    p.add_argument(
        "--memory-fraction",
        type=float,
        default=None,
        help="CUDA only: torch.cuda.set_per_process_memory_fraction(F), to simulate a smaller card.",
    )
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU). Default: torch's.")
    p.add_argument("--only", choices=("both", "sdgen", "diffusers"), default="both", help="Which pipelines.")
    p.add_argument("--prompt", default="a photograph of an astronaut riding a horse, highly detailed")
    p.add_argument(
        "--ckpt-dtype",
        choices=("fp16", "fp32", "bf16"),
        default="fp16",
        help="dtype of the random checkpoint file (sdgen casts on load). Default fp16 (half the disk).",
    )
    p.add_argument(
        "--cache-dir",
        type=Path,
        default=None,
        help="Where the random checkpoints live (default $SDGEN_BENCH_CACHE, else "
        "$XDG_CACHE_HOME/sdgen-bench, else ~/.cache/sdgen-bench).",
    )
    p.add_argument("--json", type=Path, default=None, help="Also write the raw results here.")
    p.add_argument("--markdown", type=Path, default=None, help="Also write the Markdown report here.")
    args = p.parse_args(argv)
    if args.model == "x4":
        args.upscale = True
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    log = lambda m: print(m, file=sys.stderr, flush=True)  # noqa: E731
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    cuda = args.device.startswith("cuda")
    if cuda and not torch.cuda.is_available():
        sys.exit("bench.py: --device cuda but CUDA is not available")
    if args.precision is None:
        args.precision = "fp16" if cuda else "fp32"
    if args.upscale and args.model != "x4":
        args.model = "x4"
    if args.steps is None:
        args.steps = (75 if cuda else 1) if args.upscale else (50 if cuda else 2)
    if args.extrapolate_to is None:
        args.extrapolate_to = 75 if args.upscale else 50
    if args.repeats is None:
        args.repeats = 1 if args.upscale else (3 if cuda else 2)
    if args.warmup is None:
        args.warmup = 0 if (args.upscale and not cuda and not args.single_tile) else 1
    if args.cache_dir is None:
        base = os.environ.get("SDGEN_BENCH_CACHE") or (
            Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "sdgen-bench"
        )
        args.cache_dir = Path(base)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.memory_fraction is not None:
        if not cuda:
            sys.exit("bench.py: --memory-fraction is for CUDA only")
        torch.cuda.set_per_process_memory_fraction(args.memory_fraction)
    if cuda:
        torch.cuda.init()

    res = run_upscale(args, log) if args.upscale else run_txt2img(args, log)
    text = report_upscale(res, args) if args.upscale else report_txt2img(res, args)
    command = "python bench/bench.py " + " ".join(sys.argv[1:] if argv is None else argv)
    text = f"`{command}`\n\n{text}\n"
    print(text)
    if args.markdown:
        args.markdown.write_text(text)
    if args.json:

        def enc(o):
            if isinstance(o, Run):
                return dict(asdict(o), per_step_s=o.per_step_s, fixed_s=o.fixed_s)
            return str(o)

        args.json.write_text(
            json.dumps(dict(res, args={k: str(v) for k, v in vars(args).items()}), default=enc, indent=1)
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
