"""The command line: options -> specs, a printing sink for the engine's events, one error boundary.

click lives only here. No torch import at module level, so ``sdgen --help`` is instant. The reference
scripts' spellings (``--ddim_steps``, ``--n_samples``, ``--plms``, ``--H``, ...) are accepted as aliases.
Exit codes: 0 done; 1 a problem with a file, the device or the disk; 2 a bad option value or combination
(click's own usage errors too); 130 interrupted (Ctrl-C); 143 terminated (SIGTERM).
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import click

from sdgen import __version__
from sdgen.errors import Cancelled, SdgenError, Terminated, UsageError
from sdgen.events import Event, Finished, Loaded, Notice, Saved, Started, Step
from sdgen.families import default_scale_help
from sdgen.families.x4 import DEFAULT_NOISE_LEVEL, MAX_NOISE_LEVEL
from sdgen.runtime.device import PRECISION_CHOICES
from sdgen.samplers import IMG2IMG_SAMPLER_NAMES, SAMPLER_NAMES
from sdgen.specs import (
    DEFAULT_SEED_MODE,
    DEFAULT_STEPS,
    DEFAULT_STRENGTH,
    DEFAULT_TILE,
    DEFAULT_UPSCALE_STEPS,
    MAX_PLAN_PROMPTS,
    MAX_REPEAT,
    MAX_SEED,
    RANDOM_SEED,
    SEED_MODES,
    GenerationSpec,
    Img2ImgInput,
    LoadSpec,
    OutputSpec,
    UpscaleInput,
    read_prompt_file,
)

EXIT_ERROR, EXIT_USAGE, EXIT_INTERRUPTED, EXIT_TERMINATED = 1, 2, 130, 143


# ---- printing the engine's events ----------------------------------------------------------------------


class PrintingSink:
    """Events -> the terminal: a progress bar and notices on stderr (notices above the bar, never on its
    line), written paths on stdout. --quiet keeps only the paths and the notices that say a run changed
    course (a prompt cut, out of memory, an fp32 fallback)."""

    def __init__(self, quiet: bool) -> None:
        self.quiet = quiet
        self.written: list[Path] = []
        self.stdout_closed = False
        self.bar: Any = None
        self._n = 0

    def __call__(self, event: Event) -> None:
        if isinstance(event, Step):
            if self.bar is not None:
                self.bar.update(event.batch * event.n + event.i - self.bar.n)
        elif isinstance(event, Saved):
            self.written.append(event.path)
            if not self.stdout_closed:
                try:
                    self._write(str(event.path), sys.stdout)
                    sys.stdout.flush()
                except BrokenPipeError:
                    # the reader went away (`sdgen ... | head -1`): keep making and saving the images, quietly
                    self.stdout_closed = True
                    sys.stdout = open(os.devnull, "w")  # noqa: SIM115 (for the interpreter's final flush)
        elif isinstance(event, Notice):
            if not (self.quiet and event.informational):
                self._write(event.message, sys.stderr)
        elif isinstance(event, Loaded):
            self._say(f"sdgen: {event.model}: {event.description}")
        elif isinstance(event, Started):
            why = f"; {event.why}" if event.why else ""
            self._say(f"sdgen: seed {event.seed} ({event.seed_mode}), {event.sampler}, {event.steps} steps{why}")
            self._open_bar(event.evaluations * event.batches)
        elif isinstance(event, Finished):
            self.close()
            self._say(f"sdgen: {event.images} image(s), {len(event.paths)} file(s) written")

    def _open_bar(self, total: int) -> None:
        from tqdm import tqdm

        self.bar = tqdm(total=total, file=sys.stderr, disable=self.quiet, unit="eval", dynamic_ncols=True, leave=False)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def _say(self, message: str) -> None:
        if not self.quiet:
            self._write(message, sys.stderr)

    def _write(self, message: str, stream: Any) -> None:
        if self.bar is not None and not self.quiet:
            self.bar.write(message, file=stream)  # clears the bar's line, writes, redraws the bar below
        else:
            click.echo(message, file=stream)


@contextlib.contextmanager
def error_boundary(verbose: bool, sink: PrintingSink) -> Iterator[None]:
    """The one place where exceptions become a message and an exit code (signal handlers: see main())."""
    try:
        yield
    except SdgenError as e:
        sink.close()
        if verbose:
            traceback.print_exc()
        click.echo(f"Error: {e}", err=True)
        sys.exit(EXIT_USAGE if isinstance(e, UsageError) else EXIT_ERROR)
    except (KeyboardInterrupt, Terminated, Cancelled) as e:
        sink.close()
        code = EXIT_TERMINATED if isinstance(e, Terminated) else EXIT_INTERRUPTED
        what = "terminated" if code == EXIT_TERMINATED else "interrupted"
        click.echo(f"sdgen: {what}; {len(sink.written)} file(s) written before it are complete", err=True)
        sys.exit(code)
    except (click.exceptions.Exit, click.ClickException):
        raise  # click prints usage errors itself (exit 2)
    except Exception as e:  # a bug or an environment problem: still one line unless --verbose
        sink.close()
        if verbose:
            traceback.print_exc()
        first = (str(e).strip().splitlines() or [""])[0][:300]
        click.echo(f"Error: unexpected {type(e).__name__}: {first} (run with --verbose for the traceback)", err=True)
        sys.exit(EXIT_ERROR)


# ---- options --------------------------------------------------------------------------------------------


def _options(*decorators: Callable) -> Callable:
    def apply(f: Callable) -> Callable:
        for d in reversed(decorators):
            f = d(f)
        return f

    return apply


def model_options(ckpt_help: str) -> Callable:
    return _options(
        click.option("--ckpt", type=click.Path(path_type=Path), default=None, help=ckpt_help),
        click.option(
            "--config",
            type=click.Path(path_type=Path),
            default=None,
            help="Original LDM inference yaml (v1-inference.yaml, v2-inference-v.yaml, ...) for a single-file "
            "checkpoint. Default: a NAME.yaml beside NAME.ckpt, else the one for the detected family.",
        ),
        click.option(
            "--v-prediction/--no-v-prediction",
            "v_prediction",
            default=None,
            help="SD 2.x: force v-prediction (768 models) or epsilon (512 models). Default: the yaml, else "
            "'768' in the file name means v, else epsilon.",
        ),
        click.option(
            "--device",
            default="auto",
            show_default=True,
            metavar="auto|cuda|cuda:N|mps|cpu",
            help="Where to run. auto = CUDA, else MPS, else CPU.",
        ),
        click.option(
            "--precision",
            type=click.Choice(PRECISION_CHOICES),
            default="auto",
            show_default=True,
            help="auto = fp16 on GPUs, fp32 on the CPU (full = fp32, autocast = auto). Never fp16 on the CPU.",
        ),
        click.option("--bf16", is_flag=True, help="Same as --precision bf16 (reference SD 2 spelling)."),
        click.option(
            "--low-vram",
            "low_vram",
            is_flag=True,
            help="Smallest GPU memory: attention slicing, tiled VAE, each layer on the GPU only while it "
            "runs. (Without it, sdgen steps down to these by itself when CUDA runs out of memory.)",
        ),
    )


SD_CKPT_HELP = (
    "Checkpoint: .safetensors/.ckpt file (SD 1.x, SD 2.x) or diffusers folder. Default: SD 1.5 from the "
    "Hugging Face cache (downloaded once when online)."
)
X4_CKPT_HELP = "The x4 upscaler checkpoint (x4-upscaler-ema.safetensors) or its diffusers folder. Required."

compile_option = click.option(
    "--compile",
    "compile_models",
    is_flag=True,
    help="torch.compile the UNet and VAE decoder (with CUDA graphs on a GPU). The first run of a size and batch "
    "compiles for minutes; later runs reuse ~/.cache/sdgen/torch-compile. On the CPU it saves little.",
)

seed_help = f"Seed 0..{MAX_SEED}; -1 or none: a random one, printed and stored in each PNG."


def sampling_options(mode: str) -> Callable:
    img2img = mode == "img2img"
    names = IMG2IMG_SAMPLER_NAMES if img2img else SAMPLER_NAMES
    plms = [] if img2img else [click.option("--plms", is_flag=True, help="Same as --sampler plms.")]
    return _options(
        click.option(
            "--negative-prompt", "--negative_prompt", "negative_prompt", default="", help="What to steer away from."
        ),
        click.option(
            "--steps",
            "--ddim_steps",
            "steps",
            type=int,
            default=DEFAULT_STEPS,
            show_default=True,
            help="Denoising steps.",
        ),
        click.option(
            "--sampler",
            type=click.Choice(names),
            default=None,
            help="Sampler (default ddim). ddim, plms and dpm reproduce the reference scripts."
            + (" (plms cannot start part-way: not for img2img.)" if img2img else ""),
        ),
        *plms,
        click.option("--dpm", "--dpm_solver", "dpm", is_flag=True, help="Same as --sampler dpm."),
        click.option(
            "--scale",
            type=float,
            default=None,
            help=f"Classifier-free guidance scale. Default {default_scale_help(mode)} (the reference {mode}).",
        ),
        click.option(
            "--ddim_eta",
            "--eta",
            "eta",
            type=float,
            default=0.0,
            show_default=True,
            help="DDIM eta (0 = deterministic; ddim only).",
        ),
        click.option(
            "-n",
            "--n_samples",
            "--n-samples",
            "n_samples",
            type=int,
            default=1,
            show_default=True,
            help="Images per batch.",
        ),
        click.option(
            "--n_iter",
            "--n-iter",
            "n_iter",
            type=int,
            default=1,
            show_default=True,
            help="Number of batches (of every prompt).",
        ),
        click.option("--seed", type=str, default=None, help=seed_help),
        click.option(
            "--seed-mode",
            type=click.Choice(SEED_MODES),
            default=DEFAULT_SEED_MODE,
            show_default=True,
            help="per-image: image k uses seed+k (CPU noise, reproducible alone anywhere). reference: "
            "noise drawn as the reference scripts draw it (same seed, same images).",
        ),
        click.option(
            "--fixed_code",
            "--fixed-code",
            "fixed_code",
            is_flag=True,
            help="Use the same starting noise for every batch.",
        ),
    )


grid_options = _options(
    click.option("--skip_grid", "--skip-grid", "skip_grid", is_flag=True, help="Do not save a grid."),
    click.option("--skip_save", "--skip-save", "skip_save", is_flag=True, help="Do not save single images."),
    click.option(
        "--n_rows", "--n-rows", "n_rows", type=int, default=0, help="Images per grid row (default n_samples)."
    ),
)

common_output_options = _options(
    click.option(
        "--no-watermark",
        "no_watermark",
        is_flag=True,
        help="Do not embed the invisible watermark of the reference scripts.",
    ),
    click.option("-q", "--quiet", is_flag=True, help="No progress bar or notices; only the written paths."),
    click.option("-v", "--verbose", is_flag=True, help="Show tracebacks for errors."),
)

prompt_options = _options(
    click.argument("prompt_arg", metavar="[PROMPT]", required=False),
    click.option("--prompt", "prompt_opt", default=None, help="The prompt (same as the argument)."),
    click.option(
        "--from-file",
        "--from_file",
        "from_file",
        type=click.Path(path_type=Path),
        default=None,
        help="A text file with one prompt per line, batched n_samples at a time.",
    ),
    click.option(
        "--repeat", type=int, default=1, show_default=True, help="With --from-file: make each line this many times."
    ),
)

size_options = _options(
    click.option("-H", "--H", "--height", "height", type=int, default=None, help="Height in pixels (multiple of 8)."),
    click.option("-W", "--W", "--width", "width", type=int, default=None, help="Width in pixels (multiple of 8)."),
)


def _outdir_option(default: str, grid: bool = True) -> Callable:
    where = "Images go to OUTDIR/samples/NNNNN.png" + (", grids to OUTDIR/grid-NNNN.png." if grid else ".")
    return click.option(
        "--outdir", type=click.Path(path_type=Path), default=Path(default), show_default=True, help=where
    )


# ---- options -> specs -----------------------------------------------------------------------------------


def _parse_seed(text: str | None) -> int:
    if text is None:
        return RANDOM_SEED
    try:
        return int(text.strip())
    except ValueError:
        raise click.BadParameter(
            f"{text!r} is not an integer (0..{MAX_SEED}, or -1 for random)", param_hint="'--seed'"
        ) from None


def _sampler(sampler: str | None, plms: bool, dpm: bool) -> str:
    chosen = [name for name, on in (("plms", plms), ("dpm", dpm)) if on]
    if sampler:
        chosen.append(sampler)
    if len(set(chosen)) > 1:
        raise click.UsageError(f"choose one sampler; got {', '.join(sorted(set(chosen)))}")
    return chosen[0] if chosen else "ddim"


def _prompts(o: dict) -> tuple[list[str], bool]:
    prompt_arg, prompt_opt, from_file, repeat = o["prompt_arg"], o["prompt_opt"], o["from_file"], o["repeat"]
    if prompt_arg and prompt_opt and prompt_arg != prompt_opt:
        raise click.UsageError("give the prompt either as an argument or with --prompt, not both")
    if not 1 <= repeat <= MAX_REPEAT:
        raise click.BadParameter(f"{repeat} (must be between 1 and {MAX_REPEAT})", param_hint="'--repeat'")
    if from_file is None:
        if repeat != 1:
            raise click.UsageError(
                "--repeat repeats the lines of --from-file; for more images of one prompt use "
                "-n/--n_samples or --n_iter"
            )
        prompt = prompt_arg if prompt_arg is not None else prompt_opt
        if prompt is None:
            raise click.UsageError("no prompt: give one as an argument, with --prompt, or with --from-file")
        return [prompt], False
    if prompt_arg or prompt_opt:
        raise click.UsageError("give either a prompt or --from-file, not both")
    lines = read_prompt_file(from_file)
    if len(lines) * repeat > MAX_PLAN_PROMPTS:
        raise click.UsageError(
            f"--from-file {from_file} with --repeat {repeat}: {len(lines) * repeat} prompts, more than the "
            f"{MAX_PLAN_PROMPTS} one run takes; split the file"
        )
    return [p for p in lines for _ in range(repeat)], True


def _generation_spec(o: dict, mode: str, **parts: Any) -> GenerationSpec:
    prompts, is_file = _prompts(o)
    return GenerationSpec(
        prompts=tuple(prompts),
        mode=mode,
        from_file=is_file,
        negative_prompt=o["negative_prompt"],
        steps=o["steps"],
        sampler=_sampler(o["sampler"], o.get("plms", False), o["dpm"]),
        scale=o["scale"],
        eta=o["eta"],
        height=o["height"],
        width=o["width"],
        seed=_parse_seed(o["seed"]),
        seed_mode=o["seed_mode"],
        fixed_code=o["fixed_code"],
        n_samples=o["n_samples"],
        n_iter=o["n_iter"],
        **parts,
    )


def _precision(o: dict) -> str:
    """--bf16 is --precision bf16; with another --precision it is a contradiction, not a silent choice."""
    if not o["bf16"]:
        return o["precision"]
    if o["precision"] not in ("auto", "autocast", "bf16"):
        raise click.UsageError(f"--bf16 and --precision {o['precision']} contradict each other: give one")
    return "bf16"


def _load_spec(o: dict) -> LoadSpec:
    return LoadSpec(
        ckpt=o["ckpt"],
        config=o["config"],
        v_prediction=o["v_prediction"],
        device=o["device"],
        precision=_precision(o),
        low_vram=o["low_vram"],
        compile=o.get("compile_models", False),
    )


def _output_spec(o: dict) -> OutputSpec:
    return OutputSpec(
        outdir=o["outdir"],
        skip_grid=o.get("skip_grid", True),
        skip_save=o.get("skip_save", False),
        watermark=not o["no_watermark"],
        n_rows=o.get("n_rows", 0),
    )


def _run(load: LoadSpec, gen: GenerationSpec, out: OutputSpec, sink: PrintingSink) -> None:
    from sdgen import api

    model = api.load_model(load, modes=(gen.mode,), sink=sink)
    api.run(model, gen, out, sink)


# ---- commands -------------------------------------------------------------------------------------------


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.version_option(__version__, prog_name="sdgen")
def cli() -> None:
    """Stable Diffusion from a checkpoint file, on CUDA or the CPU, offline.

    \b
    sdgen txt2img "a hamster painting with a brush" --ckpt v1-5-pruned-emaonly.safetensors
    sdgen img2img --prompt "a bird on a branch" --init-img sketch.png --ckpt sd-v1-4.ckpt
    sdgen upscale photo.png --ckpt x4-upscaler-ema.safetensors --prompt "a white cat"
    """


@cli.command()
@prompt_options
@size_options
@_outdir_option("outputs/txt2img-samples")
@sampling_options("txt2img")
@model_options(SD_CKPT_HELP)
@compile_option
@grid_options
@common_output_options
def txt2img(**o: Any) -> None:
    """Make images from a text prompt. -H/-W default to the model's size (512, or 768 for SD 2.x-v)."""
    sink = PrintingSink(o["quiet"])
    with error_boundary(o["verbose"], sink):
        _run(_load_spec(o), _generation_spec(o, "txt2img"), _output_spec(o), sink)


@cli.command()
@prompt_options
@click.option(
    "--init-img",
    "--init_img",
    "init_img",
    type=click.Path(path_type=Path),
    required=True,
    help="The starting image (PNG, JPEG, WebP, ...).",
)
@click.option(
    "--strength",
    type=float,
    default=DEFAULT_STRENGTH,
    show_default=True,
    help="How much to change it: 0 keeps the image (its VAE round trip), 1 ignores it.",
)
@size_options
@_outdir_option("outputs/img2img-samples")
@sampling_options("img2img")
@model_options(SD_CKPT_HELP)
@compile_option
@grid_options
@common_output_options
def img2img(**o: Any) -> None:
    """Turn a sketch or picture into a new one guided by a prompt.

    The output has the init image's size rounded down to a multiple of 8, unless -H/-W resize it first.
    """
    sink = PrintingSink(o["quiet"])
    with error_boundary(o["verbose"], sink):
        part = Img2ImgInput(init_image=o["init_img"], strength=o["strength"])
        _run(_load_spec(o), _generation_spec(o, "img2img", img2img=part), _output_spec(o), sink)


@cli.command()
@click.argument("inputs", nargs=-1, required=True, type=click.Path(path_type=Path), metavar="INPUT...")
@click.option("--prompt", default="", help="What the image shows (optional; helps the upscaler).")
@click.option("--negative-prompt", "--negative_prompt", "negative_prompt", default="", help="What to steer away from.")
@click.option(
    "--noise-level",
    "--noise_level",
    "noise_level",
    type=int,
    default=DEFAULT_NOISE_LEVEL,
    show_default=True,
    help=f"Noise added to the input, 0..{MAX_NOISE_LEVEL}: higher invents more detail, lower stays closer.",
)
@click.option(
    "--steps",
    "--ddim_steps",
    "steps",
    type=int,
    default=DEFAULT_UPSCALE_STEPS,
    show_default=True,
    help="Denoising steps.",
)
@click.option(
    "--scale",
    type=float,
    default=None,
    help=f"Classifier-free guidance scale. Default {default_scale_help('upscale')}.",
)
@click.option("--sampler", type=click.Choice(SAMPLER_NAMES), default="ddim", show_default=True, help="Sampler.")
@click.option("--ddim_eta", "--eta", "eta", type=float, default=0.0, show_default=True, help="DDIM eta (ddim only).")
@click.option("--seed", type=str, default=None, help=seed_help)
@click.option(
    "--seed-mode",
    type=click.Choice(SEED_MODES),
    default=DEFAULT_SEED_MODE,
    show_default=True,
    help="per-image: input k uses seed+k. reference: every input uses the seed.",
)
@click.option(
    "--tile",
    type=int,
    default=DEFAULT_TILE,
    show_default=True,
    help="Tile size in input pixels for big inputs (UNet and VAE); 0 never tiles. Smaller uses less memory.",
)
@_outdir_option("outputs/upscale-samples", grid=False)
@model_options(X4_CKPT_HELP)
@common_output_options
def upscale(**o: Any) -> None:
    """Make images 4x larger with the SD x4 upscaler (x4-upscaler-ema.safetensors or a diffusers folder).

    The VAE always decodes in fp32 (it overflows in fp16). Inputs larger than --tile pixels are processed in
    overlapping, blended tiles, which bounds memory: a smaller --tile uses less.
    """
    sink = PrintingSink(o["quiet"])
    with error_boundary(o["verbose"], sink):
        if o["ckpt"] is None:
            raise click.UsageError("--ckpt is required: the x4 upscaler checkpoint (x4-upscaler-ema.safetensors)")
        part = UpscaleInput(images=tuple(o["inputs"]), noise_level=o["noise_level"], tile=o["tile"])
        gen = GenerationSpec(
            prompts=(o["prompt"],),
            mode="upscale",
            negative_prompt=o["negative_prompt"],
            steps=o["steps"],
            sampler=o["sampler"],
            scale=o["scale"],
            eta=o["eta"],
            seed=_parse_seed(o["seed"]),
            seed_mode=o["seed_mode"],
            upscale=part,
        )
        _run(_load_spec(o), gen, _output_spec(o), sink)


def _on_sigterm(signum: int, frame: Any) -> None:
    raise Terminated()


def main() -> None:
    """The console entry point: SIGTERM ends a run as Ctrl-C does (exit 143, the files written are complete).
    Installed here only, never by the commands, so that calling them in-process changes no signal handling."""
    signal.signal(signal.SIGTERM, _on_sigterm)
    cli(prog_name="sdgen")


if __name__ == "__main__":
    main()
