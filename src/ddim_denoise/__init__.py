"""ddim-denoise: a diffusion (DDPM/DDIM) U-Net trained on CIFAR-10, used to remove Gaussian noise from images."""

from ddim_denoise.denoising.denoiser import Denoiser

__all__ = ["Denoiser"]
__version__ = "0.1.0"
