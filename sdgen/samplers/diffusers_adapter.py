"""Every sampler that is a diffusers scheduler, run in the one sampler signature of :mod:`sdgen.samplers`."""

from __future__ import annotations

from typing import Any

import torch

from sdgen.samplers import Callback, ModelFn, SamplerInfo, SamplingParams
from sdgen.samplers.schedule import Schedule


def make_scheduler(info: SamplerInfo, schedule: Schedule, v_prediction: bool):
    import diffusers

    common = {
        "num_train_timesteps": schedule.timesteps,
        "beta_start": schedule.linear_start,
        "beta_end": schedule.linear_end,
        "beta_schedule": "scaled_linear",
        "prediction_type": "v_prediction" if v_prediction else "epsilon",
    }
    assert info.scheduler is not None
    return getattr(diffusers, info.scheduler)(**common, **dict(info.options))


def sample_scheduler(
    model: ModelFn, noise: torch.Tensor, p: SamplingParams, callback: Callback, *, info: SamplerInfo
) -> torch.Tensor:
    """txt2img: the noise scaled by the scheduler's initial sigma, all steps. img2img: x0 noised to the
    scheduler's timestep at (steps - t_enc), then the remaining steps."""
    sched = make_scheduler(info, p.schedule, p.v_prediction)
    sched.set_timesteps(p.steps, device=noise.device)
    start = 0
    if p.x0 is None:
        x = noise * float(sched.init_noise_sigma)
    else:
        assert p.t_enc is not None
        start = (p.steps - p.t_enc) * sched.order
        x = sched.add_noise(p.x0, noise, sched.timesteps[start : start + 1])
    extra: dict[str, Any] = {"generator": p.generators} if info.stochastic else {}
    if start and hasattr(sched, "set_begin_index"):
        sched.set_begin_index(start)
    for t in sched.timesteps[start:]:
        model_in = sched.scale_model_input(x, t)
        x = sched.step(model(model_in, t), t, x, **extra).prev_sample
        callback(x)
    return x
