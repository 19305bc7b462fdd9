"""Segmentation metrics (Dice, HD95, normalized surface Dice) for label maps and NIfTI folders.

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

import csv
import json
import os
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage

from meddinov3_hf.volumes.io import atomic_path, case_name, list_volumes

__all__ = [
    "METRIC_PATH",
    "compute_segmentation_metrics",
    "dice_score",
    "evaluate_folders",
    "hd95",
    "normalized_surface_dice",
    "write_metrics",
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
    pred, gt = _pair(pred_mask, gt_mask)
    sp = _spacing(spacing, pred.ndim)
    has_pred, has_gt = bool(pred.any()), bool(gt.any())
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

    Args: as :func:`hd95`, plus ``tolerance_mm`` >= 0. Returns 1.0 if both are empty, 0.0 if one is.
    """
    if not np.isfinite(tolerance_mm) or tolerance_mm < 0:
        raise ValueError(f"tolerance_mm must be a finite number >= 0, got {tolerance_mm!r}")
    pred, gt = _pair(pred_mask, gt_mask)
    sp = _spacing(spacing, pred.ndim)
    has_pred, has_gt = bool(pred.any()), bool(gt.any())
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


# --------------------------------------------------------------------------------------------------------
# NIfTI files and folders
# --------------------------------------------------------------------------------------------------------


def _read_label_nifti(path: Path) -> tuple[np.ndarray, Any]:
    import nibabel as nib

    try:
        img = nib.load(path)
        data = np.asanyarray(img.dataobj)  # applies scaling if the header has any
    except FileNotFoundError:
        raise
    except Exception as exc:  # corrupt / truncated / not NIfTI
        raise ValueError(f"{path}: cannot read label volume ({type(exc).__name__}: {exc})") from exc
    if data.ndim > 3 and all(s == 1 for s in data.shape[3:]):
        data = data.reshape(data.shape[:3])
    if np.issubdtype(data.dtype, np.floating):
        if not np.all(np.isfinite(data)) or not np.array_equal(data, np.round(data)):
            raise ValueError(f"{path}: label volume has non-integer or NaN values")
        data = data.astype(np.int64)
    return data, img


def _index(path: Path) -> dict[str, Path]:
    """Case name -> file for a NIfTI file or a folder of them."""
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file or folder")
    files = list_volumes(path) if path.is_dir() else [path]
    cases: dict[str, Path] = {}
    for f in files:
        name = case_name(f)
        if name in cases:
            raise ValueError(f"{path}: files {cases[name].name} and {f.name} both map to case '{name}'")
        cases[name] = f
    if not cases:
        raise ValueError(f"{path}: no .nii/.nii.gz files found")
    return cases


def evaluate_folders(
    pred: str | os.PathLike[str],
    gt: str | os.PathLike[str],
    labels: Mapping[int, str] | None = None,
    tolerance_mm: float = 1.0,
) -> dict[str, Any]:
    """Score predicted label NIfTIs against ground-truth ones.

    Args:
        pred, gt: a NIfTI file each, or a folder each; folder files are matched by
            :func:`~meddinov3_hf.volumes.io.case_name` (``case_0000.nii.gz`` matches ``case.nii.gz``).
        labels, tolerance_mm: as :func:`compute_segmentation_metrics`.

    Metrics are computed in the files' stored voxel order with the gt header's voxel sizes. Cases present
    on only one side are warned about, listed under ``"missing_predictions"`` / ``"extra_predictions"``
    and excluded from the means; if no case matches a ``ValueError`` is raised.

    Returns:
        ``{"cases": {case: {"pred": path, "gt": path, "metrics": <compute_segmentation_metrics>}},
        "mean": {class: {"dice","hd95","nsd","n_cases"}, ..., "mean": {...}}, "missing_predictions": [...],
        "extra_predictions": [...], "tolerance_mm": float}`` — per-class means are over the cases in which
        the class was scored; the overall "mean" averages the per-case means.
    """
    pred_path, gt_path = Path(pred), Path(gt)
    if pred_path.is_dir() != gt_path.is_dir() and pred_path.exists() and gt_path.exists():
        raise ValueError(f"pred {pred_path} and gt {gt_path} must both be files or both be folders")
    pred_cases, gt_cases = _index(pred_path), _index(gt_path)
    if not pred_path.is_dir():  # single file pair: match regardless of names
        pred_cases = {next(iter(gt_cases)): next(iter(pred_cases.values()))}
    matched = sorted(set(pred_cases) & set(gt_cases))
    missing = sorted(set(gt_cases) - set(pred_cases))
    extra = sorted(set(pred_cases) - set(gt_cases))
    if not matched:
        raise ValueError(
            f"no case names match between pred {pred_path} ({sorted(pred_cases)[:5]}...) and gt {gt_path} "
            f"({sorted(gt_cases)[:5]}...)"
        )
    if missing or extra:
        warnings.warn(
            f"evaluate_folders: {len(missing)} gt case(s) without prediction {missing}, "
            f"{len(extra)} prediction(s) without gt {extra}; they are excluded from the means",
            UserWarning,
            stacklevel=2,
        )

    cases: dict[str, Any] = {}
    for name in matched:
        p_file, g_file = pred_cases[name], gt_cases[name]
        p_data, p_img = _read_label_nifti(p_file)
        g_data, g_img = _read_label_nifti(g_file)
        if p_data.shape != g_data.shape:
            raise ValueError(
                f"shape mismatch: pred {p_file} has {p_data.shape}, gt {g_file} has {g_data.shape}"
            )
        if g_data.ndim != 3:
            raise ValueError(f"{g_file}: expected a 3-D label volume, got shape {g_data.shape}")
        if not np.allclose(p_img.affine, g_img.affine, atol=1e-3):
            warnings.warn(
                f"{p_file}: affine differs from {g_file}; the prediction may be misoriented",
                UserWarning,
                stacklevel=2,
            )
        zooms = tuple(float(z) for z in g_img.header.get_zooms()[:3])
        if any(not np.isfinite(z) or z <= 0 for z in zooms):
            raise ValueError(f"{g_file}: invalid voxel sizes {zooms} in header")
        metrics = compute_segmentation_metrics(p_data, g_data, zooms, labels, tolerance_mm)
        cases[name] = {"pred": str(p_file), "gt": str(g_file), "metrics": metrics}

    mean: dict[str, Any] = {}
    class_names = sorted({c for v in cases.values() for c in v["metrics"] if c != "mean"})
    for cls in class_names:
        rows = [v["metrics"][cls] for v in cases.values() if cls in v["metrics"]]
        mean[cls] = {k: float(np.mean([r[k] for r in rows])) for k in _SCORES} | {"n_cases": len(rows)}
    mean["mean"] = {k: float(np.mean([v["metrics"]["mean"][k] for v in cases.values()])) for k in _SCORES}
    return {
        "cases": cases,
        "mean": mean,
        "missing_predictions": missing,
        "extra_predictions": extra,
        "tolerance_mm": float(tolerance_mm),
    }


def _csv_rows(results: Mapping[str, Any]) -> list[list[Any]]:
    rows: list[list[Any]] = []
    if "cases" in results:
        for case, entry in results["cases"].items():
            for cls, m in entry["metrics"].items():
                rows.append([case, cls, m["dice"], m["hd95"], m["nsd"]])
        for cls, m in results.get("mean", {}).items():
            rows.append(["mean", cls, m["dice"], m["hd95"], m["nsd"]])
    else:  # a single compute_segmentation_metrics result
        for cls, m in results.items():
            rows.append(["", cls, m["dice"], m["hd95"], m["nsd"]])
    return rows


def write_metrics(
    results: Mapping[str, Any],
    json_path: str | os.PathLike[str],
    csv_path: str | os.PathLike[str] | None = None,
) -> None:
    """Write ``results`` (from :func:`evaluate_folders` or :func:`compute_segmentation_metrics`) as JSON
    and optionally as a CSV table with columns case, class, dice, hd95, nsd (case "mean" = averages).
    Both files are written atomically."""

    def default(obj: Any) -> Any:
        if isinstance(obj, np.generic):
            return obj.item()
        if isinstance(obj, Path):
            return str(obj)
        raise TypeError(f"cannot serialize {type(obj).__name__}")

    text = json.dumps(results, indent=2, default=default, allow_nan=False)
    with atomic_path(json_path) as tmp:
        tmp.write_text(text + "\n", encoding="utf-8")
    if csv_path is not None:
        with atomic_path(csv_path) as tmp, open(tmp, "w", newline="", encoding="utf-8") as fh:
            writer = csv.writer(fh)
            writer.writerow(["case", "class", "dice", "hd95", "nsd"])
            for row in _csv_rows(results):
                writer.writerow([row[0], row[1], *(f"{float(v):.6g}" for v in row[2:])])
