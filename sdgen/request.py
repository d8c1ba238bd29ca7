"""What a run asks for, as three frozen parts validated once, before any weights load:
what is fixed at load time, what changes per image, and where the results go.

Defaults live here, each with the reason for its value.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from sdgen.errors import InputError
from sdgen.samplers import SAMPLER_NAMES

DEFAULT_STEPS = 50  # the reference scripts' --ddim_steps / --steps
DEFAULT_SAMPLER = "ddim"  # the reference scripts' default sampler
DEFAULT_SCALE = {"sd1": 7.5, "sd2": 9.0, "x4": 9.0}  # reference txt2img defaults (SD 1 and SD 2 scripts)
DEFAULT_IMG2IMG_SCALE = {"sd1": 5.0, "sd2": 9.0, "x4": 9.0}  # reference img2img defaults
DEFAULT_STRENGTH = 0.75  # reference img2img default
DEFAULT_ETA = 0.0  # deterministic DDIM, as the reference
DEFAULT_SEED_MODE = "per-image"  # every image can be made again alone from the seed in its PNG
SEED_MODES = ("per-image", "reference")
MAX_SEED = 2**32 - 1  # the reference's seed_everything range
MAX_SIDE = 8192  # beyond this no card or CPU finishes; a typo, not a wish
MAX_BATCH = 64


@dataclass(frozen=True)
class LoadRequest:
    ckpt: Path | None  # None: the default SD 1.5 model from the Hugging Face cache
    config: Path | None = None
    v_prediction: bool | None = None  # None: decided from the checkpoint (see families.decide_v_prediction)
    device: str = "auto"
    precision: str = "auto"
    low_vram: bool = False  # start at the bottom of the out-of-memory ladder (sequential CPU offload)
    compile: bool = False  # torch.compile the UNet and VAE decoder (sdgen.compiling)


@dataclass(frozen=True)
class GenerationRequest:
    batches: tuple[tuple[str, ...], ...]  # the prompts of each batch, in the order they run (n_iter included)
    negative_prompt: str = ""
    steps: int = DEFAULT_STEPS
    sampler: str = DEFAULT_SAMPLER
    scale: float | None = None  # None: the family's reference default
    eta: float = DEFAULT_ETA
    height: int | None = None  # None: the model's native size
    width: int | None = None
    seed: int = 0
    seed_mode: str = DEFAULT_SEED_MODE
    fixed_code: bool = False
    n_samples: int = 1
    extras: dict = field(default_factory=dict, compare=False)  # per-mode extras (init image, strength...)


@dataclass(frozen=True)
class OutputRequest:
    outdir: Path
    skip_grid: bool = False
    skip_save: bool = False
    watermark: bool = True
    n_rows: int = 0  # 0: one row per batch, as the reference
    quiet: bool = False


def plan_batches(prompts: list[str], n_samples: int, n_iter: int, from_file: bool) -> tuple[tuple[str, ...], ...]:
    """The reference's batching: one prompt -> n_samples copies per batch; a prompt file -> its lines in
    chunks of n_samples (the last chunk may be smaller). The whole plan runs n_iter times."""
    if from_file:
        chunks = [tuple(prompts[i : i + n_samples]) for i in range(0, len(prompts), n_samples)]
    else:
        chunks = [tuple([prompts[0]] * n_samples)]
    return tuple(chunks * n_iter)


def read_prompt_file(path: Path) -> list[str]:
    try:
        text = path.read_bytes().decode("utf-8")
    except FileNotFoundError:
        raise InputError(f"--from-file {path}: no such file") from None
    except IsADirectoryError:
        raise InputError(f"--from-file {path}: is a folder, not a text file") from None
    except UnicodeDecodeError as e:
        raise InputError(f"--from-file {path}: not UTF-8 text (bad byte at offset {e.start})") from None
    except OSError as e:
        raise InputError(f"--from-file {path}: cannot be read ({e.strerror})") from None
    prompts = [line.strip() for line in text.splitlines() if line.strip()]
    if not prompts:
        raise InputError(f"--from-file {path}: holds no prompts (empty or only blank lines)")
    return prompts


def check_size(flag: str, value: int | None) -> None:
    if value is None:
        return
    if value <= 0 or value % 8:
        raise InputError(f"{flag} {value}: must be a positive multiple of 8 (e.g. {max(8, value // 8 * 8)})")
    if value > MAX_SIDE:
        raise InputError(f"{flag} {value}: larger than {MAX_SIDE} pixels")


def validate(gen: GenerationRequest) -> None:
    """Every per-image value, checked before any weights load. Messages name the flag and the range."""
    check_size("-H/--H", gen.height)
    check_size("-W/--W", gen.width)
    if gen.steps < 1 or gen.steps > 10000:
        raise InputError(f"--steps {gen.steps}: must be between 1 and 10000")
    if gen.sampler not in SAMPLER_NAMES:
        raise InputError(f"--sampler {gen.sampler!r}: expected one of {', '.join(SAMPLER_NAMES)}")
    if gen.scale is not None and (not math.isfinite(gen.scale) or abs(gen.scale) > 1000):
        raise InputError(f"--scale {gen.scale}: must be a finite number between -1000 and 1000")
    if not math.isfinite(gen.eta) or not 0.0 <= gen.eta <= 1.0:
        raise InputError(f"--ddim_eta {gen.eta}: must be between 0 and 1")
    if gen.eta and gen.sampler not in ("ddim",):
        raise InputError(f"--ddim_eta {gen.eta}: only the ddim sampler uses eta")
    if not 1 <= gen.n_samples <= MAX_BATCH:
        raise InputError(f"--n_samples {gen.n_samples}: must be between 1 and {MAX_BATCH}")
    if not 0 <= gen.seed <= MAX_SEED:
        raise InputError(f"--seed {gen.seed}: must be between 0 and {MAX_SEED}")
    if gen.seed_mode not in SEED_MODES:
        raise InputError(f"--seed-mode {gen.seed_mode!r}: expected one of {', '.join(SEED_MODES)}")
    if not gen.batches or not all(gen.batches):
        raise InputError("no prompt: give one as an argument, with --prompt, or with --from-file")


def validate_img2img(gen: GenerationRequest) -> None:
    validate(gen)
    strength = gen.extras.get("strength")
    if strength is None or not math.isfinite(strength) or not 0.0 <= strength <= 1.0:
        raise InputError(f"--strength {strength}: must be between 0 and 1")
    if gen.sampler == "plms":
        raise InputError("--sampler plms: img2img cannot start PLMS part-way (the reference img2img refuses it "
                         "too); use ddim or another sampler")
