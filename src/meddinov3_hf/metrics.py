"""Segmentation metrics (Dice, HD95, normalized surface Dice) of label arrays, and their means over cases.

Pure numpy/scipy: this module imports nothing else from the package. Files and folders are scored by
:mod:`meddinov3_hf.volumes.evaluation`, which reads them and calls :func:`compute_segmentation_metrics`.

Conventions (chosen so that no metric is ever NaN and means over classes/cases stay defined):

==================  ======  ======  ==============================================
case                Dice    NSD     HD95
==================  ======  ======  ==============================================
both masks empty    1.0     1.0     0.0
exactly one empty   0.0     0.0     image diagonal in mm, ``sqrt(sum((shape*spacing)**2))``
==================  ======  ======  ==============================================

Surfaces are the mask voxels removed by one binary erosion with the face-connected (6-/4-neighbour)
structuring element, voxels on the image border counting as surface. Distances are Euclidean in mm
between surface voxel centres (``scipy.ndimage.distance_transform_edt`` with ``sampling=spacing``).

* HD95 = 95th percentile (numpy linear interpolation) of the POOLED symmetric surface distances, i.e. of
  pred->gt and gt->pred distances together (the medpy convention; MONAI instead takes the max of the two
  directed percentiles, which can differ slightly for asymmetric errors).
* NSD (Nikolov et al. 2021) = (#pred surface voxels within ``tolerance_mm`` of the gt surface + #gt surface
  voxels within ``tolerance_mm`` of the pred surface) / (#pred surface + #gt surface voxels); counted per
  voxel, not weighted by surface-element area.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage

__all__ = [
    "METRIC_PATH",
    "compute_segmentation_metrics",
    "dice_score",
    "hd95",
    "mean_over_cases",
    "normalized_surface_dice",
]

#: Path of the ``evaluate`` metric script: ``evaluate.load(METRIC_PATH)``.
METRIC_PATH: str = str(Path(__file__).resolve().parent / "metric" / "meddinov3_metric.py")

_SCORES = ("dice", "hd95", "nsd")


# --------------------------------------------------------------------------------------------------------
# Binary-mask metrics
# --------------------------------------------------------------------------------------------------------


def _pair(pred_mask: np.ndarray, gt_mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    pred = np.asarray(pred_mask).astype(bool, copy=False)
    gt = np.asarray(gt_mask).astype(bool, copy=False)
    if pred.shape != gt.shape:
        raise ValueError(f"prediction shape {pred.shape} != ground-truth shape {gt.shape}")
    if pred.ndim == 0:
        raise ValueError("masks must have at least one dimension")
    return pred, gt


def _spacing(spacing: Sequence[float] | float | None, ndim: int) -> np.ndarray:
    if spacing is None:
        return np.ones(ndim)
    sp = np.asarray(spacing, dtype=np.float64).reshape(-1)
    if sp.size == 1:  # one number = isotropic
        sp = np.repeat(sp, ndim)
    if sp.shape != (ndim,) or not np.all(np.isfinite(sp)) or np.any(sp <= 0):
        raise ValueError(f"spacing must be {ndim} positive numbers (one per mask axis), got {spacing!r}")
    return sp


def _surface_inputs(
    pred_mask: np.ndarray, gt_mask: np.ndarray, spacing: Sequence[float] | float | None
) -> tuple[np.ndarray, np.ndarray, np.ndarray, bool, bool]:
    """(pred, gt, spacing per axis, pred non-empty, gt non-empty) for the surface metrics."""
    pred, gt = _pair(pred_mask, gt_mask)
    sp = _spacing(spacing, pred.ndim)
    return pred, gt, sp, bool(pred.any()), bool(gt.any())


def _diagonal_mm(shape: tuple[int, ...], spacing: np.ndarray) -> float:
    return float(np.sqrt(np.sum((np.asarray(shape) * spacing) ** 2)))


def dice_score(pred_mask: np.ndarray, gt_mask: np.ndarray) -> float:
    """Dice ``2|P∩G| / (|P|+|G|)`` of two same-shape masks (any dimensionality); 1.0 if both are empty."""
    pred, gt = _pair(pred_mask, gt_mask)
    total = int(pred.sum()) + int(gt.sum())
    if total == 0:
        return 1.0
    return 2.0 * int(np.logical_and(pred, gt).sum()) / total


def _crop(pred: np.ndarray, gt: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Crop both masks to their joint bounding box plus a 1-voxel margin (saves most EDT cost on CT).

    Exact: every surface voxel lies inside the box, a mask voxel on the box edge is surface either way, and
    Euclidean distances between voxels inside the box do not depend on the rest of the image. The margin
    is not strictly needed; it just keeps the erosion away from the array edge.
    """
    coords = np.nonzero(pred | gt)
    sl = tuple(slice(max(int(c.min()) - 1, 0), min(int(c.max()) + 2, n)) for c, n in zip(coords, pred.shape))
    return pred[sl], gt[sl]


def _surface(mask: np.ndarray) -> np.ndarray:
    structure = ndimage.generate_binary_structure(mask.ndim, 1)
    return mask & ~ndimage.binary_erosion(mask, structure=structure, border_value=0)


def _surface_distances(
    pred: np.ndarray, gt: np.ndarray, spacing: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Distances (mm) pred-surface -> gt-surface and gt-surface -> pred-surface; both masks non-empty."""
    pred, gt = _crop(pred, gt)
    s_pred, s_gt = _surface(pred), _surface(gt)
    # EDT of the complement gives, at every voxel, the distance to the nearest surface voxel.
    d_to_gt = ndimage.distance_transform_edt(~s_gt, sampling=spacing)
    d_to_pred = ndimage.distance_transform_edt(~s_pred, sampling=spacing)
    return d_to_gt[s_pred], d_to_pred[s_gt]


def hd95(pred_mask: np.ndarray, gt_mask: np.ndarray, spacing: Sequence[float] | float | None = None) -> float:
    """95th-percentile symmetric surface distance in mm (see the module docstring for the definition).

    Args:
        pred_mask, gt_mask: same-shape boolean-like masks, 2-D ``(Y, X)`` or 3-D ``(Z, Y, X)`` (any N-D).
        spacing: voxel size in mm per axis (same order as the mask axes); default 1 mm.

    Returns:
        0.0 if both masks are empty; the image diagonal in mm if exactly one is empty.
    """
    pred, gt, sp, has_pred, has_gt = _surface_inputs(pred_mask, gt_mask, spacing)
    if not has_pred and not has_gt:
        return 0.0
    if has_pred != has_gt:
        return _diagonal_mm(pred.shape, sp)
    a, b = _surface_distances(pred, gt, sp)
    return float(np.percentile(np.concatenate([a, b]), 95))


def normalized_surface_dice(
    pred_mask: np.ndarray,
    gt_mask: np.ndarray,
    spacing: Sequence[float] | float | None = None,
    tolerance_mm: float = 1.0,
) -> float:
    """Normalized surface Dice at ``tolerance_mm`` in [0, 1] (see the module docstring).

    Args:
        pred_mask, gt_mask: same-shape boolean-like masks, as :func:`hd95`.
        spacing: voxel size in mm per axis; default 1 mm.
        tolerance_mm: distance (>= 0) within which a surface voxel counts as matched.

    Returns:
        1.0 if both masks are empty, 0.0 if exactly one is.
    """
    if not np.isfinite(tolerance_mm) or tolerance_mm < 0:
        raise ValueError(f"tolerance_mm must be a finite number >= 0, got {tolerance_mm!r}")
    pred, gt, sp, has_pred, has_gt = _surface_inputs(pred_mask, gt_mask, spacing)
    if not has_pred and not has_gt:
        return 1.0
    if has_pred != has_gt:
        return 0.0
    a, b = _surface_distances(pred, gt, sp)
    # Tiny slack so a distance that equals the tolerance up to float rounding counts as inside.
    tol = tolerance_mm + 1e-9
    return float((np.count_nonzero(a <= tol) + np.count_nonzero(b <= tol)) / (a.size + b.size))


# --------------------------------------------------------------------------------------------------------
# Label maps
# --------------------------------------------------------------------------------------------------------


def _mean_scores(per_class: Mapping[str, Mapping[str, Any]]) -> dict[str, float]:
    if not per_class:  # nothing to score: both maps are all background -> perfect agreement
        return {"dice": 1.0, "hd95": 0.0, "nsd": 1.0}
    return {k: float(np.mean([float(v[k]) for v in per_class.values()])) for k in _SCORES}


def compute_segmentation_metrics(
    pred: np.ndarray,
    gt: np.ndarray,
    spacing: Sequence[float] | float | None = None,
    labels: Mapping[int, str] | None = None,
    tolerance_mm: float = 1.0,
) -> dict[str, dict[str, float | int]]:
    """Per-class Dice / HD95 / NSD of two integer label maps.

    Args:
        pred, gt: integer label maps of the same shape, 2-D ``(Y, X)`` or 3-D ``(Z, Y, X)``.
        spacing: voxel size in mm per axis (same axis order as the arrays); default 1 mm.
        labels: ``{label_value: class_name}``; label 0 (background) is always excluded. If ``None`` the
            classes are the non-zero values present in ``pred`` or ``gt``, named ``str(value)``. Classes
            absent from both maps get the both-empty values (Dice 1, NSD 1, HD95 0).
        tolerance_mm: NSD tolerance.

    Returns:
        ``{class_name: {"dice", "hd95", "nsd", "pred_voxels", "gt_voxels"}, ..., "mean": {"dice", "hd95",
        "nsd"}}`` where "mean" is the unweighted mean over the foreground classes.
    """
    pred_arr, gt_arr = np.asarray(pred), np.asarray(gt)
    if pred_arr.shape != gt_arr.shape:
        raise ValueError(f"prediction shape {pred_arr.shape} != ground-truth shape {gt_arr.shape}")
    for name, arr in (("prediction", pred_arr), ("ground truth", gt_arr)):
        if not (np.issubdtype(arr.dtype, np.integer) or arr.dtype == bool):
            if not np.issubdtype(arr.dtype, np.floating) or not np.array_equal(arr, np.round(arr)):
                raise ValueError(f"{name} must be an integer label map, got dtype {arr.dtype}")
    sp = _spacing(spacing, pred_arr.ndim)
    if labels is None:
        values = np.union1d(np.unique(pred_arr), np.unique(gt_arr))
        classes = {int(v): str(int(v)) for v in values if v != 0}
    else:
        classes = {int(k): str(v) for k, v in labels.items() if int(k) != 0}
    if "mean" in classes.values():
        raise ValueError("'mean' is reserved for the class average; rename that class")
    if len(set(classes.values())) != len(classes):
        raise ValueError(f"class names must be unique, got {sorted(classes.values())}")

    out: dict[str, dict[str, float | int]] = {}
    for value, name in classes.items():
        p, g = pred_arr == value, gt_arr == value
        out[name] = {
            "dice": dice_score(p, g),
            "hd95": hd95(p, g, sp),
            "nsd": normalized_surface_dice(p, g, sp, tolerance_mm),
            "pred_voxels": int(p.sum()),
            "gt_voxels": int(g.sum()),
        }
    out["mean"] = _mean_scores(out)
    return out


def mean_over_cases(
    per_case: Iterable[Mapping[str, Mapping[str, Any]]], counts: bool = False
) -> dict[str, dict[str, float | int]]:
    """Per class (and "mean"), the average of each score over the cases in which it was scored.

    Args:
        per_case: one result per case, each ``{class: {"dice", "hd95", "nsd", ...}, "mean": {...}}`` as
            :func:`compute_segmentation_metrics` returns; a case may carry only some of the scores (e.g.
            Dice alone) and only some of the classes.
        counts: also give each entry ``"n_cases"``, the number of cases it was averaged over.

    Returns:
        ``{class: {score: mean, ...}, ..., "mean": {...}}``: classes in the order first seen, "mean" last.
        The "mean" entry averages the per-case means, so every case weighs the same.
    """
    collected: dict[str, dict[str, list[float]]] = {}
    seen: dict[str, int] = {}
    for scores in per_case:
        for name, values in scores.items():
            seen[name] = seen.get(name, 0) + 1
            for key in _SCORES:
                if key in values:
                    collected.setdefault(name, {}).setdefault(key, []).append(float(values[key]))
    order = [n for n in collected if n != "mean"] + (["mean"] if "mean" in collected else [])
    out: dict[str, dict[str, float | int]] = {}
    for name in order:
        out[name] = {k: float(np.mean(v)) for k, v in collected[name].items()}
        if counts:
            out[name]["n_cases"] = seen[name]
    return out
