"""The maths of denoising diffusion: noise schedule, preconditioning, DDIM, the U-Net, image metrics (torch and numpy only)."""
