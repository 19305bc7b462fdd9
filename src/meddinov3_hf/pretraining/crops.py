"""Multi-crop augmentation of CT slices in Hounsfield units (docs/method.md §3, §5).

Every crop goes: random-resized crop in HU → flips → Gaussian blur → Gaussian noise → level shift →
clip to a (jittered) window → gamma inside the window → z-score with the reference statistics (through
`normalize_hu`). Blur and noise act on HU like a reconstruction kernel and quantum noise would, before the
window is applied, which is how CT intensities reach a viewer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from meddinov3_hf.data.augment import _gamma_curve, _gaussian_blur, _rand, _randint, _uniform
from meddinov3_hf.image_processing_meddinov3 import CT_CLIP_RANGE, normalize_hu

__all__ = ["DINO_BLUR_SIGMA", "MultiCropAugmentation", "collate_multicrop"]

# DINO's Gaussian blur radius range (dinov3/data/transforms.py `GaussianBlur`: radius_min 0.1, radius_max 2.0).
DINO_BLUR_SIGMA = (0.1, 2.0)


@dataclass
class _CropParams:
    """Everything random about one crop, so the same crop can be rendered at two sizes."""

    box: tuple[int, int, int, int]  # top, left, height, width in input pixels
    hflip: bool
    vflip: bool
    blur_sigma: float | None  # in output pixels at `size`
    noise_std: float | None  # HU
    level_shift: float  # HU
    window: tuple[float, float]  # clip range in HU
    gamma: float | None
    size: int


class MultiCropAugmentation:
    """DINO multi-crop for one CT slice in HU: `(H, W)` (or `(1, H, W)`) float tensor of any size.

    __call__(image, generator=None, global_size=None, local_size=None, gram_size=None) →
        {"global": (n_global, 1, g, g), "local": (n_local, 1, l, l)} float32 normalised crops, plus
        "global_gram": (n_global, 1, s, s) when a gram size is set: the same global crops (same boxes, flips
        and intensity draws, blur sigma scaled with the size) rendered at the Gram teacher's resolution;
        its noise is an independent draw of the same strength.
    Sizes given to __call__ override the constructor's for that call (stage 3 samples them per step).

    Probabilities (per crop): blur 1.0 for global crop 1, 0.1 for global crop 2 and 0.5 for local crops,
    as in DINO; horizontal flip 0.5; vertical flip 0 by default (the anterior–posterior orientation of an
    axial slice is fixed, a flipped one is not a realistic view); window jitter 0.8 (each clip bound moved
    by up to ±window_jitter_hu, plus a level shift of up to ±level_shift_hu); gamma 0.3; noise 0.2.
    Deterministic under a torch.Generator (or the global torch seed).
    """

    def __init__(
        self,
        global_size: int = 224,
        local_size: int = 96,
        n_local: int = 8,
        global_scale: tuple[float, float] = (0.32, 1.0),
        local_scale: tuple[float, float] = (0.05, 0.32),
        n_global: int = 2,
        ratio: tuple[float, float] = (3 / 4, 4 / 3),
        gram_size: int | None = None,
        hflip_p: float = 0.5,
        vflip_p: float = 0.0,
        global_blur_p: tuple[float, ...] = (1.0, 0.1),
        local_blur_p: float = 0.5,
        blur_sigma: tuple[float, float] = DINO_BLUR_SIGMA,
        noise_p: float = 0.2,
        noise_std_hu: tuple[float, float] = (0.0, 25.0),
        window_p: float = 0.8,
        window_jitter_hu: float = 150.0,
        level_shift_hu: float = 20.0,
        gamma_p: float = 0.3,
        gamma_range: tuple[float, float] = (0.7, 1.5),
        clip_range: tuple[float, float] = CT_CLIP_RANGE,
    ) -> None:
        self.global_size, self.local_size, self.gram_size = global_size, local_size, gram_size
        self.n_global, self.n_local = n_global, n_local
        self.global_scale, self.local_scale = global_scale, local_scale
        self.log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
        self.hflip_p, self.vflip_p = hflip_p, vflip_p
        self.global_blur_p, self.local_blur_p, self.blur_sigma = global_blur_p, local_blur_p, blur_sigma
        self.noise_p, self.noise_std_hu = noise_p, noise_std_hu
        self.window_p, self.window_jitter_hu, self.level_shift_hu = window_p, window_jitter_hu, level_shift_hu
        self.gamma_p, self.gamma_range = gamma_p, gamma_range
        self.clip_range = clip_range

    # ---- random draws (data/augment.py's helpers; a coin of probability 0 draws nothing) -------------
    def _sample_box(
        self, height: int, width: int, scale: tuple[float, float], g: torch.Generator | None
    ) -> tuple[int, int, int, int]:
        """Random-resized-crop box: area fraction in `scale`, aspect ratio log-uniform in `ratio`."""
        for _ in range(10):
            area = height * width * _uniform(g, *scale)
            aspect = math.exp(_uniform(g, *self.log_ratio))
            w, h = round(math.sqrt(area * aspect)), round(math.sqrt(area / aspect))
            if 0 < w <= width and 0 < h <= height:
                top, left = _randint(g, 0, height - h), _randint(g, 0, width - w)
                return top, left, h, w
        # Fallback: the largest centred box within the allowed aspect ratios.
        lo, hi = math.exp(self.log_ratio[0]), math.exp(self.log_ratio[1])
        aspect = width / height
        w, h = width, height
        if aspect < lo:
            h = min(height, max(1, round(width / lo)))
        elif aspect > hi:
            w = min(width, max(1, round(height * hi)))
        return (height - h) // 2, (width - w) // 2, h, w

    def _sample_params(
        self,
        hw: tuple[int, int],
        scale: tuple[float, float],
        size: int,
        blur_p: float,
        g: torch.Generator | None,
    ) -> _CropParams:
        box = self._sample_box(*hw, scale, g)
        hflip, vflip = _coin(self.hflip_p, g), _coin(self.vflip_p, g)
        blur_sigma = _uniform(g, *self.blur_sigma) if _coin(blur_p, g) else None
        noise_std = _uniform(g, *self.noise_std_hu) if _coin(self.noise_p, g) else None
        level_shift, window = 0.0, self.clip_range
        if _coin(self.window_p, g):
            j = self.window_jitter_hu
            level_shift = _uniform(g, -self.level_shift_hu, self.level_shift_hu)
            window = (self.clip_range[0] + _uniform(g, -j, j), self.clip_range[1] + _uniform(g, -j, j))
        gamma = None
        if _coin(self.gamma_p, g):
            gamma = math.exp(_uniform(g, math.log(self.gamma_range[0]), math.log(self.gamma_range[1])))
        return _CropParams(box, hflip, vflip, blur_sigma, noise_std, level_shift, window, gamma, size)

    # ---- rendering ---------------------------------------------------------------------------------
    def _render(
        self, image: torch.Tensor, p: _CropParams, size: int, g: torch.Generator | None
    ) -> torch.Tensor:
        """HU slice `(H, W)` → normalised crop `(1, size, size)`."""
        top, left, h, w = p.box
        crop = image[top : top + h, left : left + w][None, None]
        x = F.interpolate(crop, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
        flip_dims = [d for d, on in ((-1, p.hflip), (-2, p.vflip)) if on]
        if flip_dims:
            x = torch.flip(x, dims=flip_dims)
        if p.blur_sigma is not None:
            sigma = p.blur_sigma * size / p.size  # the same blur in image space at any size
            x = _gaussian_blur(x[0, 0], sigma, sigma)[None, None]
        if p.noise_std is not None:
            x = x + p.noise_std * torch.randn(x.shape, generator=g)
        x = x + p.level_shift
        lo, hi = p.window
        x = x.clamp(lo, hi)
        if p.gamma is not None:
            x = lo + (hi - lo) * _gamma_curve(x, lo, hi, p.gamma)
        return normalize_hu(x, clip_range=(lo, hi))[0]

    def __call__(
        self,
        image: torch.Tensor,
        generator: torch.Generator | None = None,
        global_size: int | None = None,
        local_size: int | None = None,
        gram_size: int | None = None,
    ) -> dict[str, torch.Tensor]:
        image = torch.as_tensor(image).to(torch.float32)
        if image.ndim == 3 and image.shape[0] == 1:
            image = image[0]
        if image.ndim != 2:
            raise ValueError(f"expected a (H, W) slice, got shape {tuple(image.shape)}")
        g = generator
        g_size = global_size or self.global_size
        l_size = local_size or self.local_size
        s_size = gram_size or self.gram_size
        hw = (image.shape[0], image.shape[1])

        global_params = [
            self._sample_params(
                hw, self.global_scale, g_size, self.global_blur_p[min(i, len(self.global_blur_p) - 1)], g
            )
            for i in range(self.n_global)
        ]
        local_params = [
            self._sample_params(hw, self.local_scale, l_size, self.local_blur_p, g)
            for _ in range(self.n_local)
        ]
        # Gram crops are rendered last so switching them on leaves the student crops' random draws unchanged.
        out = {"global": torch.stack([self._render(image, p, g_size, g) for p in global_params])}
        local = [self._render(image, p, l_size, g) for p in local_params]
        out["local"] = torch.stack(local) if local else image.new_zeros((0, 1, l_size, l_size))
        if s_size is not None:
            out["global_gram"] = torch.stack([self._render(image, p, s_size, g) for p in global_params])
        return out


def collate_multicrop(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack per-image crop dicts: `(n_crops, 1, s, s)` per image → `(n_crops, B, 1, s, s)`.

    Crop keys ("global", "local", "global_gram") are stacked along a new batch dim 1; any other key is
    returned as a list (or stacked along dim 0 when all values are tensors of one shape).
    """
    out: dict[str, Any] = {}
    for key in samples[0]:
        values = [s[key] for s in samples]
        if key in ("global", "local", "global_gram"):
            out[key] = torch.stack(values, dim=1)
        elif all(torch.is_tensor(v) for v in values) and len({tuple(v.shape) for v in values}) == 1:
            out[key] = torch.stack(values)
        else:
            out[key] = values
    return out


def _coin(p: float, g: torch.Generator | None) -> bool:
    return p > 0 and _rand(g) < p
