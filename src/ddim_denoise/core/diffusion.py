"""Which noise levels training sees, and DDIM denoising from the noise level of the input down to a clean image."""

from __future__ import annotations

import math

import torch

from ddim_denoise.core.precond import Preconditioner
from ddim_denoise.core.scale import sigma_to_model
from ddim_denoise.core.schedule import NoiseSchedule

T_SAMPLINGS = ("uniform", "log_uniform", "log_normal")


class SigmaSampler:
    """Draws model-scale noise levels for a training batch.

    - ``uniform``: t uniform on [0, T-1] (standard DDPM); most of those t lie far above any noise we denoise.
    - ``log_uniform``: log(sigma) uniform on [sigma_min, sigma_max] (pixel scale), the range denoising uses.
    - ``log_normal``: log(sigma) ~ N(p_mean, p_std^2) (model scale), as in EDM.
    """

    def __init__(self, kind: str, schedule: NoiseSchedule, sigma_min: float = 0.002, sigma_max: float = 1.0,
                 p_mean: float = -1.2, p_std: float = 1.2):
        if kind not in T_SAMPLINGS:
            raise ValueError(f"unknown diffusion.t_sampling {kind!r}: use one of {', '.join(T_SAMPLINGS)}")
        if not 0 < sigma_min < sigma_max:
            raise ValueError(f"diffusion.sigma_min ({sigma_min}) must be positive and below sigma_max ({sigma_max})")
        self.kind, self.schedule = kind, schedule
        self.log_lo = math.log(sigma_to_model(sigma_min))
        self.log_hi = math.log(sigma_to_model(sigma_max))
        self.p_mean, self.p_std = p_mean, p_std

    def __call__(self, n: int, device, generator: torch.Generator | None = None) -> torch.Tensor:
        u = torch.rand(n, device=device, generator=generator)
        if self.kind == "uniform":
            return self.schedule.model_sigma(u * (self.schedule.T - 1)).to(device)
        if self.kind == "log_uniform":
            return torch.exp(self.log_lo + u * (self.log_hi - self.log_lo))
        z = torch.randn(n, device=device, generator=generator)
        return torch.exp(self.p_mean + self.p_std * z)


def ddim_timesteps(schedule: NoiseSchedule, model_sigma: torch.Tensor, steps: int,
                   stop_sigma: float = 0.0) -> torch.Tensor:
    """(steps + 1, N) fractional timesteps from t* (where the input sits) down to 0, evenly spaced in t; or down to
    the timestep of the model-scale ``stop_sigma``, for inputs above it (the others stay at t*: one step).

    The walk visits the schedule's own levels only: an input below its lowest level (clean-looking photos estimate
    down to pixel sigma 0.001) sits at t* = 0, one above its highest at t* = T - 1 (``denoise_ddim`` takes the
    first step from the input's own sigma either way)."""
    def timestep(sigma: torch.Tensor) -> torch.Tensor:
        return schedule.sigma_to_timestep(sigma.clamp(schedule.sigma_min, schedule.sigma_max))

    t_start = timestep(torch.as_tensor(model_sigma, dtype=torch.float32))
    t_end = torch.zeros_like(t_start)
    if stop_sigma > 0:
        t_stop = timestep(torch.tensor(float(stop_sigma))).to(t_start)
        t_end = torch.minimum(t_start, t_stop.expand_as(t_start))
    frac = torch.linspace(1, 0, steps + 1, device=t_start.device).reshape(-1, 1)
    return t_end.reshape(1, -1) + frac * (t_start - t_end).reshape(1, -1)


@torch.no_grad()
def denoise_ddim(model: Preconditioner, schedule: NoiseSchedule, y: torch.Tensor, model_sigma: torch.Tensor,
                 steps: int = 1, eta: float = 0.0, generator: torch.Generator | None = None,
                 stop_sigma: float = 0.0) -> torch.Tensor:
    """Clean estimate of y (model scale, [-1, 1] images plus noise of std ``model_sigma`` per image).

    DDIM in its VP form starts from x_t = sqrt(abar(t*)) * y at the t* where (1 - abar)/abar = sigma^2. We keep the
    state in the equivalent unscaled form y_t = x_t / sqrt(abar_t) (so the network always sees y and its sigma), and
    take ``steps`` model evaluations from t* to 0. The last evaluation's clean estimate is the answer, so
    ``steps=1`` is the one-step x0 (Tweedie / MMSE) estimate. ``eta`` > 0 adds DDPM-style fresh noise per step.
    ``stop_sigma`` > 0 (model scale) ends the walk there instead of at 0: at the model's training floor it kept
    one step's PSNR and SSIM more nearly than walking to 0 did, with more of the detail (docs/design.md, *DDIM and
    where it stops*).
    """
    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")
    sigma = torch.as_tensor(model_sigma, dtype=torch.float32, device=y.device).expand(y.shape[0]).contiguous()
    if steps == 1:
        return model(y, sigma)
    # The levels each step sees: never above the input's own (an input below the schedule's floor stays there, and
    # its steps repeat the one-step estimate, as an input below the stop does).
    sigmas = torch.minimum(schedule.model_sigma(ddim_timesteps(schedule, sigma.cpu(), steps, stop_sigma)),
                           sigma.cpu()).to(y.device)
    sigmas[0] = sigma
    x = y
    for i in range(steps):
        x0 = model(x, sigmas[i])
        if i == steps - 1:
            return x0
        x = _ddim_step(x, x0, sigmas[i], sigmas[i + 1], eta, generator)
    raise AssertionError("unreachable")


def _ddim_step(y_t, x0, s_now, s_next, eta, generator):
    """One DDIM update written for y = x / sqrt(abar): y_next = x0 + s_next * (direction + fresh noise)."""
    s_now, s_next = s_now.reshape(-1, 1, 1, 1), s_next.reshape(-1, 1, 1, 1)
    eps = (y_t - x0) / s_now
    if eta == 0:
        return x0 + s_next * eps
    # VP quantities, to reuse Song et al.'s eta exactly: abar = 1/(1+s^2).
    abar_now, abar_next = 1 / (1 + s_now**2), 1 / (1 + s_next**2)
    c1 = eta * torch.sqrt((1 - abar_next) / (1 - abar_now) * (1 - abar_now / abar_next))
    c2 = torch.sqrt((1 - abar_next - c1**2).clamp(min=0))
    noise = torch.randn(y_t.shape, device=y_t.device, generator=generator, dtype=y_t.dtype)
    x_next = torch.sqrt(abar_next) * x0 + c2 * eps + c1 * noise
    return x_next / torch.sqrt(abar_next)
