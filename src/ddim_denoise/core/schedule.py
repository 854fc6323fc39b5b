"""Noise schedules: abar(t) on a continuous time axis, and the map between timesteps and noise levels.

Conventions used throughout the package:
- ``abar(t)`` is the DDPM cumulative signal fraction; ``x_t = sqrt(abar) * x0 + sqrt(1 - abar) * eps``.
- ``model_sigma(t) = sqrt((1 - abar) / abar)`` is the noise level of ``x_t / sqrt(abar) = x0 + model_sigma * eps``
  on the model's [-1, 1] scale. A pixel-scale sigma (images in [0, 1]) is half of it: see ``scale.sigma_to_model``.
- Timesteps are 0-indexed like improved-diffusion: t=0 is the first noising step, t=T-1 the last. ``t`` may be
  fractional; between integers the log-SNR is interpolated linearly, so the map sigma <-> t is exact both ways.
"""

from __future__ import annotations

import math

import torch

SCHEDULES = ("linear", "cosine")


def _betas(name: str, T: int, beta_start: float, beta_end: float) -> torch.Tensor:
    if name == "linear":
        return torch.linspace(beta_start, beta_end, T, dtype=torch.float64)
    if name == "cosine":
        # Nichol & Dhariwal (2021): abar(t) = f(t)/f(0), f(t) = cos^2(((t/T + s)/(1 + s)) * pi/2), betas capped at 0.999.
        s = 0.008
        steps = torch.arange(T + 1, dtype=torch.float64) / T
        f = torch.cos((steps + s) / (1 + s) * math.pi / 2) ** 2
        return (1 - f[1:] / f[:-1]).clamp(max=0.999)
    raise ValueError(f"unknown noise schedule {name!r}: use one of {', '.join(SCHEDULES)}")


class NoiseSchedule:
    """abar(t) for t in [0, T-1], fractional t included, and its inverse via the noise level."""

    def __init__(self, name: str = "cosine", T: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02):
        if T < 2:
            raise ValueError(f"diffusion.T must be at least 2, got {T}")
        self.name, self.T = name, T
        betas = _betas(name, T, beta_start, beta_end)
        abar = torch.cumprod(1 - betas, dim=0)
        # log-SNR = log(abar / (1 - abar)) is strictly decreasing in t: the grid we interpolate on.
        self.log_snr = (torch.log(abar) - torch.log1p(-abar)).float()

    @property
    def sigma_min(self) -> float:
        """Smallest model-scale noise level the schedule reaches (at t=0)."""
        return float(torch.exp(-0.5 * self.log_snr[0]))

    @property
    def sigma_max(self) -> float:
        return float(torch.exp(-0.5 * self.log_snr[-1]))

    def log_snr_at(self, t: torch.Tensor) -> torch.Tensor:
        t = torch.as_tensor(t, dtype=torch.float32).clamp(0, self.T - 1)
        lo = t.floor().long().clamp(max=self.T - 2)
        frac = t - lo
        grid = self.log_snr.to(t.device)
        return grid[lo] * (1 - frac) + grid[lo + 1] * frac

    def abar(self, t: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.log_snr_at(t))

    def model_sigma(self, t: torch.Tensor) -> torch.Tensor:
        """Model-scale noise level sqrt((1 - abar)/abar) at timestep t."""
        return torch.exp(-0.5 * self.log_snr_at(t))

    def sigma_to_timestep(self, model_sigma: torch.Tensor | float) -> torch.Tensor:
        """The fractional t whose (1 - abar)/abar equals model_sigma^2 (inverse of ``model_sigma``).

        Raises ValueError when the noise level lies outside what the schedule covers, rather than clamping silently.
        """
        s = torch.as_tensor(model_sigma, dtype=torch.float32)
        lo_s, hi_s = self.sigma_min, self.sigma_max
        if torch.any(s < lo_s * (1 - 1e-5)) or torch.any(s > hi_s * (1 + 1e-5)):
            raise ValueError(
                f"model-scale sigma {s.min().item():.4g}..{s.max().item():.4g} lies outside the {self.name} schedule's "
                f"range [{lo_s:.4g}, {hi_s:.4g}]: change diffusion.T / beta_start / beta_end or the sigma"
            )
        target = -2.0 * torch.log(s.clamp(lo_s, hi_s))
        grid = self.log_snr.to(s.device)
        # log_snr decreases in t; searchsorted needs increasing values, so search the negated grid.
        hi = torch.searchsorted(-grid, -target.reshape(-1).contiguous()).clamp(1, self.T - 1)
        lo = hi - 1
        frac = (grid[lo] - target.reshape(-1)) / (grid[lo] - grid[hi])
        return (lo.float() + frac.clamp(0, 1)).reshape(s.shape)
