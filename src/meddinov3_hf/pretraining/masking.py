"""Block-wise patch masks for the iBOT loss (docs/method.md §5, §7)."""

from __future__ import annotations

import math

import numpy as np
import torch

__all__ = ["BlockMaskGenerator", "sample_masks"]


def _numpy_rng(generator: torch.Generator | None) -> np.random.Generator:
    # One seed drawn from torch keeps everything reproducible under torch.manual_seed / a torch.Generator,
    # while the many small draws of the rectangle loop run at numpy speed.
    seed = torch.randint(0, 2**62, (1,), generator=generator).item()
    return np.random.default_rng(seed)


class BlockMaskGenerator:
    """Masks made of a union of random rectangles (BEiT/iBOT-style block masking).

    Each rectangle has an area drawn uniformly in [min_num_patches, still-missing patches] and an aspect
    ratio drawn log-uniformly in [1/max_aspect, max_aspect]. Rectangles are added until the target count is
    reached or no rectangle fits; with `fill_to_target` the last few patches are then masked at random so
    the count is exact.
    """

    def __init__(
        self,
        grid_hw: tuple[int, int],
        min_num_patches: int = 4,
        max_aspect: float = 3.0,
        max_attempts: int = 10,
        fill_to_target: bool = True,
    ) -> None:
        self.height, self.width = grid_hw
        self.num_patches = self.height * self.width
        self.min_num_patches = min_num_patches
        self.log_aspect = (math.log(1.0 / max_aspect), math.log(max_aspect))
        self.max_attempts = max_attempts
        self.fill_to_target = fill_to_target

    def _add_block(self, mask: np.ndarray, max_new: int, rng: np.random.Generator) -> int:
        """Try to mask one rectangle adding 1..max_new patches; returns how many were added."""
        for _ in range(self.max_attempts):
            area = rng.uniform(self.min_num_patches, max_new)
            aspect = math.exp(rng.uniform(*self.log_aspect))
            h = int(round(math.sqrt(area * aspect)))
            w = int(round(math.sqrt(area / aspect)))
            if not (0 < h <= self.height and 0 < w <= self.width):
                continue
            top = int(rng.integers(0, self.height - h + 1))
            left = int(rng.integers(0, self.width - w + 1))
            block = mask[top : top + h, left : left + w]
            added = h * w - int(block.sum())
            if 0 < added <= max_new:
                block[...] = True
                return added
        return 0

    def generate(self, num_masked: int, rng: np.random.Generator) -> np.ndarray:
        """Bool mask `(h, w)` with (up to, or exactly with fill_to_target) `num_masked` True patches."""
        num_masked = min(max(num_masked, 0), self.num_patches)
        mask = np.zeros((self.height, self.width), dtype=bool)
        count = 0
        while num_masked - count >= self.min_num_patches:
            added = self._add_block(mask, num_masked - count, rng)
            if added == 0:
                break
            count += added
        if self.fill_to_target and count < num_masked:
            free = np.flatnonzero(~mask.reshape(-1))
            mask.reshape(-1)[rng.choice(free, size=num_masked - count, replace=False)] = True
        return mask

    def __call__(self, num_masked: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """Bool mask `(h, w)` as a torch tensor."""
        return torch.from_numpy(self.generate(num_masked, _numpy_rng(generator)))


def sample_masks(
    batch_size: int,
    grid_hw: tuple[int, int],
    mask_probability: float = 0.5,
    ratio_range: tuple[float, float] = (0.1, 0.5),
    generator: torch.Generator | None = None,
    min_num_patches: int = 4,
    max_aspect: float = 3.0,
) -> torch.Tensor:
    """Masks for a batch of global crops: `(batch_size, h·w)` bool.

    `int(batch_size · mask_probability)` images get block masks, the rest none. Their mask ratios are spread
    evenly over `ratio_range` (DINOv2-style): the range is cut into one equal bin per masked image and each
    draws its ratio uniformly within its bin, then ~ratio·h·w patches are masked. Which images are masked is
    a random permutation. Deterministic given `generator` (or the global torch seed).
    """
    rng = _numpy_rng(generator)
    mask_gen = BlockMaskGenerator(grid_hw, min_num_patches=min_num_patches, max_aspect=max_aspect)
    n_patches = mask_gen.num_patches
    n_masked = int(batch_size * mask_probability)
    edges = np.linspace(ratio_range[0], ratio_range[1], n_masked + 1)

    masks = np.zeros((batch_size, n_patches), dtype=bool)
    for i, image in enumerate(rng.permutation(batch_size)[:n_masked]):
        ratio = rng.uniform(edges[i], edges[i + 1])
        masks[image] = mask_gen.generate(int(round(ratio * n_patches)), rng).reshape(-1)
    return torch.from_numpy(masks)
