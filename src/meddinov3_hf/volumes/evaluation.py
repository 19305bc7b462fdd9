"""Scoring label NIfTIs against reference ones: `meddinov3 evaluate`, the demo and the fine-tuning report.

Files are read with :func:`~meddinov3_hf.volumes.labels.read_labels` and scored on the reference's voxel grid
with :func:`~meddinov3_hf.metrics.compute_segmentation_metrics` (the metric conventions are documented in
:mod:`meddinov3_hf.metrics`); means over cases come from :func:`~meddinov3_hf.metrics.mean_over_cases`, the
same function the `evaluate` metric module and the fine-tuning validator use.
"""

from __future__ import annotations

import csv
import json
import os
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from ..files import atomic_path
from ..metrics import compute_segmentation_metrics, mean_over_cases
from .io import case_name, list_volumes
from .labels import GRID_TOLERANCE_MM, read_labels

__all__ = ["evaluate_folders", "write_metrics"]


def _onto_reference_grid(
    p_data: np.ndarray, p_affine: np.ndarray, g_shape: tuple[int, ...], g_affine: np.ndarray
) -> np.ndarray | None:
    """The prediction on the reference's voxel grid when the two grids differ only by an axis permutation
    and/or flips (exact: no interpolation), else None."""
    from nibabel.orientations import apply_orientation, inv_ornt_aff, io_orientation, ornt_transform

    p_ornt, g_ornt = io_orientation(p_affine), io_orientation(g_affine)
    if np.isnan(p_ornt).any() or np.isnan(g_ornt).any():
        return None
    transform = ornt_transform(p_ornt, g_ornt)
    moved = apply_orientation(p_data, transform)
    moved_affine = p_affine @ inv_ornt_aff(transform, p_data.shape)
    if moved.shape != tuple(g_shape) or not np.allclose(moved_affine, g_affine, atol=GRID_TOLERANCE_MM):
        return None
    return np.ascontiguousarray(moved)


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


def _on_reference_grid(p_file: Path, g_file: Path, allow_grid_mismatch: bool) -> tuple[Any, Any, str]:
    """Both label maps, the prediction moved onto the reference grid when that is exact; and what was done."""
    pred, ref = read_labels(p_file), read_labels(g_file)
    p_data, g_data = pred.array, ref.array
    if p_data.shape == g_data.shape and np.allclose(pred.affine, ref.affine, atol=GRID_TOLERANCE_MM):
        return p_data, ref, "same"
    moved = _onto_reference_grid(p_data, pred.affine, g_data.shape, ref.affine)
    if moved is not None:
        return moved, ref, "reoriented: prediction axes permuted/flipped onto the gt grid (exact)"
    if p_data.shape != g_data.shape:
        raise ValueError(
            f"shape mismatch: pred {p_file} has {p_data.shape}, gt {g_file} has {g_data.shape}, and the "
            "grids are not a permutation/flip of each other; resample the prediction onto the gt grid"
        )
    if not allow_grid_mismatch:
        offset = float(np.abs(pred.affine - ref.affine).max())
        raise ValueError(
            f"grid mismatch: pred {p_file} and gt {g_file} have affines differing by up to {offset:.4g} "
            "(not a permutation/flip); resample the prediction onto the gt grid, or pass "
            "--allow-grid-mismatch to score voxel by voxel"
        )
    grid = "mismatch: affines differ, scored voxel by voxel (--allow-grid-mismatch)"
    warnings.warn(f"{p_file}: affine differs from {g_file}; {grid}", UserWarning, stacklevel=3)
    return p_data, ref, grid


def _match_cases(
    pred_path: Path, gt_path: Path
) -> tuple[dict[str, Path], dict[str, Path], list[str], list[str], list[str]]:
    """(pred files, gt files, matched, missing, extra) by case name; a warning when some do not match, an
    error when none does."""
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
            stacklevel=3,  # evaluate_folders' caller
        )
    return pred_cases, gt_cases, matched, missing, extra


def evaluate_folders(
    pred: str | os.PathLike[str],
    gt: str | os.PathLike[str],
    labels: Mapping[int, str] | None = None,
    tolerance_mm: float = 1.0,
    allow_grid_mismatch: bool = False,
) -> dict[str, Any]:
    """Score predicted label NIfTIs against ground-truth ones.

    Metrics are computed on the gt's voxel grid with the gt header's voxel sizes. A prediction stored on a
    grid that differs from the gt's only by an axis permutation and/or flips is reoriented onto it exactly;
    any other difference of affine or shape raises a ``ValueError`` unless ``allow_grid_mismatch`` (then
    same-shaped volumes are scored voxel by voxel). Each case records what was done under ``"grid"``.
    Label values present in the files but absent from ``labels`` are not scored and are reported under
    ``"warnings"``; negative label values raise. Cases present on only one side are warned about, listed
    under ``"missing_predictions"`` / ``"extra_predictions"`` and excluded from the means; if no case matches
    a ``ValueError`` is raised.

    Args:
        pred: a label NIfTI, or a folder of them.
        gt: the reference file or folder; folder files are matched by
            :func:`~meddinov3_hf.volumes.io.case_name` (``case_0000.nii.gz`` matches ``case.nii.gz``).
        labels: ``{label_value: class_name}``, as :func:`~meddinov3_hf.metrics.compute_segmentation_metrics`.
        tolerance_mm: NSD tolerance.
        allow_grid_mismatch: score same-shaped volumes on different grids voxel by voxel.

    Returns:
        ``{"cases": {case: {"pred", "gt", "grid", "metrics": <compute_segmentation_metrics>}},
        "mean": <mean_over_cases, with n_cases>, "missing_predictions": [...], "extra_predictions": [...],
        "tolerance_mm": float, "warnings": [...]}``. Per-class means are over the cases in which the class
        was scored; the overall "mean" averages the per-case means.
    """
    pred_cases, gt_cases, matched, missing, extra = _match_cases(Path(pred), Path(gt))
    negative = sorted(k for k in (labels or {}) if int(k) < 0)
    if negative:
        raise ValueError(f"labels: label IDs must be >= 0, got {negative}")
    cases: dict[str, Any] = {}
    notes: list[str] = []
    for name in matched:
        p_file, g_file = pred_cases[name], gt_cases[name]
        p_data, ref, grid = _on_reference_grid(p_file, g_file, allow_grid_mismatch)
        zooms = tuple(float(z) for z in ref.image.header.get_zooms()[:3])
        if any(not np.isfinite(z) or z <= 0 for z in zooms):
            raise ValueError(f"{g_file}: invalid voxel sizes {zooms} in header")
        if labels is not None:
            for file, data in ((p_file, p_data), (g_file, ref.array)):
                unknown = sorted(set(np.unique(data).tolist()) - {int(k) for k in labels} - {0})
                if unknown:
                    notes.append(f"{file}: label values {unknown} are not in --labels and were not scored")
                    warnings.warn(notes[-1], UserWarning, stacklevel=2)
        metrics = compute_segmentation_metrics(p_data, ref.array, zooms, labels, tolerance_mm)
        cases[name] = {"pred": str(p_file), "gt": str(g_file), "grid": grid, "metrics": metrics}

    return {
        "cases": cases,
        "mean": mean_over_cases([v["metrics"] for v in cases.values()], counts=True),
        "missing_predictions": missing,
        "extra_predictions": extra,
        "tolerance_mm": float(tolerance_mm),
        "warnings": notes,
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
    """Write ``results`` as JSON and, optionally, as a CSV table; both atomically.

    Args:
        results: from :func:`evaluate_folders` or :func:`~meddinov3_hf.metrics.compute_segmentation_metrics`.
        json_path: the JSON file.
        csv_path: a CSV file with columns case, class, dice, hd95, nsd (case "mean" holds the averages).
    """

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
