"""The maths of denoising diffusion, torch and numpy only: noise schedule, pixel/model scale, preconditioning, DDIM,
the U-Net, image metrics."""
