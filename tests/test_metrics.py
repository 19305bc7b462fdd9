"""Tests for meddinov3_hf.metrics (hand-derived Dice/HD95/NSD values, means over cases), folder evaluation in
meddinov3_hf.volumes.evaluation, and the evaluate module."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from meddinov3_hf.metrics import (
    METRIC_PATH,
    compute_segmentation_metrics,
    dice_score,
    hd95,
    normalized_surface_dice,
)
from meddinov3_hf.volumes.evaluation import evaluate_folders, write_metrics


def _square(top: int, left: int, size: int = 4, shape: tuple[int, int] = (12, 12)) -> np.ndarray:
    m = np.zeros(shape, bool)
    m[top : top + size, left : left + size] = True
    return m


def _cube(z0: int, size: int = 4, shape: tuple[int, int, int] = (10, 10, 10)) -> np.ndarray:
    m = np.zeros(shape, bool)
    m[z0 : z0 + size, 2 : 2 + size, 2 : 2 + size] = True
    return m


# ---------------------------------------------------------------------------------------------------------
# Binary masks, hand-computed
# ---------------------------------------------------------------------------------------------------------


def test_dice_of_known_boxes() -> None:
    # 4x4 squares overlapping in 2 of 4 rows: 2*8 / (16+16)
    assert dice_score(_square(2, 2), _square(4, 2)) == pytest.approx(0.5)
    # 4^3 cubes shifted by one slice: overlap 4*4*3
    assert dice_score(_cube(3), _cube(2)) == pytest.approx(2 * 48 / 128)
    assert dice_score(_square(0, 0), _square(6, 6)) == 0.0


def test_shifted_squares_anisotropic_2d() -> None:
    # gt rows/cols 3..6, pred shifted by 2 columns. 4-connected surface ring = 12 pixels each.
    gt, pred = _square(3, 3), _square(3, 5)
    # spacing (sy, sx) = (1.0, 0.5): per direction the distances are 4x0, 4x0.5 mm, 4x1.0 mm
    assert hd95(pred, gt, (1.0, 0.5)) == pytest.approx(1.0)
    assert normalized_surface_dice(pred, gt, (1.0, 0.5), tolerance_mm=0.5) == pytest.approx(16 / 24)
    assert normalized_surface_dice(pred, gt, (1.0, 0.5), tolerance_mm=0.4) == pytest.approx(8 / 24)
    assert normalized_surface_dice(pred, gt, (1.0, 0.5), tolerance_mm=1.0) == pytest.approx(1.0)
    # spacing (0.5, 1.0): distances 4x0, 2x0.5 (row neighbour), 2x1.0, 4x2.0 -> HD95 = 2 mm
    assert hd95(pred, gt, (0.5, 1.0)) == pytest.approx(2.0)
    assert normalized_surface_dice(pred, gt, (0.5, 1.0), tolerance_mm=1.0) == pytest.approx(16 / 24)


def test_shifted_cubes_anisotropic_3d() -> None:
    # 4^3 cubes, pred one slice higher, sz = 3 mm. Per direction (56 surface voxels):
    # 40 at 0 mm, 4 face-centre voxels at 1 mm (in-plane to the side ring), 16 on the far face at 3 mm.
    gt, pred = _cube(2), _cube(3)
    spacing = (3.0, 1.0, 1.0)
    assert hd95(pred, gt, spacing) == pytest.approx(3.0)
    assert normalized_surface_dice(pred, gt, spacing, 1.0) == pytest.approx(80 / 112)
    assert normalized_surface_dice(pred, gt, spacing, 0.5) == pytest.approx(72 / 112)
    assert normalized_surface_dice(pred, gt, spacing, 3.0) == pytest.approx(1.0)
    # isotropic 1 mm: the far face is 1 mm away, so everything is within 1 mm
    assert hd95(pred, gt, 1.0) == pytest.approx(1.0)


def test_identical_masks() -> None:
    m = _cube(3)
    assert (dice_score(m, m), hd95(m, m, (2, 1, 1)), normalized_surface_dice(m, m, (2, 1, 1))) == (
        1.0,
        0.0,
        1.0,
    )


def test_empty_conventions() -> None:
    empty = np.zeros((10, 10, 10), bool)
    full = _cube(2)
    spacing = (3.0, 1.0, 0.5)
    assert dice_score(empty, empty) == 1.0
    assert hd95(empty, empty, spacing) == 0.0
    assert normalized_surface_dice(empty, empty, spacing) == 1.0
    diagonal = np.sqrt(30.0**2 + 10.0**2 + 5.0**2)
    for a, b in ((empty, full), (full, empty)):
        assert dice_score(a, b) == 0.0
        assert normalized_surface_dice(a, b, spacing) == 0.0
        assert hd95(a, b, spacing) == pytest.approx(diagonal)


def _brute_force_pooled(pred: np.ndarray, gt: np.ndarray, spacing: np.ndarray) -> np.ndarray:
    """All-pairs distances between surface voxels (same surface definition, no EDT, no cropping)."""
    st = ndimage.generate_binary_structure(pred.ndim, 1)
    sp_ = np.argwhere(pred & ~ndimage.binary_erosion(pred, st, border_value=0)) * spacing
    sg_ = np.argwhere(gt & ~ndimage.binary_erosion(gt, st, border_value=0)) * spacing
    d = np.sqrt(((sp_[:, None, :] - sg_[None, :, :]) ** 2).sum(-1))
    return np.concatenate([d.min(axis=1), d.min(axis=0)])


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_brute_force_on_random_blobs(seed: int) -> None:
    rng = np.random.default_rng(seed)
    shape = (9, 14, 13)
    # smoothed noise -> a few irregular blobs per mask
    pred = ndimage.gaussian_filter(rng.random(shape), 1.5) > 0.52
    gt = ndimage.gaussian_filter(rng.random(shape), 1.5) > 0.52
    pred[0, :, :3] = True  # touch the image border so the crop/border handling is exercised
    spacing = np.array([2.5, 0.7, 1.1])
    assert pred.sum() > 20 and gt.sum() > 20
    d = _brute_force_pooled(pred, gt, spacing)
    assert hd95(pred, gt, spacing) == pytest.approx(np.percentile(d, 95))
    assert normalized_surface_dice(pred, gt, spacing, 1.5) == pytest.approx(np.mean(d <= 1.5))


def test_mask_errors() -> None:
    with pytest.raises(ValueError, match=r"\(4, 4\).*\(4, 5\)"):
        dice_score(np.zeros((4, 4)), np.zeros((4, 5)))
    with pytest.raises(ValueError, match="spacing"):
        hd95(_cube(2), _cube(3), (1.0, 1.0))
    with pytest.raises(ValueError, match="spacing"):
        hd95(_cube(2), _cube(3), (1.0, 0.0, 1.0))


# ---------------------------------------------------------------------------------------------------------
# Label maps
# ---------------------------------------------------------------------------------------------------------


def _label_pair() -> tuple[np.ndarray, np.ndarray]:
    gt = _cube(2).astype(np.uint8)
    pred = _cube(3).astype(np.uint8)
    gt[8, 8, 8] = 2  # class 2 only in gt
    return pred, gt


def test_compute_segmentation_metrics() -> None:
    pred, gt = _label_pair()
    spacing = (3.0, 1.0, 1.0)
    res = compute_segmentation_metrics(pred, gt, spacing, labels={0: "bg", 1: "liver", 2: "tumor", 3: "cyst"})
    assert set(res) == {"liver", "tumor", "cyst", "mean"}
    assert res["liver"]["dice"] == pytest.approx(0.75)
    assert res["liver"]["hd95"] == pytest.approx(3.0)
    assert res["liver"]["nsd"] == pytest.approx(80 / 112)
    assert (res["liver"]["pred_voxels"], res["liver"]["gt_voxels"]) == (64, 64)
    diagonal = np.sqrt(30.0**2 + 10.0**2 + 10.0**2)
    assert res["tumor"] == {
        "dice": 0.0,
        "hd95": pytest.approx(diagonal),
        "nsd": 0.0,
        "pred_voxels": 0,
        "gt_voxels": 1,
    }
    assert res["cyst"]["dice"] == 1.0 and res["cyst"]["hd95"] == 0.0  # absent from both
    assert res["mean"]["dice"] == pytest.approx((0.75 + 0 + 1) / 3)
    assert res["mean"]["hd95"] == pytest.approx((3.0 + diagonal + 0) / 3)
    # labels=None: only classes present, named by value
    assert set(compute_segmentation_metrics(pred, gt, spacing)) == {"1", "2", "mean"}
    assert all(np.isfinite(v) for c in res.values() for v in c.values())


def test_compute_shape_mismatch() -> None:
    with pytest.raises(ValueError, match=r"\(10, 10, 10\).*\(10, 10, 9\)"):
        compute_segmentation_metrics(np.zeros((10, 10, 10), int), np.zeros((10, 10, 9), int), 1.0)
    with pytest.raises(ValueError, match="integer"):
        compute_segmentation_metrics(np.full((3, 3), 0.5), np.zeros((3, 3)), 1.0)


# ---------------------------------------------------------------------------------------------------------
# Folders and output files
# ---------------------------------------------------------------------------------------------------------


def _save(path: Path, data: np.ndarray, zooms=(3.0, 1.0, 1.0)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(data.astype(np.uint8), np.diag([*zooms, 1.0])), path)
    return path


def test_evaluate_folders_matching_and_missing(tmp_path: Path) -> None:
    pred, gt = _label_pair()
    # stored axis order (i, j, k) with voxel sizes (3, 1, 1): same numbers as the (Z, Y, X) case above
    _save(tmp_path / "gt" / "case_a.nii.gz", gt)
    _save(tmp_path / "gt" / "case_b.nii.gz", gt)
    _save(tmp_path / "pred" / "case_a_0000.nii.gz", pred)  # nnU-Net channel suffix still matches
    _save(tmp_path / "pred" / "case_c.nii.gz", pred)
    with pytest.warns(UserWarning, match=r"case_b.*case_c"):
        res = evaluate_folders(tmp_path / "pred", tmp_path / "gt", labels={1: "liver", 2: "tumor"})
    assert res["missing_predictions"] == ["case_b"] and res["extra_predictions"] == ["case_c"]
    assert list(res["cases"]) == ["case_a"]
    expected = compute_segmentation_metrics(pred, gt, (3.0, 1.0, 1.0), {1: "liver", 2: "tumor"})
    assert res["cases"]["case_a"]["metrics"] == expected
    assert res["mean"]["liver"]["hd95"] == pytest.approx(3.0)  # spacing came from the gt header
    assert res["mean"]["mean"]["dice"] == pytest.approx(expected["mean"]["dice"])

    write_metrics(res, tmp_path / "out" / "m.json", tmp_path / "out" / "m.csv")
    assert json.loads((tmp_path / "out" / "m.json").read_text())["missing_predictions"] == ["case_b"]
    rows = list(csv.reader((tmp_path / "out" / "m.csv").open()))
    assert rows[0] == ["case", "class", "dice", "hd95", "nsd"]
    assert ["case_a", "liver", "0.75", "3", f"{80 / 112:.6g}"] in rows
    assert any(r[0] == "mean" and r[1] == "mean" for r in rows)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["m.csv", "m.json"]  # no temp files


def test_evaluate_single_files_and_errors(tmp_path: Path) -> None:
    pred, gt = _label_pair()
    p = _save(tmp_path / "p.nii.gz", pred, zooms=(1.0, 1.0, 1.0))
    g = _save(tmp_path / "g.nii.gz", gt, zooms=(1.0, 1.0, 1.0))
    res = evaluate_folders(p, g)
    assert res["cases"]["g"]["metrics"]["1"]["hd95"] == pytest.approx(1.0)

    bad = _save(tmp_path / "bad.nii.gz", pred[:, :, :9])
    with pytest.raises(ValueError, match=r"bad\.nii\.gz.*g\.nii\.gz"):
        evaluate_folders(bad, g)

    _save(tmp_path / "A" / "x.nii.gz", pred)
    _save(tmp_path / "B" / "y.nii.gz", gt)
    with pytest.raises(ValueError, match="no case names match"):
        evaluate_folders(tmp_path / "A", tmp_path / "B")
    with pytest.raises(FileNotFoundError):
        evaluate_folders(tmp_path / "nope", tmp_path / "B")


# ---------------------------------------------------------------------------------------------------------
# evaluate module
# ---------------------------------------------------------------------------------------------------------


def test_evaluate_module_offline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    evaluate = pytest.importorskip("evaluate")
    assert Path(METRIC_PATH).is_file()
    metric = evaluate.load(METRIC_PATH)
    pred, gt = _label_pair()
    out = metric.compute(predictions=[pred], references=[gt], spacing=(3.0, 1.0, 1.0), num_labels=3)
    direct = compute_segmentation_metrics(pred, gt, (3.0, 1.0, 1.0), {1: "1", 2: "2"})
    assert out["per_example"][0] == direct
    assert out["mean_dice"] == pytest.approx(direct["mean"]["dice"])
    assert out["mean_hd95"] == pytest.approx(direct["mean"]["hd95"])
    assert out["per_class"]["1"]["nsd"] == pytest.approx(80 / 112)

    # 2-D slices, several examples, added in batches
    metric.add_batch(predictions=[pred[4], pred[5]], references=[gt[4], gt[5]])
    out2 = metric.compute(spacing=(1.0, 1.0), labels={1: "liver"})
    assert out2["per_class"]["liver"]["dice"] == pytest.approx(1.0)
    assert out2["mean_nsd"] == pytest.approx(1.0)
