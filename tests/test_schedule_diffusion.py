import numpy as np
import pytest
import torch
from denoise_fixtures import write_tiny_checkpoint

from ddim_denoise.core.diffusion import SigmaSampler, ddim_timesteps, denoise_ddim
from ddim_denoise.core.precond import PREDICTIONS, DenoisingLoss, Preconditioner, precond_coefficients
from ddim_denoise.core.scale import sigma_to_pixels
from ddim_denoise.core.schedule import NoiseSchedule
from ddim_denoise.denoising.denoiser import Denoiser


@pytest.mark.parametrize("name", ["linear", "cosine"])
def test_sigma_to_timestep_round_trips_and_abar_is_monotone(name):
    schedule = NoiseSchedule(name, T=1000)
    abar = schedule.abar(torch.linspace(0, 999, 5000))
    assert torch.all(abar[1:] < abar[:-1])
    sigmas = torch.tensor([0.02, 0.2, 0.4, 0.6, 1.0, 3.0])
    t = schedule.sigma_to_timestep(sigmas)
    assert torch.allclose(schedule.model_sigma(t), sigmas, rtol=1e-4)
    # Integer timesteps map back to themselves.
    ints = torch.tensor([3.0, 100.0, 517.0])
    assert torch.allclose(schedule.sigma_to_timestep(schedule.model_sigma(ints)), ints, atol=1e-3)
    # (1 - abar)/abar = sigma^2 at the returned t.
    a = schedule.abar(t)
    assert torch.allclose((1 - a) / a, sigmas**2, rtol=1e-3)


def test_sigma_outside_schedule_is_an_error():
    schedule = NoiseSchedule("linear", T=1000)
    with pytest.raises(ValueError, match="outside"):
        schedule.sigma_to_timestep(torch.tensor([1e-4]))


@pytest.mark.parametrize("prediction", PREDICTIONS)
def test_each_prediction_target_recovers_x0_from_its_own_target(prediction):
    # For the true x0, F* = (x0 - c_skip*y)/c_out; plugging F* back into D gives x0 exactly.
    x0, eps, sigma = torch.randn(4, 3, 8, 8), torch.randn(4, 3, 8, 8), torch.tensor([0.1, 0.5, 1.0, 3.0])
    y = x0 + sigma.reshape(-1, 1, 1, 1) * eps
    c_skip, c_out, _ = precond_coefficients(prediction, sigma.reshape(-1, 1, 1, 1))
    target = (x0 - c_skip * y) / c_out
    assert torch.allclose(c_skip * y + c_out * target, x0, atol=1e-5)
    if prediction == "eps":
        assert torch.allclose(target, eps, atol=1e-5)


class OracleNet(torch.nn.Module):
    """Knows the clean image; returns the raw output F that makes the preconditioned D(y) equal it."""

    downsampling_factor = 1

    def __init__(self, x0, prediction):
        super().__init__()
        self.x0, self.prediction, self.calls = x0, prediction, 0

    def forward(self, x_in, c_noise):
        self.calls += 1
        sigma = torch.exp(4 * c_noise).reshape(-1, 1, 1, 1)
        c_skip, c_out, c_in = precond_coefficients(self.prediction, sigma)
        return (self.x0 - c_skip * x_in / c_in) / c_out


@pytest.mark.parametrize("steps,eta,stop", [(1, 0.0, 0.0), (5, 0.0, 0.0), (20, 0.0, 0.0), (10, 1.0, 0.0), (5, 0.0, 0.1)])
@pytest.mark.parametrize("prediction", ["eps", "v", "edm"])
def test_ddim_with_a_perfect_oracle_returns_the_clean_image(steps, eta, stop, prediction):
    torch.manual_seed(0)
    x0 = torch.rand(2, 3, 8, 8) * 2 - 1
    sigma = torch.tensor([0.4, 1.0])
    y = x0 + sigma.reshape(-1, 1, 1, 1) * torch.randn_like(x0)
    net = OracleNet(x0, prediction)
    out = denoise_ddim(Preconditioner(net, prediction), NoiseSchedule("cosine"), y, sigma, steps=steps, eta=eta,
                       stop_sigma=stop)
    assert net.calls == steps
    assert torch.allclose(out, x0, atol=1e-4)


class RecordingOracle(OracleNet):
    """The oracle, also recording the (y, sigma) each model call sees."""

    def __init__(self, x0, prediction):
        super().__init__(x0, prediction)
        self.seen = []

    def forward(self, x_in, c_noise):
        sigma = torch.exp(4 * c_noise).reshape(-1, 1, 1, 1)
        self.seen.append((x_in / precond_coefficients(self.prediction, sigma)[2], sigma))
        return super().forward(x_in, c_noise)


@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_each_ddim_step_hands_the_next_one_its_noise_level(eta):
    """A perfect denoiser's last step is right whatever the steps before it did, so the answer cannot catch a wrong
    update; the inputs the steps see can. With eta 0 each one holds the input's own noise at its level; with eta 1
    part of it is fresh noise, still of exactly that level."""
    torch.manual_seed(0)
    x0, eps = torch.rand(2, 3, 64, 64) * 2 - 1, torch.randn(2, 3, 64, 64)
    sigma = torch.tensor([0.8, 0.4])
    net = RecordingOracle(x0, "eps")
    denoise_ddim(Preconditioner(net, "eps"), NoiseSchedule("cosine"), x0 + sigma.reshape(-1, 1, 1, 1) * eps, sigma,
                 steps=5, eta=eta, generator=torch.Generator().manual_seed(1))
    levels = [level.flatten() for _, level in net.seen]
    assert len(levels) == 5 and all(torch.all(lower < upper) for upper, lower in zip(levels, levels[1:]))
    for y, level in net.seen[1:]:
        noise = (y - x0) / level
        if eta == 0:
            assert torch.allclose(noise, eps, atol=1e-3)
        else:
            assert noise.std().item() == pytest.approx(1.0, abs=0.02)
            assert torch.corrcoef(torch.stack([noise.flatten(), eps.flatten()]))[0, 1] < 0.99  # fresh noise mixed in


def test_a_ddim_walk_can_stop_above_zero_and_an_input_below_the_stop_stays_put():
    schedule = NoiseSchedule("cosine")
    sigma = torch.tensor([0.8, 0.05])
    ts = ddim_timesteps(schedule, sigma, 4, stop_sigma=0.1)
    assert torch.allclose(ts[0], schedule.sigma_to_timestep(sigma))
    assert float(ts[-1, 0]) == pytest.approx(float(schedule.sigma_to_timestep(torch.tensor(0.1))), abs=1e-4)
    assert torch.all(ts[1:, 0] < ts[:-1, 0])
    assert torch.allclose(ts[:, 1], ts[0, 1].expand(5))  # already below the stop: one level all along
    assert torch.all(ddim_timesteps(schedule, sigma, 4)[-1] == 0)  # the default walks to 0


def test_the_denoiser_stops_ddim_where_asked(tmp_path, tiny_params):
    denoiser = Denoiser.from_checkpoint(write_tiny_checkpoint(tmp_path / "tiny.pt", tiny_params), device="cpu")
    noisy = np.random.default_rng(0).uniform(0.2, 0.8, (2, 16, 16, 3)).astype(np.float32)
    one_step, to_zero = denoiser.denoise(noisy, 0.1), denoiser.denoise(noisy, 0.1, steps=4)
    np.testing.assert_allclose(denoiser.denoise(noisy, 0.1, steps=4, ddim_stop_sigma=0.2), one_step, atol=1e-5)
    stopped = denoiser.denoise(noisy, 0.1, steps=4, ddim_stop_sigma=0.05)
    assert not np.allclose(stopped, to_zero, atol=1e-4) and not np.allclose(stopped, one_step, atol=1e-4)
    with pytest.raises(ValueError, match="ddim_stop_sigma must lie in"):
        denoiser.denoise(noisy, 0.1, steps=4, ddim_stop_sigma=-0.1)


def test_multi_step_ddim_serves_noise_below_the_schedules_lowest_level(tmp_path, tiny_params):
    """The cosine schedule's lowest level is pixel sigma ~0.003, and a clean-looking photo estimates lower: such an
    input gets the one-step answer from any number of steps (it raised before), and a stop below that level walks
    to the schedule's end like no stop."""
    denoiser = Denoiser.from_checkpoint(write_tiny_checkpoint(tmp_path / "tiny.pt", tiny_params), device="cpu")
    floor = float(sigma_to_pixels(torch.tensor(denoiser.schedule.sigma_min)))
    noisy = np.random.default_rng(0).uniform(0.2, 0.8, (2, 16, 16, 3)).astype(np.float32)
    below = np.array([floor / 2, 0.1], dtype=np.float32)
    walked = denoiser.denoise(noisy, below, steps=4)
    np.testing.assert_allclose(walked[0], denoiser.denoise(noisy[:1], below[0])[0], atol=1e-5)
    np.testing.assert_allclose(walked[1], denoiser.denoise(noisy[1:], 0.1, steps=4)[0], atol=1e-5)
    np.testing.assert_allclose(denoiser.denoise(noisy, 0.1, steps=4, ddim_stop_sigma=floor / 2),
                               denoiser.denoise(noisy, 0.1, steps=4), atol=1e-5)


def test_log_uniform_sampler_stays_in_range_and_loss_is_finite():
    schedule = NoiseSchedule("cosine")
    sampler = SigmaSampler("log_uniform", schedule, sigma_min=0.01, sigma_max=0.5)
    s = sampler(10000, "cpu", torch.Generator().manual_seed(0))
    assert s.min() >= 0.02 * 0.999 and s.max() <= 1.0 * 1.001
    net = OracleNet(torch.zeros(3, 3, 8, 8), "edm")
    loss = DenoisingLoss(sampler)(Preconditioner(net), torch.zeros(3, 3, 8, 8))
    assert loss.item() < 1e-8  # the oracle's F is the target
