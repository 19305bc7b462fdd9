"""nnU-Net raw datasets: synthetic generator, validation, cross-validation splits, slice dataset cache."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from meddinov3_hf.data import slices as slices_mod
from meddinov3_hf.data.nnunet import (
    DatasetValidationError,
    NnUNetDataset,
    split_cases,
    validate,
    write_splits_file,
)
from meddinov3_hf.data.slices import build_slice_dataset, decode_slice
from meddinov3_hf.data.synthetic import (
    SYNTHETIC_ORGANS,
    canonical_affine,
    make_synthetic_ct,
    synthetic_label_map,
    write_nnunet_dataset,
)

SHAPE = (6, 32, 40)
SPACING = (3.0, 0.9, 0.8)


@pytest.fixture()
def dataset_root(tmp_path: Path) -> Path:
    return write_nnunet_dataset(tmp_path / "ds", n_cases=3, shape=SHAPE, spacing=SPACING, seed=1)


# --------------------------------------------------------------------------------------------------------
# Synthetic generator
# --------------------------------------------------------------------------------------------------------


def test_synthetic_ct_is_anatomy_like_and_seeded():
    hu, labels = make_synthetic_ct((32, 64, 64), (2.5, 0.8, 0.8), seed=7, n_organs=3)
    assert hu.dtype == np.int16 and labels.dtype == np.uint8 and hu.shape == labels.shape == (32, 64, 64)
    assert set(np.unique(labels)) == {0, 1, 2, 3}
    assert hu[:, 0, 0].mean() < -900  # air in the corners
    assert hu.max() > 400  # bone
    # Portal-venous phase: kidney (~160-200) > spleen (120) > liver (105) > soft tissue (40).
    means = {i: hu[labels == i].mean() for i in (1, 2, 3)}
    assert means[2] > means[3] + 30 and means[3] > means[1] + 5 and means[1] > 80
    # Same seed → identical; other seed → different positions.
    hu2, labels2 = make_synthetic_ct((32, 64, 64), (2.5, 0.8, 0.8), seed=7, n_organs=3)
    assert np.array_equal(hu, hu2) and np.array_equal(labels, labels2)
    _, labels3 = make_synthetic_ct((32, 64, 64), (2.5, 0.8, 0.8), seed=8, n_organs=3)
    assert not np.array_equal(labels, labels3)
    # Liver sits on the patient's right = low X index in the canonical orientation.
    xs = np.nonzero(labels == 1)[2]
    assert xs.mean() < 32


def test_synthetic_all_organs_and_errors():
    _, labels = make_synthetic_ct((24, 48, 48), (3.0, 1.0, 1.0), seed=0, n_organs=len(SYNTHETIC_ORGANS))
    assert set(np.unique(labels)) == set(range(len(SYNTHETIC_ORGANS) + 1))
    assert list(synthetic_label_map(2)) == ["background", "liver", "kidney"]
    with pytest.raises(ValueError, match="n_organs"):
        make_synthetic_ct(n_organs=99)


def test_write_case_is_fast(tmp_path: Path):
    t0 = time.perf_counter()
    write_nnunet_dataset(tmp_path, n_cases=1, shape=(32, 64, 64), spacing=(2.5, 0.8, 0.8))
    elapsed = time.perf_counter() - t0
    # Target is < 0.2 s; the bound is loose because tests share a busy machine.
    assert elapsed < 1.0, elapsed


@pytest.mark.parametrize("kind", ["LPS", "RAS", "PIL", "SAR"])
def test_orientations_round_trip_to_canonical(tmp_path: Path, kind: str):
    root = write_nnunet_dataset(tmp_path, n_cases=1, shape=SHAPE, spacing=SPACING, seed=2, affine_kind=kind)
    ds = NnUNetDataset(root)
    vol, labels = ds.load_case("case_000")
    hu_ref, lab_ref = make_synthetic_ct(SHAPE, SPACING, seed=2000)
    assert np.array_equal(vol.hu, hu_ref) and np.array_equal(labels, lab_ref)
    assert np.allclose(vol.spacing, SPACING)
    assert nib.aff2axcodes(nib.load(ds.image_path("case_000")).affine) == tuple(kind)


def test_dataset_metadata(dataset_root: Path):
    ds = NnUNetDataset(dataset_root)
    assert ds.case_ids == ["case_000", "case_001", "case_002"]
    assert ds.id2label == {0: "background", 1: "liver", 2: "kidney", 3: "spleen"}
    assert ds.label2id["spleen"] == 3 and ds.num_labels == 4 and len(ds) == 3
    assert ds.validate() == []
    ds.validate_or_raise()
    with pytest.raises(KeyError, match="nope"):
        ds.image_path("nope")


# --------------------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------------------


def _save(array_zyx: np.ndarray, path: Path, affine: np.ndarray | None = None) -> None:
    aff = canonical_affine(array_zyx.shape, SPACING) if affine is None else affine
    nib.save(nib.Nifti1Image(np.ascontiguousarray(array_zyx.transpose(2, 1, 0)), aff), path)


def test_validate_reports_every_problem_at_once(tmp_path: Path):
    root = write_nnunet_dataset(tmp_path / "bad", n_cases=7, shape=SHAPE, spacing=SPACING, seed=3)
    meta = json.loads((root / "dataset.json").read_text())
    meta["channel_names"] = {"0": "CT", "1": "PET"}  # not a single CT channel
    (root / "dataset.json").write_text(json.dumps(meta))
    # case_000: image without label; extra label without image.
    (root / "labelsTr" / "case_000.nii.gz").rename(root / "labelsTr" / "orphan.nii.gz")
    # case_001: label shape mismatch.
    wrong_shape = np.zeros((SHAPE[0], SHAPE[1], SHAPE[2] - 1), np.uint8)
    _save(wrong_shape, root / "labelsTr" / "case_001.nii.gz", canonical_affine(SHAPE, SPACING))
    # case_002: label affine mismatch (origin shifted by 0.5 mm).
    aff = canonical_affine(SHAPE, SPACING)
    aff[0, 3] += 0.5
    _save(make_synthetic_ct(SHAPE, SPACING, seed=3002)[1], root / "labelsTr" / "case_002.nii.gz", aff)
    # case_003: undeclared label value 9.
    lab = make_synthetic_ct(SHAPE, SPACING, seed=3003)[1]
    lab[0, 0, 0] = 9
    _save(lab, root / "labelsTr" / "case_003.nii.gz")
    # case_004: truncated (unreadable) image.
    img = root / "imagesTr" / "case_004_0000.nii.gz"
    img.write_bytes(img.read_bytes()[:200])
    # case_005: image payload truncated (header still readable).
    img = root / "imagesTr" / "case_005_0000.nii.gz"
    img.write_bytes(img.read_bytes()[: img.stat().st_size // 2])

    problems = validate(root)
    text = "\n".join(problems)
    assert "channel_names" in text
    assert any("case_000_0000.nii.gz" in p and "no label" in p for p in problems)
    assert any("orphan.nii.gz" in p and "no image" in p for p in problems)
    assert any("case_001.nii.gz" in p and "shape" in p for p in problems)
    assert any("case_002.nii.gz" in p and "affine" in p for p in problems)
    assert any("case_003.nii.gz" in p and "[9]" in p for p in problems)
    assert any("case_004_0000.nii.gz" in p for p in problems)
    assert any("case_005_0000.nii.gz" in p and "voxel data" in p for p in problems)
    assert "case_006" not in text  # the healthy case is not blamed

    assert len(problems) == 8, text  # exactly one report per injected problem
    # The dataset.json problem alone already prevents construction, and the error names it.
    with pytest.raises(DatasetValidationError, match="channel_names"):
        NnUNetDataset(root)


def test_validate_or_raise_lists_all_file_problems(tmp_path: Path):
    root = write_nnunet_dataset(tmp_path / "bad", n_cases=3, shape=SHAPE, spacing=SPACING, seed=4)
    ds = NnUNetDataset(root)
    wrong_shape = np.zeros((SHAPE[0], SHAPE[1] + 2, SHAPE[2]), np.uint8)
    _save(wrong_shape, root / "labelsTr" / "case_000.nii.gz", canonical_affine(SHAPE, SPACING))
    (root / "labelsTr" / "case_001.nii.gz").write_bytes(b"not a nifti file")
    with pytest.raises(DatasetValidationError) as exc:
        ds.validate_or_raise()
    assert len(exc.value.problems) == 2
    assert "case_000.nii.gz" in str(exc.value) and "case_001.nii.gz" in str(exc.value)


def test_validate_dataset_json_problems(tmp_path: Path):
    root = write_nnunet_dataset(tmp_path / "a", n_cases=2, shape=SHAPE, spacing=SPACING)
    (root / "dataset.json").unlink()
    assert any("missing dataset.json" in p for p in validate(root))
    (root / "dataset.json").write_text(
        json.dumps({"labels": {"background": 0, "liver": 2}, "numTraining": 5})
    )
    problems = validate(root)
    text = "\n".join(problems)
    assert "'channel_names'" in text and "'file_ending'" in text  # missing keys
    assert "consecutive" in text and "numTraining is 5" in text
    assert any("case_000.nii.gz" in p and "[1, 3]" in p for p in problems)  # liver=1, spleen=3 undeclared
    assert validate(tmp_path / "nowhere") == [f"{tmp_path / 'nowhere'}: dataset folder does not exist"]


# --------------------------------------------------------------------------------------------------------
# Splits
# --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [5, 7, 12, 23, 101])
def test_split_cases_partition_properties(n: int):
    ids = [f"c{i:03d}" for i in np.random.default_rng(n).permutation(n)]  # order must not matter
    vals = []
    for fold in range(5):
        train, val = split_cases(ids, fold)
        assert set(train).isdisjoint(val) and set(train) | set(val) == set(ids)
        assert len(val) == n // 5 + (1 if fold < n % 5 else 0)
        assert train == sorted(train)  # KFold returns train indices ascending
        assert split_cases(list(reversed(ids)), fold) == (train, val)  # deterministic, order independent
        vals.append(val)
    assert sorted(sum(vals, [])) == sorted(ids)  # each case validated exactly once


@pytest.mark.parametrize("n", [5, 9, 40])
def test_split_cases_matches_independent_rederivation(n: int):
    # RandomState.permutation(n) == shuffle(arange(n)) with the same seed; np.array_split makes the first
    # n % k chunks one larger, which is exactly KFold's fold-size rule.
    keys = np.sort(np.array([f"case_{i}" for i in range(n)]))
    chunks = np.array_split(np.random.RandomState(12345).permutation(n), 5)
    for fold, test_idx in enumerate(chunks):
        train, val = split_cases(list(keys), fold)
        assert val == list(keys[test_idx])
        assert train == list(keys[np.setdiff1d(np.arange(n), test_idx)])
    # Another seed gives another split.
    assert split_cases(list(keys), 0, seed=1) != split_cases(list(keys), 0)


def test_split_cases_all_file_and_errors(tmp_path: Path):
    ids = [f"c{i}" for i in range(8)]
    assert split_cases(ids[::-1], "all") == (sorted(ids), sorted(ids))
    with pytest.raises(ValueError, match="fold"):
        split_cases(ids, 5)
    with pytest.raises(ValueError, match="cannot split 3"):
        split_cases(ids[:3], 0)
    path = write_splits_file(tmp_path / "splits_final.json", ids)
    splits = json.loads(path.read_text())
    assert len(splits) == 5 and all(set(s) == {"train", "val"} for s in splits)
    assert split_cases(ids, 2, splits_file=path) == split_cases(ids, 2)
    custom = tmp_path / "custom.json"
    custom.write_text(json.dumps([{"train": ["c0", "c1"], "val": ["c2"]}]))
    assert split_cases(ids, 0, splits_file=custom) == (["c0", "c1"], ["c2"])
    with pytest.raises(ValueError, match="custom.json.*1 fold"):
        split_cases(ids, 1, splits_file=custom)
    with pytest.raises(ValueError, match="custom.json.*c2"):
        split_cases(["c0", "c1"], 0, splits_file=custom)


# --------------------------------------------------------------------------------------------------------
# Slice dataset
# --------------------------------------------------------------------------------------------------------


def test_slice_dataset_round_trips_exactly(dataset_root: Path, tmp_path: Path):
    ds = build_slice_dataset(dataset_root, cache_dir=tmp_path / "cache")
    assert len(ds) == 3 * SHAPE[0]
    for case in range(3):
        hu_ref, lab_ref = make_synthetic_ct(SHAPE, SPACING, seed=1000 + case)
        for z in range(SHAPE[0]):
            row = ds[case * SHAPE[0] + z]
            hu, lab = decode_slice(row)
            assert row["case_id"] == f"case_{case:03d}" and row["slice_index"] == z
            assert hu.dtype == np.int16 and np.array_equal(hu, hu_ref[z])
            assert np.array_equal(lab, lab_ref[z])
            assert (row["height"], row["width"]) == SHAPE[1:]
            assert np.allclose(row["spacing"], SPACING)
            present = sorted(int(c) for c in np.unique(lab_ref[z]) if c > 0)
            assert row["classes"] == present and row["has_foreground"] == bool(present)


def test_slice_dataset_cache_reused_and_invalidated(dataset_root: Path, tmp_path: Path, monkeypatch):
    cache = tmp_path / "cache"
    first = build_slice_dataset(dataset_root, cache_dir=cache)

    def fail(*args, **kwargs):
        raise AssertionError("volume read although the cache should have been used")

    monkeypatch.setattr(slices_mod, "_load_case", fail)
    second = build_slice_dataset(dataset_root, cache_dir=cache)
    assert len(second) == len(first) and second[5]["image"] == first[5]["image"]
    assert len([p for p in cache.iterdir() if p.name.startswith("slices-")]) == 1
    assert not [p for p in cache.iterdir() if p.name.startswith(".building")]  # no leftovers

    # A modified file (new mtime) must not reuse the stale cache.
    label = dataset_root / "labelsTr" / "case_001.nii.gz"
    st = label.stat()
    os.utime(label, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    with pytest.raises(Exception, match="cache should have been used"):
        build_slice_dataset(dataset_root, cache_dir=cache)


def test_slice_dataset_case_filter(dataset_root: Path, tmp_path: Path):
    ds = build_slice_dataset(dataset_root, cache_dir=tmp_path / "cache", case_ids=["case_002"])
    assert len(ds) == SHAPE[0] and set(ds["case_id"]) == {"case_002"}
    with pytest.raises(KeyError, match="case_999"):
        build_slice_dataset(dataset_root, cache_dir=tmp_path / "cache", case_ids=["case_999"])


def test_slice_dataset_rounds_fractional_hu(tmp_path: Path):
    root = write_nnunet_dataset(tmp_path / "ds", n_cases=1, shape=SHAPE, spacing=SPACING, seed=5)
    hu, _ = make_synthetic_ct(SHAPE, SPACING, seed=5000)
    frac = hu.astype(np.float32) + 0.3  # e.g. a float-resampled scan
    _save(frac, root / "imagesTr" / "case_000_0000.nii.gz")
    ds = build_slice_dataset(root, cache_dir=tmp_path / "cache")
    assert np.array_equal(decode_slice(ds[2])[0], hu[2])  # rounded to the nearest integer HU


@pytest.mark.slow
def test_slice_dataset_parallel_build_keeps_order(dataset_root: Path, tmp_path: Path):
    serial = build_slice_dataset(dataset_root, cache_dir=tmp_path / "a")
    parallel = build_slice_dataset(dataset_root, cache_dir=tmp_path / "b", num_proc=2)
    assert parallel["case_id"] == serial["case_id"] and parallel["slice_index"] == serial["slice_index"]
    assert parallel[7]["image"] == serial[7]["image"]
