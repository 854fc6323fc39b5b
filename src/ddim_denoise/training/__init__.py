"""The training loop and its launchers (one process, or torchrun ranks)."""
