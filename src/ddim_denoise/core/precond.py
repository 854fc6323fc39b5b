"""The noise-level wrapper around the backbone: turns the raw network output into a clean-image estimate.

Every prediction target is written in the sigma form of Karras et al. (2022), Table 1: the network sees
``c_in * y`` and ``c_noise``, and the clean estimate is ``D(y) = c_skip * y + c_out * F(c_in * y, c_noise)``, where
``y = x_t / sqrt(abar) = x0 + sigma * eps`` (model scale). With ``abar = 1 / (1 + sigma^2)`` this reproduces

- ``eps``: F predicts eps (c_skip = 1, c_out = -sigma, c_in = sqrt(abar): the network input is exactly x_t),
- ``x0``:  F predicts x0 (c_skip = 0, c_out = 1),
- ``v``:   F predicts v = sqrt(abar) eps - sqrt(1 - abar) x0 (c_skip = abar, c_out = -sigma sqrt(abar)),
- ``edm``: EDM preconditioning with ``sigma_data`` (unit-variance input and target at every noise level).

Training F on its own target with unit weight is the same as training D with weight 1/c_out^2, which is how the
loss below is written. The network is conditioned on c_noise = log(sigma)/4, i.e. on the true noise level.
"""

from __future__ import annotations

import torch
from torch import nn

PREDICTIONS = ("eps", "x0", "v", "edm")


def precond_coefficients(prediction: str, sigma: torch.Tensor, sigma_data: float = 0.5):
    """(c_skip, c_out, c_in) for a model-scale sigma (broadcastable tensor)."""
    if prediction == "eps":
        return torch.ones_like(sigma), -sigma, torch.rsqrt(1 + sigma**2)
    if prediction == "x0":
        return torch.zeros_like(sigma), torch.ones_like(sigma), torch.rsqrt(1 + sigma**2)
    if prediction == "v":
        return 1 / (1 + sigma**2), -sigma * torch.rsqrt(1 + sigma**2), torch.rsqrt(1 + sigma**2)
    if prediction == "edm":
        var = sigma**2 + sigma_data**2
        return sigma_data**2 / var, sigma * sigma_data * torch.rsqrt(var), torch.rsqrt(var)
    raise ValueError(f"unknown diffusion.prediction {prediction!r}: use one of {', '.join(PREDICTIONS)}")


class Preconditioner(nn.Module):
    """D(y, sigma): clean-image estimate from a noisy image y = x0 + sigma * eps (model scale)."""

    def __init__(self, net: nn.Module, prediction: str = "edm", sigma_data: float = 0.5):
        super().__init__()
        precond_coefficients(prediction, torch.ones(1), sigma_data)  # validate the name early
        self.net, self.prediction, self.sigma_data = net, prediction, sigma_data

    def coefficients(self, sigma: torch.Tensor):
        return precond_coefficients(self.prediction, sigma.float().reshape(-1, 1, 1, 1), self.sigma_data)

    def raw(self, y: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """The backbone's own output F for input y at noise level sigma (one value per image)."""
        _, _, c_in = self.coefficients(sigma)
        c_noise = torch.log(sigma.float()) / 4
        return self.net(c_in * y, c_noise)

    def forward(self, y: torch.Tensor, sigma: torch.Tensor, raw: bool = False) -> torch.Tensor:
        """D(y) or, with ``raw=True``, the backbone output F (what the loss trains; a call through forward keeps
        DistributedDataParallel's gradient hooks working)."""
        if raw:
            return self.raw(y, sigma)
        c_skip, c_out, _ = self.coefficients(sigma)
        return c_skip * y + c_out * self.raw(y, sigma).float()


class DenoisingLoss:
    """Mean squared error of F against its own target, (x0 - c_skip * y) / c_out, for the sampled noise levels."""

    def __init__(self, sampler, prediction: str = "edm", sigma_data: float = 0.5):
        self.sampler = sampler  # callable: (batch, device, generator) -> model-scale sigmas
        self.prediction, self.sigma_data = prediction, sigma_data

    def __call__(self, model: torch.nn.Module, x0: torch.Tensor, generator: torch.Generator | None = None):
        """``model`` is a Preconditioner, possibly wrapped (torch.compile, DistributedDataParallel)."""
        sigma = self.sampler(x0.shape[0], x0.device, generator)
        eps = torch.randn(x0.shape, device=x0.device, generator=generator, dtype=x0.dtype)
        y = x0 + sigma.reshape(-1, 1, 1, 1) * eps
        c_skip, c_out, _ = precond_coefficients(self.prediction, sigma.reshape(-1, 1, 1, 1), self.sigma_data)
        target = (x0 - c_skip * y) / c_out
        return (model(y, sigma, raw=True).float() - target).pow(2).mean()
