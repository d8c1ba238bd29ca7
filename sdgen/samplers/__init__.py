"""Sampler names users type, mapped to the code that runs them. Importing this package imports no torch
(the CLI's --sampler choices come from here).

Every sampler has one signature, ``sample_NAME(model, noise, params, callback) -> latents``:

- ``model(x, t)``: the guided model output (eps or v) for latents x at timestep t;
- ``noise``: the starting noise (txt2img) or the forward-process noise (img2img, with ``params.x0``);
- ``params``: :class:`SamplingParams`, the same for all;
- ``callback(x)``: called after every model evaluation with the current latents (progress, previews and
  cancelling hang on it, as on k-diffusion's callback).

ddim, plms and dpm reproduce the reference scripts (:mod:`sdgen.samplers.reference`); every other name is
a diffusers scheduler with the model's training schedule (:mod:`sdgen.samplers.diffusers_adapter`).
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from sdgen.samplers.schedule import X4_LOW_RES_SCHEDULE, Schedule

if TYPE_CHECKING:
    import torch

__all__ = [
    "SAMPLERS",
    "SAMPLER_NAMES",
    "Schedule",
    "X4_LOW_RES_SCHEDULE",
    "SamplingParams",
    "sample",
    "evaluations",
    "evaluations_note",
]

ModelFn = Callable[["torch.Tensor", "torch.Tensor"], "torch.Tensor"]
Callback = Callable[["torch.Tensor"], None]


@dataclass(frozen=True)
class SamplerInfo:
    label: str  # the name A1111 and other tools write in the 'parameters' chunk
    function: str  # "module:function" under sdgen.samplers, imported when first run
    scheduler: str | None = None  # the diffusers class, for the adapter
    options: tuple[tuple[str, Any], ...] = ()
    stochastic: bool = False  # draws noise at every step (from the run's generators)
    img2img: bool = True  # can start part-way (the reference PLMS cannot)


_REF, _DIFF = "reference", "diffusers_adapter:sample_scheduler"
SAMPLERS: dict[str, SamplerInfo] = {
    "ddim": SamplerInfo("DDIM", f"{_REF}:sample_ddim"),
    "plms": SamplerInfo("PLMS", f"{_REF}:sample_plms", img2img=False),
    "dpm": SamplerInfo("DPM-Solver", f"{_REF}:sample_dpm_solver"),
    "euler": SamplerInfo("Euler", _DIFF, "EulerDiscreteScheduler"),
    "euler_a": SamplerInfo("Euler a", _DIFF, "EulerAncestralDiscreteScheduler", stochastic=True),
    "dpmpp_2m": SamplerInfo("DPM++ 2M", _DIFF, "DPMSolverMultistepScheduler"),
    "dpmpp_2m_karras": SamplerInfo(
        "DPM++ 2M Karras", _DIFF, "DPMSolverMultistepScheduler", (("use_karras_sigmas", True),)
    ),
    "lms": SamplerInfo("LMS", _DIFF, "LMSDiscreteScheduler"),
    "heun": SamplerInfo("Heun", _DIFF, "HeunDiscreteScheduler"),
    "unipc": SamplerInfo("UniPC", _DIFF, "UniPCMultistepScheduler"),
}
SAMPLER_NAMES = tuple(SAMPLERS)
IMG2IMG_SAMPLER_NAMES = tuple(n for n, s in SAMPLERS.items() if s.img2img)


@dataclass(frozen=True)
class SamplingParams:
    steps: int
    schedule: Schedule
    v_prediction: bool
    eta: float = 0.0
    generators: Any = None  # one torch.Generator (reference seed mode) or one per image (per-image mode)
    x0: torch.Tensor | None = None  # img2img: the clean latents to start from
    t_enc: int | None = None  # img2img: how many of the steps to run (strength x steps)


def sample(name: str, model: ModelFn, noise: torch.Tensor, params: SamplingParams, callback: Callback) -> torch.Tensor:
    """Run sampler ``name``. img2img at strength 0 is the clean latents; at strength 1 it is txt2img."""
    if params.x0 is not None:
        if params.t_enc is None or params.t_enc <= 0:
            return params.x0
        if params.t_enc >= params.steps:
            params = dataclasses.replace(params, x0=None, t_enc=None)
    info = SAMPLERS[name]
    module, function = info.function.split(":")
    run = getattr(importlib.import_module(f"sdgen.samplers.{module}"), function)
    if info.scheduler is not None:  # one adapter for every diffusers scheduler: tell it which
        run = functools.partial(run, info=info)
    return run(model, noise, params, callback)


def reference_timesteps(steps: int, n_train: int = 1000) -> list[int]:
    """The reference's 'uniform' DDIM/PLMS timesteps: range(0, 1000, 1000 // steps) + 1. For the step counts
    where that reaches 1000 (3, 9, 27, 37, 111, 333, 1000) the reference crashes; sdgen drops that step."""
    return [t + 1 for t in range(0, n_train, n_train // steps) if t + 1 < n_train]


def evaluations(name: str, steps: int, t_enc: int | None = None, n_train: int = 1000) -> int:
    """How many model evaluations (progress ticks) a run of ``steps`` takes (img2img: of its last t_enc)."""
    if t_enc is not None and t_enc < steps:
        if t_enc <= 0:
            return 0
        return 2 * t_enc - 1 if name == "heun" else t_enc
    if name == "ddim":
        return len(reference_timesteps(steps, n_train))
    if name == "plms":
        return len(reference_timesteps(steps, n_train)) + 1
    if name == "heun":
        return 2 * steps - 1
    return steps


def evaluations_note(name: str, steps: int, n: int) -> str:
    """Why the progress bar counts ``n`` model evaluations for ``steps`` steps (empty when n == steps)."""
    if n == steps:
        return ""
    why = {
        "ddim": "the reference's timestep spacing, range(0, 1000, 1000 // steps)",
        "plms": "the reference's timestep spacing, plus one for PLMS's first step",
        "heun": "two per step except the last",
    }.get(name, "part of the steps, as the strength asks")
    return f"{n} UNet evaluations for {steps} steps: {why}"
