"""Export the one-step denoiser to ONNX or TorchScript, and check the exported file against PyTorch.

The exported graph is the deployment form of ``Denoiser.denoise(noisy, sigma, steps=1)``:

- inputs ``images``: float32 (N, 3, H, W) on the [0, 1] scale (noisy, unclipped) and ``sigma``: float32 (N,), the
  noise level of each image on the same pixel scale (0.1 = 25.5/255);
- output ``denoised``: float32 (N, 3, H, W), clipped to [0, 1].

N, H and W are dynamic. H and W need not be multiples of the U-Net's downsampling factor: the graph reflect-pads and
crops as ``Denoiser`` does, which needs H, W >= that factor. Multi-step DDIM is left to Python (``Denoiser``): it
is a loop around this same network call. The file is written atomically; ONNX weights are stored inside the file.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ddim_denoise.core.precond import Preconditioner
from ddim_denoise.core.scale import sigma_to_model, to_model, to_pixels
from ddim_denoise.pipeline.checkpoint import atomic_path
from ddim_denoise.pipeline.errors import InputError
from ddim_denoise.serving.output_paths import refuse_existing, same_file

EXPORT_FORMATS = ("onnx", "torchscript")
INPUT_NAMES = ("images", "sigma")
OUTPUT_NAME = "denoised"
DEFAULT_PARITY_ATOL = 1e-4  # max |exported - PyTorch| on [0, 1] pixels: a fortieth of one 8-bit level

# (images (N, 3, H, W) float32, sigma (N,) float32) -> denoised (N, 3, H, W) float32
ExportedRunner = Callable[[np.ndarray, np.ndarray], np.ndarray]


class OneStepDenoiser(nn.Module):
    """[0, 1] NCHW images and pixel-scale sigmas in, the one-step clean estimate out (what gets exported)."""

    def __init__(self, model: Preconditioner, downsampling_factor: int):
        super().__init__()
        self.model, self.factor = model, downsampling_factor

    def forward(self, images: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        height, width = images.shape[-2], images.shape[-1]
        y = to_model(images)
        pad_h = (self.factor - height % self.factor) % self.factor  # written so that it exports with symbolic sizes
        pad_w = (self.factor - width % self.factor) % self.factor
        y = F.pad(y, (0, pad_w, 0, pad_h), mode="reflect")
        x0 = self.model(y, sigma_to_model(sigma))[..., :height, :width]
        return to_pixels(x0).clamp(0, 1)


def one_step_module(checkpoint: str | Path) -> OneStepDenoiser:
    """The exportable module for a checkpoint: EMA weights, fp32, CPU, eval mode, plain memory layout."""
    from ddim_denoise.denoising.denoiser import Denoiser

    denoiser = Denoiser.from_checkpoint(checkpoint, device="cpu")
    model = denoiser.model.float().to(memory_format=torch.contiguous_format).eval()
    return OneStepDenoiser(model, denoiser.factor).eval()


def example_inputs(batch: int = 2, height: int = 32, width: int = 32,
                   seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs to trace the graph with; any shape works afterwards (the axes are exported as dynamic)."""
    generator = torch.Generator().manual_seed(seed)
    images = torch.rand(batch, 3, height, width, generator=generator)
    return images, torch.linspace(0.05, 0.3, batch)


def _export_onnx(module: OneStepDenoiser, path: Path, opset: int | None) -> None:
    batch, height, width = (torch.export.Dim(name, min=lo) for name, lo in (("batch", 1), ("height", module.factor),
                                                                            ("width", module.factor)))
    torch.onnx.export(module, example_inputs(), str(path), input_names=list(INPUT_NAMES), output_names=[OUTPUT_NAME],
                      dynamic_shapes={"images": {0: batch, 2: height, 3: width}, "sigma": {0: batch}},
                      opset_version=opset, dynamo=True, external_data=False, verbose=False)


def _export_torchscript(module: OneStepDenoiser, path: Path) -> None:
    traced = torch.jit.trace(module, example_inputs(), check_trace=False)
    torch.jit.save(traced, str(path))


def check_export_target(checkpoint: str | Path, out: str | Path, force: bool = False) -> Path:
    """``out`` as a Path, or InputError if writing it would replace the checkpoint itself (never allowed), a folder,
    or an existing file without ``force``. Cheap: called before the model is loaded."""
    out = Path(out)
    if same_file(out, checkpoint):
        raise InputError(f"--out {out} is the checkpoint being exported; write the export to another file")
    if out.is_dir():
        raise InputError(f"--out {out} is a folder; give a file name, e.g. {out / 'denoiser.onnx'}")
    if not force:
        refuse_existing([out], "--force")
    return out


def export_model(checkpoint: str | Path, fmt: str, out: str | Path, opset: int | None = None,
                 force: bool = False) -> Path:
    """Write the one-step denoiser of ``checkpoint`` to ``out`` as ``onnx`` or ``torchscript``; return the path.

    ``opset`` picks the ONNX opset (None: the exporter's default). An existing ``out`` is replaced only with
    ``force``, and never when it is the checkpoint.
    """
    if fmt not in EXPORT_FORMATS:
        raise InputError(f"unknown export format {fmt!r}: use one of {', '.join(EXPORT_FORMATS)}")
    out = check_export_target(checkpoint, out, force)
    module = one_step_module(checkpoint)
    with atomic_path(out, suffix=out.suffix) as tmp, torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit's deprecation notice; the format is still asked for
        warnings.simplefilter("ignore", UserWarning)  # the ONNX exporter's notes on renamed dynamic axes
        # group_norm's batch-size sanity check is traced as a constant; the parity check covers other shapes
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        if fmt == "onnx":
            _export_onnx(module, tmp, opset)
        else:
            _export_torchscript(module, tmp)
    return out


def format_of(path: str | Path) -> str:
    suffix = Path(path).suffix.lower()
    if suffix == ".onnx":
        return "onnx"
    if suffix in (".pt", ".pth", ".ts", ".torchscript"):
        return "torchscript"
    raise InputError(f"{path}: cannot tell the export format from the suffix (.onnx, or .pt/.ts for TorchScript)")


def load_exported(path: str | Path, fmt: str | None = None, threads: int | None = None) -> ExportedRunner:
    """A NumPy-in, NumPy-out runner for an exported file: onnxruntime for ONNX, torch.jit for TorchScript."""
    path, fmt = Path(path), fmt or format_of(path)
    if not path.is_file():
        raise InputError(f"{path}: no such exported model")
    if fmt == "onnx":
        import onnxruntime as ort

        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

        def run_onnx(images: np.ndarray, sigma: np.ndarray) -> np.ndarray:
            feeds = {INPUT_NAMES[0]: np.ascontiguousarray(images, dtype=np.float32),
                     INPUT_NAMES[1]: np.ascontiguousarray(sigma, dtype=np.float32)}
            return session.run([OUTPUT_NAME], feeds)[0]

        return run_onnx
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        scripted = torch.jit.load(str(path), map_location="cpu").eval()

    def run_torchscript(images: np.ndarray, sigma: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return scripted(torch.from_numpy(np.array(images, dtype=np.float32)),
                            torch.from_numpy(np.array(sigma, dtype=np.float32))).numpy()

    return run_torchscript


def run_eager(module: OneStepDenoiser) -> ExportedRunner:
    """The PyTorch module behind the same NumPy interface, the reference of the parity check."""

    def run(images: np.ndarray, sigma: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return module(torch.from_numpy(np.array(images, dtype=np.float32)),
                          torch.from_numpy(np.array(sigma, dtype=np.float32))).numpy()

    return run


@dataclass(frozen=True)
class ParityReport:
    max_abs_error: float
    mean_abs_error: float
    atol: float
    shapes: tuple[tuple[int, ...], ...]

    @property
    def passed(self) -> bool:
        return self.max_abs_error <= self.atol

    def __str__(self) -> str:
        verdict = "passed" if self.passed else "FAILED"
        return (f"parity {verdict}: max |exported - PyTorch| = {self.max_abs_error:.2e} (tolerance {self.atol:.0e}), "
                f"mean {self.mean_abs_error:.2e}, over shapes {', '.join('x'.join(map(str, s)) for s in self.shapes)}")


def check_parity(exported: ExportedRunner, reference: ExportedRunner,
                 batches: list[tuple[np.ndarray, np.ndarray]], atol: float = DEFAULT_PARITY_ATOL) -> ParityReport:
    """Compare an exported runner with the PyTorch reference on (images NCHW, sigma) batches of any shapes."""
    worst, total, count = 0.0, 0.0, 0
    for images, sigma in batches:
        diff = np.abs(exported(images, sigma) - reference(images, sigma))
        worst, total, count = max(worst, float(diff.max())), total + float(diff.sum()), count + diff.size
    return ParityReport(worst, total / max(count, 1), atol, tuple(images.shape for images, _ in batches))


def parity_batches(sigmas: tuple[float, ...] = (0.05, 0.1, 0.2), crop: int = 48, seed: int = 0
                   ) -> list[tuple[np.ndarray, np.ndarray]]:
    """Real photographs (scikit-image's bundled samples) with Gaussian noise, as NCHW batches of several shapes.

    Sizes include ones that are not multiples of the downsampling factor (odd crops), so padding is checked too.
    """
    from skimage import data

    rng = np.random.default_rng(seed)
    photos = [data.astronaut(), data.chelsea(), data.coffee()]
    shapes = [(crop, crop), (crop - 3, crop + 5), (crop // 2 + 1, crop)]
    batches = []
    for height, width in shapes:
        clean = np.stack([photo[:height, :width] for photo in photos]).astype(np.float32) / 255
        sigma = np.resize(np.asarray(sigmas, dtype=np.float32), len(photos))  # one level per photo, cycled
        noisy = clean + sigma[:, None, None, None] * rng.standard_normal(clean.shape, dtype=np.float32)
        batches.append((np.ascontiguousarray(noisy.transpose(0, 3, 1, 2)), sigma))
    return batches


def verify_export(path: str | Path, checkpoint: str | Path, fmt: str | None = None,
                  atol: float = DEFAULT_PARITY_ATOL) -> ParityReport:
    """Parity of an exported file against the checkpoint's PyTorch module on noisy real photographs."""
    return check_parity(load_exported(path, fmt), run_eager(one_step_module(checkpoint)), parity_batches(), atol)
