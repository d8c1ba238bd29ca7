"""The reference scripts' samplers, written out: DDIM and PLMS (CompVis ldm/models/diffusion/ddim.py, plms.py)
and the SD 2 scripts' DPM-Solver (dpm_solver.py), each in the one signature of :mod:`sdgen.samplers`.

They are not diffusers' schedulers because those differ in details that change pixels: the reference takes
the timesteps ``range(0, 1000, 1000 // S) + 1`` (31 of them for S = 30, where diffusers takes 30), ends on
alphas_cumprod[0], and draws (and, at eta 0, discards) a noise tensor at every DDIM/PLMS update, which moves
the random stream the next batch starts from. dpm is multistep, order 2, data prediction, time-uniform
continuous steps on the piecewise-linear log-alpha of the discrete schedule.
"""

from __future__ import annotations

import torch

from sdgen.noise import drawer
from sdgen.samplers import Callback, ModelFn, SamplingParams, reference_timesteps


def _ddim_tables(alphas_cumprod: torch.Tensor, timesteps: list[int], eta: float):
    """alpha_t, alpha_prev and sigma for each reference step (DDIM paper, Song et al. 2020, eq. 16)."""
    a = alphas_cumprod[timesteps]
    a_prev = torch.cat([alphas_cumprod[:1], alphas_cumprod[timesteps[:-1]]])
    sigma = eta * torch.sqrt((1 - a_prev) / (1 - a) * (1 - a / a_prev))
    return a, a_prev, sigma


def _eps_and_x0(out, x, t, a_t, sqrt_ac, sqrt_1m_ac, v_prediction):
    """eps and predicted x0 from the model output (eps or v; Salimans & Ho 2022 for v)."""
    if v_prediction:
        return sqrt_ac[t] * out + sqrt_1m_ac[t] * x, sqrt_ac[t] * x - sqrt_1m_ac[t] * out
    return out, (x - torch.sqrt(1.0 - a_t) * out) / torch.sqrt(a_t)


def _schedule_roots(alphas_cumprod: torch.Tensor):
    ac = alphas_cumprod.double()
    return ac.sqrt().float(), (1.0 - ac).sqrt().float()


def sample_ddim(model: ModelFn, noise: torch.Tensor, p: SamplingParams, callback: Callback) -> torch.Tensor:
    """DDIM (Song et al., 2020, arXiv:2010.02502) as the reference DDIMSampler, drawing a noise tensor at every
    step as the reference does. img2img: x0 noised to the alpha of step t_enc, then steps t_enc - 1 .. 0."""
    ac = p.schedule.alphas_cumprod().to(noise.device)
    ts = reference_timesteps(p.steps, ac.shape[0])
    a, a_prev, sigma = _ddim_tables(ac, ts, p.eta)
    sqrt_ac, sqrt_1m_ac = _schedule_roots(ac)
    draw = drawer(p.generators, noise.device)
    if p.x0 is None:
        x, first = noise, len(ts)
    else:
        assert p.t_enc is not None  # sdgen.samplers.sample passes x0 only with a t_enc
        alpha = ac[ts[p.t_enc]]
        x, first = torch.sqrt(alpha) * p.x0 + torch.sqrt(1.0 - alpha) * noise, p.t_enc
    for index in reversed(range(first)):
        t = ts[index]
        out = model(x, torch.tensor(t, device=x.device))
        e_t, pred_x0 = _eps_and_x0(out, x, t, a[index], sqrt_ac, sqrt_1m_ac, p.v_prediction)
        dir_xt = torch.sqrt(1.0 - a_prev[index] - sigma[index] ** 2) * e_t
        x = torch.sqrt(a_prev[index]) * pred_x0 + dir_xt + sigma[index] * draw(x.shape)
        callback(x)
    return x


def sample_plms(model: ModelFn, noise: torch.Tensor, p: SamplingParams, callback: Callback) -> torch.Tensor:
    """PLMS (Liu et al., 2022, arXiv:2202.09778, 'pseudo linear multistep') as the reference PLMSSampler:
    a pseudo improved-Euler first step, then Adams-Bashforth of orders 2, 3, 4 on eps.
    (For v-prediction models eps is derived from v; the reference PLMS skips that and fails on them.)
    txt2img only: the reference img2img refuses PLMS, and so does sdgen."""
    x, v_prediction, draw = noise, p.v_prediction, drawer(p.generators, noise.device)
    ac = p.schedule.alphas_cumprod().to(x.device)
    ts = reference_timesteps(p.steps, ac.shape[0])
    a, a_prev, _ = _ddim_tables(ac, ts, 0.0)
    sqrt_ac, sqrt_1m_ac = _schedule_roots(ac)

    def eps(x_in: torch.Tensor, t: int) -> torch.Tensor:
        out = model(x_in, torch.tensor(t, device=x.device))
        callback(x_in)
        return _eps_and_x0(out, x_in, t, a[0], sqrt_ac, sqrt_1m_ac, v_prediction)[0] if v_prediction else out

    def update(x_in: torch.Tensor, e: torch.Tensor, index: int) -> torch.Tensor:
        pred_x0 = (x_in - torch.sqrt(1.0 - a[index]) * e) / torch.sqrt(a[index])
        draw(x_in.shape)  # sigma is 0 (PLMS needs eta 0), but the reference draws the tensor all the same
        return torch.sqrt(a_prev[index]) * pred_x0 + torch.sqrt(1.0 - a_prev[index]) * e

    old: list[torch.Tensor] = []
    for index in reversed(range(len(ts))):
        t, t_next = ts[index], ts[max(index - 1, 0)]
        e_t = eps(x, t)
        if not old:
            e_next = eps(update(x, e_t, index), t_next)
            e_prime = (e_t + e_next) / 2
        elif len(old) == 1:
            e_prime = (3 * e_t - old[-1]) / 2
        elif len(old) == 2:
            e_prime = (23 * e_t - 16 * old[-1] + 5 * old[-2]) / 12
        else:
            e_prime = (55 * e_t - 59 * old[-1] + 37 * old[-2] - 9 * old[-3]) / 24
        x = update(x, e_prime, index)
        old = (old + [e_t])[-3:]
    return x


def sample_dpm_solver(model: ModelFn, noise: torch.Tensor, p: SamplingParams, callback: Callback) -> torch.Tensor:
    """DPM-Solver-2 multistep with data prediction (Lu et al., 2022, arXiv:2211.01095 'DPM-Solver++'
    with the 'dpm_solver' correction), as the SD 2 scripts' DPMSolverSampler runs it. img2img starts at the
    continuous time of the strength t_enc / steps and takes that share of the steps."""
    x, x0, steps, v_prediction = noise, p.x0, p.steps, p.v_prediction
    strength = 1.0 if x0 is None or p.t_enc is None else p.t_enc / p.steps
    alphas_cumprod = p.schedule.alphas_cumprod()
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
        callback(x)
        return (x - sigma * eps) / alpha

    t_start = 1.0 if x0 is None else 1.0 / n + strength * (1.0 - 1.0 / n)  # img2img starts part-way
    if x0 is not None:
        steps = max(1, round(strength * steps))
        alpha, sigma, _ = coeffs(torch.tensor(t_start, device=x.device))
        x = alpha * x0 + sigma * x  # x is the forward-process noise here
    ts = torch.linspace(t_start, 1.0 / n, steps + 1, device=x.device)
    prev_x0 = data_prediction(x, ts[0])
    prev_lambda = coeffs(ts[0])[2]
    older: tuple[torch.Tensor, torch.Tensor] | None = None
    for i in range(1, steps + 1):
        alpha_t, sigma_t, lambda_t = coeffs(ts[i])
        sigma_s = coeffs(ts[i - 1])[1]
        h = lambda_t - prev_lambda
        if older is None or (steps < 15 and i == steps):  # DPM-Solver-1 (= DDIM) first and, for few steps, last
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
