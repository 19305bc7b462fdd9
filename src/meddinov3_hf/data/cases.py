"""The dataset interface that fine-tuning uses: labelled CT cases, nothing about how they are stored.

`build_slice_dataset` (the slice cache) and `VolumeValidator` (whole-volume validation) need only what
`SegmentationCases` declares, so any object with these members can be fine-tuned on and validated. The
package's own implementation is `meddinov3_hf.data.nnunet.NnUNetDataset`; other layouts (Medical
Segmentation Decathlon, TotalSegmentator) are converted into nnU-Net raw format by
`meddinov3_hf.data.conversion`.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Protocol, runtime_checkable

import numpy as np

if TYPE_CHECKING:
    from meddinov3_hf.volumes.io import CTVolume

__all__ = ["SegmentationCases"]


@runtime_checkable
class SegmentationCases(Protocol):
    """Labelled CT cases.

    Attributes:
        root: the dataset's folder; `files()` are below it (the slice cache keys on their relative paths).
        case_ids: ids of the cases having both an image and a label map, sorted.
        id2label: class id -> name, background (0) included, the ignore label excluded.
        ignore_label: id of voxels scored neither as hits nor as errors, or None.
        file_ending: file ending of label maps written for this dataset (".nii.gz" or ".nii").
    """

    root: Path
    case_ids: list[str]
    id2label: dict[int, str]
    ignore_label: int | None
    file_ending: str

    def image_path(self, case_id: str) -> Path:
        """The image file of a case; KeyError naming the dataset for an unknown id."""
        ...

    def label_path(self, case_id: str) -> Path:
        """The label map of a case; KeyError naming the dataset for an unknown id."""
        ...

    def files(self, case_ids: Iterable[str] | None = None) -> list[Path]:
        """Every file the cases' content depends on (metadata, images, labels), for cache keys."""
        ...

    def load_case(self, case_id: str) -> tuple[CTVolume, np.ndarray]:
        """(CTVolume with HU and spacing, integer label map (Z, Y, X)), both in canonical orientation."""
        ...
