"""What a run asks for, as frozen specs validated once, in ``__post_init__``, before any weights load:
:class:`LoadSpec` (fixed at load time), :class:`GenerationSpec` (what changes per image, with the typed
img2img and upscale parts) and :class:`OutputSpec` (where the results go).

Every range and every file check that can happen before loading happens here, so a typo costs no model load.
Specs are plain data: ``to_json()`` / ``from_json()`` round-trip them, so a job can be queued, sent to another
process, written into a PNG and read back. Defaults live here, each with the reason for its value.
Messages name the CLI flag, show the value and the allowed range.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import secrets
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from sdgen.errors import CheckpointError, ConfigError, DeviceError, InputError, OutputError, UsageError
from sdgen.families.x4 import DEFAULT_NOISE_LEVEL, MAX_NOISE_LEVEL
from sdgen.input_files import read_regular_file, require_regular_file
from sdgen.runtime.device import PRECISION_ALIASES, PRECISIONS, validate_device_name
from sdgen.samplers import SAMPLER_NAMES, SAMPLERS

MODES = ("txt2img", "img2img", "upscale")
DEFAULT_STEPS = 50  # the reference scripts' --ddim_steps / --steps
DEFAULT_UPSCALE_STEPS = 75  # the reference upscaling script
DEFAULT_SAMPLER = "ddim"  # the reference scripts' default sampler
DEFAULT_STRENGTH = 0.75  # reference img2img default
DEFAULT_ETA = 0.0  # deterministic DDIM, as the reference
DEFAULT_SEED_MODE = "per-image"  # every image can be made again alone from the seed in its PNG
DEFAULT_TILE = 128  # x4 upscale: input pixels per tile (UNet and VAE); fits an 8 GiB card in fp16
SEED_MODES = ("per-image", "reference")
RANDOM_SEED = -1  # A1111's spelling of "pick one"
MAX_SEED = 2**32 - 1  # the reference's seed_everything range
MAX_SIDE = 8192  # beyond this no card or CPU finishes; a typo, not a wish
MAX_BATCH = 64
MAX_STEPS = 10000
MAX_ITER = 100_000  # --n_iter: checked before the plan is built
MAX_REPEAT = 10_000  # --repeat: each prompt-file line at most this many times
MAX_PLAN_PROMPTS = 1_000_000  # prompts in one run (file lines x --repeat)
MAX_PROMPT_FILE = 16 << 20  # bytes of a --from-file (a few hundred thousand prompts)
MIN_TILE = 32

S = TypeVar("S", bound="_Spec")


class _Spec:
    """JSON round trip for the frozen specs (paths as strings, tuples as lists, nested specs as objects)."""

    def to_dict(self) -> dict[str, Any]:
        return {f.name: _plain(getattr(self, f.name)) for f in dataclasses.fields(self)}  # type: ignore[arg-type]

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    def _check_fields(self) -> None:
        """Each field of the type its annotation names (a spec may come from JSON or from a caller's code):
        a str where a tuple belongs, a float step count or a string seed is a UsageError here, not a
        TypeError after the model has loaded. Strings for paths, lists for tuples and objects for nested specs
        (as JSON has them) are converted."""
        for name, hint in typing.get_type_hints(type(self)).items():
            _set(self, name, _checked(f"{type(self).__name__}.{name}", hint, getattr(self, name)))

    @classmethod
    def from_dict(cls: type[S], data: dict[str, Any]) -> S:
        names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
        unknown = sorted(set(data) - names)
        if unknown:
            raise UsageError(f"{cls.__name__}: unknown field(s) {', '.join(unknown)}")
        return cls(**data)  # __post_init__ turns JSON lists, strings and objects into tuples, paths and specs

    @classmethod
    def from_json(cls: type[S], text: str) -> S:
        return cls.from_dict(json.loads(text))


def _plain(value: Any) -> Any:
    if isinstance(value, _Spec):
        return value.to_dict()
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, tuple):
        return [_plain(v) for v in value]
    return value


def _checked(where: str, hint: Any, value: Any) -> Any:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(hint)
        if value is None and type(None) in options:
            return None
        return _checked(where, next(a for a in options if a is not type(None)), value)
    if origin is tuple:
        if isinstance(value, str) or not isinstance(value, (tuple, list)):
            raise UsageError(f"{where}: expected a list, got {value!r}")
        item = typing.get_args(hint)[0]
        return tuple(_checked(f"{where}[{i}]", item, v) for i, v in enumerate(value))
    if hint is Path:
        if isinstance(value, (str, Path)) and str(value):
            return Path(value)
        raise UsageError(f"{where}: expected a path, got {value!r}")
    if isinstance(hint, type) and issubclass(hint, _Spec) and isinstance(value, dict):
        return hint.from_dict(value)
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if (hint in (int, float) and isinstance(value, bool)) or not isinstance(value, hint):
        raise UsageError(f"{where}: expected {getattr(hint, '__name__', hint)}, got {value!r}")
    return value


def _set(obj: Any, name: str, value: Any) -> None:
    object.__setattr__(obj, name, value)  # normalising a frozen spec in its own __post_init__


def _check_size(flag: str, value: int | None) -> None:
    if value is None:
        return
    if value <= 0 or value % 8:
        raise UsageError(f"{flag} {value}: must be a positive multiple of 8 (e.g. {max(8, value // 8 * 8)})")
    if value > MAX_SIDE:
        raise UsageError(f"{flag} {value}: larger than {MAX_SIDE} pixels")


@dataclass(frozen=True)
class LoadSpec(_Spec):
    ckpt: Path | None = None  # None: the default SD 1.5 model from the Hugging Face cache
    config: Path | None = None  # an original LDM yaml; None: NAME.yaml beside NAME.ckpt, else shipped
    v_prediction: bool | None = None  # None: decided from the checkpoint (Family.decide_v_prediction)
    device: str = "auto"
    precision: str = "auto"
    low_vram: bool = False  # start at the bottom of the out-of-memory ladder (sequential CPU offload)
    compile: bool = False  # torch.compile the UNet and VAE decoder (sdgen.runtime.compiling)

    def __post_init__(self) -> None:
        self._check_fields()
        _set(self, "device", validate_device_name(self.device))
        precision = PRECISION_ALIASES.get(self.precision, self.precision)
        if precision not in PRECISIONS:
            raise UsageError(
                f"--precision {self.precision!r}: expected one of {', '.join(PRECISIONS)} (or full, autocast)"
            )
        _set(self, "precision", precision)
        if self.device == "cpu" and precision == "fp16":
            raise DeviceError(
                "--precision fp16 is not supported on the CPU (no half-precision convolutions); use fp32 or bf16"
            )
        if self.compile and self.low_vram:
            raise UsageError(
                "--compile and --low-vram do not go together (offloading moves weights under the "
                "compiled graphs); choose one"
            )
        if self.ckpt is not None and not self.ckpt.exists():
            raise CheckpointError(f"--ckpt {self.ckpt}: no such file")
        if self.config is not None:
            if self.ckpt is not None and self.ckpt.is_dir():
                raise UsageError(
                    f"--config {self.config}: a diffusers folder brings its own configs; --config is "
                    "for single-file checkpoints"
                )
            require_regular_file(self.config, "--config", ConfigError)


@dataclass(frozen=True)
class Img2ImgInput(_Spec):
    init_image: Path
    strength: float = DEFAULT_STRENGTH  # 0 keeps the image (its VAE round trip), 1 ignores it

    def __post_init__(self) -> None:
        self._check_fields()
        if not math.isfinite(self.strength) or not 0.0 <= self.strength <= 1.0:
            raise UsageError(f"--strength {self.strength}: must be between 0 and 1")


@dataclass(frozen=True)
class UpscaleInput(_Spec):
    images: tuple[Path, ...]
    noise_level: int = DEFAULT_NOISE_LEVEL
    tile: int = DEFAULT_TILE  # 0: never tile

    def __post_init__(self) -> None:
        self._check_fields()
        if not self.images:
            raise UsageError("no input image: give one or more INPUT files")
        if not 0 <= self.noise_level <= MAX_NOISE_LEVEL:
            raise UsageError(f"--noise-level {self.noise_level}: must be between 0 and {MAX_NOISE_LEVEL}")
        if self.tile != 0 and (self.tile < MIN_TILE or self.tile % 8):
            raise UsageError(f"--tile {self.tile}: must be 0 (no tiling) or a multiple of 8, at least {MIN_TILE}")


@dataclass(frozen=True)
class GenerationSpec(_Spec):
    prompts: tuple[str, ...]  # one prompt, or the lines of a prompt file (each repeated as asked)
    mode: str = "txt2img"
    from_file: bool = False  # prompts are a file's lines: batched n_samples at a time, not n_samples copies
    negative_prompt: str = ""
    steps: int = DEFAULT_STEPS
    sampler: str = DEFAULT_SAMPLER
    scale: float | None = None  # None: the family's reference default for the mode
    eta: float = DEFAULT_ETA
    height: int | None = None  # None: the model's native size (img2img: the init image's)
    width: int | None = None
    seed: int = RANDOM_SEED  # -1: random, chosen here once so that the spec (and its PNG) replays exactly
    seed_mode: str = DEFAULT_SEED_MODE
    fixed_code: bool = False
    n_samples: int = 1  # images per batch
    n_iter: int = 1  # times the whole batch plan runs
    img2img: Img2ImgInput | None = None
    upscale: UpscaleInput | None = None

    def __post_init__(self) -> None:
        self._check_fields()
        if self.seed == RANDOM_SEED:
            _set(self, "seed", secrets.randbelow(MAX_SEED + 1))
        self._check_values()
        self._check_mode()

    def _check_values(self) -> None:
        if self.mode not in MODES:
            raise UsageError(f"mode {self.mode!r}: expected one of {', '.join(MODES)}")
        _check_size("-H/--H", self.height)
        _check_size("-W/--W", self.width)
        if not 1 <= self.steps <= MAX_STEPS:
            raise UsageError(f"--steps {self.steps}: must be between 1 and {MAX_STEPS}")
        if self.sampler not in SAMPLER_NAMES:
            raise UsageError(f"--sampler {self.sampler!r}: expected one of {', '.join(SAMPLER_NAMES)}")
        if self.scale is not None and (not math.isfinite(self.scale) or abs(self.scale) > 1000):
            raise UsageError(f"--scale {self.scale}: must be a finite number between -1000 and 1000")
        if not math.isfinite(self.eta) or not 0.0 <= self.eta <= 1.0:
            raise UsageError(f"--ddim_eta {self.eta}: must be between 0 and 1")
        if self.eta and self.sampler != "ddim":
            raise UsageError(f"--ddim_eta {self.eta}: only the ddim sampler uses eta")
        if not 1 <= self.n_samples <= MAX_BATCH:
            raise UsageError(f"--n_samples {self.n_samples}: must be between 1 and {MAX_BATCH}")
        if not 1 <= self.n_iter <= MAX_ITER:
            raise UsageError(f"--n_iter {self.n_iter}: must be between 1 and {MAX_ITER}")
        if not 0 <= self.seed <= MAX_SEED:
            raise UsageError(f"--seed {self.seed}: must be between 0 and {MAX_SEED} (or -1 for a random one)")
        if self.seed_mode not in SEED_MODES:
            raise UsageError(f"--seed-mode {self.seed_mode!r}: expected one of {', '.join(SEED_MODES)}")
        if not self.prompts:
            raise UsageError("no prompt: give one as an argument, with --prompt, or with --from-file")
        for i, prompt in enumerate((*self.prompts, self.negative_prompt)):
            try:
                prompt.encode("utf-8")
            except UnicodeEncodeError as e:  # lone surrogates: bytes that were not UTF-8 in the shell's argv
                which = "the negative prompt" if i == len(self.prompts) else f"prompt {i + 1}"
                raise UsageError(
                    f"{which} is not valid UTF-8 text (a stray byte at character {e.start}); "
                    "check the terminal's encoding"
                ) from None

    def _check_mode(self) -> None:
        """The typed part that the mode needs, present and readable; no part of another mode."""
        from sdgen import images

        if (self.mode == "img2img") != (self.img2img is not None):
            raise UsageError("img2img needs its init image (Img2ImgInput), and only img2img takes one")
        if (self.mode == "upscale") != (self.upscale is not None):
            raise UsageError("upscale needs its input images (UpscaleInput), and only upscale takes them")
        if self.img2img is not None:
            if not SAMPLERS[self.sampler].img2img:
                raise UsageError(
                    f"--sampler {self.sampler}: img2img cannot start it part-way (the reference "
                    "img2img refuses it too); use ddim or another sampler"
                )
            images.fit_size(images.load_rgb(self.img2img.init_image, "--init-img"), self.width, self.height)
        if self.upscale is not None:
            if self.width is not None or self.height is not None or self.n_samples != 1 or self.n_iter != 1:
                raise UsageError("upscale makes one image per input at 4x its size: no -H/-W, -n or --n_iter")
            for path in self.upscale.images:
                images.load_rgb(path, "INPUT")

    @property
    def image_count(self) -> int:
        if self.upscale is not None:
            return len(self.upscale.images)
        per_plan = len(self.prompts) if self.from_file else self.n_samples
        return per_plan * self.n_iter


@dataclass(frozen=True)
class OutputSpec(_Spec):
    outdir: Path
    skip_grid: bool = False
    skip_save: bool = False
    watermark: bool = True
    n_rows: int = 0  # images per grid row; 0: n_samples, as the reference

    def __post_init__(self) -> None:
        self._check_fields()
        if self.n_rows < 0:
            raise UsageError(f"--n_rows {self.n_rows}: must be 0 (one row per batch) or more")
        if not (self.skip_save and self.skip_grid):
            _check_writable(self.outdir)


def _check_writable(outdir: Path) -> None:
    """The output folder (or the nearest folder that exists above it) can take files: checked before loading."""
    for path in (outdir / "samples", outdir):
        if path.exists() and not path.is_dir():
            raise OutputError(f"cannot write to {path}: it is a file, not a folder (--outdir)")
    existing = outdir
    while not existing.exists() and existing.parent != existing:
        existing = existing.parent
    if not existing.is_dir():
        raise OutputError(f"cannot write to {outdir}: {existing} is a file, not a folder (--outdir)")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise OutputError(f"cannot write to {outdir}: permission denied in {existing} (--outdir)")


def read_prompt_file(path: Path) -> list[str]:
    """The non-blank lines of a UTF-8 prompt file (--from-file)."""
    try:
        text = read_regular_file(path, "--from-file", MAX_PROMPT_FILE).decode("utf-8")
    except UnicodeDecodeError as e:
        raise InputError(f"--from-file {path}: not UTF-8 text (bad byte at offset {e.start})") from None
    except OSError as e:
        raise InputError(f"--from-file {path}: cannot be read ({e.strerror})") from None
    prompts = [line.strip() for line in text.splitlines() if line.strip()]
    if not prompts:
        raise InputError(f"--from-file {path}: holds no prompts (empty or only blank lines)")
    return prompts
