"""The public API: ``Denoiser.from_checkpoint(path).denoise(noisy, sigma)`` on NumPy images in [0, 1]."""

from __future__ import annotations

import logging
import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ddim_denoise.core.diffusion import denoise_ddim
from ddim_denoise.core.precond import Preconditioner
from ddim_denoise.core.scale import sigma_to_model, to_model, to_pixels
from ddim_denoise.core.schedule import NoiseSchedule
from ddim_denoise.core.unet import build_unet
from ddim_denoise.denoising.clipping import estimate_noise_sigma, saturated, share_noise, unclip
from ddim_denoise.denoising.grayscale import RGB_SIGMA_FACTOR, identical_channels, looks_mono_noise, to_gray, whiten
from ddim_denoise.denoising.trained_on import far_larger_warning
from ddim_denoise.pipeline.checkpoint import load_checkpoint, load_model_weights
from ddim_denoise.pipeline.params import Params, validate_params
from ddim_denoise.pipeline.runtime import resolve_channels_last, resolve_device, resolve_inference_precision

log = logging.getLogger(__name__)


def build_model(params: Params) -> tuple[Preconditioner, NoiseSchedule]:
    """The preconditioned U-Net and its noise schedule, as params describe them (weights freshly initialised)."""
    d = params.diffusion
    schedule = NoiseSchedule(d.schedule, d.T, d.beta_start, d.beta_end)
    return Preconditioner(build_unet(params.model), d.prediction, d.sigma_data), schedule


def estimate_sigma(noisy: np.ndarray) -> np.ndarray:
    """Per-image pixel-scale noise estimate (``clipping.estimate_noise_sigma``: a robust spread of a noise-only
    filter's outputs; on 32x32 images it is unbiased where scikit-image's wavelet estimator reads 3% low)."""
    return np.array([estimate_noise_sigma(img) for img in noisy], dtype=np.float32)


def max_sigma(gray: bool) -> float:
    """The largest pixel-scale sigma served: 1 for colour images, 1/sqrt(3) for gray ones and monochromatic noise
    (``grayscale.whiten``)."""
    return 1 / RGB_SIGMA_FACTOR if gray else 1.0


def reestimate_sigma(images: np.ndarray, previous: np.ndarray, same_noise: bool = False) -> np.ndarray:
    """``estimate_sigma`` of unclipped images, keeping the previous level wherever the new one is unusable."""
    new = np.minimum(estimate_sigma(images), max_sigma(same_noise or images.shape[-1] == 1))
    return np.where(np.isfinite(new) & (new > 0), new, previous).astype(np.float32)


def check_sigma(sigma: np.ndarray, gray: bool = False) -> None:
    limit = max_sigma(gray)
    if not np.all(np.isfinite(sigma)) or np.any(sigma <= 0) or np.any(sigma > limit):
        kind = " for gray images and monochromatic noise (the RGB model sees sqrt(3) x their sigma)" if gray else ""
        raise ValueError(f"sigma must lie in (0, {limit:.3g}] on the [0,1] pixel scale (0.1 = 25.5/255){kind}, "
                         f"got {sigma.ravel()[:4]}")


def check_denoise_options(mono_noise: bool | str, ddim_stop_sigma: float) -> None:
    """The checks ``Denoiser.denoise`` and the file / serving options (``DenoiseOptions``) share."""
    if mono_noise not in (True, False, "auto"):
        raise ValueError(f"mono_noise must be True, False or 'auto', got {mono_noise!r}")
    if not (math.isfinite(ddim_stop_sigma) and 0 <= ddim_stop_sigma < 1):
        raise ValueError(f"ddim_stop_sigma must lie in [0, 1) on the pixel scale (the DDIM stop sigma; 0: walk to 0, "
                         f"the model's training floor diffusion.sigma_min: keep more PSNR), got {ddim_stop_sigma}")


class Denoiser:
    """A trained diffusion model used as a Gaussian denoiser.

    ``denoise`` takes float32 images (N, H, W, 3) on the [0, 1] scale, noisy, and returns the same shape clipped to
    [0, 1]. Gray images go in as (N, H, W, 1), or as RGB with three equal channels; either way their noise is made
    white across channels before the model sees it (``grayscale``). ``mono_noise=True`` says colour images carry the
    same noise draw in R, G and B (an editor's monochromatic noise): they take the same way, and keep their colour
    differences, which such noise leaves untouched. Noise that was clipped to [0, 1] (pixels at
    exactly 0 or 1, as in image files) is undone in ``params.eval.unclip_passes`` extra one-step passes for the images
    that have such pixels (``clipping.unclip``); with an estimated sigma, ``unclip_passes_estimated`` passes, each
    re-estimating it on the unclipped images. H and W of any size work: images are reflect-padded up to a multiple of
    the U-Net's downsampling factor and cropped back. ``amp`` (auto | bf16 | fp16 | off) overrides ``params.eval.amp``.
    A model trained on CIFAR-10 warns once when asked for pictures far larger than its thumbnails
    (``warn_if_far_larger``).
    """

    def __init__(self, model: Preconditioner, schedule: NoiseSchedule, params: Params, device=None,
                 amp: str | None = None):
        self.device = resolve_device("auto" if device is None else str(device))
        self.model = model.to(self.device).eval()
        if self.device.type == "cpu" or resolve_channels_last(params.train.channels_last, self.device):
            self.model = self.model.to(memory_format=torch.channels_last)
        self.schedule, self.params = schedule, params
        self.precision = resolve_inference_precision(amp or params.eval.amp, self.device)
        self.factor = self.model.net.downsampling_factor
        self.last_sigma: np.ndarray | None = None  # the estimate, when denoise() was called with sigma=None
        self._warned_untrained_sigma = False
        self._warned_far_larger = False

    @classmethod
    def from_checkpoint(cls, path: str | Path, device=None, amp: str | None = None,
                        weights: str = "ema") -> "Denoiser":
        """``weights="model"`` loads the raw (non-averaged) weights, to measure what the EMA is worth."""
        state = load_checkpoint(path)
        params = validate_params(state["params"], source=f"checkpoint {path}")
        model, schedule = build_model(params)
        fix = "it does not match the architecture it declares; retrain or restore it"
        load_model_weights(model, state, path, fix, weights)
        return cls(model, schedule, params, device, amp)

    def denoise(self, noisy: np.ndarray, sigma: float | np.ndarray | None = None, steps: int = 1, eta: float = 0.0,
                batch_size: int = 64, seed: int = 0, mono_noise: bool | str = False,
                ddim_stop_sigma: float = 0.0, colour: bool = False) -> np.ndarray:
        """Denoised (N, H, W, C) float images on [0, 1]. ``sigma`` None: estimated per image (``last_sigma``).
        ``mono_noise``: True when each colour image's noise is one draw copied to R, G and B; "auto" decides per
        image (``grayscale.looks_mono_noise``). ``ddim_stop_sigma`` (pixel scale, as the model sees the noise): where
        multi-step DDIM stops walking down, 0 = all the way; the model's training floor is diffusion.sigma_min.
        ``colour``: the images are parts of colour pictures, denoised as colour even where their three channels are
        equal (a tile of flat white or transparent area), so that every tile of a picture goes the same way."""
        noisy = np.asarray(noisy)
        check_denoise_options(mono_noise, ddim_stop_sigma)
        if noisy.ndim != 4 or noisy.shape[-1] not in (1, 3):
            raise ValueError(f"expected images of shape (N, H, W, 3), or (N, H, W, 1) for gray ones, got "
                             f"{noisy.shape}; drop the alpha channel first")
        if not np.issubdtype(noisy.dtype, np.floating):
            raise ValueError(f"expected float images on the [0, 1] scale, got dtype {noisy.dtype}; divide integers by 255")
        self.warn_if_far_larger(*noisy.shape[1:3])
        options = dict(steps=steps, eta=eta, batch_size=batch_size, seed=seed, mono_noise=mono_noise,
                       ddim_stop_sigma=ddim_stop_sigma, colour=colour)
        stop = float(sigma_to_model(torch.tensor(float(ddim_stop_sigma))))
        if noisy.shape[-1] == 3:
            gray = np.zeros(len(noisy), dtype=bool) if colour else identical_channels(noisy)
            if gray.any():  # as (N, H, W, 1) gray images, replicated back
                return self._denoise_groups(noisy, sigma, [(gray, noisy[gray][..., :1], options),
                                                           (~gray, noisy[~gray], options)])
            if mono_noise == "auto":
                mono = looks_mono_noise(noisy, sigma)
                return self._denoise_groups(noisy, sigma, [(mono, noisy[mono], {**options, "mono_noise": True}),
                                                           (~mono, noisy[~mono], {**options, "mono_noise": False})])
        mono_noise = mono_noise is True  # "auto" on gray images: their noise is one draw per pixel anyway
        estimating = sigma is None
        same_noise = noisy.shape[-1] == 1 or mono_noise  # one noise draw in every channel: whitened (grayscale.py)
        if estimating:  # an estimate past what this noise can be served at is served at the limit, with the warning
            sigma = np.minimum(estimate_sigma(noisy), max_sigma(same_noise))
        sigma = np.array(np.broadcast_to(np.asarray(sigma, dtype=np.float32), (len(noisy),)))
        check_sigma(sigma, same_noise)
        self._warn_untrained_sigma(sigma, same_noise)
        generator = torch.Generator(self.device).manual_seed(seed)
        cfg = self.params.eval
        passes = cfg.unclip_passes_estimated if estimating else cfg.unclip_passes
        clipped = saturated(noisy).reshape(len(noisy), -1).any(axis=1) if passes else np.zeros(len(noisy), bool)
        # Images with clipped pixels first get the one-step estimate that the unclipping starts from.
        first_steps = np.where(clipped, 1, steps)
        out = np.empty(noisy.shape, dtype=np.float32)
        for k in np.unique(first_steps):
            self._denoise_all(noisy, sigma, first_steps == k, out, int(k), eta, batch_size, generator, same_noise,
                              stop)
        if clipped.any():
            rng, unclipped = np.random.default_rng(seed), noisy.copy()  # each pass rewrites the clipped images whole
            for p in range(passes):
                unclipped[clipped] = unclip(noisy[clipped], out[clipped], sigma[clipped], rng)
                if mono_noise and noisy.shape[-1] == 3:
                    unclipped[clipped] = share_noise(unclipped[clipped], noisy[clipped], out[clipped])
                if estimating:  # clipping hid noise from the first estimate; the unclipped images show more of it
                    sigma[clipped] = reestimate_sigma(unclipped[clipped], sigma[clipped], same_noise)
                self._denoise_all(unclipped, sigma, clipped, out, steps if p == passes - 1 else 1, eta, batch_size,
                                  generator, same_noise, stop)
        if estimating:
            self.last_sigma = sigma
            log.info("estimated sigma: %s", np.array2string(sigma, precision=4))
        return out

    def _denoise_groups(self, noisy: np.ndarray, sigma, groups: list) -> np.ndarray:
        """Denoise each (mask, images, options) group of ``noisy`` on its own, and put the outputs (a gray group's
        replicated to RGB) back in order: gray pictures (RGB with three equal channels) go through as gray images,
        and mono_noise="auto" sends each image the way its noise looks."""
        sigmas = None if sigma is None else np.broadcast_to(np.asarray(sigma, dtype=np.float32), (len(noisy),))
        out = np.empty(noisy.shape, dtype=np.float32)
        estimates = np.empty(len(noisy), dtype=np.float32)
        for which, images, options in groups:
            if which.any():
                out[which] = self.denoise(images, None if sigmas is None else sigmas[which], **options)
                if sigma is None:
                    estimates[which] = self.last_sigma
        if sigma is None:
            self.last_sigma = estimates
        return out

    def _denoise_all(self, noisy, sigma, which, out, steps, eta, batch_size, generator, same_noise=False,
                     stop_sigma=0.0) -> None:
        """Denoise the images selected by the boolean mask ``which`` into ``out``, in batches."""
        index = np.flatnonzero(which)
        for start in range(0, len(index), batch_size):
            sl = index[start:start + batch_size]
            out[sl] = self._denoise_batch(noisy[sl], sigma[sl], steps, eta, generator, same_noise, stop_sigma)

    @property
    def trained_sigma_range(self) -> tuple[float, float] | None:
        """The pixel-scale noise levels training drew from (``log_uniform``); None where it drew from all of them."""
        d = self.params.diffusion
        return (d.sigma_min, d.sigma_max) if d.t_sampling == "log_uniform" else None

    def warn_if_far_larger(self, height: int, width: int) -> None:
        """Once per Denoiser: a warning when a whole picture of this size is far larger than the model was trained
        on (``trained_on.far_larger_warning``). Callers that denoise a picture in tiles call it with the picture's
        size; ``denoise`` calls it with the size of the images it is given."""
        if self._warned_far_larger:
            return
        warning = far_larger_warning(self.params, height, width)
        if warning:
            self._warned_far_larger = True
            log.warning(warning)

    def _warn_untrained_sigma(self, sigma: np.ndarray, same_noise: bool) -> None:
        """Once per Denoiser: outside its training range the model extrapolates (still better than the input, but
        it can fall behind BM3D far below the range: docs/design.md, *The training noise range*). Gray images
        (and monochromatic noise) count at the level the model sees: sqrt(3) times theirs (``grayscale``)."""
        trained = self.trained_sigma_range
        if trained is None or self._warned_untrained_sigma:
            return
        seen = sigma * (RGB_SIGMA_FACTOR if same_noise else 1)
        outside = (seen < trained[0]) | (seen > trained[1])
        if outside.any():
            self._warned_untrained_sigma = True
            given = ""
            if same_noise:
                given = f" (a gray image's or monochromatic noise's {sigma[outside][0]:.3g} times sqrt(3))"
            log.warning("sigma %.3g%s lies outside the %g-%g this model was trained on: expect weaker denoising there; "
                        "train with a wider diffusion.sigma_min/sigma_max for such noise", seen[outside][0], given,
                        *trained)

    @torch.no_grad()
    def _denoise_batch(self, noisy, sigma, steps, eta, generator, same_noise=False, stop_sigma=0.0):
        """``same_noise``: one noise draw in every channel (gray images, monochromatic noise): whiten it.
        ``stop_sigma``: model scale (``denoise_ddim``)."""
        y = torch.from_numpy(np.ascontiguousarray(noisy, dtype=np.float32)).to(self.device).permute(0, 3, 1, 2)
        y = to_model(y)
        h, w = y.shape[-2:]
        pad_h, pad_w = (-h) % self.factor, (-w) % self.factor
        if pad_h or pad_w:
            mode = "reflect" if pad_h < h and pad_w < w else "replicate"
            y = F.pad(y, (0, pad_w, 0, pad_h), mode=mode)
        model_sigma = sigma_to_model(torch.from_numpy(np.ascontiguousarray(sigma)).to(self.device))
        if same_noise:  # one noise draw in all three channels is not what the model knows: whiten it (grayscale.py)
            # Such noise leaves the colour differences (each channel less their mean) exact: keep them (0 if gray).
            colour = y - y.mean(dim=1, keepdim=True)
            y, model_sigma = whiten(y, model_sigma, generator), model_sigma * RGB_SIGMA_FACTOR
        y = y.contiguous(memory_format=torch.channels_last)
        with self.precision.autocast(self.device):
            x0 = denoise_ddim(self.model, self.schedule, y, model_sigma, steps, eta, generator, stop_sigma)
        x0 = x0[..., :h, :w].float()
        if same_noise:
            x0 = to_gray(x0) + colour[..., :h, :w]
        return to_pixels(x0).clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy()

