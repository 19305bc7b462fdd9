"""Image processor for CT slices in Hounsfield units (HU never passes through 8-bit)."""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from transformers.image_processing_utils import BaseImageProcessor, BatchFeature

# Reference intensity normalisation of MedDINOv3 (docs/method.md §3): clip to [-1000, 1000] HU, then z-score.
CT_CLIP_RANGE: tuple[float, float] = (-1000.0, 1000.0)
CT_MEAN: float = 65.1084213256836
CT_STD: float = 178.01663208007812

# Classic radiology windows as (level, width) in HU.
WINDOW_PRESETS: dict[str, tuple[float, float]] = {
    "abdomen": (40.0, 400.0),
    "liver": (60.0, 150.0),
    "lung": (-600.0, 1500.0),
    "bone": (400.0, 1800.0),
    "brain": (40.0, 80.0),
    "mediastinum": (50.0, 350.0),
}


def as_target_spacing(value: float | Sequence[float] | None) -> tuple[float, float] | None:
    """The in-plane working spacing as one type: a (row, col) tuple in mm (one value means both axes), or None
    for the native spacing."""
    if value is None:
        return None
    values = [float(value)] if isinstance(value, (int, float)) else [float(v) for v in value]
    values = values * 2 if len(values) == 1 else values
    if len(values) != 2 or not all(v > 0 and math.isfinite(v) for v in values):
        raise ValueError(f"target_spacing must be one or two positive mm values or None, got {value!r}")
    return values[0], values[1]


def resampled_extent(
    shape_yx: Sequence[int], spacing_yx: Sequence[float], target_spacing: Sequence[float] | None
) -> tuple[float, float]:
    """(rows, cols) a slice of `shape_yx` pixels at `spacing_yx` mm spans at `target_spacing`, before rounding:
    n · s / t per axis (the slice's field of view is kept); the shape itself without a target spacing."""
    if target_spacing is None:
        return float(shape_yx[0]), float(shape_yx[1])
    rows, cols = (n * s / t for n, s, t in zip(shape_yx, spacing_yx, target_spacing))
    return rows, cols


def resampled_shape(
    shape_yx: Sequence[int], spacing_yx: Sequence[float], target_spacing: Sequence[float] | None
) -> tuple[int, int]:
    """(rows, cols) after resampling to `target_spacing`: `resampled_extent` rounded, at least one pixel."""
    rows, cols = (max(1, round(e)) for e in resampled_extent(shape_yx, spacing_yx, target_spacing))
    return rows, cols


def spacing_for_patch(original_spacing: float, original_patch: int = 512, patch_size: int = 896) -> float:
    """The in-plane spacing that turns an `original_patch` field of view into `patch_size` pixels.

    The "896 rule" of the reference fine-tuning (docs/method.md §3): 0.78125 mm at 512 px becomes 0.4464 mm.
    """
    return float(original_spacing) * original_patch / patch_size


def normalize_hu(
    hu: torch.Tensor,
    clip_range: tuple[float, float] = CT_CLIP_RANGE,
    mean: float = CT_MEAN,
    std: float = CT_STD,
) -> torch.Tensor:
    """Clip HU to `clip_range` and z-score with the reference statistics. Any shape; returns float32."""
    hu = hu.to(torch.float32)
    return (hu.clamp(clip_range[0], clip_range[1]) - mean) / (std + 1e-8)


def resolve_window(window: str | Sequence[float]) -> tuple[float, float]:
    """A preset name or (level, width) → (low, high) HU."""
    if isinstance(window, str):
        if window.lower() not in WINDOW_PRESETS:
            raise ValueError(f"unknown window preset {window!r}; choose from {sorted(WINDOW_PRESETS)}")
        level, width = WINDOW_PRESETS[window.lower()]
    else:
        level, width = (float(v) for v in window)
    if width <= 0:
        raise ValueError(f"window width must be positive, got {width}")
    return level - width / 2, level + width / 2


def read_dicom_slice(source: Any) -> tuple[np.ndarray, tuple[float, float] | None]:
    """A pydicom dataset or DICOM file path → (HU float32 (H, W), pixel spacing (row, col) mm or None)."""
    try:
        import pydicom
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError("reading DICOM needs pydicom: pip install 'meddinov3-hf[dicom]'") from err
    name = str(source) if isinstance(source, (str, os.PathLike)) else "<pydicom dataset>"
    try:
        dataset = source if isinstance(source, pydicom.Dataset) else pydicom.dcmread(source)
        pixels = dataset.pixel_array
    except Exception as err:
        raise ValueError(f"{name}: cannot read a DICOM image ({err})") from err
    if pixels.ndim != 2:
        raise ValueError(f"{name}: expected one 2-D DICOM slice, got pixel data of shape {pixels.shape}")
    slope = float(getattr(dataset, "RescaleSlope", 1.0) or 1.0)
    intercept = float(getattr(dataset, "RescaleIntercept", 0.0) or 0.0)
    spacing = getattr(dataset, "PixelSpacing", None)
    spacing = (float(spacing[0]), float(spacing[1])) if spacing is not None else None
    return pixels.astype(np.float32) * slope + intercept, spacing


def _is_dicom_like(image: Any) -> bool:
    if isinstance(image, (str, os.PathLike)):
        return True
    return type(image).__module__.startswith("pydicom")


class MedDINOv3ImageProcessor(BaseImageProcessor):
    r"""
    Turns CT slices in Hounsfield units into MedDINOv3 `pixel_values`, and logits back into label maps.

    Inputs: numpy arrays or torch tensors of shape (H, W), (B, H, W) or (B, 1, H, W), integer or float HU; lists
    of those; pydicom datasets or DICOM file paths (RescaleSlope/RescaleIntercept applied). All arithmetic is
    float32 torch: HU never passes through 8-bit.

    Args:
        clip_range (`tuple[float, float]`, defaults to (-1000, 1000)): HU range kept before normalisation.
        window (`str` or `(level, width)`, *optional*): a preset (abdomen, liver, lung, bone, brain,
            mediastinum) or custom window; overrides `clip_range` and, unless given, sets mean = level and
            std = width / 2 (values in [-1, 1]).
        image_mean / image_std (`float`): z-score statistics; defaults are MedDINOv3's CT statistics.
        size (`dict`, *optional*): `{"height": h, "width": w}` to resize every slice to.
        target_spacing (`tuple[float, float]`, *optional*): in-plane working spacing (row, col) in mm (one value
            means both axes); slices with a known spacing (DICOM, or `spacing=` at call time) are resampled to it
            when `size` is not set.
        size_divisor (`int`, defaults to 16): otherwise slices are resized to the nearest multiple of it.
        num_output_channels (`int`, defaults to 1): 1 for MedDINOv3 (it folds the patch kernel); 3 repeats the
            channel for models that need RGB-shaped input.
    """

    model_input_names = ["pixel_values"]

    def __init__(
        self,
        clip_range: Sequence[float] = CT_CLIP_RANGE,
        window: str | Sequence[float] | None = None,
        image_mean: float | None = None,
        image_std: float | None = None,
        size: dict[str, int] | None = None,
        target_spacing: Sequence[float] | None = None,
        size_divisor: int = 16,
        num_output_channels: int = 1,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.window = list(window) if window is not None and not isinstance(window, str) else window
        if window is not None:
            low, high = resolve_window(window)
            clip_range = (low, high)
            image_mean = (low + high) / 2 if image_mean is None else image_mean
            image_std = (high - low) / 2 if image_std is None else image_std
        self.clip_range = [float(clip_range[0]), float(clip_range[1])]
        if self.clip_range[0] >= self.clip_range[1]:
            raise ValueError(f"clip_range must be increasing, got {self.clip_range}")
        self.image_mean = float(CT_MEAN if image_mean is None else image_mean)
        self.image_std = float(CT_STD if image_std is None else image_std)
        if size is not None and set(size) != {"height", "width"}:
            raise ValueError(f"size must be {{'height': h, 'width': w}}, got {size}")
        self.size = dict(size) if size is not None else None
        self.target_spacing = as_target_spacing(target_spacing)
        self.size_divisor = int(size_divisor)
        if num_output_channels not in (1, 3):
            raise ValueError(f"num_output_channels must be 1 or 3, got {num_output_channels}")
        self.num_output_channels = int(num_output_channels)

    # -- input handling ---------------------------------------------------------------------------------------
    def _to_slices(self, images: Any, spacing: Any) -> list[tuple[torch.Tensor, tuple[float, float] | None]]:
        """Any supported input → list of (HU float32 (H, W), spacing or None)."""
        if isinstance(images, (list, tuple)) and not (
            len(images) == 2 and all(isinstance(v, (int, float)) for v in images)
        ):
            spacings = spacing if isinstance(spacing, list) else [spacing] * len(images)
            if len(spacings) != len(images):
                raise ValueError(f"got {len(images)} images but {len(spacings)} spacings")
            return [item for image, sp in zip(images, spacings) for item in self._to_slices(image, sp)]
        if _is_dicom_like(images):
            hu, dicom_spacing = read_dicom_slice(images)
            return [(torch.from_numpy(hu), spacing or dicom_spacing)]
        if isinstance(images, np.ndarray):
            if images.dtype == object or not np.issubdtype(images.dtype, np.number):
                raise ValueError(f"CT slices must be numeric arrays in HU, got dtype {images.dtype}")
            images = torch.from_numpy(np.ascontiguousarray(images))
        if not isinstance(images, torch.Tensor):
            raise TypeError(
                f"unsupported input {type(images).__name__}: pass HU arrays/tensors, pydicom datasets or DICOM paths"
            )
        if images.is_complex() or images.dtype == torch.bool:
            raise ValueError(f"CT slices must be real-valued HU, got dtype {images.dtype}")
        if images.ndim == 4 and images.shape[1] == 1:
            images = images[:, 0]
        if images.ndim == 2:
            images = images[None]
        if images.ndim != 3:
            raise ValueError(
                f"expected a CT slice (H, W) or a batch (B, H, W) / (B, 1, H, W), got shape {tuple(images.shape)}"
            )
        images = images.to(torch.float32)
        if not torch.isfinite(images).all():
            raise ValueError("CT slice contains NaN or infinite values")
        # CT always has negative HU (air, fat); a picture in [0, 255] is almost certainly not HU.
        if images.numel() and images.min() >= 0 and images.max() <= 255:
            warnings.warn(
                "input values lie in [0, 255]: this looks like an 8-bit picture, not CT in Hounsfield units",
                stacklevel=3,
            )
        return [(image, spacing) for image in images]

    def _output_size(self, height: int, width: int, spacing: tuple[float, float] | None) -> tuple[int, int]:
        if self.size is not None:
            return self.size["height"], self.size["width"]
        if spacing is not None:
            height, width = resampled_extent((height, width), spacing, self.target_spacing)
        divisor = self.size_divisor
        return max(divisor, round(height / divisor) * divisor), max(divisor, round(width / divisor) * divisor)

    # -- public API -------------------------------------------------------------------------------------------
    def resampled_shape(self, shape_yx: Sequence[int], spacing_yx: Sequence[float]) -> tuple[int, int]:
        """In-plane size (rows, cols) of a slice at `spacing_yx` after resampling to `target_spacing` (unchanged
        without one); training transforms and whole-volume inference size their grids with this rule."""
        return resampled_shape(shape_yx, spacing_yx, self.target_spacing)

    def normalize(self, hu: torch.Tensor) -> torch.Tensor:
        """Clip to the window and z-score; any shape, float32 out."""
        return normalize_hu(hu, tuple(self.clip_range), self.image_mean, self.image_std)

    def resize_hu(self, hu: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """(..., H, W) float HU → (..., h, w), bilinear with antialiasing (no 8-bit round trip)."""
        if tuple(hu.shape[-2:]) == tuple(size):
            return hu
        lead = hu.shape[:-2]
        flat = hu.reshape(-1, 1, *hu.shape[-2:]).float()
        out = F.interpolate(flat, size=size, mode="bilinear", antialias=True, align_corners=False)
        return out.reshape(*lead, *size)

    def preprocess(
        self,
        images: Any,
        spacing: Sequence[float] | list[Sequence[float]] | None = None,
        return_tensors: str | None = "pt",
        **kwargs,
    ) -> BatchFeature:
        """CT slices → `BatchFeature(pixel_values=(B, C, h, w) float32)`; also `original_sizes` (B, 2) when
        `return_original_sizes=True` (for `post_process_semantic_segmentation`)."""
        return_original_sizes = kwargs.pop("return_original_sizes", False)
        if kwargs:
            raise TypeError(f"unexpected arguments {sorted(kwargs)}")
        slices = self._to_slices(images, spacing)
        if not slices:
            raise ValueError("no CT slices given")
        processed, original_sizes = [], []
        for hu, slice_spacing in slices:
            original_sizes.append(tuple(hu.shape))
            size = self._output_size(hu.shape[0], hu.shape[1], slice_spacing)
            processed.append(self.normalize(self.resize_hu(hu, size)))
        shapes = {tuple(p.shape) for p in processed}
        if len(shapes) > 1:
            raise ValueError(
                f"slices resize to different sizes {sorted(shapes)}; set `size` to batch them together"
            )
        pixel_values = torch.stack(processed)[:, None]
        if self.num_output_channels == 3:
            pixel_values = pixel_values.expand(-1, 3, -1, -1).contiguous()
        data = {"pixel_values": pixel_values}
        if return_original_sizes:
            data["original_sizes"] = torch.tensor(original_sizes)
        if return_tensors in ("np", "numpy"):
            data = {k: v.numpy() for k, v in data.items()}
        elif return_tensors not in ("pt", None):
            raise ValueError(f"return_tensors must be 'pt' or 'np', got {return_tensors!r}")
        return BatchFeature(data=data)

    def post_process_semantic_segmentation(
        self, outputs: Any, target_sizes: Sequence[Sequence[int]] | None = None
    ) -> list[torch.Tensor]:
        """Model outputs (logits (B, K, h, w)) → list of (H, W) int64 label maps, logits bilinearly resized to
        each `target_sizes[i]` before the argmax."""
        logits = outputs.logits if hasattr(outputs, "logits") else outputs
        if target_sizes is not None and len(target_sizes) != logits.shape[0]:
            raise ValueError(f"{len(target_sizes)} target sizes for a batch of {logits.shape[0]} logits")
        maps = []
        for index in range(logits.shape[0]):
            item = logits[index : index + 1].float()
            if target_sizes is not None and tuple(target_sizes[index]) != tuple(item.shape[-2:]):
                size = tuple(int(v) for v in target_sizes[index])
                item = F.interpolate(item, size=size, mode="bilinear", align_corners=False)
            maps.append(item[0].argmax(dim=0))
        return maps


__all__ = ["MedDINOv3ImageProcessor", "normalize_hu", "WINDOW_PRESETS", "CT_MEAN", "CT_STD", "CT_CLIP_RANGE"]
