"""Denoising image files: read each, denoise it (whole or in tiles), write it beside the others in the output folder.

The per-image step (``denoise_decoded``) is shared with the MLflow pyfunc server, so a file denoised from the command
line and one sent over REST go through the same code. The noise level is either given (one pixel-scale sigma for
every image: 0.1 means 25.5/255) or estimated per image from the whole image (refined on its central tile where
clipping hid part of the noise), never per tile, so the tiles of one image are all denoised at the same level.

All inputs are checked (present, distinct output names, not overwriting themselves, no existing output replaced
unless asked) before the first one is denoised, so a typo in the tenth path does not cost nine images' work.
"""

from __future__ import annotations

import logging
import math
import tempfile
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from ddim_denoise.data.image_io import DEFAULT_QUALITY, DecodedImage, DecodeLimits, read_image, write_image
from ddim_denoise.denoising.clipping import saturated
from ddim_denoise.denoising.denoiser import Denoiser, check_denoise_options, estimate_sigma, max_sigma
from ddim_denoise.denoising.grayscale import identical_channels, looks_mono_noise
from ddim_denoise.denoising.tiling import TileOptions, denoise_tiled, tile_boxes
from ddim_denoise.denoising.trained_on import trained_on
from ddim_denoise.pipeline.errors import InputError
from ddim_denoise.serving.output_paths import refuse_existing, same_file

log = logging.getLogger(__name__)


def check_pixel_sigma(sigma: float) -> float:
    """A user's noise level, on the [0, 1] pixel scale; InputError unless it lies in (0, 1]."""
    try:
        value = float(sigma)
    except (TypeError, ValueError):
        raise InputError(f"sigma {sigma!r} is not a number") from None
    if not (math.isfinite(value) and 0 < value <= 1):
        raise InputError(f"sigma must lie in (0, 1] on the [0,1] pixel scale (0.1 = 25.5/255), got {sigma}")
    return value


# DDIM steps: the default schedule's timesteps (diffusion.T). More steps than the schedule has levels add only time,
# and a count in the billions allocated its table of timesteps until memory ran out.
MAX_STEPS = 1000
TRANSPARENT_FILL = 0.5  # what fully transparent pixels show the model (denoise_decoded): flat, and far from 0 and 1


@dataclass(frozen=True)
class DenoiseOptions:
    sigma: float | None = None  # pixel-scale noise level for every image; None: estimate it per image
    steps: int = 1  # DDIM steps (1: the one-step MMSE estimate)
    eta: float = 0.0  # DDIM stochasticity (0: deterministic)
    ddim_stop_sigma: float = 0.0  # where multi-step DDIM stops, pixel scale (Denoiser.denoise); 0 = walk to 0
    tiles: TileOptions = field(default_factory=TileOptions)
    quality: int = DEFAULT_QUALITY  # JPEG / lossy WebP quality of the written files
    mono_noise: bool | str = False  # colour images whose noise is one draw in R, G and B; "auto": decided per image

    def validate(self) -> "DenoiseOptions":
        if self.sigma is not None:
            check_pixel_sigma(self.sigma)
        if not 1 <= self.steps <= MAX_STEPS:
            raise InputError(f"steps must lie in [1, {MAX_STEPS}], got {self.steps}")
        if not (math.isfinite(self.eta) and self.eta >= 0):
            raise InputError(f"eta must be a finite number >= 0, got {self.eta}")
        if not 1 <= self.quality <= 100:
            raise InputError(f"quality must lie in [1, 100], got {self.quality}")
        try:
            check_denoise_options(self.mono_noise, self.ddim_stop_sigma)
        except ValueError as e:
            raise InputError(str(e)) from None
        self.tiles.validate()
        return self


def load_denoiser(checkpoint: str | Path, device: str | None = None) -> Denoiser:
    """``Denoiser.from_checkpoint``, with a device that cannot be used reported as an InputError; logs which data
    the model was trained on."""
    from ddim_denoise.pipeline.runtime import resolve_device

    try:
        resolve_device(device or "auto")
    except (ValueError, RuntimeError) as e:  # "cuda" without a GPU, or a malformed device name
        raise InputError(f"--device {device}: {e}") from None
    denoiser = Denoiser.from_checkpoint(checkpoint, device=device)
    log.info("the model was trained on %s", trained_on(denoiser.params))
    return denoiser


@dataclass(frozen=True)
class DenoisedImage:
    rgb: np.ndarray  # float32 (H, W, 3) in [0, 1]
    sigma: float  # the pixel-scale noise level used
    estimated: bool  # True when sigma was estimated from the image
    mono_noise: bool = False  # whether the image was denoised as having monochromatic noise


def is_gray_picture(rgb: np.ndarray) -> bool:
    """Whether a whole (H, W, 3) image is gray (three equal channels): decided once per image, never per tile, as a
    colour picture's flat white or transparent tile is gray too, and gray images have a lower sigma limit."""
    return bool(identical_channels(rgb[None])[0])


def image_sigma(denoiser: Denoiser, rgb: np.ndarray, sigma: float | None, tile: int,
                mono_noise: bool = False) -> tuple[float, bool]:
    """(sigma to use, whether it was estimated): the given one, or the image's own estimate (raised if not positive).

    Where the image has clipped pixels (exactly 0 or 1), the estimate reads low; the denoiser then refines it on the
    central ``tile`` x ``tile`` crop, unclipping and re-estimating in turn (``Denoiser.denoise`` with sigma=None).
    """
    if sigma is not None:
        return check_pixel_sigma(sigma), False
    estimate = float(estimate_sigma(rgb[None])[0])
    if not (math.isfinite(estimate) and estimate > 0):
        raise InputError(f"the noise level estimated from the image is {estimate:.3g}; the image looks noise-free or "
                         "flat: pass --sigma instead")
    gray = is_gray_picture(rgb)
    if saturated(rgb).any():
        top, left = max(0, (rgb.shape[0] - tile) // 2), max(0, (rgb.shape[1] - tile) // 2)
        denoiser.denoise(rgb[None, top:top + tile, left:left + tile], None, mono_noise=mono_noise, colour=not gray)
        estimate = float(denoiser.last_sigma[0])
    return min(estimate, max_sigma(mono_noise or gray)), True


def denoise_decoded(denoiser: Denoiser, image: DecodedImage, options: DenoiseOptions,
                    on_tiles: Callable[[int], None] | None = None) -> DenoisedImage:
    """Denoise one decoded image (tiled when large), at the given or estimated noise level. With mono_noise "auto"
    the whole image decides (``grayscale.looks_mono_noise``), so that all its tiles go the same way.

    Fully transparent pixels are invisible, and files often store them as 0. Taken for noise clipped to 0, they misled
    the estimate (0.04 for a cut-out's 0.1). They reach the model as flat TRANSPARENT_FILL, neither clipped nor counted
    as noise (``clipping.estimate_noise_sigma``), and come back as stored. A picture far larger than the model was
    trained on is warned about once per Denoiser (``Denoiser.warn_if_far_larger``), before it is cut into tiles."""
    rgb = image.rgb
    denoiser.warn_if_far_larger(*rgb.shape[:2])
    transparent = np.zeros(rgb.shape[:2], dtype=bool) if image.alpha is None else image.alpha == 0
    if transparent.any():
        rgb = np.where(transparent[..., None], np.float32(TRANSPARENT_FILL), rgb)
    if options.mono_noise == "auto":
        options = replace(options, mono_noise=bool(looks_mono_noise(rgb[None], options.sigma)[0]))
    batch = partial(denoiser.denoise, steps=options.steps, eta=options.eta, batch_size=options.tiles.batch,
                    mono_noise=options.mono_noise, ddim_stop_sigma=options.ddim_stop_sigma,
                    colour=not is_gray_picture(rgb))  # the tiles go the way the whole image does
    try:
        sigma, estimated = image_sigma(denoiser, rgb, options.sigma, options.tiles.tile, options.mono_noise)
        out = denoise_tiled(batch, rgb, sigma, options.tiles, on_tiles)
    except ValueError as e:  # Denoiser's refusals: a sigma it cannot serve (check_sigma)
        raise InputError(str(e)) from None
    out[transparent] = image.rgb[transparent]
    return DenoisedImage(out, sigma, estimated, options.mono_noise)


@dataclass(frozen=True)
class DenoisedFile:
    source: Path
    output: Path
    sigma: float
    estimated: bool
    mono_noise: bool = False


def plan_outputs(inputs: Sequence[str | Path], out_dir: str | Path,
                 overwrite: bool = False) -> list[tuple[Path, Path]]:
    """(input, output) pairs, output = out_dir / input's name; InputError on missing inputs, clashing outputs, an
    output that is its own input, or (unless ``overwrite``) outputs that already exist."""
    if not inputs:
        raise InputError("no input images given")
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise InputError(f"--out {out_dir}: exists and is not a folder")
    pairs, seen = [], {}
    for item in inputs:
        source = Path(item)
        if not source.is_file():
            raise InputError(f"{source}: no such file")
        output = out_dir / source.name
        if same_file(output, source):
            raise InputError(f"{source}: the output would overwrite the input; choose another --out folder")
        if output in seen:
            raise InputError(f"{source} and {seen[output]} would both be written to {output}; denoise them into "
                             "separate folders")
        seen[output] = source
        pairs.append((source, output))
    if not overwrite:
        refuse_existing([output for _, output in pairs], "--overwrite")
    return pairs


def make_out_dir(out_dir: str | Path) -> None:
    """Create the output folder and check that it takes files: before the first image is denoised, not after."""
    try:
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=out_dir):
            pass
    except OSError as e:  # a file where a parent folder should be, no permission, a read-only disk
        raise InputError(f"--out {out_dir}: cannot create or write to this folder ({e.strerror or e}); choose "
                         "another --out folder") from None


def denoise_files(denoiser: Denoiser, inputs: Sequence[str | Path], out_dir: str | Path,
                  options: DenoiseOptions = DenoiseOptions(), progress: bool = True,
                  report: Callable[[DenoisedFile], None] | None = None, overwrite: bool = False,
                  limits: DecodeLimits = DecodeLimits()) -> list[DenoisedFile]:
    """Denoise every input into ``out_dir`` (same name, format and bit depth); ``report`` hears of each file as done.
    Existing files in ``out_dir`` are replaced only with ``overwrite``; files over ``limits`` are refused unread.

    Two progress bars on stderr: files done, and below it the tiles of the file in hand (a large photo takes long).
    """
    from tqdm import tqdm

    options.validate()
    limits.validate()
    pairs = plan_outputs(inputs, out_dir, overwrite)
    make_out_dir(out_dir)
    done: list[DenoisedFile] = []
    with tqdm(total=len(pairs), unit="file", disable=not progress, position=0) as files_bar:
        for source, output in pairs:
            image = read_image(source, limits)
            height, width = image.rgb.shape[:2]
            n_tiles = len(tile_boxes(height, width, options.tiles))
            log.debug("%s: %s, %d tile(s)", source, image.layout.describe(), n_tiles)
            with tqdm(total=n_tiles, unit="tile", leave=False,
                      desc=source.name, disable=not progress, position=1) as tiles_bar:
                result = denoise_decoded(denoiser, image, options, on_tiles=tiles_bar.update)
            write_image(output, result.rgb, image, options.quality)
            item = DenoisedFile(source, output, result.sigma, result.estimated, result.mono_noise)
            done.append(item)
            if report:
                report(item)
            files_bar.update(1)
    return done
