"""Gray images through the RGB model: their noise is made white across channels before the model sees it."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from denoise_fixtures import write_tiny_checkpoint
from PIL import Image

import ddim_denoise.denoising.denoiser as denoiser_module
from ddim_denoise.core.scale import sigma_to_model
from ddim_denoise.data.image_io import split_channels
from ddim_denoise.denoising.denoiser import Denoiser
from ddim_denoise.denoising.grayscale import identical_channels, looks_mono_noise
from ddim_denoise.denoising.tiling import TileOptions
from ddim_denoise.serving.denoise_files import DenoiseOptions, denoise_decoded, image_sigma


@pytest.fixture
def tiny_denoiser(tmp_path, tiny_params):
    return Denoiser.from_checkpoint(write_tiny_checkpoint(tmp_path / "tiny.pt", tiny_params), device="cpu")


@pytest.fixture
def seen(monkeypatch):
    """Replaces the model call with the identity and records what it was given: (y, model_sigma) per batch."""
    calls = []

    def identity(model, schedule, y, model_sigma, *args, **kwargs):
        calls.append((y.detach().clone(), model_sigma.detach().clone()))
        return y

    monkeypatch.setattr(denoiser_module, "denoise_ddim", identity)
    return calls


def gray_noise(n: int, size: int, sigma: float, seed: int = 0) -> np.ndarray:
    """Mid-gray images plus one noise draw per pixel: (n, size, size, 1) float32, nowhere near 0 or 1 at sigma 0.05."""
    rng = np.random.default_rng(seed)
    return (0.5 + sigma * rng.standard_normal((n, size, size, 1))).astype(np.float32)


def test_identical_channels_marks_gray_pictures_only():
    rgb = np.random.default_rng(0).uniform(size=(3, 4, 4, 3)).astype(np.float32)
    rgb[1] = rgb[1, ..., :1]
    assert identical_channels(rgb).tolist() == [False, True, False]
    assert identical_channels(rgb[..., :1]).all()


@pytest.mark.parametrize("channels", [1, 3])
def test_the_model_sees_white_noise_at_sqrt3_sigma_and_the_gray_image_comes_back(tiny_denoiser, seen, channels):
    sigma = 0.05
    noisy = gray_noise(4, 64, sigma)
    out = tiny_denoiser.denoise(np.repeat(noisy, channels, axis=-1), sigma, batch_size=8)
    (y, model_sigma), = seen
    assert y.shape == (4, 3, 64, 64)
    expected = math.sqrt(3) * float(sigma_to_model(torch.tensor(sigma)))
    torch.testing.assert_close(model_sigma, torch.full((4,), expected))
    noise = (y - y.mean(dim=(2, 3), keepdim=True)).permute(1, 0, 2, 3).reshape(3, -1).double()  # model scale
    covariance = torch.cov(noise) / expected**2
    torch.testing.assert_close(covariance, torch.eye(3, dtype=torch.float64), atol=0.03, rtol=0)
    # The added noise has no gray component, so the channel mean of an unchanged image is the input itself.
    assert out.shape == (4, 64, 64, channels)
    np.testing.assert_allclose(out, np.repeat(noisy, channels, axis=-1), atol=1e-6)


def test_colour_images_reach_the_model_as_they_are(tiny_denoiser, seen):
    noisy = np.random.default_rng(1).uniform(0.2, 0.8, (2, 16, 16, 3)).astype(np.float32)
    tiny_denoiser.denoise(noisy, 0.1)
    (y, model_sigma), = seen
    torch.testing.assert_close(y, torch.from_numpy(noisy).permute(0, 3, 1, 2) * 2 - 1)
    torch.testing.assert_close(model_sigma, sigma_to_model(torch.full((2,), 0.1)))


def test_gray_and_colour_images_in_one_batch_each_go_their_own_way(tiny_denoiser):
    rng = np.random.default_rng(2)
    colour = (0.5 + 0.1 * rng.standard_normal((2, 16, 16, 3))).astype(np.float32)
    gray = gray_noise(2, 16, 0.1, seed=3)
    mixed = np.stack([colour[0], np.repeat(gray[0], 3, axis=-1), colour[1], np.repeat(gray[1], 3, axis=-1)])
    out = tiny_denoiser.denoise(mixed, np.array([0.1, 0.12, 0.1, 0.12]))
    np.testing.assert_array_equal(out[[0, 2]], tiny_denoiser.denoise(colour, 0.1))
    np.testing.assert_array_equal(out[[1, 3]], np.repeat(tiny_denoiser.denoise(gray, 0.12), 3, axis=-1))
    estimates = []
    for part in (colour, gray, mixed):  # estimated: one level per image, in the input's order
        tiny_denoiser.denoise(part, None)
        estimates.append(tiny_denoiser.last_sigma.copy())
    colour_sigma, gray_sigma, mixed_sigma = estimates
    np.testing.assert_allclose(mixed_sigma, [colour_sigma[0], gray_sigma[0], colour_sigma[1], gray_sigma[1]], rtol=1e-6)


def test_a_gray_sigma_the_rgb_model_cannot_serve_is_refused(tiny_denoiser):
    noisy = gray_noise(1, 16, 0.05)
    with pytest.raises(ValueError, match=r"\(0, 0.577\].*gray"):
        tiny_denoiser.denoise(noisy, 0.6)
    tiny_denoiser.denoise(np.repeat(noisy, 3, axis=-1) + np.float32([0, 0.01, 0.02]), 0.6)  # colour: served


def test_an_estimated_gray_sigma_past_the_limit_is_served_at_the_limit_with_the_warning(tiny_denoiser, seen, caplog):
    """The user gave no sigma, so an estimate the RGB model cannot serve is not an error: it is served at the limit."""
    noisy = gray_noise(1, 32, 0.8, seed=5)  # float, unclipped
    limit = 1 / math.sqrt(3)
    tiny_denoiser.denoise(noisy, None)
    assert tiny_denoiser.last_sigma[0] == pytest.approx(limit)
    (_, model_sigma), = seen
    assert float(model_sigma[0]) == pytest.approx(math.sqrt(3) * float(sigma_to_model(torch.tensor(limit))))
    assert "outside the" in caplog.text
    for rgb in (np.repeat(noisy[0], 3, axis=-1), noisy[0]):  # a gray file decodes to three equal channels
        assert image_sigma(tiny_denoiser, rgb, None, tile=16) == (pytest.approx(limit), True)
    colour = np.repeat(noisy[0], 3, axis=-1) + np.float32([0, 0.01, 0.02])
    assert image_sigma(tiny_denoiser, colour, None, tile=16)[0] > limit  # colour: served as estimated


def test_a_gray_file_goes_the_gray_way(tiny_denoiser, seen):
    pixels = np.clip(np.rint(gray_noise(1, 16, 0.05)[0, ..., 0] * 255), 0, 255).astype(np.uint8)
    image = split_channels(pixels, "png", "gray.png")
    result = denoise_decoded(tiny_denoiser, image, DenoiseOptions(sigma=0.05).validate())
    (y, model_sigma), = seen
    assert y.shape[1] == 3 and not torch.equal(y[:, 0], y[:, 1])
    assert float(model_sigma[0]) == pytest.approx(math.sqrt(3) * float(sigma_to_model(torch.tensor(0.05))))
    assert identical_channels(result.rgb[None]).all()


@pytest.mark.parametrize("flat", ["transparent", "white"])
def test_every_tile_of_a_colour_picture_goes_the_colour_way(tiny_denoiser, seen, flat):
    """A colour picture's tiles lying wholly in a transparent area (shown to the model as flat gray) or a flat white
    one have three equal channels. They went the gray way, whose sigma limit (0.577) refused the 0.6 that the
    picture itself is served at; whether a picture is gray is now decided once, for the whole picture."""
    rng = np.random.default_rng(7)
    rgba = np.dstack([rng.integers(0, 256, (32, 80, 3)), np.full((32, 80), 255)]).astype(np.uint8)
    if flat == "transparent":
        rgba[:, 40:, 3] = 0
    else:
        rgba[:, 40:, :3] = 255
    options = DenoiseOptions(sigma=0.6, tiles=TileOptions(tile=32, overlap=8)).validate()  # the last tile: x 48-79
    denoise_decoded(tiny_denoiser, split_channels(rgba, "png", "cutout.png"), options)
    colour_sigma = float(sigma_to_model(torch.tensor(0.6)))  # not sqrt(3) times it, as for gray images
    assert seen and all(torch.allclose(sigma, torch.full_like(sigma, colour_sigma)) for _, sigma in seen)


def test_multistep_ddim_denoises_gray_images_too(tiny_denoiser):
    noisy = gray_noise(2, 16, 0.1, seed=4)
    one, three = (tiny_denoiser.denoise(noisy, 0.1, steps=steps) for steps in (1, 3))
    assert three.shape == noisy.shape and np.all(np.isfinite(three))
    assert not np.array_equal(one, three)


def colour_with_mono_noise(n: int, size: int, sigma: float, seed: int = 5) -> tuple[np.ndarray, np.ndarray]:
    """(clean, noisy): smooth colour images, plus one noise draw per pixel copied to R, G and B."""
    rng = np.random.default_rng(seed)
    clean = np.clip(rng.uniform(0.3, 0.7, (n, 1, 1, 3)) + np.linspace(-0.1, 0.1, size)[None, :, None, None], 0, 1)
    noisy = clean + sigma * rng.standard_normal((n, size, size, 1))
    return clean.astype(np.float32) * np.ones((1, size, size, 1), np.float32), noisy.astype(np.float32)


def test_monochromatic_noise_reaches_the_model_white_at_sqrt3_sigma(tiny_denoiser, seen):
    sigma = 0.05
    clean, noisy = colour_with_mono_noise(4, 64, sigma)
    out = tiny_denoiser.denoise(noisy, sigma, batch_size=8, mono_noise=True)
    (y, model_sigma), = seen
    expected = math.sqrt(3) * float(sigma_to_model(torch.tensor(sigma)))
    torch.testing.assert_close(model_sigma, torch.full((4,), expected))
    noise = y - (torch.from_numpy(clean).permute(0, 3, 1, 2) * 2 - 1)  # the mono draw plus what whitening added
    covariance = torch.cov(noise.permute(1, 0, 2, 3).reshape(3, -1).double()) / expected**2
    torch.testing.assert_close(covariance, torch.eye(3, dtype=torch.float64), atol=0.05, rtol=0)
    np.testing.assert_allclose(out, np.clip(noisy, 0, 1), atol=1e-6)  # identity model: the image comes back


def test_monochromatic_noise_leaves_the_colour_differences_as_they_are(tiny_denoiser, monkeypatch):
    monkeypatch.setattr(denoiser_module, "denoise_ddim", lambda model, schedule, y, *a, **k: torch.zeros_like(y))
    _, noisy = colour_with_mono_noise(2, 16, 0.05)
    out = tiny_denoiser.denoise(noisy, 0.05, mono_noise=True)  # a model that answers flat mid-gray
    np.testing.assert_allclose(out, np.clip(0.5 + noisy - noisy.mean(-1, keepdims=True), 0, 1), atol=1e-6)


def colour_with_channel_noise(n: int, size: int, sigma: float, seed: int = 6) -> np.ndarray:
    """The same kind of smooth colour images, with noise drawn independently per channel."""
    clean, _ = colour_with_mono_noise(n, size, sigma, seed)
    return clean + sigma * np.random.default_rng(seed + 1).standard_normal(clean.shape).astype(np.float32)


@pytest.mark.parametrize("sigma", [0.03, 0.1, 0.5])
def test_monochromatic_noise_is_told_from_noise_drawn_per_channel(sigma):
    _, mono = colour_with_mono_noise(6, 32, sigma)
    per_channel = colour_with_channel_noise(6, 32, sigma)
    assert looks_mono_noise(mono).all() and not looks_mono_noise(per_channel).any()
    assert not looks_mono_noise(mono[..., :1]).any()  # gray images have no colour differences to tell by


def test_images_with_a_given_sigma_below_the_floor_keep_the_default_path():
    _, mono = colour_with_mono_noise(3, 32, 0.03)
    assert looks_mono_noise(mono, 0.03).all() and not looks_mono_noise(mono, 0.01).any()
    assert looks_mono_noise(mono, np.float32([0.03, 0.01, 0.03])).tolist() == [True, False, True]


def test_auto_sends_each_image_the_way_its_noise_looks(tiny_denoiser, seen):
    sigma = 0.05
    _, mono = colour_with_mono_noise(2, 32, sigma)
    images = np.concatenate([colour_with_channel_noise(1, 32, sigma), mono[:1], colour_with_channel_noise(1, 32, sigma, 9),
                             mono[1:]])
    out = tiny_denoiser.denoise(images, sigma, mono_noise="auto")
    told = [float(model_sigma[0]) for _, model_sigma in seen]
    assert told == pytest.approx([math.sqrt(3) * float(sigma_to_model(torch.tensor(sigma))),
                                  float(sigma_to_model(torch.tensor(sigma)))])  # the mono group, then the rest
    which = np.array([False, True, False, True])
    np.testing.assert_array_equal(out[which], tiny_denoiser.denoise(images[which], sigma, mono_noise=True))
    np.testing.assert_array_equal(out[~which], tiny_denoiser.denoise(images[~which], sigma))
    with pytest.raises(ValueError, match="mono_noise must be"):
        tiny_denoiser.denoise(images, sigma, mono_noise="yes")


def test_detect_mono_noise_decides_once_per_file_and_the_command_line_says_so(tiny_denoiser, tmp_path):
    from typer.testing import CliRunner

    from ddim_denoise import cli

    _, mono = colour_with_mono_noise(1, 48, 0.1)
    files = {"mono.png": mono[0], "per_channel.png": colour_with_channel_noise(1, 48, 0.1)[0]}
    for name, pixels in files.items():
        image = split_channels(np.clip(np.rint(pixels * 255), 0, 255).astype(np.uint8), "png", name)
        options = DenoiseOptions(sigma=0.1, mono_noise="auto", tiles=TileOptions(tile=32, overlap=8)).validate()
        assert denoise_decoded(tiny_denoiser, image, options).mono_noise == (name == "mono.png")
        Image.fromarray(np.clip(np.rint(pixels * 255), 0, 255).astype(np.uint8)).save(tmp_path / name)
    result = CliRunner().invoke(cli.app, ["denoise", str(tmp_path / "mono.png"), str(tmp_path / "per_channel.png"),
                                          "-o", str(tmp_path / "out"), "--sigma", "0.1", "-c", str(tmp_path / "tiny.pt"),
                                          "--detect-mono-noise", "--no-progress"])
    assert result.exit_code == 0, result.output
    assert "mono.png: monochromatic noise" in result.output
    assert "per_channel.png: noise drawn per channel" in result.output
    both = CliRunner().invoke(cli.app, ["denoise", str(tmp_path / "mono.png"), "-o", str(tmp_path / "out"), "--sigma",
                                        "0.1", "--mono-noise", "--detect-mono-noise"])
    assert both.exit_code == 2 and "not both" in both.output


def test_monochromatic_noise_beyond_what_the_model_can_serve_is_refused(tiny_denoiser):
    _, noisy = colour_with_mono_noise(1, 16, 0.05)
    with pytest.raises(ValueError, match=r"\(0, 0.577\].*monochromatic"):
        tiny_denoiser.denoise(noisy, 0.6, mono_noise=True)


def test_the_command_lines_mono_noise_option_reaches_the_denoiser(tiny_denoiser, seen):
    _, noisy = colour_with_mono_noise(1, 16, 0.05)
    image = split_channels(np.clip(np.rint(noisy[0] * 255), 0, 255).astype(np.uint8), "png", "mono.png")
    denoise_decoded(tiny_denoiser, image, DenoiseOptions(sigma=0.05, mono_noise=True).validate())
    (_, model_sigma), = seen
    assert float(model_sigma[0]) == pytest.approx(math.sqrt(3) * float(sigma_to_model(torch.tensor(0.05))))
