"""Every sampler on an analytic model, no weights: diffusers' scheduler-test model ``sample * t / (t + 1)``.

The values were recorded before the engine refactor from the code that matches the reference scripts; they
pin each sampler's timesteps, coefficients, per-step noise draws (ddim at eta 0.5, euler_a) and img2img start
(noised to the strength's step, t_enc of 6 steps), for epsilon and v-prediction. A changed formula, timestep
or draw moves them by far more than the 1e-4 tolerance.
"""

from __future__ import annotations

import pytest
import torch

from sdgen.samplers import SAMPLER_NAMES, SAMPLERS, SamplingParams, evaluations, sample
from sdgen.samplers.schedule import Schedule

# name-prediction-eta[-img2img] -> (mean, mean |x|, first three values)
GOLDEN = {
    "ddim-eps-eta0.0": (0.01149, 0.331992, [-0.50251, -0.51435, -0.11184]),
    "ddim-eps-eta0.0-img2img": (0.02756, 0.418907, [-0.82977, -0.27363, -0.49622]),
    "ddim-eps-eta0.5": (0.022845, 0.346559, [-0.70589, -0.23723, -0.13999]),
    "plms-eps-eta0.0": (0.013303, 0.384375, [-0.5818, -0.5955, -0.12949]),
    "dpm-eps-eta0.0": (0.012084, 0.349165, [-0.5285, -0.54095, -0.11763]),
    "dpm-eps-eta0.0-img2img": (0.025065, 0.381157, [-0.75492, -0.2495, -0.45116]),
    "euler-eps-eta0.0": (0.010926, 0.31571, [-0.47786, -0.48912, -0.10636]),
    "euler-eps-eta0.0-img2img": (0.027244, 0.387157, [-0.76865, -0.1385, -0.52189]),
    "euler_a-eps-eta0.0": (0.015182, 0.297098, [-0.41791, 0.31973, -0.03377]),
    "euler_a-eps-eta0.0-img2img": (0.029423, 0.329505, [-0.93053, -0.25508, -0.50561]),
    "dpmpp_2m-eps-eta0.0": (0.011559, 0.333993, [-0.50554, -0.51745, -0.11252]),
    "dpmpp_2m-eps-eta0.0-img2img": (0.023956, 0.364454, [-0.72175, -0.23907, -0.43105]),
    "dpmpp_2m_karras-eps-eta0.0": (0.014992, 0.433188, [-0.65568, -0.67113, -0.14593]),
    "dpmpp_2m_karras-eps-eta0.0-img2img": (0.036965, 0.495738, [-0.94532, 0.06154, -0.76732]),
    "lms-eps-eta0.0": (0.012672, 0.366135, [-0.55419, -0.56724, -0.12335]),
    "lms-eps-eta0.0-img2img": (0.036519, 0.518951, [-1.03031, -0.18565, -0.69955]),
    "heun-eps-eta0.0": (0.01797, 0.51923, [-0.78591, -0.80443, -0.17492]),
    "heun-eps-eta0.0-img2img": (0.041486, 0.589539, [-1.17045, -0.2109, -0.7947]),
    "unipc-eps-eta0.0": (0.011713, 0.338436, [-0.51226, -0.52433, -0.11401]),
    "unipc-eps-eta0.0-img2img": (0.024278, 0.369345, [-0.73144, -0.24228, -0.43683]),
    "ddim-v-eta0.0": (0.003435, 0.099249, [-0.15023, -0.15376, -0.03344]),
    "ddim-v-eta0.0-img2img": (0.017035, 0.258931, [-0.51289, -0.16913, -0.30672]),
    "ddim-v-eta0.5": (0.009412, 0.150611, [-0.18176, -0.08233, -0.01873]),
    "plms-v-eta0.0": (0.004422, 0.12778, [-0.19341, -0.19797, -0.04305]),
    "dpm-v-eta0.0": (0.004567, 0.131947, [-0.19972, -0.20442, -0.04445]),
    "dpm-v-eta0.0-img2img": (0.013831, 0.210327, [-0.41657, -0.13768, -0.24895]),
    "euler-v-eta0.0": (0.002825, 0.081634, [-0.12356, -0.12647, -0.0275]),
    "euler-v-eta0.0-img2img": (0.013676, 0.194349, [-0.38585, -0.06953, -0.26198]),
    "euler_a-v-eta0.0": (0.004512, 0.152326, [-0.11506, 0.07413, 0.01489]),
    "euler_a-v-eta0.0-img2img": (0.011913, 0.155762, [-0.43045, -0.12223, -0.20045]),
    "dpmpp_2m-v-eta0.0": (0.00422, 0.121932, [-0.18456, -0.18891, -0.04108]),
    "dpmpp_2m-v-eta0.0-img2img": (0.01276, 0.194123, [-0.38443, -0.12734, -0.22959]),
    "dpmpp_2m_karras-v-eta0.0": (0.010863, 0.313877, [-0.47509, -0.48628, -0.10574]),
    "dpmpp_2m_karras-v-eta0.0-img2img": (0.028585, 0.383358, [-0.73102, 0.04759, -0.59337]),
    "lms-v-eta0.0": (0.005319, 0.153675, [-0.23261, -0.23808, -0.05177]),
    "lms-v-eta0.0-img2img": (0.040326, 0.573056, [-1.13773, -0.205, -0.77248]),
    "heun-v-eta0.0": (0.009509, 0.274755, [-0.41587, -0.42567, -0.09256]),
    "heun-v-eta0.0-img2img": (0.032052, 0.455474, [-0.90428, -0.16294, -0.61398]),
    "unipc-v-eta0.0": (0.004368, 0.126214, [-0.19104, -0.19554, -0.04252]),
    "unipc-v-eta0.0-img2img": (0.013586, 0.206685, [-0.40931, -0.13558, -0.24445]),
}


def analytic_model(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    t = t.to(x.dtype).reshape(-1, *[1] * (x.dim() - 1)) if t.dim() else t.to(x.dtype)
    return x * t / (t + 1)


def _run(name: str, v: bool, eta: float, img2img: bool) -> tuple[torch.Tensor, int]:
    noise = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    x0 = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(2)) if img2img else None
    params = SamplingParams(
        steps=6,
        schedule=Schedule(),
        v_prediction=v,
        eta=eta,
        generators=torch.Generator().manual_seed(1),
        x0=x0,
        t_enc=3 if img2img else None,
    )
    calls: list[int] = []
    out = sample(name, analytic_model, noise, params, lambda x: calls.append(1))
    return out, len(calls)


@pytest.mark.parametrize("key", list(GOLDEN))
def test_sampler_golden(key):
    name, pred, eta, *img2img = key.split("-")
    out, calls = _run(name, pred == "v", float(eta[3:]), bool(img2img))
    mean, abs_mean, first = GOLDEN[key]
    assert abs(float(out.double().mean()) - mean) < 1e-4, (key, float(out.double().mean()))
    assert abs(float(out.double().abs().mean()) - abs_mean) < 1e-4, key
    assert torch.allclose(out.flatten()[:3], torch.tensor(first), atol=1e-4), (key, out.flatten()[:3])
    # the progress callback runs once per model evaluation, as many as the progress bar expects
    assert calls == evaluations(name, 6, 3 if img2img else None)


def test_every_sampler_is_pinned():
    pinned = {k.split("-")[0] for k in GOLDEN}
    assert pinned == set(SAMPLER_NAMES)
    assert {k.split("-")[0] for k in GOLDEN if k.endswith("img2img")} == {n for n, s in SAMPLERS.items() if s.img2img}


def test_img2img_strength_0_and_1():
    noise = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    x0 = torch.ones(1, 4, 8, 8)
    p = SamplingParams(steps=6, schedule=Schedule(), v_prediction=False, x0=x0, t_enc=0)
    assert sample("ddim", analytic_model, noise, p, lambda x: None) is x0
    full = SamplingParams(steps=6, schedule=Schedule(), v_prediction=False)
    p1 = SamplingParams(steps=6, schedule=Schedule(), v_prediction=False, x0=x0, t_enc=6)
    assert torch.equal(
        sample("ddim", analytic_model, noise, p1, lambda x: None),
        sample("ddim", analytic_model, noise, full, lambda x: None),
    )
