"""The public Denoiser and the decisions it makes once: noise-level estimate, clipped noise, gray images."""
