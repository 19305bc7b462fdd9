"""2-D training / evaluation transforms for CT slices in torch (nnU-Net 2-D defaults, docs/method.md §4).

Spatial work is ONE `grid_sample` per tensor: in-plane resampling to the working spacing, the patch crop
(with padding), rotation, scaling and mirroring are composed into a single affine map from output to input
pixels. That is one interpolation (no blur from chained resamplings) and costs the same whatever the input
size. Image: bilinear, samples outside the slice are air (-1000 HU; the image is shifted so that grid_sample's
zero padding *is* air, so the outermost half pixel blends towards air). Labels: nearest, outside = 0, so
they only ever take values present in the input.

Coordinates: pixel k of an axis of length N covers [k, k+1) ("edge" coordinates, pixel centre k + 0.5),
the `align_corners=False` convention of `torch.nn.functional.interpolate`. The resampled grid at spacing t
has N·s/t pixels (s = native spacing); the patch is an integer window of it, so without resampling or
augmentation the output is an exact crop of the input.

Determinism: every random draw comes from the `torch.Generator` passed in; `sample_generator(seed, epoch,
index)` derives one per sample so a resumed run reproduces the same patches.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from meddinov3_hf.image_processing_meddinov3 import (
    MedDINOv3ImageProcessor,
    as_target_spacing,
    normalize_hu,
    resampled_extent,
    resampled_shape,
    spacing_for_patch,
)

__all__ = [
    "AIR_HU",
    "SegmentationEvalTransform",
    "SegmentationTrainTransform",
    "sample_generator",
    "spacing_for_patch",
]

AIR_HU = -1000.0


def sample_generator(seed: int, epoch: int, index: int) -> torch.Generator:
    """A CPU generator whose state depends only on (seed, epoch, index), well mixed via SeedSequence."""
    state = np.random.SeedSequence([int(seed) & 0xFFFFFFFF, int(epoch), int(index)]).generate_state(2)
    g = torch.Generator()
    g.manual_seed((int(state[0]) << 31) ^ int(state[1]))  # < 2**63
    return g


# --------------------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------------------


# The random draws of these transforms and of pretraining's multi-crop (`pretraining.crops`); a generator of
# None draws from torch's global one.
def _rand(g: torch.Generator | None) -> float:
    return float(torch.rand((), generator=g))


def _uniform(g: torch.Generator | None, lo: float, hi: float) -> float:
    return lo + (hi - lo) * _rand(g)


def _randint(g: torch.Generator | None, lo: int, hi: int) -> int:
    """Uniform integer in [lo, hi] (inclusive)."""
    return int(torch.randint(lo, hi + 1, (), generator=g))


def _mean_std(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and (population) std in one cheap pass each: torch.std_mean is ~20x slower on CPU."""
    flat = x.reshape(-1)
    n = flat.numel()
    mean = flat.sum() / n
    var = (torch.dot(flat, flat) / n - mean * mean).clamp_min(0.0)
    return mean, var.sqrt()


def _gaussian_kernel(sigma: float) -> torch.Tensor:
    radius = max(1, math.ceil(3.0 * sigma))
    x = torch.arange(-radius, radius + 1, dtype=torch.float32)
    k = torch.exp(-0.5 * (x / sigma) ** 2)
    return k / k.sum()


def _blur_rows(x: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """1-D convolution along dim 0 of a contiguous (H, W) tensor as a sum of shifted row slabs.

    Shifted adds over contiguous memory are ~3x faster on CPU than conv2d with a 1-D kernel."""
    r = k.numel() // 2
    mode = "reflect" if x.shape[0] > r else "replicate"  # reflect needs the axis longer than the radius
    p = F.pad(x[None, None], (0, 0, r, r), mode=mode)[0, 0]
    out = p[0 : x.shape[0]] * float(k[0])
    for i in range(1, k.numel()):
        out.add_(p[i : i + x.shape[0]], alpha=float(k[i]))
    return out


def _gaussian_blur(x: torch.Tensor, sigma_y: float, sigma_x: float) -> torch.Tensor:
    """Separable Gaussian blur of a (H, W) float tensor, kernel radius 3σ, reflect padding; sigma <= 0 skips
    that axis."""
    if sigma_y > 0:
        x = _blur_rows(x, _gaussian_kernel(sigma_y))
    if sigma_x > 0:
        x = _blur_rows(x.t().contiguous(), _gaussian_kernel(sigma_x)).t().contiguous()
    return x


def _gamma_curve(x: torch.Tensor, lo: Any, hi: Any, gamma: float) -> torch.Tensor:
    """((x - lo) / (hi - lo))**gamma in [0, 1] for x in [lo, hi] (lo, hi: numbers or 0-d tensors), through
    log/exp in place on a new tensor: 2x faster than pow."""
    return (x - lo).div_(hi - lo + 1e-7).log_().mul_(gamma).exp_()


def _as_2d(name: str, x: Any) -> torch.Tensor:
    t = torch.as_tensor(np.asarray(x) if not isinstance(x, torch.Tensor) else x)
    if t.ndim != 2:
        raise ValueError(f"{name} must be a 2-D (H, W) slice, got shape {tuple(t.shape)}")
    return t


def _check_spacing(spacing_yx: Sequence[float]) -> tuple[float, float]:
    sy, sx = (float(s) for s in spacing_yx)
    if not (sy > 0 and sx > 0 and math.isfinite(sy) and math.isfinite(sx)):
        raise ValueError(f"spacing_yx must be two positive numbers (sy, sx) in mm, got {tuple(spacing_yx)}")
    return sy, sx


@dataclass(frozen=True)
class _Geometry:
    """Everything the single grid_sample needs. Sizes and starts are in resampled-grid pixels."""

    out_hw: tuple[int, int]
    start_yx: tuple[int, int]  # top-left of the patch in the resampled grid (negative = padding)
    native_yx: tuple[float, float]  # input pixel spacing (mm)
    target_yx: tuple[float, float]  # output pixel spacing (mm) before scaling
    angle: float = 0.0  # radians, rotation about the patch centre, in physical (mm) space
    scale: float = 1.0  # > 1 samples a larger field of view (structures get smaller), as nnU-Net
    flip_yx: tuple[bool, bool] = (False, False)

    def downsampling_yx(self) -> tuple[float, float]:
        """Input pixels per output pixel along y/x (> 1 means downsampling, i.e. aliasing risk)."""
        return (
            self.scale * self.target_yx[0] / self.native_yx[0],
            self.scale * self.target_yx[1] / self.native_yx[1],
        )


def _theta(geo: _Geometry, in_hw: tuple[int, int]) -> list[list[float]]:
    """2x3 affine from output base coords b ∈ [-1, 1] (align_corners=False) to input normalised coords.

    Output offset from the patch centre: o = b·size/2 (pixels) → physical p = o·target (mm, mirrored by
    the flips) → rotated/scaled p' = s·R(angle)·p → input edge coordinate u = centre + p'/native → 2u/N - 1.
    """
    h, w = in_hw
    ho, wo = geo.out_hw
    (ny, nx), (ty, tx) = geo.native_yx, geo.target_yx
    cy = (geo.start_yx[0] + ho / 2.0) * ty / ny  # patch centre, input edge coordinates
    cx = (geo.start_yx[1] + wo / 2.0) * tx / nx
    half_x = tx * wo / 2.0 * (-1.0 if geo.flip_yx[1] else 1.0)  # mm per unit of b_x
    half_y = ty * ho / 2.0 * (-1.0 if geo.flip_yx[0] else 1.0)
    c, s = geo.scale * math.cos(geo.angle), geo.scale * math.sin(geo.angle)
    return [
        [2.0 / w * c * half_x / nx, -2.0 / w * s * half_y / nx, 2.0 * cx / w - 1.0],
        [2.0 / h * s * half_x / ny, 2.0 / h * c * half_y / ny, 2.0 * cy / h - 1.0],
    ]


def _affine_grid(theta: list[list[float]], out_hw: tuple[int, int]) -> torch.Tensor:
    """(1, Ho, Wo, 2) sampling grid, same values as F.affine_grid(align_corners=False) but ~2x faster on CPU:
    the map is affine, so each component is an outer sum of a row and a column vector (float64 coefficients,
    so large images keep sub-pixel precision)."""
    ho, wo = out_hw
    bx = (torch.arange(wo, dtype=torch.float64) * 2 + 1) / wo - 1
    by = (torch.arange(ho, dtype=torch.float64) * 2 + 1) / ho - 1
    grid = torch.empty((1, ho, wo, 2), dtype=torch.float32)
    for k in range(2):
        a, b, c = theta[k]
        torch.add((bx * a + c).float()[None, :], (by * b).float()[:, None], out=grid[0, ..., k])
    return grid


def _sample(
    hu: torch.Tensor, label: torch.Tensor | None, geo: _Geometry
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Resample + crop/pad + rotate/scale/mirror in one grid_sample per tensor.

    Args: hu (H, W) any real dtype; label (H, W) integer or None.
    Returns: hu (Ho, Wo) float32 with AIR_HU outside the slice; label (Ho, Wo) int64 (0 outside) or None.
    """
    h, w = hu.shape
    # Shift so that air is 0: grid_sample's zero padding then pads with air at no extra cost.
    img_in = hu.to(torch.float32) - AIR_HU
    dy, dx = geo.downsampling_yx()
    if dy > 1.1 or dx > 1.1:
        # Anti-alias before downsampling (sigma = (factor - 1) / 2 input pixels, as skimage does).
        img_in = _gaussian_blur(img_in, max(0.0, (dy - 1) / 2), max(0.0, (dx - 1) / 2))
    grid = _affine_grid(_theta(geo, (h, w)), geo.out_hw)
    img = F.grid_sample(img_in[None, None], grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    img = img[0, 0].add_(AIR_HU)
    lab = None
    if label is not None:
        # Nearest: labels are copied, never interpolated to values that do not exist in the input.
        lab = F.grid_sample(
            label.to(torch.float32)[None, None],
            grid,
            mode="nearest",
            padding_mode="zeros",
            align_corners=False,
        )[0, 0].to(torch.int64)
    return img, lab


def _patch_hw(patch_size: int | Sequence[int]) -> tuple[int, int]:
    ph, pw = (patch_size, patch_size) if isinstance(patch_size, int) else tuple(int(p) for p in patch_size)
    if ph < 1 or pw < 1:
        raise ValueError(f"patch_size must be positive, got {patch_size!r}")
    return ph, pw


def _target_yx(
    target_spacing: tuple[float, float] | None, native_yx: tuple[float, float]
) -> tuple[float, float]:
    return native_yx if target_spacing is None else target_spacing


def _check_prob(name: str, p: float) -> float:
    if not 0.0 <= float(p) <= 1.0:
        raise ValueError(f"{name} must be a probability in [0, 1], got {p}")
    return float(p)


# --------------------------------------------------------------------------------------------------------
# Transforms
# --------------------------------------------------------------------------------------------------------


# Every augmentation probability at zero: resampling and random crops only.
NO_AUGMENTATION: dict[str, float] = {
    name: 0.0
    for name in ("p_rotation", "p_scale", "p_noise", "p_blur", "p_brightness", "p_contrast", "p_lowres",
                 "p_gamma", "p_gamma_inverted", "p_mirror")
}  # fmt: skip


class SegmentationTrainTransform:
    """nnU-Net-style 2-D training augmentation of one axial CT slice → one normalised patch.

    Steps: patch location (random, or with probability `oversample_foreground` centred on a random voxel
    of a random foreground class present) → one grid_sample doing resampling to `target_spacing`, crop/pad
    (air / background), rotation (`p_rotation`, angle U(rotation_range)), scaling (`p_scale`,
    U(scale_range)) and mirroring (`p_mirror` per axis) → `normalize_hu` → intensity augmentations on the
    normalised values: Gaussian noise (variance U(0, 0.1)), Gaussian blur (sigma U(0.5, 1)), multiplicative
    brightness U(0.75, 1.25), contrast U(0.75, 1.25) (mean kept, clipped to the previous range),
    low-resolution simulation (nearest downsample by U(1, 2), bilinear upsample), inverted gamma then gamma
    U(0.7, 1.5) (both retaining mean and std).

    `target_spacing`: in-plane (row, col) mm, one value for both axes (`as_target_spacing`); None keeps the
    native spacing. For MedDINOv3 use `spacing_for_patch(median_spacing)` so that the original 512 field of
    view becomes 896 pixels.
    """

    def __init__(
        self,
        patch_size: int | Sequence[int] = 896,
        target_spacing: float | Sequence[float] | None = None,
        oversample_foreground: float = 0.33,
        p_rotation: float = 0.2,
        rotation_range: tuple[float, float] = (-math.pi, math.pi),
        scale_range: tuple[float, float] = (0.7, 1.4),
        p_scale: float = 0.2,
        p_noise: float = 0.1,
        noise_variance: tuple[float, float] = (0.0, 0.1),
        p_blur: float = 0.2,
        blur_sigma: tuple[float, float] = (0.5, 1.0),
        p_brightness: float = 0.15,
        brightness_range: tuple[float, float] = (0.75, 1.25),
        p_contrast: float = 0.15,
        contrast_range: tuple[float, float] = (0.75, 1.25),
        p_lowres: float = 0.25,
        lowres_factor: tuple[float, float] = (1.0, 2.0),
        p_gamma: float = 0.3,
        p_gamma_inverted: float = 0.1,
        gamma_range: tuple[float, float] = (0.7, 1.5),
        p_mirror: float = 0.5,
        normalize: Callable[[torch.Tensor], torch.Tensor] = normalize_hu,
    ):
        arguments = locals()  # the probabilities are checked by name below
        # The model's processor.normalize in practice: training must see the inference-time intensities.
        self.normalize = normalize
        self.patch_hw = _patch_hw(patch_size)
        self.target_spacing = as_target_spacing(target_spacing)
        self.oversample_foreground = _check_prob("oversample_foreground", oversample_foreground)
        for name in NO_AUGMENTATION:  # p_rotation, ..., p_mirror: every augmentation probability
            setattr(self, name, _check_prob(name, arguments[name]))
        self.rotation_range, self.scale_range = rotation_range, scale_range
        self.noise_variance, self.blur_sigma = noise_variance, blur_sigma
        self.brightness_range, self.contrast_range = brightness_range, contrast_range
        self.lowres_factor, self.gamma_range = lowres_factor, gamma_range

    @classmethod
    def from_processor(
        cls, processor: MedDINOv3ImageProcessor, patch_size: int | Sequence[int], **kwargs: Any
    ) -> SegmentationTrainTransform:
        """The training transform at `processor`'s target spacing and HU normalisation, so that training
        sees the intensities and the resolution inference will. `kwargs` are the augmentation settings."""
        return cls(patch_size, processor.target_spacing, normalize=processor.normalize, **kwargs)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(patch_size={self.patch_hw}, target_spacing={self.target_spacing}, "
            f"oversample_foreground={self.oversample_foreground})"
        )

    # ---- patch location ------------------------------------------------------------------------------

    def _crop_start(
        self,
        label: torch.Tensor,
        native_yx: tuple[float, float],
        target_yx: tuple[float, float],
        classes: Sequence[int] | None,
        g: torch.Generator,
    ) -> tuple[int, int]:
        ranges = []
        for extent, p in zip(resampled_extent(label.shape, native_yx, target_yx), self.patch_hw):
            n_res = math.floor(extent + 1e-6)
            ranges.append((min(0, n_res - p), max(0, n_res - p)))  # negative start = image inside padding
        if _rand(g) < self.oversample_foreground:
            if classes is None:
                counts = torch.bincount(label.reshape(-1).to(torch.int64))  # much faster than torch.unique
                classes = [int(c) for c in counts[1:].nonzero().reshape(-1) + 1]
            if classes:
                c = int(classes[_randint(g, 0, len(classes) - 1)])
                voxels = (label == c).nonzero()
                if len(voxels):
                    vy, vx = (int(v) for v in voxels[_randint(g, 0, len(voxels) - 1)])
                    start = []
                    for v, nat, tgt, p, (lo, hi) in zip(
                        (vy, vx), native_yx, target_yx, self.patch_hw, ranges
                    ):
                        centre = (v + 0.5) * nat / tgt  # voxel centre in the resampled grid
                        start.append(min(max(round(centre - p / 2), lo), hi))
                    return start[0], start[1]
        return _randint(g, *ranges[0]), _randint(g, *ranges[1])

    # ---- main ----------------------------------------------------------------------------------------

    def __call__(
        self,
        hu: torch.Tensor | np.ndarray,
        label: torch.Tensor | np.ndarray,
        spacing_yx: Sequence[float],
        generator: torch.Generator | None = None,
        classes: Sequence[int] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Augment one slice.

        Args:
            hu: (H, W) Hounsfield units (int16 or float).
            label: (H, W) class ids.
            spacing_yx: native in-plane spacing (sy, sx) mm.
            generator: source of all randomness (see `sample_generator`); default: torch's global one.
            classes: foreground classes present in `label`, if known (saves a `torch.unique`).

        Returns:
            pixel_values (1, P, P) float32 normalised; labels (P, P) int64.
        """
        hu, label = _as_2d("hu", hu), _as_2d("label", label)
        if hu.shape != label.shape:
            raise ValueError(f"hu shape {tuple(hu.shape)} != label shape {tuple(label.shape)}")
        g = generator if generator is not None else torch.default_generator
        native = _check_spacing(spacing_yx)
        target = _target_yx(self.target_spacing, native)

        start = self._crop_start(label, native, target, classes, g)
        angle = _uniform(g, *self.rotation_range) if _rand(g) < self.p_rotation else 0.0
        scale = _uniform(g, *self.scale_range) if _rand(g) < self.p_scale else 1.0
        flips = (_rand(g) < self.p_mirror, _rand(g) < self.p_mirror)
        geo = _Geometry(self.patch_hw, start, native, target, angle, scale, flips)
        img, lab = _sample(hu, label, geo)
        x = self.normalize(img)
        x = self._intensity(x, g)
        assert lab is not None
        return x[None], lab

    def _intensity(self, x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        """nnU-Net intensity augmentations on a normalised (H, W) patch; order as in nnU-Net v2."""
        if _rand(g) < self.p_noise:
            sd = math.sqrt(_uniform(g, *self.noise_variance))
            x = x + sd * torch.randn(x.shape, generator=g)
        if _rand(g) < self.p_blur:
            sigma = _uniform(g, *self.blur_sigma)
            x = _gaussian_blur(x, sigma, sigma)
        if _rand(g) < self.p_brightness:
            x = x * _uniform(g, *self.brightness_range)
        if _rand(g) < self.p_contrast:
            factor = _uniform(g, *self.contrast_range)
            lo, hi = torch.aminmax(x)
            # (x - mean)·f + mean, clipped to the previous range; written as one fused pass.
            x = (x * factor).add_(x.mean() * (1.0 - factor)).clamp_(lo, hi)
        if _rand(g) < self.p_lowres:
            factor = _uniform(g, *self.lowres_factor)
            small = [max(1, round(s / factor)) for s in x.shape]
            x4 = F.interpolate(x[None, None], size=small, mode="nearest")
            x = F.interpolate(x4, size=tuple(x.shape), mode="bilinear", align_corners=False)[0, 0]
        if _rand(g) < self.p_gamma_inverted:
            x = -self._gamma(-x, g)
        if _rand(g) < self.p_gamma:
            x = self._gamma(x, g)
        return x

    def _gamma(self, x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        lo_g, hi_g = self.gamma_range
        # As batchgenerators: half the time a gamma below 1, else above 1, so both sides are equally likely.
        gamma = _uniform(g, lo_g, 1.0) if (_rand(g) < 0.5 and lo_g < 1) else _uniform(g, max(lo_g, 1.0), hi_g)
        mean, std = _mean_std(x)
        lo, hi = torch.aminmax(x)
        y = _gamma_curve(x, lo, hi, gamma)
        # Mapping y back to [lo, hi] and then restoring mean/std collapses to standardising y directly.
        mean_y, std_y = _mean_std(y)
        return y.sub_(mean_y).mul_(std / (std_y + 1e-8)).add_(mean)


class SegmentationEvalTransform:
    """Deterministic evaluation transform: resample to `target_spacing`, then centre crop/pad to
    `patch_size`, or (patch_size None) pad the bottom/right to a multiple of `pad_multiple` (the image then
    occupies `[:ho, :wo]` with `(ho, wo) = resampled_hw(...)`). Padding is air / background.
    """

    def __init__(
        self,
        patch_size: int | Sequence[int] | None = None,
        target_spacing: float | Sequence[float] | None = None,
        pad_multiple: int = 16,
        normalize: Callable[[torch.Tensor], torch.Tensor] = normalize_hu,
    ):
        self.normalize = normalize
        self.patch_hw = None if patch_size is None else _patch_hw(patch_size)
        self.target_spacing = as_target_spacing(target_spacing)
        self.pad_multiple = int(pad_multiple)

    @classmethod
    def from_processor(
        cls, processor: MedDINOv3ImageProcessor, patch_size: int | Sequence[int] | None = None
    ) -> SegmentationEvalTransform:
        """The evaluation transform at `processor`'s target spacing and HU normalisation."""
        return cls(patch_size, processor.target_spacing, normalize=processor.normalize)

    def resampled_hw(self, shape_hw: Sequence[int], spacing_yx: Sequence[float]) -> tuple[int, int]:
        """Size (rows, cols) of the slice after resampling to the target spacing (the processor's rule)."""
        native = _check_spacing(spacing_yx)
        return resampled_shape(shape_hw, native, _target_yx(self.target_spacing, native))

    def __call__(
        self,
        hu: torch.Tensor | np.ndarray,
        label: torch.Tensor | np.ndarray | None,
        spacing_yx: Sequence[float],
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Returns pixel_values (1, Ho, Wo) float32 normalised and labels (Ho, Wo) int64 (None if no label)."""
        hu = _as_2d("hu", hu)
        lab_in = None if label is None else _as_2d("label", label)
        if lab_in is not None and lab_in.shape != hu.shape:
            raise ValueError(f"hu shape {tuple(hu.shape)} != label shape {tuple(lab_in.shape)}")
        native = _check_spacing(spacing_yx)
        target = _target_yx(self.target_spacing, native)
        res = self.resampled_hw(hu.shape, native)
        if self.patch_hw is None:
            m = self.pad_multiple
            out = tuple(-(-r // m) * m for r in res)
            start = (0, 0)
        else:
            out = self.patch_hw
            start = tuple((r - p) // 2 for r, p in zip(res, out))
        img, lab = _sample(hu, lab_in, _Geometry(out, start, native, target))  # type: ignore[arg-type]
        return self.normalize(img)[None], lab
