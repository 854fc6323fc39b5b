"""Clipped noise (pixels stored at exactly 0 or 1) and the noise-level estimate."""

from __future__ import annotations

import numpy as np
import pytest
from denoise_fixtures import noisy_photo, write_tiny_checkpoint

from ddim_denoise.denoising.clipping import as_8bit, estimate_noise_sigma, saturated, unclip
from ddim_denoise.denoising.denoiser import Denoiser


def smooth_images(n: int, size: int, seed: int = 0) -> np.ndarray:
    """Smooth colour ramps spanning [0, 1] (so that noise clips at both ends): (n, size, size, 3) float64."""
    rng = np.random.default_rng(seed)
    yy, xx = np.meshgrid(np.linspace(0, 1, size), np.linspace(0, 1, size), indexing="ij")
    out = np.empty((n, size, size, 3))
    for i in range(n):
        for c in range(3):
            a, b = rng.uniform(-1, 1, 2)
            ramp = a * yy + b * xx
            out[i, ..., c] = (ramp - ramp.min()) / (np.ptp(ramp) or 1)
    return out


@pytest.mark.parametrize("sigma", [0.05, 0.1, 0.3])
def test_estimate_is_unbiased_on_32x32_images(sigma):
    clean = smooth_images(200, 32)
    noisy = clean + sigma * np.random.default_rng(1).standard_normal(clean.shape)
    ratios = np.array([estimate_noise_sigma(image) for image in noisy]) / sigma
    assert abs(np.median(ratios) - 1) < 0.02
    assert np.percentile(ratios, 90) - np.percentile(ratios, 10) < 0.12


def test_estimate_of_a_flat_image_is_zero_and_of_a_tiny_one_nan():
    assert estimate_noise_sigma(np.full((16, 16, 3), 0.4)) == 0
    assert np.isnan(estimate_noise_sigma(np.zeros((2, 8, 3))))


@pytest.mark.parametrize("flat_share", [0.5, 0.75])
def test_exactly_flat_regions_do_not_pull_the_estimate_down(flat_share):
    """An RGBA file's transparent region (stored as 0) or a padded border holds no noise; half an image of it made the
    median estimate 0, and --estimate then called the image noise-free."""
    noisy = noisy_photo(128, 128, sigma=0.05, seed=3)
    whole = estimate_noise_sigma(noisy)
    assert whole == pytest.approx(0.05, rel=0.1)
    noisy[:, : int(flat_share * 128)] = 0
    assert estimate_noise_sigma(noisy) == pytest.approx(whole, rel=0.05)


def test_unclip_redraws_only_saturated_pixels_beyond_their_bound():
    rng = np.random.default_rng(0)
    clean = smooth_images(2, 16)
    stored = np.clip(clean + 0.3 * rng.standard_normal(clean.shape), 0, 1).astype(np.float32)
    low, high = stored == 0, stored == 1
    assert low.any() and high.any()
    out = unclip(stored, clean, np.array([0.3, 0.3]), np.random.default_rng(5))
    np.testing.assert_array_equal(out[~(low | high)], stored[~(low | high)])
    assert np.all(out[low] <= 0) and np.all(out[high] >= 1)
    assert len(np.unique(out[low])) == low.sum()  # drawn, not set to one value
    np.testing.assert_array_equal(out, unclip(stored, clean, np.array([0.3, 0.3]), np.random.default_rng(5)))


def test_unclipping_around_the_clean_image_restores_gaussian_noise():
    """With the clean image as the estimate, the unclipped noise is N(0, sigma^2) again; the stored one is not."""
    sigma = 0.3
    clean = smooth_images(4, 64)
    stored = as_8bit(clean + sigma * np.random.default_rng(2).standard_normal(clean.shape))
    assert saturated(stored).mean() > 0.15
    assert np.std(stored - clean) < 0.9 * sigma
    restored = unclip(stored, clean, np.full(4, sigma), np.random.default_rng(3)) - clean
    assert abs(np.std(restored) / sigma - 1) < 0.02
    assert abs(np.mean(restored)) < 0.01


def test_reestimating_on_unclipped_images_converges_to_the_true_sigma():
    """The estimate reads low on clipped noise; unclipping at it and estimating again climbs to the true level."""
    sigma, rng = 0.4, np.random.default_rng(4)
    clean = smooth_images(8, 32)
    stored = as_8bit(clean + sigma * rng.standard_normal(clean.shape))
    estimate = np.array([estimate_noise_sigma(image) for image in stored])
    assert np.median(estimate) < 0.85 * sigma
    for _ in range(8):
        estimate = np.array([estimate_noise_sigma(image) for image in unclip(stored, clean, estimate, rng)])
    assert abs(np.median(estimate) / sigma - 1) < 0.04


@pytest.fixture
def counting_denoiser(tmp_path, tiny_params):
    """A tiny-model Denoiser that records the batch size of every model call."""
    denoiser = Denoiser.from_checkpoint(write_tiny_checkpoint(tmp_path / "tiny.pt", tiny_params), device="cpu")
    calls, forward = [], denoiser.model.forward

    def counted(y, sigma, *args, **kwargs):
        calls.append(len(y))
        return forward(y, sigma, *args, **kwargs)

    denoiser.model.forward = counted
    return denoiser, calls


def test_only_images_with_clipped_pixels_get_the_extra_passes(counting_denoiser):
    denoiser, calls = counting_denoiser
    rng = np.random.default_rng(6)
    images = (0.5 + 0.05 * rng.standard_normal((3, 16, 16, 3))).astype(np.float32)  # nowhere near 0 or 1
    images[1, 0, 0, 0], images[2, 3, 4, 1] = 0.0, 1.0
    passes = denoiser.params.eval.unclip_passes
    assert passes > 0
    out = denoiser.denoise(images, 0.1, batch_size=8)
    assert calls == [3] + [2] * passes
    denoiser.params.eval.unclip_passes = 0
    plain = denoiser.denoise(images, 0.1, batch_size=8)
    np.testing.assert_array_equal(out[0], plain[0])  # an unclipped image comes out exactly as before
    assert not np.array_equal(out[1], plain[1])


def test_an_estimated_sigma_is_reestimated_for_clipped_images_only(counting_denoiser):
    denoiser, calls = counting_denoiser
    rng = np.random.default_rng(7)
    clean = smooth_images(2, 32).astype(np.float32)
    noisy = clean + np.float32(0.3) * rng.standard_normal(clean.shape, dtype=np.float32)
    noisy[1] = as_8bit(noisy[1])
    first = np.array([estimate_noise_sigma(image) for image in noisy])
    denoiser.denoise(noisy, None, batch_size=8)
    assert calls == [2] + [1] * denoiser.params.eval.unclip_passes_estimated
    assert denoiser.last_sigma[0] == pytest.approx(first[0], rel=1e-6)
    assert denoiser.last_sigma[1] > first[1]  # the clipped image's estimate rose towards its true level


def test_multistep_ddim_runs_its_steps_once_after_the_one_step_unclipping_passes(counting_denoiser):
    denoiser, calls = counting_denoiser
    images = np.random.default_rng(8).uniform(0.3, 0.7, (2, 16, 16, 3)).astype(np.float32)
    images[1, 0, 0, 0] = 0.0
    passes = denoiser.params.eval.unclip_passes
    denoiser.denoise(images, 0.2, steps=3, batch_size=8)
    # the unclipped image: 3 DDIM steps; the clipped one: a one-step start, passes - 1 one-step passes, 3 steps
    assert len(calls) == 3 + 1 + (passes - 1) + 3


def test_share_noise_gives_clipped_channels_the_noise_their_pixel_shows_elsewhere():
    from ddim_denoise.denoising.clipping import share_noise

    estimate = np.full((1, 1, 3, 3), 0.9, dtype=np.float32)
    noisy = np.array([[[[1.0, 0.95, 0.97],  # R clipped; G and B show noise +0.05 and +0.07
                        [1.0, 1.0, 1.0],  # all clipped: the redraws' mean noise, kept >= 1
                        [0.8, 0.85, 0.9]]]], dtype=np.float32)  # nothing clipped: left alone
    redrawn = noisy.copy()
    redrawn[0, 0, 0, 0] = 1.3
    redrawn[0, 0, 1] = [1.02, 1.2, 1.13]
    out = share_noise(redrawn, noisy, estimate)
    np.testing.assert_allclose(out[0, 0, 0], [1.0, 0.95, 0.97], atol=1e-6)  # 0.9 + 0.06 < 1: held at the bound
    estimate[0, 0, 0, 0] = 0.96
    np.testing.assert_allclose(share_noise(redrawn, noisy, estimate)[0, 0, 0], [1.02, 0.95, 0.97], atol=1e-6)
    np.testing.assert_allclose(out[0, 0, 1], [0.9 + (0.12 + 0.3 + 0.23) / 3] * 3, atol=1e-6)  # the redraws' mean
    np.testing.assert_array_equal(out[0, 0, 2], noisy[0, 0, 2])
