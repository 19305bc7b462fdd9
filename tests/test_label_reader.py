"""The one label reader (`volumes.labels.read_labels` / `load_labels`), the one mean over cases
(`metrics.mean_over_cases`) shared by `evaluate`, the `evaluate` module and fine-tuning, and the atomic writers
of the synthetic dataset."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from meddinov3_hf.data.nnunet import NnUNetDataset
from meddinov3_hf.data.synthetic import write_nnunet_dataset
from meddinov3_hf.finetuning.evaluation import _dice_only
from meddinov3_hf.metrics import METRIC_PATH, compute_segmentation_metrics, mean_over_cases
from meddinov3_hf.volumes.evaluation import evaluate_folders
from meddinov3_hf.volumes.io import VolumeError, load_volume, save_labels
from meddinov3_hf.volumes.labels import integer_labels, load_labels, read_labels

# Stored axes permuted and flipped relative to RAS, so the canonical order differs from the stored one.
AFFINE = np.array([[0.0, 0.0, -2.5, 30.0], [-0.8, 0.0, 0.0, 10.0], [0.0, 0.9, 0.0, -5.0], [0, 0, 0, 1]])
SHAPE = (6, 7, 5)


def _save(path: Path, data: np.ndarray, affine: np.ndarray = AFFINE) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(np.asarray(data), affine), path)
    return path


def _scan(path: Path) -> Path:
    data = np.full(SHAPE, -1000, np.int16)  # air, and a bright block, so it reads as CT
    data[2:4, 2:5, 1:4] = 800
    return _save(path, data)


def _labels(seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 3, SHAPE).astype(np.uint8)


# ---------------------------------------------------------------------------------------------------------
# read_labels / load_labels
# ---------------------------------------------------------------------------------------------------------


def test_read_labels_keeps_stored_order_and_converts_integral_floats(tmp_path: Path) -> None:
    data = _labels()
    stored = read_labels(_save(tmp_path / "a.nii.gz", data))
    assert stored.array.dtype == np.uint8 and np.array_equal(stored.array, data)
    assert np.allclose(stored.affine, AFFINE)

    floats = read_labels(_save(tmp_path / "f.nii.gz", data.astype(np.float32)))
    assert floats.array.dtype == np.int64 and np.array_equal(floats.array, data)
    trailing = read_labels(_save(tmp_path / "t.nii.gz", data[..., None]))  # (X, Y, Z, 1)
    assert trailing.array.shape == SHAPE


@pytest.mark.parametrize(
    ("name", "data", "message"),
    [
        ("frac.nii.gz", np.full(SHAPE, 0.5, np.float32), "non-integer"),
        ("nan.nii.gz", np.full(SHAPE, np.nan, np.float32), "NaN"),
        ("neg.nii.gz", np.full(SHAPE, -2, np.int16), r"negative label values \[-2\]"),
        ("four.nii.gz", np.zeros((*SHAPE, 2), np.uint8), "must be 3-D"),
    ],
)
def test_read_labels_refuses_naming_the_file(
    tmp_path: Path, name: str, data: np.ndarray, message: str
) -> None:
    path = _save(tmp_path / name, data)
    with pytest.raises(VolumeError, match=f"{name}: .*{message}"):
        read_labels(path)


def test_read_labels_unreadable_and_missing(tmp_path: Path) -> None:
    garbage = tmp_path / "g.nii.gz"
    garbage.write_bytes(b"not a nifti")
    with pytest.raises(VolumeError, match=r"g\.nii\.gz: cannot read label map"):
        read_labels(garbage)
    with pytest.raises(FileNotFoundError, match="nope.nii.gz"):
        read_labels(tmp_path / "nope.nii.gz")


def test_load_labels_is_canonical_and_checks_the_grid(tmp_path: Path) -> None:
    scan = _scan(tmp_path / "ct.nii.gz")
    volume = load_volume(scan)
    data = _labels(1)
    labels = load_labels(_save(tmp_path / "l.nii.gz", data), volume)
    assert np.array_equal(labels, volume.to_canonical(data))
    assert labels.shape == volume.hu.shape != SHAPE  # really reoriented

    shifted = AFFINE.copy()
    shifted[0, 3] += 2.0
    with pytest.raises(VolumeError, match=r"far\.nii\.gz: affine differs from ct\.nii\.gz"):
        load_labels(_save(tmp_path / "far.nii.gz", data, shifted), volume)
    with pytest.raises(VolumeError, match=r"small\.nii\.gz: shape \(6, 7, 4\) differs from ct\.nii\.gz"):
        load_labels(_save(tmp_path / "small.nii.gz", data[..., :4]), volume)


def test_nnunet_case_with_negative_labels_names_the_file(tmp_path: Path) -> None:
    root = write_nnunet_dataset(
        tmp_path / "ds", n_cases=2, shape=(4, 24, 24), spacing=(3.0, 1.0, 1.0), seed=0
    )
    dataset = NnUNetDataset(root)
    label = dataset.label_path(dataset.case_ids[0])
    img = nib.load(label)
    data = np.asarray(img.dataobj).astype(np.int16)
    data[0, 0, 0] = -1
    _save(label, data, img.affine)
    with pytest.raises(VolumeError, match=f"{label.name}: negative label values"):
        dataset.load_case(dataset.case_ids[0])
    assert any(label.name in p and "negative" in p for p in dataset.validate(check_image_data=False))


def test_save_labels_uses_the_same_integer_rule(tmp_path: Path) -> None:
    volume = load_volume(_scan(tmp_path / "ct.nii.gz"))
    with pytest.raises(VolumeError, match="negative label values"):
        save_labels(np.full(volume.hu.shape, -1, np.int16), volume, tmp_path / "out.nii.gz")
    with pytest.raises(VolumeError, match="labels must be integers"):
        integer_labels(np.array(["a"]), "x")
    assert not (tmp_path / "out.nii.gz").exists()


# ---------------------------------------------------------------------------------------------------------
# mean_over_cases: one implementation for evaluate, the evaluate module and fine-tuning
# ---------------------------------------------------------------------------------------------------------


def test_mean_over_cases_partial_classes_and_scores() -> None:
    cases = [
        {"b": {"dice": 0.5}, "a": {"dice": 1.0}, "mean": {"dice": 0.75}},
        {"a": {"dice": 0.0}, "mean": {"dice": 0.0}},
    ]
    means = mean_over_cases(cases)
    assert list(means) == ["b", "a", "mean"]  # first seen, "mean" last
    assert means == {"b": {"dice": 0.5}, "a": {"dice": 0.5}, "mean": {"dice": 0.375}}
    counted = mean_over_cases(cases, counts=True)
    assert counted["b"]["n_cases"] == 1 and counted["a"]["n_cases"] == 2 and counted["mean"]["n_cases"] == 2


def test_the_three_callers_agree(tmp_path: Path) -> None:
    evaluate = pytest.importorskip("evaluate")
    preds, gts = [_labels(2), _labels(3)], [_labels(4), _labels(5)]
    for i, (p, g) in enumerate(zip(preds, gts)):
        _save(tmp_path / "pred" / f"c{i}.nii.gz", p, np.diag([2.0, 1.0, 1.5, 1.0]))
        _save(tmp_path / "gt" / f"c{i}.nii.gz", g, np.diag([2.0, 1.0, 1.5, 1.0]))
    names = {1: "liver", 2: "kidney"}
    folders = evaluate_folders(tmp_path / "pred", tmp_path / "gt", labels=names)["mean"]

    module = evaluate.load(METRIC_PATH).compute(
        predictions=preds, references=gts, spacing=(2.0, 1.0, 1.5), labels=names
    )
    for name in names.values():
        for key in ("dice", "hd95", "nsd"):
            assert module["per_class"][name][key] == pytest.approx(folders[name][key])
    assert module["mean_dice"] == pytest.approx(folders["mean"]["dice"])

    # The fine-tuning validator's Dice-only pass goes through the same mean.
    dice_only = mean_over_cases([_dice_only(p, g, {0: "bg", **names}) for p, g in zip(preds, gts)])
    for name in [*names.values(), "mean"]:
        assert dice_only[name]["dice"] == pytest.approx(folders[name]["dice"])
    full = compute_segmentation_metrics(preds[0], gts[0], (2.0, 1.0, 1.5), names)
    assert _dice_only(preds[0], gts[0], names)["liver"]["dice"] == full["liver"]["dice"]


# ---------------------------------------------------------------------------------------------------------
# Atomic writers of the synthetic dataset (files.atomic_path)
# ---------------------------------------------------------------------------------------------------------


def test_synthetic_dataset_files_have_ordinary_modes_and_no_temporaries(tmp_path: Path) -> None:
    umask = os.umask(0)
    os.umask(umask)
    root = write_nnunet_dataset(
        tmp_path / "ds", n_cases=1, shape=(4, 24, 24), spacing=(3.0, 1.0, 1.0), seed=0
    )
    files = sorted(p for p in root.rglob("*") if p.is_file())
    names = sorted(p.relative_to(root).as_posix() for p in files)
    assert names == ["dataset.json", "imagesTr/case_000_0000.nii.gz", "labelsTr/case_000.nii.gz"]
    assert not [p for p in root.rglob(".*")]
    for path in files:  # mkstemp's 0600 made the old files unreadable to other users
        assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask, path
