"""Dataset seam (issue #11): the `SegmentationCases` interface, and Medical Segmentation Decathlon and
TotalSegmentator layouts converted into nnU-Net raw format, checked, and fine-tuned on."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from conftest import tiny_config

from meddinov3_hf import MedDINOv3ImageProcessor, MedDINOv3Model
from meddinov3_hf.cli import main
from meddinov3_hf.data.cases import SegmentationCases
from meddinov3_hf.data.conversion import DatasetConversionError, convert_msd, convert_totalsegmentator
from meddinov3_hf.data.nnunet import DatasetValidationError, NnUNetDataset, validate
from meddinov3_hf.data.slices import build_slice_dataset
from meddinov3_hf.data.synthetic import write_nnunet_dataset
from meddinov3_hf.files import OutputPathError

SHAPE, SPACING = (8, 48, 48), (2.5, 0.8, 0.8)


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> NnUNetDataset:
    """A synthetic nnU-Net dataset; the MSD and TotalSegmentator sources below are re-arrangements of it."""
    root = tmp_path_factory.mktemp("reference")
    return NnUNetDataset(write_nnunet_dataset(root / "nn", n_cases=3, shape=SHAPE, spacing=SPACING, seed=3))


def make_msd(ref: NnUNetDataset, root: Path) -> Path:
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    (root / "imagesTs").mkdir()
    training = []
    for case in ref.case_ids:
        shutil.copyfile(ref.image_path(case), root / "imagesTr" / f"{case}.nii.gz")
        shutil.copyfile(ref.label_path(case), root / "labelsTr" / f"{case}.nii.gz")
        training.append({"image": f"./imagesTr/{case}.nii.gz", "label": f"./labelsTr/{case}.nii.gz"})
    (root / "imagesTr" / f"._{ref.case_ids[0]}.nii.gz").write_bytes(
        b"\0macOS resource fork"
    )  # as in MSD tars
    shutil.copyfile(ref.image_path(ref.case_ids[0]), root / "imagesTs" / "unseen_7.nii.gz")
    meta = {
        "name": "Synthetic",
        "description": "MSD-style copy",
        "tensorImageSize": "3D",
        "modality": {"0": "CT"},
        "labels": {str(i): name for name, i in ref.meta["labels"].items()},
        "numTraining": len(training),
        "numTest": 1,
        "training": training,
        "test": ["./imagesTs/unseen_7.nii.gz"],
    }
    (root / "dataset.json").write_text(json.dumps(meta, indent=2))
    return root


def make_totalsegmentator(ref: NnUNetDataset, root: Path) -> Path:
    for case in ref.case_ids:
        (root / case / "segmentations").mkdir(parents=True)
        shutil.copyfile(ref.image_path(case), root / case / "ct.nii.gz")
        label = nib.load(ref.label_path(case))
        data = np.asarray(label.dataobj)
        for name, value in ref.label2id.items():
            if value:
                mask = nib.Nifti1Image((data == value).astype(np.uint8), label.affine)
                nib.save(mask, root / case / "segmentations" / f"{name}.nii.gz")
    (root / "meta.csv").write_text("image_id;split\n")
    return root


def _tree_digest(folder: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(folder.rglob("*")):
        h.update(str(p.relative_to(folder)).encode())
        if p.is_file():
            h.update(p.read_bytes())
    return h.hexdigest()


def _same_cases(converted: NnUNetDataset, ref: NnUNetDataset, names: dict[str, str] | None = None) -> None:
    """Every case's canonical HU and labels equal the reference's (labels compared by class name)."""
    assert converted.case_ids == ref.case_ids
    for case in ref.case_ids:
        volume, labels = converted.load_case(case)
        ref_volume, ref_labels = ref.load_case(case)
        np.testing.assert_array_equal(volume.hu, ref_volume.hu)
        assert volume.spacing == pytest.approx(ref_volume.spacing)
        for name, value in ref.label2id.items():
            if value:
                new_id = converted.label2id.get((names or {}).get(name, name))
                expected = ref_labels == value
                if new_id is None:  # left out: background now
                    assert not (labels[expected] > 0).any()
                else:
                    np.testing.assert_array_equal(labels == new_id, expected)


# ---------------------------------------------------------------------------------------------------------
# The interface
# ---------------------------------------------------------------------------------------------------------


class _FirstTwoCases:
    """A dataset that is not an NnUNetDataset: two cases of one, exposed through the interface only."""

    def __init__(self, inner: NnUNetDataset):
        self._inner = inner
        self.root, self.case_ids = inner.root, inner.case_ids[:2]
        self.id2label, self.ignore_label, self.file_ending = inner.id2label, inner.ignore_label, ".nii.gz"

    def image_path(self, case_id):
        return self._inner.image_path(case_id)

    def label_path(self, case_id):
        return self._inner.label_path(case_id)

    def files(self, case_ids=None):
        return self._inner.files(self.case_ids if case_ids is None else case_ids)

    def load_case(self, case_id):
        return self._inner.load_case(case_id)


def test_nnunet_dataset_satisfies_the_interface_and_others_plug_in(reference, tmp_path):
    assert isinstance(reference, SegmentationCases)
    assert not isinstance(str(reference.root), SegmentationCases)
    other = _FirstTwoCases(reference)
    assert isinstance(other, SegmentationCases)
    slices = build_slice_dataset(other, tmp_path / "cache")
    assert sorted(set(slices["case_id"])) == reference.case_ids[:2]
    assert len(slices) == 2 * SHAPE[0]


# ---------------------------------------------------------------------------------------------------------
# Medical Segmentation Decathlon
# ---------------------------------------------------------------------------------------------------------


def test_msd_converts_to_a_valid_nnunet_dataset(reference, tmp_path):
    src = make_msd(reference, tmp_path / "Task99_Synthetic")
    before = _tree_digest(src)
    out = convert_msd(src, tmp_path / "out")
    assert validate(out) == []
    converted = NnUNetDataset(out)
    assert converted.label2id == reference.label2id and converted.meta["name"] == "Synthetic"
    _same_cases(converted, reference)
    assert sorted(p.name for p in (out / "imagesTs").iterdir()) == ["unseen_7_0000.nii.gz"]
    assert _tree_digest(src) == before  # inputs untouched


def test_msd_refuses_a_4d_image_naming_the_file(reference, tmp_path):
    src = make_msd(reference, tmp_path / "Task98_TwoPhase")
    case = reference.case_ids[1]
    img = nib.load(src / "imagesTr" / f"{case}.nii.gz")
    data = np.asarray(img.dataobj)
    nib.save(
        nib.Nifti1Image(np.stack([data, data], axis=-1), img.affine), src / "imagesTr" / f"{case}.nii.gz"
    )
    with pytest.raises(DatasetConversionError, match=rf"imagesTr/{case}\.nii\.gz: 4-D image of shape"):
        convert_msd(src, tmp_path / "out")
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out*"))


def test_msd_problems_are_reported_together_before_writing(reference, tmp_path):
    src = make_msd(reference, tmp_path / "Task97_Bad")
    a, b = reference.case_ids[:2]
    label = nib.load(src / "labelsTr" / f"{a}.nii.gz")
    bad = np.asarray(label.dataobj).copy()
    bad[0, 0, 0] = 9  # undeclared class
    nib.save(nib.Nifti1Image(bad, label.affine), src / "labelsTr" / f"{a}.nii.gz")
    nib.save(nib.Nifti1Image(bad[:-1], label.affine), src / "labelsTr" / f"{b}.nii.gz")  # wrong shape
    with pytest.raises(DatasetValidationError) as err:
        convert_msd(src, tmp_path / "out")
    assert any(f"{a}.nii.gz: label value(s) [9]" in p for p in err.value.problems)
    assert any(f"{b}.nii.gz: shape" in p for p in err.value.problems)
    assert not (tmp_path / "out").exists()


def test_msd_refuses_non_ct_and_missing_files(reference, tmp_path):
    src = make_msd(reference, tmp_path / "Task96_MR")
    meta = json.loads((src / "dataset.json").read_text())
    (src / "dataset.json").write_text(json.dumps({**meta, "modality": {"0": "MRI"}}))
    with pytest.raises(DatasetConversionError, match="dataset.json: modality .*only single-channel CT"):
        convert_msd(src, tmp_path / "out")
    meta["training"][0]["image"] = "./imagesTr/nothing.nii.gz"
    (src / "dataset.json").write_text(json.dumps(meta))
    with pytest.raises(DatasetConversionError, match=r"imagesTr/nothing\.nii\.gz: file does not exist"):
        convert_msd(src, tmp_path / "out")


# ---------------------------------------------------------------------------------------------------------
# TotalSegmentator
# ---------------------------------------------------------------------------------------------------------


def test_totalsegmentator_masks_become_one_label_map(reference, tmp_path):
    src = make_totalsegmentator(reference, tmp_path / "ts")
    before = _tree_digest(src)
    out = convert_totalsegmentator(src, tmp_path / "out")
    assert validate(out) == []
    converted = NnUNetDataset(out)
    names = sorted(n for n, v in reference.label2id.items() if v)
    assert converted.label2id == {"background": 0, **{n: i + 1 for i, n in enumerate(names)}}
    _same_cases(converted, reference)
    assert _tree_digest(src) == before

    subset = convert_totalsegmentator(src, tmp_path / "subset", structures=["spleen", "liver"])
    assert NnUNetDataset(subset).label2id == {"background": 0, "spleen": 1, "liver": 2}
    _same_cases(NnUNetDataset(subset), reference)  # kidney is background there


@pytest.mark.parametrize("problem", ["overlap", "missing", "values", "grid"])
def test_totalsegmentator_bad_masks_are_refused_naming_the_file(reference, tmp_path, problem):
    src = make_totalsegmentator(reference, tmp_path / "ts")
    case = reference.case_ids[2]
    liver = src / case / "segmentations" / "liver.nii.gz"
    img = nib.load(liver)
    data = np.asarray(img.dataobj)
    if problem == "overlap":
        kidney = np.asarray(nib.load(src / case / "segmentations" / "kidney.nii.gz").dataobj)
        nib.save(nib.Nifti1Image(np.maximum(data, kidney), img.affine), liver)
        expected = "liver.nii.gz: .* also belong to 'kidney'"
    elif problem == "missing":
        liver.unlink()
        expected = "liver.nii.gz: mask file does not exist"
    elif problem == "values":
        nib.save(nib.Nifti1Image(data * 2, img.affine), liver)
        expected = "liver.nii.gz: mask values must be 0 or 1"
    else:
        shifted = img.affine.copy()
        shifted[0, 3] += 5.0
        nib.save(nib.Nifti1Image(data, shifted), liver)
        expected = "liver.nii.gz: affine differs from ct.nii.gz"
    with pytest.raises(DatasetConversionError, match=expected):
        convert_totalsegmentator(src, tmp_path / "out")
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out*"))


# ---------------------------------------------------------------------------------------------------------
# Command line and fine-tuning
# ---------------------------------------------------------------------------------------------------------


def test_cli_convert_dataset_and_output_guard(reference, tmp_path, capsys):
    src = make_totalsegmentator(reference, tmp_path / "ts")
    out = tmp_path / "nn"
    assert (
        main(["convert-dataset", "--format", "totalsegmentator", str(src), str(out), "--structures", "liver"])
        == 0
    )
    assert "3 case(s) converted" in capsys.readouterr().out
    assert NnUNetDataset(out).label2id == {"background": 0, "liver": 1}
    digest = _tree_digest(out)
    assert main(["convert-dataset", "--format", "totalsegmentator", str(src), str(out)]) == 2  # not empty
    assert "not empty" in capsys.readouterr().err and _tree_digest(out) == digest
    assert main(["convert-dataset", "--format", "msd", str(src), str(src / "inside")]) == 2
    assert "inside the input folder" in capsys.readouterr().err
    with pytest.raises(OutputPathError):
        convert_msd(src, src / "inside")
    assert main(["convert-dataset", "--format", "msd", str(src), str(tmp_path / "x")]) == 2  # no dataset.json
    assert "dataset.json" in capsys.readouterr().err


@pytest.mark.parametrize("layout", ["msd", "totalsegmentator"])
def test_converted_datasets_fine_tune(reference, tmp_path, layout):
    from meddinov3_hf.finetuning import run_finetune

    if layout == "msd":
        data = convert_msd(make_msd(reference, tmp_path / "src"), tmp_path / "nn")
    else:
        data = convert_totalsegmentator(make_totalsegmentator(reference, tmp_path / "src"), tmp_path / "nn")
    MedDINOv3Model(tiny_config()).save_pretrained(tmp_path / "backbone")
    MedDINOv3ImageProcessor().save_pretrained(tmp_path / "backbone")
    out = tmp_path / "run"
    argv = [
        "--dataset", str(data), "--model", str(tmp_path / "backbone"), "--fold", "all", "--patch_size", "32",
        "--slice_cache_dir", str(tmp_path / "cache"), "--output_dir", str(out), "--per_device_train_batch_size", "2",
        "--iterations_per_epoch", "2", "--max_steps", "2", "--report_to", "none", "--disable_tqdm", "true",
        "--eval_strategy", "no", "--save_strategy", "no", "--seed", "0",
    ]  # fmt: skip
    assert run_finetune(argv) == 0
    metrics = json.loads((out / "validation" / "metrics.json").read_text())
    assert set(metrics["cases"]) == set(reference.case_ids)
    assert set(metrics["mean"]) == {*NnUNetDataset(data).label2id, "mean"} - {"background"}
    assert (out / "model.safetensors").is_file()
