"""Augmentation keeps orientation: captions say "upper left" and "north", so must the pixels."""

import pytest
import torch
from PIL import Image, ImageDraw
from torchvision.transforms import v2

from rsilora.augment import eval_transform, train_transform

QUADRANTS = {"upper left": (0, 0), "upper right": (1, 0), "lower left": (0, 1), "lower right": (1, 1)}


def _marker_image(quadrant: str, size: int = 256) -> Image.Image:
    """Dark ground with one bright square centred in a quadrant, plus an arrow-like bar to its east."""
    qx, qy = QUADRANTS[quadrant]
    image = Image.new("RGB", (size, size), (30, 40, 30))
    cx, cy = size // 4 + qx * size // 2, size // 4 + qy * size // 2
    ImageDraw.Draw(image).rectangle([cx - 16, cy - 16, cx + 16, cy + 16], fill=(250, 250, 250))
    return image


def _marker_centroid(image: torch.Tensor) -> tuple[float, float]:
    gray = image.float().mean(0)  # (H, W)
    mask = gray > gray.mean() + 0.5 * (gray.max() - gray.mean())
    ys, xs = torch.nonzero(mask, as_tuple=True)
    return xs.float().mean().item() / image.shape[2], ys.float().mean().item() / image.shape[1]


@pytest.mark.parametrize("quadrant", list(QUADRANTS))
def test_marker_stays_in_its_quadrant_over_many_draws(quadrant):
    torch.manual_seed(0)
    transform = train_transform(224, aug_prob=1.0)
    image = _marker_image(quadrant)
    qx, qy = QUADRANTS[quadrant]
    positions = set()
    for _ in range(150):
        out = transform(image)
        assert out.shape == (3, 224, 224) and out.dtype == torch.uint8
        x, y = _marker_centroid(out)
        assert (x >= 0.5) == bool(qx) and (y >= 0.5) == bool(qy), f"marker moved to ({x:.2f}, {y:.2f})"
        positions.add((round(x, 2), round(y, 2)))
    assert len(positions) > 20  # the crop and translation really do move the view


def test_no_flip_or_rotation_in_the_pipeline():
    forbidden = (v2.RandomHorizontalFlip, v2.RandomVerticalFlip, v2.RandomRotation)

    def walk(t):
        yield t
        for child in getattr(t, "transforms", []):
            yield from walk(child)

    steps = list(walk(train_transform()))
    assert not any(isinstance(t, forbidden) for t in steps)
    affine = next(t for t in steps if isinstance(t, v2.RandomAffine))
    assert list(affine.degrees) == [0.0, 0.0] and affine.shear is None or affine.shear in (0, [0.0, 0.0])


def test_colour_group_applies_with_aug_prob():
    torch.manual_seed(0)
    colour = torch.tensor([100.0, 150.0, 200.0])
    image = Image.new("RGB", (256, 256), (100, 150, 200))

    def centre_colour(out):  # the centre is never translated off-image
        return out[:, 100:124, 100:124].float().mean((1, 2))

    never = [centre_colour(train_transform(224, aug_prob=0.0)(image)) for _ in range(20)]
    assert all(torch.allclose(c, colour, atol=1.0) for c in never)
    always = [centre_colour(train_transform(224, aug_prob=1.0)(image)) for _ in range(20)]
    assert sum((c - colour).abs().max() > 3 for c in always) >= 15


def test_eval_transform_is_deterministic_resize():
    image = _marker_image("lower right", size=300)
    a, b = eval_transform(224)(image), eval_transform(224)(image)
    assert torch.equal(a, b) and a.shape == (3, 224, 224)
    x, y = _marker_centroid(a)
    assert x > 0.5 and y > 0.5
