"""Orientation-preserving image augmentation (torchvision v2).

RSICap captions say "north", "upper left", "east-west road": a flip or rotation would make the
caption false for the picture. So training views change scale, position (a little), colour and
sharpness, never orientation. Validation and test images are only resized. Both return uint8
tensors ``(3, size, size)``; the processor then rescales and normalises them exactly the same way.
"""

from __future__ import annotations

import torch
from torchvision.transforms import v2


def train_transform(size: int = 224, aug_prob: float = 0.8) -> v2.Compose:
    """The plan's training augmentation.

    Spatial (always): RandomResizedCrop(scale 0.8-1.0, ratio 0.9-1.1) and a translation of up to
    10 %. Colour group with probability ``aug_prob``: ColorJitter(0.2, 0.2, 0.1, 0.05),
    RandomGrayscale(0.1), GaussianBlur(3, sigma 0.1-0.5) — a mild stand-in for sensor and
    atmosphere effects.
    """
    colour = v2.Compose([
        v2.ColorJitter(brightness=0.2, contrast=0.2, saturation=0.1, hue=0.05),
        v2.RandomGrayscale(p=0.1),
        v2.GaussianBlur(kernel_size=3, sigma=(0.1, 0.5)),
    ])
    return v2.Compose([
        v2.ToImage(),
        v2.RGB(),
        v2.RandomResizedCrop(size, scale=(0.8, 1.0), ratio=(0.9, 1.1), antialias=True),
        v2.RandomAffine(degrees=0, translate=(0.1, 0.1), scale=None, shear=0),
        v2.RandomApply([colour], p=aug_prob),
        v2.ToDtype(torch.uint8, scale=True),
    ])


def eval_transform(size: int = 224) -> v2.Compose:
    """Deterministic resize to ``size x size`` (no crop: the whole scene stays in view)."""
    return v2.Compose([
        v2.ToImage(),
        v2.RGB(),
        v2.Resize((size, size), antialias=True),
        v2.ToDtype(torch.uint8, scale=True),
    ])


def build_transform(train: bool, size: int, augment: bool = True, aug_prob: float = 0.8) -> v2.Compose:
    """Training views when ``train and augment``; otherwise the deterministic resize."""
    return train_transform(size, aug_prob) if train and augment else eval_transform(size)
