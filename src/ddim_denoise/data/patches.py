"""Random square crops of pictures of any size: what training and validation see of a folder source.

A crop position is drawn uniformly over every position in every picture (a picture with four times the positions is
chosen four times as often), so each pixel of the set is about equally likely to be trained on whatever the picture
sizes. The draw is seeded, so a run resumed at an epoch boundary crops exactly what an uninterrupted run would have.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np
import torch


def crop_positions(sizes: list[tuple[int, int]], n: int, patch_size: int, generator: torch.Generator
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(picture index, top, left) of ``n`` crops, uniform over every crop position of pictures of ``sizes`` (H, W)."""
    positions = torch.tensor([(h - patch_size + 1) * (w - patch_size + 1) for h, w in sizes], dtype=torch.float64)
    picture = torch.multinomial(positions, n, replacement=True, generator=generator)
    heights, widths = (torch.tensor(side) for side in zip(*sizes))
    top = (torch.rand(n, generator=generator, dtype=torch.float64) * (heights[picture] - patch_size + 1)).long()
    left = (torch.rand(n, generator=generator, dtype=torch.float64) * (widths[picture] - patch_size + 1)).long()
    return picture, top, left


def random_crops(pictures: list[torch.Tensor], n: int, patch_size: int, generator: torch.Generator) -> torch.Tensor:
    """``n`` uint8 crops (n, patch_size, patch_size, 3) of ``pictures`` (each (H, W, 3), on any one device).
    ``generator`` is a CPU generator: the positions are the same on every device."""
    picture, top, left = crop_positions([tuple(p.shape[:2]) for p in pictures], n, patch_size, generator)
    return torch.stack([pictures[i][y: y + patch_size, x: x + patch_size]
                        for i, y, x in zip(picture.tolist(), top.tolist(), left.tolist())])


class TrainImages(Protocol):
    """What a training run draws its batches from: ``epoch_images(epoch)``, uint8 (N, H, W, 3) on one device."""

    def __len__(self) -> int: ...

    def epoch_images(self, epoch: int) -> torch.Tensor: ...


class PatchSource:
    """The training set of a folder source: ``per_epoch`` fresh random crops each epoch, drawn from the whole uint8
    pictures kept on ``device`` (on a GPU, the crops never cross the bus)."""

    def __init__(self, pictures: list[np.ndarray], patch_size: int, per_epoch: int, seed: int,
                 device: torch.device | str = "cpu"):
        self.pictures = [torch.from_numpy(p).to(device) for p in pictures]
        self.patch_size, self.per_epoch, self.seed = patch_size, per_epoch, seed

    def __len__(self) -> int:
        return self.per_epoch

    def epoch_images(self, epoch: int) -> torch.Tensor:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return random_crops(self.pictures, self.per_epoch, self.patch_size, generator)


class FixedImages:
    """The training set of CIFAR-10: the same uint8 images (N, H, W, 3) every epoch, on ``device``."""

    def __init__(self, images: np.ndarray, device: torch.device | str = "cpu"):
        self.images = torch.from_numpy(images).to(device)

    def __len__(self) -> int:
        return len(self.images)

    def epoch_images(self, epoch: int) -> torch.Tensor:
        return self.images
