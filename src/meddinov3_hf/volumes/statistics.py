"""Per-structure statistics of a label map over its CT: size, volume, HU under the mask, extent, truncation.

`compute_statistics` returns, for every named structure (background excluded), the voxel count, the volume in
ml, mean / std (population) / min / max / median HU of the input under the mask, the bounding box in voxels
(canonical ``z, y, x`` index ranges) and in mm (its size along those axes and its corners in the scanner's RAS
world coordinates), and whether the structure touches the scan's first or last axial slice, in which case it is
probably cut off by the field of view (`truncated`). Structures absent from the map are listed with count 0.
"""

from __future__ import annotations

import csv
import io
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage

from ..files import atomic_path
from .io import CTVolume

__all__ = ["CSV_COLUMNS", "compute_statistics", "voxel_volume_mm3", "write_statistics"]

CSV_COLUMNS = [
    "id", "name", "voxels", "volume_ml", "hu_mean", "hu_std", "hu_min", "hu_max", "hu_median",
    "bbox_z0", "bbox_z1", "bbox_y0", "bbox_y1", "bbox_x0", "bbox_x1", "size_z_mm", "size_y_mm", "size_x_mm",
    "ras_min_x", "ras_min_y", "ras_min_z", "ras_max_x", "ras_max_y", "ras_max_z",
    "touches_first_slice", "touches_last_slice", "truncated",
]  # fmt: skip


def voxel_volume_mm3(volume: CTVolume) -> float:
    """Volume of one voxel in mm³: the absolute determinant of the voxel-to-world matrix (exact for sheared,
    gantry-tilted grids, where the product of the axis spacings overestimates it)."""
    return float(abs(np.linalg.det(volume.affine[:3, :3])))


def _empty(label: int, name: str) -> dict[str, Any]:
    return {
        "id": label, "name": name, "voxels": 0, "volume_ml": 0.0,
        "hu_mean": None, "hu_std": None, "hu_min": None, "hu_max": None, "hu_median": None,
        "bbox_index_zyx": None, "bbox_size_mm_zyx": None, "bbox_ras_min": None, "bbox_ras_max": None,
        "touches_first_slice": False, "touches_last_slice": False, "truncated": False,
    }  # fmt: skip


def compute_statistics(
    labels_zyx: np.ndarray, volume: CTVolume, names: Mapping[int, str] | None = None
) -> dict[str, dict[str, Any]]:
    """Statistics of each structure of a canonical ``(Z, Y, X)`` label map on ``volume``'s grid.

    Args:
        labels_zyx: integer labels in canonical order (as `VolumeSegmenter.segment` returns them).
        volume: the CT they were computed on (HU, spacing, affine).
        names: ``{id: name}``; default: the ids present, named by their number.

    Returns:
        ``{name: {"id", "voxels", "volume_ml", "hu_mean", ..., "truncated"}}`` in id order.
    """
    labels = np.asarray(labels_zyx)
    if labels.shape != volume.hu.shape:
        raise ValueError(
            f"{volume.source}: label map shape {labels.shape} differs from the volume {volume.hu.shape}"
        )
    if names is None:
        names = {int(v): str(int(v)) for v in np.unique(labels) if v != 0}
    spacing = np.asarray(volume.spacing, dtype=np.float64)
    affine = volume.canonical_affine  # canonical (x, y, z) index -> RAS mm
    # |det| not the product of the spacings: a gantry-tilted grid is sheared and its voxels are smaller.
    voxel_ml = voxel_volume_mm3(volume) / 1000.0
    depth = labels.shape[0]
    ids = sorted(int(k) for k in names if int(k) != 0)
    # One pass for the boxes of all ids (find_objects wants positive ints; ids beyond the max are absent).
    boxes = ndimage.find_objects(labels.astype(np.int64, copy=False), max_label=max(ids, default=0))
    out: dict[str, dict[str, Any]] = {}
    for label in ids:
        name = str(names[label])
        box = boxes[label - 1] if label - 1 < len(boxes) else None
        if box is None:
            out[name] = _empty(label, name)
            continue
        mask = labels[box] == label
        hu = volume.hu[box][mask].astype(np.float64)
        start = np.array([s.start for s in box])
        stop = np.array([s.stop for s in box]) - 1  # inclusive last index
        corners_zyx = np.array([[a, b, c] for a in (start[0], stop[0]) for b in (start[1], stop[1])
                                for c in (start[2], stop[2])], dtype=np.float64)  # fmt: skip
        xyz1 = np.c_[corners_zyx[:, ::-1], np.ones(len(corners_zyx))]
        world = (affine @ xyz1.T).T[:, :3]
        out[name] = {
            "id": label,
            "name": name,
            "voxels": int(mask.sum()),
            "volume_ml": float(mask.sum() * voxel_ml),
            "hu_mean": float(hu.mean()),
            "hu_std": float(hu.std()),
            "hu_min": float(hu.min()),
            "hu_max": float(hu.max()),
            "hu_median": float(np.median(hu)),
            "bbox_index_zyx": [[int(a), int(b)] for a, b in zip(start, stop)],
            "bbox_size_mm_zyx": [float(v) for v in (stop - start + 1) * spacing],
            "bbox_ras_min": [float(v) for v in world.min(axis=0)],
            "bbox_ras_max": [float(v) for v in world.max(axis=0)],
            "touches_first_slice": bool(start[0] == 0),
            "touches_last_slice": bool(stop[0] == depth - 1),
            "truncated": bool(start[0] == 0 or stop[0] == depth - 1),
        }
    return out


def _row(stats: Mapping[str, Any]) -> list[Any]:
    box = stats["bbox_index_zyx"] or [[None, None]] * 3
    size = stats["bbox_size_mm_zyx"] or [None] * 3
    lo = stats["bbox_ras_min"] or [None] * 3
    hi = stats["bbox_ras_max"] or [None] * 3
    return [
        stats["id"], stats["name"], stats["voxels"], stats["volume_ml"], stats["hu_mean"], stats["hu_std"],
        stats["hu_min"], stats["hu_max"], stats["hu_median"], *box[0], *box[1], *box[2], *size, *lo, *hi,
        stats["touches_first_slice"], stats["touches_last_slice"], stats["truncated"],
    ]  # fmt: skip


def write_statistics(
    statistics: Mapping[str, Mapping[str, Any]], json_path: str | os.PathLike[str]
) -> tuple[Path, Path]:
    """Write ``statistics`` as JSON and as a CSV table beside it (same stem, ``.csv``), each atomically."""
    json_path = Path(json_path)
    csv_path = json_path.with_suffix(".csv")
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    for stats in statistics.values():
        writer.writerow(["" if v is None else v for v in _row(stats)])
    with atomic_path(json_path) as tmp:
        tmp.write_text(json.dumps(statistics, indent=2) + "\n")
    with atomic_path(csv_path) as tmp:
        tmp.write_text(buffer.getvalue())
    return json_path, csv_path
