"""Sampler names users type, mapped to the code that runs them.

ddim and plms are diffusers' DDIM and PNDM(PLMS-only) schedulers configured as the reference samplers:
timesteps 1, 1+T/S, ... ("leading" spacing with offset 1) and the last step going to alphas_cumprod[0], not 1.
dpm is the SD 2 scripts' DPM-Solver (multistep, order 2, data prediction, time-uniform steps on the
piecewise-linear log-alpha of the discrete schedule), written here as one function since diffusers'
DPM-Solver uses integer timesteps and so differs from it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # torch is imported lazily so that `sdgen --help` stays instant
    import torch


@dataclass(frozen=True)
class SamplerInfo:
    label: str  # the name A1111 and other tools write in the 'parameters' chunk
    scheduler: str | None  # diffusers class; None for our own loop
    options: tuple[tuple[str, Any], ...] = ()
    stochastic: bool = False


SAMPLERS: dict[str, SamplerInfo] = {
    "ddim": SamplerInfo("DDIM", "DDIMScheduler"),
    "plms": SamplerInfo("PLMS", "PNDMScheduler", (("skip_prk_steps", True),)),
    "dpm": SamplerInfo("DPM-Solver", None),
    "euler": SamplerInfo("Euler", "EulerDiscreteScheduler"),
    "euler_a": SamplerInfo("Euler a", "EulerAncestralDiscreteScheduler", stochastic=True),
    "dpmpp_2m": SamplerInfo("DPM++ 2M", "DPMSolverMultistepScheduler"),
    "dpmpp_2m_karras": SamplerInfo("DPM++ 2M Karras", "DPMSolverMultistepScheduler",
                                   (("use_karras_sigmas", True),)),
    "lms": SamplerInfo("LMS", "LMSDiscreteScheduler"),
    "heun": SamplerInfo("Heun", "HeunDiscreteScheduler"),
    "unipc": SamplerInfo("UniPC", "UniPCMultistepScheduler"),
}
SAMPLER_NAMES = tuple(SAMPLERS)

# Model output (eps or v, guidance applied) for latents x at (possibly fractional) timestep t.
ModelFn = Callable[["torch.Tensor", "torch.Tensor"], "torch.Tensor"]


@dataclass(frozen=True)
class Schedule:
    """The training noise schedule ('scaled linear' betas as in LDM's register_schedule)."""

    linear_start: float = 0.00085
    linear_end: float = 0.012
    timesteps: int = 1000

    def alphas_cumprod(self) -> torch.Tensor:
        import torch

        betas = torch.linspace(self.linear_start**0.5, self.linear_end**0.5, self.timesteps, dtype=torch.float64) ** 2
        return torch.cumprod(1.0 - betas, dim=0).float()


def make_scheduler(name: str, schedule: Schedule, v_prediction: bool):
    import diffusers

    info = SAMPLERS[name]
    common = {
        "num_train_timesteps": schedule.timesteps,
        "beta_start": schedule.linear_start,
        "beta_end": schedule.linear_end,
        "beta_schedule": "scaled_linear",
        "prediction_type": "v_prediction" if v_prediction else "epsilon",
    }
    if name in ("ddim", "plms"):
        common.update(timestep_spacing="leading", steps_offset=1, set_alpha_to_one=False)
    if name == "ddim":
        common.update(clip_sample=False)
    return getattr(diffusers, info.scheduler)(**common, **dict(info.options))


def run_scheduler(
    name: str, model: ModelFn, x: torch.Tensor, steps: int, schedule: Schedule, v_prediction: bool,
    eta: float, generator: Any, progress: Callable[[], None], start_step: int = 0,
) -> torch.Tensor:
    """Denoise ``x`` (already scaled as the scheduler's first step expects) from step ``start_step``."""
    sched = make_scheduler(name, schedule, v_prediction)
    sched.set_timesteps(steps, device=x.device)
    extra: dict[str, Any] = {}
    if name == "ddim":
        extra = {"eta": eta, "generator": generator}
    elif SAMPLERS[name].stochastic:
        extra = {"generator": generator}
    for t in sched.timesteps[start_step:]:
        model_in = sched.scale_model_input(x, t)
        x = sched.step(model(model_in, t), t, x, **extra).prev_sample
        progress()
    return x


def scheduler_init_sigma(name: str, schedule: Schedule, v_prediction: bool, steps: int) -> float:
    if SAMPLERS[name].scheduler is None:
        return 1.0
    sched = make_scheduler(name, schedule, v_prediction)
    sched.set_timesteps(steps)
    return float(sched.init_noise_sigma)


def scheduler_steps(name: str, steps: int) -> int:
    """How many model evaluations (progress ticks) a run of ``steps`` takes."""
    return steps + 1 if name == "plms" and steps > 1 else steps


def sample_dpm_solver(
    model: ModelFn, x: torch.Tensor, alphas_cumprod: torch.Tensor, steps: int, v_prediction: bool,
    progress: Callable[[], None],
) -> torch.Tensor:
    """DPM-Solver-2 multistep with data prediction (Lu et al., 2022, arXiv:2211.01095 'DPM-Solver++'
    with the 'dpm_solver' correction), as the SD 2 scripts' DPMSolverSampler runs it."""
    import torch

    n = alphas_cumprod.shape[0]
    log_alpha_table = 0.5 * torch.log(alphas_cumprod.to(x.device, torch.float32))
    t_table = torch.linspace(0.0, 1.0, n + 1, device=x.device)[1:]

    def log_alpha(t: torch.Tensor) -> torch.Tensor:  # piecewise-linear interpolation, extended at the ends
        i = torch.clamp(torch.searchsorted(t_table, t.reshape(1)) - 1, 0, n - 2)
        t0, t1 = t_table[i], t_table[i + 1]
        y0, y1 = log_alpha_table[i], log_alpha_table[i + 1]
        return (y0 + (t - t0) * (y1 - y0) / (t1 - t0)).reshape(())

    def coeffs(t: torch.Tensor):
        la = log_alpha(t)
        sigma = torch.sqrt(1.0 - torch.exp(2.0 * la))
        return torch.exp(la), sigma, la - torch.log(sigma)

    def data_prediction(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        alpha, sigma, _ = coeffs(t)
        out = model(x, ((t - 1.0 / n) * 1000.0).expand(x.shape[0]))
        eps = alpha * out + sigma * x if v_prediction else out
        progress()
        return (x - sigma * eps) / alpha

    ts = torch.linspace(1.0, 1.0 / n, steps + 1, device=x.device)
    prev_x0 = data_prediction(x, ts[0])
    prev_lambda = coeffs(ts[0])[2]
    older: tuple[torch.Tensor, torch.Tensor] | None = None
    for i in range(1, steps + 1):
        alpha_t, sigma_t, lambda_t = coeffs(ts[i])
        sigma_s = coeffs(ts[i - 1])[1]
        h = lambda_t - prev_lambda
        order2 = older is not None and not (steps < 15 and i == steps)  # lower order at the end
        if not order2:  # DPM-Solver-1 (= DDIM) from the newest data prediction
            x = (sigma_t / sigma_s) * x - alpha_t * torch.expm1(-h) * prev_x0
        else:
            x0_older, lambda_older = older
            r = (prev_lambda - lambda_older) / h
            d1 = (prev_x0 - x0_older) / r
            phi = torch.exp(-h) - 1.0
            x = (sigma_t / sigma_s) * x - alpha_t * phi * prev_x0 - 0.5 * alpha_t * phi * d1
        older = (prev_x0, prev_lambda)
        prev_lambda = lambda_t
        if i < steps:
            prev_x0 = data_prediction(x, ts[i])
    return x
