"""The command line: parse options into requests, call one function, print paths or one-line errors.

No torch import at module level, so ``sdgen --help`` is instant. The reference scripts' spellings
(``--ddim_steps``, ``--n_samples``, ``--plms``, ``--H``, ...) are accepted as aliases.
"""

from __future__ import annotations

import contextlib
import functools
import secrets
import signal
import sys
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path

import click

from sdgen import __version__
from sdgen.device import PRECISION_CHOICES
from sdgen.errors import InputError, SdgenError
from sdgen.request import (
    DEFAULT_SEED_MODE,
    DEFAULT_STEPS,
    DEFAULT_STRENGTH,
    MAX_SEED,
    SEED_MODES,
    GenerationRequest,
    LoadRequest,
    OutputRequest,
    plan_batches,
    read_prompt_file,
    validate,
    validate_img2img,
)
from sdgen.samplers import SAMPLER_NAMES

EXIT_INTERRUPTED, EXIT_TERMINATED = 130, 143


class Terminated(Exception):
    """SIGTERM, turned into an exception so that the same clean-up as Ctrl-C runs."""


def _on_sigterm(signum, frame):
    raise Terminated()


@contextlib.contextmanager
def error_boundary(verbose: bool, written: list[Path]) -> Iterator[None]:
    """The one place where exceptions become a message and an exit code."""
    previous = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        yield
    except SdgenError as e:
        if verbose:
            traceback.print_exc()
        click.echo(f"Error: {e}", err=True)
        sys.exit(1)
    except (KeyboardInterrupt, Terminated) as e:
        code = EXIT_TERMINATED if isinstance(e, Terminated) else EXIT_INTERRUPTED
        what = "terminated" if code == EXIT_TERMINATED else "interrupted"
        click.echo(f"sdgen: {what}; {len(written)} file(s) written before it are complete", err=True)
        sys.exit(code)
    except (click.exceptions.Exit, click.ClickException):
        raise  # click prints usage errors itself (exit 2)
    except Exception as e:  # a bug or an environment problem: still one line unless --verbose
        if verbose:
            traceback.print_exc()
        first = (str(e).strip().splitlines() or [""])[0][:300]
        click.echo(f"Error: unexpected {type(e).__name__}: {first} (run with --verbose for the traceback)", err=True)
        sys.exit(1)
    finally:
        signal.signal(signal.SIGTERM, previous)


def _options(*decorators: Callable) -> Callable:
    def apply(f: Callable) -> Callable:
        for d in reversed(decorators):
            f = d(f)
        return f

    return apply


model_options = _options(
    click.option("--ckpt", type=click.Path(path_type=Path), default=None,
                 help="Checkpoint: .safetensors/.ckpt file (SD 1.x, SD 2.x, x4 upscaler) or diffusers folder. "
                      "Default: SD 1.5 from the Hugging Face cache (downloaded once)."),
    click.option("--config", type=click.Path(path_type=Path), default=None,
                 help="Original LDM inference yaml (v1-inference.yaml, v2-inference-v.yaml, ...). Default: detected "
                      "from the weights; a NAME.yaml beside NAME.ckpt is used when present."),
    click.option("--v-prediction/--no-v-prediction", "v_prediction", default=None,
                 help="SD 2.x: force v-prediction (768 models) or epsilon (512 models). Default: '768' in the "
                      "file name means v, else epsilon."),
    click.option("--device", default="auto", show_default=True, metavar="auto|cuda|cuda:N|mps|cpu",
                 help="Where to run. auto = CUDA, else MPS, else CPU."),
    click.option("--precision", type=click.Choice(PRECISION_CHOICES), default="auto", show_default=True,
                 help="auto = fp16 on GPUs, fp32 on the CPU (full = fp32, autocast = auto). Never fp16 on the CPU."),
    click.option("--bf16", is_flag=True, help="Same as --precision bf16 (reference SD 2 spelling)."),
    click.option("--low-vram", "low_vram", is_flag=True,
                 help="Smallest GPU memory: attention slicing, tiled VAE, each layer on the GPU only while it runs. "
                      "(Without it, sdgen steps down to these by itself when CUDA runs out of memory.)"),
)

compile_option = click.option(
    "--compile", "compile_models", is_flag=True,
    help="torch.compile the UNet and VAE decoder (with CUDA graphs on a GPU). The first run of a size and batch "
         "compiles for minutes; later runs reuse ~/.cache/sdgen/torch-compile. On the CPU it saves little.")

sampling_options = _options(
    click.option("--negative-prompt", "--negative_prompt", "negative_prompt", default="",
                 help="What to steer away from."),
    click.option("--steps", "--ddim_steps", "steps", type=int, default=DEFAULT_STEPS, show_default=True,
                 help="Denoising steps."),
    click.option("--sampler", type=click.Choice(SAMPLER_NAMES), default=None,
                 help="Sampler (default ddim). ddim, plms and dpm reproduce the reference scripts."),
    click.option("--plms", is_flag=True, help="Same as --sampler plms."),
    click.option("--dpm", "--dpm_solver", "dpm", is_flag=True, help="Same as --sampler dpm."),
    click.option("--scale", type=float, default=None,
                 help="Classifier-free guidance scale. Default 7.5 for SD 1.x, 9.0 for SD 2.x."),
    click.option("--ddim_eta", "--eta", "eta", type=float, default=0.0, show_default=True,
                 help="DDIM eta (0 = deterministic)."),
    click.option("-n", "--n_samples", "--n-samples", "n_samples", type=int, default=1, show_default=True,
                 help="Images per batch."),
    click.option("--n_iter", "--n-iter", "n_iter", type=int, default=1, show_default=True,
                 help="Number of batches (of every prompt)."),
    click.option("--seed", type=str, default=None,
                 help=f"Seed 0..{MAX_SEED}. Default: random, printed and stored in each PNG."),
    click.option("--seed-mode", type=click.Choice(SEED_MODES), default=DEFAULT_SEED_MODE, show_default=True,
                 help="per-image: image k uses seed+k (CPU noise, reproducible alone anywhere). reference: "
                      "noise drawn as the reference scripts draw it (same seed, same images)."),
    click.option("--fixed_code", "--fixed-code", "fixed_code", is_flag=True,
                 help="Use the same starting noise for every batch."),
)

output_options = _options(
    click.option("--skip_grid", "--skip-grid", "skip_grid", is_flag=True, help="Do not save a grid."),
    click.option("--skip_save", "--skip-save", "skip_save", is_flag=True, help="Do not save single images."),
    click.option("--n_rows", "--n-rows", "n_rows", type=int, default=0,
                 help="Images per grid row (default n_samples)."),
    click.option("--no-watermark", "no_watermark", is_flag=True,
                 help="Do not embed the invisible watermark of the reference scripts."),
    click.option("-q", "--quiet", is_flag=True, help="No progress bar or notices; only the written paths."),
    click.option("-v", "--verbose", is_flag=True, help="Show tracebacks for errors."),
)


def _parse_seed(text: str | None) -> int:
    if text is None:
        return secrets.randbelow(MAX_SEED + 1)
    try:
        return int(text.strip())
    except ValueError:
        raise click.BadParameter(f"{text!r} is not an integer (0..{MAX_SEED})", param_hint="'--seed'") from None


def _sampler(sampler: str | None, plms: bool, dpm: bool) -> str:
    chosen = [name for name, on in (("plms", plms), ("dpm", dpm)) if on]
    if sampler:
        chosen.append(sampler)
    if len(set(chosen)) > 1:
        raise click.UsageError(f"choose one sampler; got {', '.join(sorted(set(chosen)))}")
    return chosen[0] if chosen else "ddim"


def _prompts(
    prompt_arg: str | None, prompt_opt: str | None, from_file: Path | None, repeat: int
) -> tuple[list[str], bool]:
    if prompt_arg and prompt_opt and prompt_arg != prompt_opt:
        raise click.UsageError("give the prompt either as an argument or with --prompt, not both")
    if from_file is not None:
        if prompt_arg or prompt_opt:
            raise click.UsageError("give either a prompt or --from-file, not both")
        lines = read_prompt_file(from_file)
        return [p for p in lines for _ in range(repeat)], True
    prompt = prompt_arg if prompt_arg is not None else prompt_opt
    if prompt is None:
        raise click.UsageError("no prompt: give one as an argument, with --prompt, or with --from-file")
    return [prompt], False


def _say(quiet: bool) -> Callable[[str], None]:
    return (lambda message: None) if quiet else (lambda message: click.echo(message, err=True))


def _notices(quiet: bool) -> Callable[[str], None]:
    """Notices during a run. --quiet drops the informational one (no watermark on small images) but keeps
    those that say the run changed course (prompt cut, out of memory, fp32 fallback)."""

    def notice(message: str) -> None:
        if not (quiet and "too small for the invisible watermark" in message):
            click.echo(message, err=True)

    return notice


def _emit(written: list[Path]) -> Callable[[Path], None]:
    def emit(path: Path) -> None:
        written.append(path)
        click.echo(str(path))

    return emit


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.version_option(__version__, prog_name="sdgen")
def cli() -> None:
    """Stable Diffusion from a checkpoint file, on CUDA or the CPU, offline.

    \b
    sdgen txt2img "a hamster painting with a brush" --ckpt v1-5-pruned-emaonly.safetensors
    sdgen img2img --prompt "a bird on a branch" --init-img sketch.png --ckpt sd-v1-4.ckpt
    sdgen upscale photo.png --ckpt x4-upscaler-ema.safetensors --prompt "a white cat"
    """


prompt_options = _options(
    click.argument("prompt_arg", metavar="[PROMPT]", required=False),
    click.option("--prompt", "prompt_opt", default=None, help="The prompt (same as the argument)."),
    click.option("--from-file", "--from_file", "from_file", type=click.Path(path_type=Path), default=None,
                 help="A text file with one prompt per line, batched n_samples at a time."),
    click.option("--repeat", type=int, default=1, help="With --from-file: make each line this many times."),
)


def _generation(o: dict, **extras) -> GenerationRequest:
    """The per-image request from the options of txt2img/img2img (``o``: click's keyword arguments)."""
    if o["repeat"] < 1:
        raise click.BadParameter(f"{o['repeat']} (must be at least 1)", param_hint="'--repeat'")
    if o["n_iter"] < 1:
        raise click.BadParameter(f"{o['n_iter']} (must be at least 1)", param_hint="'--n_iter'")
    prompts, is_file = _prompts(o["prompt_arg"], o["prompt_opt"], o["from_file"], o["repeat"])
    return GenerationRequest(
        batches=plan_batches(prompts, max(o["n_samples"], 1), o["n_iter"], is_file),
        negative_prompt=o["negative_prompt"], steps=o["steps"], sampler=_sampler(o["sampler"], o["plms"], o["dpm"]),
        scale=o["scale"], eta=o["eta"], height=o["height"], width=o["width"], seed=_parse_seed(o["seed"]),
        seed_mode=o["seed_mode"], fixed_code=o["fixed_code"], n_samples=o["n_samples"], extras=extras,
    )


def _load_and_output(o: dict) -> tuple[LoadRequest, OutputRequest]:
    """The load-time and output parts from model_options, output_options and --outdir."""
    load_req = LoadRequest(ckpt=o["ckpt"], config=o["config"], v_prediction=o["v_prediction"], device=o["device"],
                           precision="bf16" if o["bf16"] else o["precision"], low_vram=o["low_vram"],
                           compile=o.get("compile_models", False))
    if load_req.compile and load_req.low_vram:
        raise click.UsageError("--compile and --low-vram do not go together (offloading moves weights under the "
                               "compiled graphs); choose one")
    out = OutputRequest(outdir=o["outdir"], skip_grid=o["skip_grid"], skip_save=o["skip_save"],
                        watermark=not o["no_watermark"], n_rows=o["n_rows"], quiet=o["quiet"])
    return load_req, out


def _outdir_option(default: str) -> Callable:
    return click.option("--outdir", type=click.Path(path_type=Path), default=Path(default), show_default=True,
                        help="Images go to OUTDIR/samples/NNNNN.png, grids to OUTDIR/grid-NNNN.png.")


size_options = _options(
    click.option("-H", "--H", "--height", "height", type=int, default=None,
                 help="Height in pixels (multiple of 8)."),
    click.option("-W", "--W", "--width", "width", type=int, default=None,
                 help="Width in pixels (multiple of 8)."),
)


@cli.command()
@prompt_options
@size_options
@_outdir_option("outputs/txt2img-samples")
@sampling_options
@model_options
@compile_option
@output_options
def txt2img(**o):
    """Make images from a text prompt. -H/-W default to the model's size (512, or 768 for SD 2.x-v)."""
    written: list[Path] = []
    with error_boundary(o["verbose"], written):
        gen = _generation(o)
        validate(gen)
        _run("txt2img", *_load_and_output(o), gen, written)


@cli.command()
@prompt_options
@click.option("--init-img", "--init_img", "init_img", type=click.Path(path_type=Path), required=True,
              help="The starting image (PNG, JPEG, WebP, ...).")
@click.option("--strength", type=float, default=DEFAULT_STRENGTH, show_default=True,
              help="How much to change it: 0 keeps the image (its VAE round trip), 1 ignores it.")
@size_options
@_outdir_option("outputs/img2img-samples")
@sampling_options
@model_options
@compile_option
@output_options
def img2img(**o):
    """Turn a sketch or picture into a new one guided by a prompt.

    The output has the init image's size rounded down to a multiple of 8, unless -H/-W resize it first.
    --scale defaults to 5.0 for SD 1.x and 9.0 for SD 2.x, as the reference img2img.
    """
    from sdgen import images

    written: list[Path] = []
    with error_boundary(o["verbose"], written):
        gen = _generation(o, strength=o["strength"], init_path=o["init_img"])
        validate_img2img(gen)
        image, resized = images.fit_size(images.load_rgb(o["init_img"], "--init-img"), o["width"], o["height"])
        if resized and not o["quiet"]:
            click.echo(f"sdgen: {resized}", err=True)
        gen.extras.update(init_image=image, init_sha256=images.sha256(o["init_img"]))
        _run("img2img", *_load_and_output(o), gen, written)


@cli.command()
@click.argument("inputs", nargs=-1, required=True, type=click.Path(path_type=Path), metavar="INPUT...")
@click.option("--prompt", default="", help="What the image shows (optional; helps the upscaler).")
@click.option("--negative-prompt", "--negative_prompt", "negative_prompt", default="", help="What to steer away from.")
@click.option("--noise-level", "--noise_level", "noise_level", type=int, default=20, show_default=True,
              help="Noise added to the input, 0..350: higher invents more detail, lower stays closer.")
@click.option("--steps", "--ddim_steps", "steps", type=int, default=75, show_default=True, help="Denoising steps.")
@click.option("--scale", type=float, default=9.0, show_default=True, help="Classifier-free guidance scale.")
@click.option("--sampler", type=click.Choice(SAMPLER_NAMES), default="ddim", show_default=True, help="Sampler.")
@click.option("--ddim_eta", "--eta", "eta", type=float, default=0.0, show_default=True, help="DDIM eta.")
@click.option("--seed", type=str, default=None, help=f"Seed 0..{MAX_SEED}. Default: random, stored in each PNG.")
@click.option("--seed-mode", type=click.Choice(SEED_MODES), default=DEFAULT_SEED_MODE, show_default=True,
              help="per-image: input k uses seed+k. reference: every input uses the seed.")
@click.option("--tile", type=int, default=128, show_default=True,
              help="Tile size in input pixels for big inputs (UNet and VAE); 0 never tiles. Smaller uses less memory.")
@click.option("--outdir", type=click.Path(path_type=Path), default=Path("outputs/upscale-samples"), show_default=True,
              help="Images go to OUTDIR/samples/NNNNN.png.")
@model_options
@output_options
def upscale(**o):
    """Make images 4x larger with the SD x4 upscaler (x4-upscaler-ema.safetensors or a diffusers folder).

    The VAE always decodes in fp32 (it overflows in fp16). Inputs larger than --tile pixels are processed in
    overlapping, blended tiles, which bounds memory: a smaller --tile uses less.
    """
    from sdgen import upscale as upscaling

    written: list[Path] = []
    with error_boundary(o["verbose"], written):
        gen = GenerationRequest(batches=((o["prompt"],),), negative_prompt=o["negative_prompt"], steps=o["steps"],
                                sampler=o["sampler"], scale=o["scale"], eta=o["eta"], seed=_parse_seed(o["seed"]),
                                seed_mode=o["seed_mode"])
        validate(gen)
        noise_level, tile = o["noise_level"], o["tile"]
        if not 0 <= noise_level <= upscaling.MAX_NOISE_LEVEL:
            raise InputError(f"--noise-level {noise_level}: must be between 0 and {upscaling.MAX_NOISE_LEVEL}")
        if tile != 0 and (tile < 32 or tile % 8):
            raise InputError(f"--tile {tile}: must be 0 (no tiling) or a multiple of 8, at least 32")
        if o["ckpt"] is None:
            raise click.UsageError("--ckpt is required: the x4 upscaler checkpoint (x4-upscaler-ema.safetensors)")
        settings = upscaling.UpscaleSettings(noise_level=noise_level, tile=tile, overlap=min(32, tile // 4))
        loaded = upscaling.load_inputs(list(o["inputs"]))
        # an upscale writes one image per input and no grid, whatever the shared output options say
        load_req, out = _load_and_output(dict(o, skip_grid=True, skip_save=False, n_rows=0))
        from sdgen import loader

        say = _say(o["quiet"])
        pipe = loader.load(load_req, expect=("x4",), say=say)
        say(f"sdgen: seed {gen.seed} ({gen.seed_mode}), {gen.sampler}, {gen.steps} steps, noise level {noise_level}")
        result = upscaling.upscale(pipe, gen, out, settings, loaded, say=_notices(o["quiet"]), emit=_emit(written))
        say(f"sdgen: {result.images} image(s) written")


def _run(mode: str, load_req: LoadRequest, out: OutputRequest, gen: GenerationRequest, written: list[Path]) -> None:
    from sdgen import generate, loader
    from sdgen.device import validate_device_name

    validate_device_name(load_req.device)
    say = _say(out.quiet)
    pipe = loader.load(load_req, say=say)
    say(f"sdgen: seed {gen.seed} ({gen.seed_mode}), {gen.sampler}, {gen.steps} steps")
    run = functools.partial(getattr(generate, mode), pipe, gen, out)
    result = run(say=_notices(out.quiet), emit=_emit(written))
    say(f"sdgen: {result.images} image(s), {len(result.paths)} file(s) written")


def main() -> None:
    cli(prog_name="sdgen")


if __name__ == "__main__":
    main()
