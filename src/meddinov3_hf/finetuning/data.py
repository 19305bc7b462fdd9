"""Torch datasets over the cached axial-slice dataset, for fine-tuning with `transformers.Trainer`.

- `TrainSliceDataset`: an "epoch" is a fixed number of random patches (nnU-Net: 250 iterations). Sample `i`
  of epoch `e` (slice choice, foreground oversampling, augmentation) depends only on `(seed, e, i)`, so a run
  resumed from a checkpoint sees exactly the patches an uninterrupted run would, whatever the workers.
- `EpochSampler`: yields `e * n + i`; the Trainer tells it the epoch through `set_epoch`.
- `EvalSliceDataset`: deterministic centre crops of validation slices at the working spacing.
- `derive_target_spacing`: the "896 rule" (docs/method.md §3) for the processor's `target_spacing`.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from typing import Any

import datasets
import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from ..data.augment import (
    NO_AUGMENTATION,
    SegmentationEvalTransform,
    SegmentationTrainTransform,
    sample_generator,
)
from ..data.slices import decode_row
from ..image_processing_meddinov3 import MedDINOv3ImageProcessor, as_target_spacing, spacing_for_patch

__all__ = [
    "EpochSampler",
    "EvalSliceDataset",
    "TrainSliceDataset",
    "collate_segmentation",
    "derive_target_spacing",
    "select_cases",
]


def select_cases(slices: datasets.Dataset, case_ids: Sequence[str]) -> datasets.Dataset:
    """Rows of `slices` whose case is in `case_ids` (one cached build serves every fold)."""
    wanted = set(case_ids)
    missing = wanted - set(slices.unique("case_id"))
    if missing:
        raise KeyError(f"cases {sorted(missing)[:10]} are not in the slice dataset")
    rows = [i for i, c in enumerate(slices["case_id"]) if c in wanted]
    return slices.select(rows)


def _case_geometry(slices: datasets.Dataset) -> list[tuple[int, int, float, float]]:
    """(height, width, sy, sx) per case, from its first row (all slices of a case share them)."""
    first: dict[str, int] = {}
    for row, case in enumerate(slices["case_id"]):
        first.setdefault(case, row)
    table = slices.select(list(first.values())).select_columns(["height", "width", "spacing"])
    return [
        (int(r["height"]), int(r["width"]), float(r["spacing"][1]), float(r["spacing"][2])) for r in table
    ]


def derive_target_spacing(
    slices: datasets.Dataset, patch_size: int, reference_patch_cap: int = 512
) -> tuple[float, float]:
    """The "896 rule": (row, col) spacing = median spacing × min(median shape, cap) / patch_size per axis.

    The median in-plane shape stands for the 2-D patch nnU-Net would plan (the whole slice, capped), so the
    field of view that patch covered is now sampled with `patch_size` pixels (0.78 mm at 512 → 0.45 mm)."""
    geometry = np.asarray(_case_geometry(slices), dtype=np.float64)
    if not len(geometry):
        raise ValueError("cannot derive a working spacing from an empty slice dataset")
    shape = np.minimum(np.median(geometry[:, :2], axis=0), reference_patch_cap)
    spacing = np.median(geometry[:, 2:], axis=0)
    rows, cols = (float(spacing_for_patch(s, n, patch_size)) for s, n in zip(spacing, shape))
    return rows, cols


def _working_processor(
    processor: MedDINOv3ImageProcessor | None, target_spacing: float | Sequence[float] | None
) -> MedDINOv3ImageProcessor:
    """`processor`, or a default one (the reference HU normalisation) at `target_spacing`; not both."""
    if processor is None:
        return MedDINOv3ImageProcessor(target_spacing=as_target_spacing(target_spacing))
    if target_spacing is not None:
        raise ValueError("pass either a processor or a target_spacing: the processor carries its own spacing")
    return processor


class TrainSliceDataset(Dataset):
    """Random training patches. Index `e * len(self) + i` (see `EpochSampler`) is sample `i` of epoch `e`.

    With probability `oversample_foreground` a sample picks a foreground class uniformly, a slice containing
    it uniformly, and a patch centred on a random voxel of that class (nnU-Net's oversampling); otherwise a
    uniformly random slice and patch location.

    The transforms are built from `processor` (the model's: its target spacing and HU normalisation), or,
    without one, from a default processor at `target_spacing`."""

    def __init__(
        self,
        slices: datasets.Dataset,
        samples_per_epoch: int,
        patch_size: int,
        target_spacing: float | tuple[float, float] | None = None,
        seed: int = 0,
        oversample_foreground: float = 0.33,
        augment: bool = True,
        processor: MedDINOv3ImageProcessor | None = None,
    ):
        if len(slices) == 0:
            raise ValueError("the training slice dataset is empty")
        processor = _working_processor(processor, target_spacing)
        self.slices = slices
        self.samples_per_epoch = int(samples_per_epoch)
        self.seed = int(seed)
        self.oversample_foreground = float(oversample_foreground)
        extra = {} if augment else NO_AUGMENTATION
        # Two transforms so that the oversampling decision is made once, here, not again in the transform.
        self.foreground_transform = SegmentationTrainTransform.from_processor(
            processor, patch_size, oversample_foreground=1.0, **extra
        )
        self.random_transform = SegmentationTrainTransform.from_processor(
            processor, patch_size, oversample_foreground=0.0, **extra
        )
        by_class: dict[int, list[int]] = {}
        for row, classes in enumerate(slices["classes"]):
            for c in classes:
                by_class.setdefault(int(c), []).append(row)
        self.class_ids = sorted(by_class)
        self.rows_by_class = {c: np.asarray(rows, dtype=np.int64) for c, rows in by_class.items()}

    def __len__(self) -> int:
        return self.samples_per_epoch

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        epoch, position = divmod(int(index), self.samples_per_epoch)
        g = sample_generator(self.seed, epoch, position)
        if self.class_ids and float(torch.rand((), generator=g)) < self.oversample_foreground:
            c = self.class_ids[int(torch.randint(len(self.class_ids), (), generator=g))]
            rows = self.rows_by_class[c]
            row = int(rows[int(torch.randint(len(rows), (), generator=g))])
            pixel_values, labels = self._transform(self.foreground_transform, row, g, classes=[c])
        else:
            row = int(torch.randint(len(self.slices), (), generator=g))
            pixel_values, labels = self._transform(self.random_transform, row, g)
        return {"pixel_values": pixel_values, "labels": labels}

    def _transform(
        self,
        transform: SegmentationTrainTransform,
        row: int,
        g: torch.Generator,
        classes: list[int] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        example = self.slices[row]
        hu, label, spacing = decode_row(example)
        # `classes` forces the class the patch is centred on.
        classes = classes if classes is not None else example["classes"]
        return transform(torch.from_numpy(hu.copy()), torch.from_numpy(label.copy()), spacing, g, classes)


class EpochSampler(Sampler[int]):
    """In-order indices `epoch * n + i`, i < n: the dataset derives each sample from (seed, epoch, i).

    In-order is enough because the samples themselves are random; it also makes resuming a pure skip."""

    def __init__(self, num_samples: int):
        self.num_samples = int(num_samples)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.num_samples

    def __iter__(self) -> Iterator[int]:
        offset = self.epoch * self.num_samples
        return iter(range(offset, offset + self.num_samples))


class EvalSliceDataset(Dataset):
    """Validation slices, resampled to the working spacing and centre cropped/padded to the patch.

    `max_slices` keeps an evenly spaced subset (deterministic) so that evaluation stays cheap. The transform
    is built from `processor` as in `TrainSliceDataset`."""

    def __init__(
        self,
        slices: datasets.Dataset,
        patch_size: int,
        target_spacing: float | tuple[float, float] | None = None,
        max_slices: int | None = None,
        processor: MedDINOv3ImageProcessor | None = None,
    ):
        rows = np.arange(len(slices))
        if max_slices is not None and len(rows) > max_slices:
            rows = np.unique(np.linspace(0, len(rows) - 1, max_slices).round().astype(np.int64))
        self.slices = slices
        self.rows = rows
        processor = _working_processor(processor, target_spacing)
        self.transform = SegmentationEvalTransform.from_processor(processor, patch_size)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        hu, label, spacing = decode_row(self.slices[int(self.rows[index])])
        pixel_values, labels = self.transform(
            torch.from_numpy(hu.copy()), torch.from_numpy(label.copy()), spacing
        )
        return {"pixel_values": pixel_values, "labels": labels}


def collate_segmentation(batch: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    """Stack `pixel_values` (B, 1, P, P) float32 and `labels` (B, P, P) int64."""
    return {
        "pixel_values": torch.stack([b["pixel_values"] for b in batch]),
        "labels": torch.stack([b["labels"] for b in batch]).long(),
    }


def samples_per_epoch(
    iterations_per_epoch: int, per_device_batch_size: int, world_size: int, accumulation: int
) -> int:
    """Samples one epoch holds so that each process makes `iterations_per_epoch` optimizer steps."""
    return max(1, iterations_per_epoch) * per_device_batch_size * max(1, world_size) * max(1, accumulation)


def isotropic(spacing: Sequence[float]) -> float:
    """The training transform samples isotropically in-plane; use the coarser axis so that the reference
    field of view still fits the patch on both axes (both axes are equal for almost every CT dataset)."""
    values = [float(s) for s in spacing]
    if not all(v > 0 and math.isfinite(v) for v in values):
        raise ValueError(f"spacing must be positive, got {values}")
    return max(values)
