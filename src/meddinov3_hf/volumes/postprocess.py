"""Label-map clean-up: keep the largest connected component, remove small islands, and choose the steps on a
validation set the way nnU-Net's `determine_postprocessing` does (a step is kept only if mean Dice rises).

Connected components use full (26-) connectivity in 3-D, so voxels touching at a corner are one structure.
Neither step ever removes a structure's largest component: `remove_small` keeps it even when it is smaller
than the threshold, and `keep_largest` keeps exactly it. Removed voxels become background (0).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage

from ..files import atomic_path

__all__ = [
    "apply_plan",
    "apply_postprocessing",
    "determine_postprocessing",
    "keep_largest",
    "parse_class_groups",
    "remove_small",
    "run_postprocess",
]

_STRUCTURE = np.ones((3, 3, 3), dtype=bool)  # 26-connectivity


def _groups(labels: np.ndarray, groups: Iterable[Iterable[int]] | None) -> list[tuple[int, ...]]:
    if groups is None:
        return [(int(v),) for v in np.unique(labels) if v != 0]
    return [tuple(sorted({int(c) for c in g})) for g in groups]


def _components(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Component ids (0 outside) and the size of each component 1..n (index 0 = 0)."""
    components, count = ndimage.label(mask, structure=_STRUCTURE)
    sizes = np.bincount(components.ravel(), minlength=count + 1)
    sizes[0] = 0
    return components, sizes


def _boxes(labels: np.ndarray, classes: Sequence[int]) -> tuple[slice, ...] | None:
    """Bounding box (slices) of the voxels of ``classes`` or None when absent."""
    mask = np.isin(labels, classes)
    if not mask.any():
        return None
    return ndimage.find_objects(mask.astype(np.uint8))[0]


def keep_largest(labels: np.ndarray, groups: Iterable[Iterable[int]] | None = None) -> np.ndarray:
    """Keep only the largest connected component of each class (or of each class group's union).

    Args:
        labels: integer label map (any number of dimensions, usually canonical ``(Z, Y, X)``).
        groups: ``None`` for every class present on its own, or groups of class ids, e.g. ``[[1], [2, 3]]``:
            the largest component of the union of 2 and 3 is kept (with its voxels' own classes).

    Returns:
        A new label map; removed voxels are 0.
    """
    out = np.array(labels, copy=True)
    for group in _groups(labels, groups):
        box = _boxes(out, group)
        if box is None:
            continue
        region = out[box]
        mask = np.isin(region, group)
        components, sizes = _components(mask)
        if np.count_nonzero(sizes) <= 1:
            continue
        largest = int(np.argmax(sizes))  # ties: the first in scan order, deterministic
        region[mask & (components != largest)] = 0
    return out


def remove_small(
    labels: np.ndarray,
    spacing: Sequence[float],
    min_volume_mm3: float,
    classes: Iterable[int] | None = None,
    voxel_mm3: float | None = None,
) -> np.ndarray:
    """Remove connected components smaller than ``min_volume_mm3`` — except each class's largest one.

    Args:
        labels: integer label map.
        spacing: voxel size in mm along ``labels``' axes (``CTVolume.spacing`` for canonical arrays).
        min_volume_mm3: components with fewer mm³ are set to 0.
        classes: the classes to clean (default: all present).
        voxel_mm3: the voxel volume when it is not the product of ``spacing`` (a sheared, gantry-tilted
            grid: pass ``statistics.voxel_volume_mm3(volume)``).
    """
    if min_volume_mm3 < 0:
        raise ValueError(f"remove_small: the minimum volume must be >= 0 mm³, got {min_volume_mm3}")
    voxel = float(np.prod(np.asarray(spacing, dtype=np.float64))) if voxel_mm3 is None else float(voxel_mm3)
    out = np.array(labels, copy=True)
    for (value,) in _groups(labels, None if classes is None else [[c] for c in classes]):
        box = _boxes(out, [value])
        if box is None:
            continue
        region = out[box]
        mask = region == value
        components, sizes = _components(mask)
        small = sizes * voxel < min_volume_mm3
        small[0] = False
        small[int(np.argmax(sizes))] = False  # never the structure's largest component
        if small.any():
            region[small[components] & mask] = 0
    return out


def parse_class_groups(
    specs: Sequence[str] | None, names: Mapping[int, str] | None
) -> list[list[int]] | None:
    """``["1", "2+3", "kidney_left+kidney_right"]`` → ``[[1], [2, 3], [ids...]]``; empty/None → None (each
    class on its own). Names are looked up in ``names`` (``{id: name}``)."""
    if not specs:
        return None
    by_name = {v: k for k, v in (names or {}).items()}
    groups = []
    for spec in specs:
        group = []
        for item in str(spec).replace(",", "+").split("+"):
            item = item.strip()
            if not item:
                continue
            if item.lstrip("-").isdigit():
                group.append(int(item))
            elif item in by_name:
                group.append(by_name[item])
            else:
                known = ", ".join(sorted(by_name)[:12])
                raise ValueError(f"--keep-largest: unknown class {item!r} (ids or names: {known})")
        if group:
            groups.append(group)
    return groups or None


def apply_postprocessing(
    labels: np.ndarray,
    spacing: Sequence[float],
    keep_largest_groups: Iterable[Iterable[int]] | bool | None = None,
    remove_small_mm3: float | None = None,
    voxel_mm3: float | None = None,
) -> np.ndarray:
    """``remove_small`` then ``keep_largest`` (``True`` = every class on its own), as the CLI applies them."""
    out = labels
    if remove_small_mm3:
        out = remove_small(out, spacing, remove_small_mm3, voxel_mm3=voxel_mm3)
    if keep_largest_groups is not None and keep_largest_groups is not False:
        out = keep_largest(out, None if keep_largest_groups is True else keep_largest_groups)
    return out


def _dice(pred: np.ndarray, gt: np.ndarray, value: int) -> float:
    p, g = pred == value, gt == value
    denominator = int(p.sum()) + int(g.sum())
    return float("nan") if denominator == 0 else 2.0 * int(np.logical_and(p, g).sum()) / denominator


def _mean_dice(cases: list[tuple[np.ndarray, np.ndarray]], classes: Sequence[int]) -> dict[int, float]:
    out = {}
    for c in classes:
        values = [_dice(p, g, c) for p, g in cases]
        values = [v for v in values if not np.isnan(v)]
        out[c] = float(np.mean(values)) if values else float("nan")
    return out


def _overall(per_class: Mapping[int, float]) -> float:
    values = [v for v in per_class.values() if not np.isnan(v)]
    return float(np.mean(values)) if values else float("nan")


def determine_postprocessing(
    pred_folder: str | os.PathLike[str],
    gt_folder: str | os.PathLike[str],
    output: str | os.PathLike[str] | None = None,
    classes: Sequence[int] | None = None,
) -> dict[str, Any]:
    """nnU-Net's idea on a validation folder: try (1) keeping the largest foreground region (all classes as one
    group), kept if the mean Dice over classes rises, then (2) per class, keeping its largest component, kept for
    the classes whose Dice rises. Returns (and writes to ``output``) the plan with Dice before and after.

    Predictions and references are matched by case name (``case_0000.nii.gz`` ↔ ``case.nii.gz``).
    """
    from .io import case_name, list_volumes
    from .labels import read_labels

    preds = {case_name(p): p for p in list_volumes(pred_folder)}
    gts = {case_name(p): p for p in list_volumes(gt_folder)}
    missing = sorted(set(preds) - set(gts))
    if missing:
        raise ValueError(f"{gt_folder}: no reference for prediction(s) {', '.join(missing[:5])}")
    if not preds:
        raise ValueError(f"{pred_folder}: no .nii/.nii.gz predictions")
    cases = []
    for name in sorted(preds):
        pred, gt = read_labels(preds[name]).array, read_labels(gts[name]).array
        if pred.shape != gt.shape:
            raise ValueError(f"{preds[name]}: shape {pred.shape} differs from the reference {gt.shape}")
        cases.append((pred, gt))
    if classes is None:
        classes = sorted({int(v) for _, g in cases for v in np.unique(g) if v != 0})
    classes = list(classes)
    before = _mean_dice(cases, classes)
    plan: dict[str, Any] = {"keep_largest_foreground": False, "keep_largest": [], "dice_before": before}
    current = cases
    foreground = [(keep_largest(p, [classes]), g) for p, g in current]
    after_fg = _mean_dice(foreground, classes)
    if _overall(after_fg) > _overall(before):
        plan["keep_largest_foreground"] = True
        current, before_step2 = foreground, after_fg
    else:
        before_step2 = before
    per_class = [(keep_largest(p, [[c] for c in classes]), g) for p, g in current]
    after_cls = _mean_dice(per_class, classes)
    chosen = [c for c in classes if after_cls[c] > before_step2[c]]
    plan["keep_largest"] = chosen
    final = [(keep_largest(p, [[c] for c in chosen]) if chosen else p, g) for p, g in current]
    plan["dice_after"] = _mean_dice(final, classes)
    plan["mean_dice_before"] = _overall(before)
    plan["mean_dice_after"] = _overall(plan["dice_after"])
    plan["classes"] = classes
    if output is not None:
        with atomic_path(Path(output)) as tmp:
            tmp.write_text(json.dumps(_jsonable(plan), indent=2) + "\n")
    return plan


def _jsonable(plan: dict[str, Any]) -> dict[str, Any]:
    def fix(value: Any) -> Any:
        if isinstance(value, dict):
            return {str(k): fix(v) for k, v in value.items()}
        if isinstance(value, float) and np.isnan(value):
            return None
        return value

    return fix(plan)


def apply_plan(labels: np.ndarray, plan: Mapping[str, Any]) -> np.ndarray:
    """Apply a plan written by :func:`determine_postprocessing` to one label map."""
    out = labels
    classes = [int(c) for c in plan.get("classes", [])]
    if plan.get("keep_largest_foreground") and classes:
        out = keep_largest(out, [classes])
    chosen = [int(c) for c in plan.get("keep_largest", [])]
    if chosen:
        out = keep_largest(out, [[c] for c in chosen])
    return out


# --------------------------------------------------------------------------------------------------------
# `meddinov3 postprocess`
# --------------------------------------------------------------------------------------------------------


def run_postprocess(args: Any) -> int:
    """`meddinov3 postprocess`: ``--determine`` a plan, or clean (and convert) label maps."""
    from ..files import check_output_path

    if args.determine:
        if not (args.pred and args.gt):
            raise ValueError("postprocess --determine needs --pred FOLDER and --gt FOLDER")
        out = check_output_path(
            args.output, [args.pred, args.gt], suffixes=(".json",), overwrite=True, option="-o"
        )
        plan = determine_postprocessing(args.pred, args.gt, out)
        chosen = ["largest foreground region"] if plan["keep_largest_foreground"] else []
        chosen += [f"largest component of class {c}" for c in plan["keep_largest"]]
        print(
            f"mean Dice {plan['mean_dice_before']:.4f} → {plan['mean_dice_after']:.4f}; keep: "
            f"{', '.join(chosen) or 'nothing (no step raised mean Dice)'} → {out}"
        )
        return 0
    if not args.input:
        raise ValueError("postprocess needs -i LABELS (or --determine with --pred/--gt)")
    if args.statistics and not args.source:
        raise ValueError(f"{args.input}: --statistics needs --source (the CT whose HU lie under the labels)")
    source = Path(args.input)
    if not source.exists():
        raise FileNotFoundError(f"{source}: no such file or folder")
    from .io import case_name, list_volumes

    if source.is_dir():
        if args.source:
            raise ValueError(f"{source}: --source applies to one label file, not a folder")
        check_output_path(args.output, [source], kind="into", option="-o")
        pairs = [(p, Path(args.output) / f"{case_name(p)}.nii.gz") for p in list_volumes(source)]
        if not pairs:
            raise ValueError(f"{source}: no .nii/.nii.gz label maps")
    else:
        out = Path(args.output)
        if not out.name.lower().endswith((".nii", ".nii.gz")):
            out = out / f"{case_name(source)}.nii.gz"
        pairs = [(source, out)]
    plan = json.loads(Path(args.plan).read_text()) if args.plan else None
    for label_path, out in pairs:
        _postprocess_file(label_path, out, args, plan)
        print(f"wrote {out}")
    return 0


def _postprocess_file(label_path: Path, out: Path, args: Any, plan: Mapping[str, Any] | None) -> None:
    from .io import load_volume
    from .labels import check_label_values, load_labels, read_label_names, read_labels, read_nifti_label_names
    from .outputs import OutputOptions, prepare_jobs, write_case_outputs

    stored = read_labels(label_path)
    names = read_label_names(args.names) if args.names else read_nifti_label_names(stored.image)
    reference = load_volume(args.source) if args.source else None
    if reference is None:
        # The label map is its own grid: load it as a "volume" (warnings about HU are irrelevant here).
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            reference = load_volume(stored.image)
    labels = load_labels(stored, reference, f"the source {reference.source}")
    if names:
        check_label_values(labels, {0: "background", **names}, str(label_path))
    if plan is not None:
        labels = apply_plan(labels, plan)
    options = OutputOptions(
        types=tuple(args.output_type),
        statistics=bool(args.statistics),
        keep_largest=args.keep_largest,
        remove_small_mm3=args.remove_small,
        names=({0: "background", **names} if names else None),
        model_name=Path(str(args.names)).name if args.names else "MedDINOv3",
    )
    from .outputs import check_output_request

    check_output_request(args.source or label_path, options)

    from ..files import check_output_path

    check_output_path(
        out, [label_path, args.source], suffixes=(".nii.gz", ".nii"), overwrite=True, option="-o"
    )

    class _Job:  # the planned output, checked by the same guards as `segment`'s
        output = str(out)

    prepare_jobs([_Job()], args.source or label_path, options)
    write_case_outputs(labels, reference, out, options)
