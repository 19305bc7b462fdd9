"""Named labels (NIfTI header extension, labels.json, model folders), per-structure statistics against an
independent computation, connected-component clean-up, and the `segment` / `postprocess` flags around them."""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET

import nibabel as nib
import numpy as np
import pytest
from conftest import LABELS, tiny_config
from scipy import ndimage

from meddinov3_hf.cli import main as cli_main
from meddinov3_hf.volumes.io import load_volume, save_labels
from meddinov3_hf.volumes.labels import (
    LabelSetError,
    check_label_values,
    read_label_names,
    read_nifti_label_names,
)
from meddinov3_hf.volumes.postprocess import determine_postprocessing, keep_largest, remove_small
from meddinov3_hf.volumes.statistics import compute_statistics

NAMES = {0: "background", 1: "liver", 2: "kidney_left", 3: "spleen"}
# Stored (X, Y, Z) axes permuted and flipped relative to RAS, so canonical order differs from storage.
AFFINE = np.array([[0, 0.8, 0, 40.0], [0, 0, -0.9, -20.0], [-2.5, 0, 0, 10.0], [0, 0, 0, 1.0]])


def _case(seed=0, shape=(14, 12, 9)):
    rng = np.random.default_rng(seed)
    hu = rng.normal(0, 300, shape).astype(np.float32)
    hu[0] = -1000
    labels = np.zeros(shape, np.uint8)
    labels[2:7, 3:8, 2:6] = 1
    labels[11:14, 1:4, 0:3] = 2  # touches the last stored slice (the first axial one: the axis is flipped)
    labels[11, 9, 7] = 2  # a stray voxel
    labels[8:13, 8:11, 5:8] = 3
    return hu, labels


def _write(tmp_path, seed=0):
    hu, labels = _case(seed)
    nib.save(nib.Nifti1Image(hu, AFFINE), tmp_path / "ct.nii.gz")
    return load_volume(tmp_path / "ct.nii.gz"), hu, labels


# -- names ------------------------------------------------------------------------------------------------------
def test_nifti_names_round_trip_and_totalsegmentator_reading(tmp_path):
    volume, _, labels = _write(tmp_path)
    out = save_labels(volume.to_canonical(labels), volume, tmp_path / "seg.nii.gz", label_names=NAMES)
    assert read_nifti_label_names(out) == {1: "liver", 2: "kidney_left", 3: "spleen"}
    # TotalSegmentator's loader reads the first extension's CaretExtension XML label table.
    img = nib.load(out)
    root = ET.fromstring(img.header.extensions[0].get_content().decode().strip())
    table = root.find("./VolumeInformation/LabelTable")
    assert {int(e.get("Key")): e.text for e in table.findall("Label")} == {
        1: "liver",
        2: "kidney_left",
        3: "spleen",
    }
    np.testing.assert_array_equal(np.asanyarray(img.dataobj), labels)

    # ...and a file written the TotalSegmentator way is read back by us.
    xml = (
        '<?xml version="1.0" encoding="UTF-8"?> <CaretExtension>  <Date><![CDATA[2013-07-14T05:45:09]]></Date>'
        '   <VolumeInformation Index="0">   <LabelTable><Label Key="1" Red="1.0" Green="0.0" Blue="0.0" '
        'Alpha="1"><![CDATA[spleen]]></Label>\n<Label Key="5" Red="0" Green="1" Blue="0" Alpha="1"><![CDATA['
        "kidney_right]]></Label>\n  </LabelTable>  <StudyMetaDataLinkSet>  </StudyMetaDataLinkSet>  <VolumeType>"
        "<![CDATA[Label]]></VolumeType>   </VolumeInformation></CaretExtension>\n              "
    )
    theirs = nib.Nifti1Image(labels, AFFINE)
    theirs.header.extensions.append(nib.nifti1.Nifti1Extension(0, xml.encode()))
    nib.save(theirs, tmp_path / "totalseg.nii.gz")
    assert read_label_names(tmp_path / "totalseg.nii.gz") == {1: "spleen", 5: "kidney_right"}


def test_label_names_from_every_source(tmp_path):
    config = tiny_config()
    (tmp_path / "model").mkdir()
    config.save_pretrained(tmp_path / "model")
    assert read_label_names(tmp_path / "model") == LABELS
    assert read_label_names(tmp_path / "model" / "config.json") == LABELS
    (tmp_path / "dataset.json").write_text(json.dumps({"labels": {"background": 0, "liver": 1}}))
    assert read_label_names(tmp_path / "dataset.json") == {0: "background", 1: "liver"}
    (tmp_path / "seg.labels.json").write_text(json.dumps({"labels": {"0": "background", "2": "kidney"}}))
    assert read_label_names(tmp_path / "seg.labels.json") == {0: "background", 2: "kidney"}
    assert read_label_names("0=background,1=liver") == {0: "background", 1: "liver"}
    with pytest.raises(ValueError, match="not a model folder"):
        read_label_names(tmp_path)


def test_label_values_outside_the_set_are_refused():
    labels = np.array([[[0, 1, 4, 7]]])
    with pytest.raises(
        LabelSetError, match=r"value\(s\) 4, 7 are not in the label set \{0: background, 1: liver"
    ):
        check_label_values(labels, {0: "background", 1: "liver"}, "pred.nii.gz")


# -- statistics -------------------------------------------------------------------------------------------------
def test_statistics_equal_an_independent_computation(tmp_path):
    volume, hu, labels = _write(tmp_path)
    stats = compute_statistics(volume.to_canonical(labels), volume, NAMES)
    assert list(stats) == ["liver", "kidney_left", "spleen"]
    voxel_ml = abs(np.linalg.det(AFFINE[:3, :3])) / 1000
    # The scan's slice axis is the stored axis that points along S (here stored axis 0, flipped: -2.5 mm).
    slice_axis = int(np.argmax(np.abs(AFFINE[2, :3])))
    assert slice_axis == 0
    for value, name in ((1, "liver"), (2, "kidney_left"), (3, "spleen")):
        mask = labels == value
        values = hu[mask].astype(np.float64)
        s = stats[name]
        assert s["voxels"] == mask.sum()
        assert s["volume_ml"] == pytest.approx(mask.sum() * voxel_ml)
        assert s["hu_mean"] == pytest.approx(values.mean(), rel=1e-6)
        assert s["hu_std"] == pytest.approx(values.std(), rel=1e-6)
        assert s["hu_median"] == pytest.approx(np.median(values), rel=1e-6)
        assert (s["hu_min"], s["hu_max"]) == (pytest.approx(values.min()), pytest.approx(values.max()))
        ijk = np.argwhere(mask)
        world = (AFFINE @ np.c_[ijk, np.ones(len(ijk))].T).T[
            :, :3
        ]  # voxel centres, RAS mm (axis-aligned grid)
        np.testing.assert_allclose(s["bbox_ras_min"], world.min(0), atol=1e-4)
        np.testing.assert_allclose(s["bbox_ras_max"], world.max(0), atol=1e-4)
        extent = (ijk.max(0) - ijk.min(0) + 1) * np.abs(AFFINE[:3, :3]).sum(0)  # mm along stored axes
        assert sorted(s["bbox_size_mm_zyx"]) == pytest.approx(sorted(extent))
        on_border = ijk[:, slice_axis].min() == 0 or ijk[:, slice_axis].max() == labels.shape[slice_axis] - 1
        assert s["truncated"] == on_border
    assert stats["kidney_left"]["truncated"] and not stats["liver"]["truncated"]


def test_statistics_volume_of_a_tilted_series_uses_the_sheared_voxel(tmp_path):
    pytest.importorskip("pydicom")
    from dicom_series import write_series

    write_series(tmp_path / "ct", tilt_mm_per_slice=1.0, slice_step=2.0, pixel_spacing=(0.5, 0.5))
    volume = load_volume(tmp_path / "ct")
    labels = (volume.hu > 300).astype(np.uint8)
    stats = compute_statistics(labels, volume, {1: "bone"})
    # The true voxel is 0.5 x 0.5 x 2.0 mm (slices 2 mm apart along the normal), whatever the shear.
    assert stats["bone"]["volume_ml"] == pytest.approx(labels.sum() * 0.5 * 0.5 * 2.0 / 1000)


# -- clean-up ---------------------------------------------------------------------------------------------------
def _largest_component(mask):
    components, n = ndimage.label(mask, structure=np.ones((3, 3, 3)))
    sizes = np.bincount(components.ravel())[1:]
    return components == (np.argmax(sizes) + 1)


def test_clean_up_never_removes_a_structures_largest_component():
    rng = np.random.default_rng(0)
    for _ in range(10):
        labels = (rng.integers(1, 4, (10, 12, 11)) * (rng.random((10, 12, 11)) > 0.6)).astype(np.uint8)
        largest = {v: _largest_component(labels == v) for v in (1, 2, 3) if (labels == v).any()}
        kept = keep_largest(labels)
        for cleaned in (
            kept,
            remove_small(labels, (1.0, 1.0, 1.0), 1e9),  # every component is "small"
            remove_small(labels, (2.0, 0.5, 0.5), 3.0),
        ):
            for value, component in largest.items():
                assert (cleaned[component] == value).all()
        for value, component in largest.items():  # and keep_largest keeps nothing else
            np.testing.assert_array_equal(kept == value, component)


def test_keep_largest_and_remove_small_remove_what_they_should():
    labels = np.zeros((6, 10, 10), np.uint8)
    labels[1:4, 1:5, 1:5] = 1  # 48 voxels
    labels[5, 8, 8] = 1  # island, 1 voxel
    labels[1:3, 7:9, 7:9] = 2  # 8 voxels: class 2's only component, below the threshold
    labels[4, 0, 9] = 2  # 1 voxel
    kept = keep_largest(labels)
    assert kept[5, 8, 8] == 0 and kept[4, 0, 9] == 0 and (kept[1:4, 1:5, 1:5] == 1).all()
    small = remove_small(labels, (2.0, 1.0, 1.0), min_volume_mm3=20.0)  # voxel = 2 mm³
    assert small[5, 8, 8] == 0 and small[4, 0, 9] == 0
    assert (small[1:3, 7:9, 7:9] == 2).all()  # 16 mm³ < 20 but it is class 2's largest: kept
    # Groups: classes 1 and 2 as one structure -> only the 48-voxel block survives.
    grouped = keep_largest(labels, [[1, 2]])
    assert set(np.unique(grouped)) == {0, 1} and grouped.sum() == 48


def test_determine_postprocessing_keeps_a_step_only_if_dice_rises(tmp_path):
    (tmp_path / "pred").mkdir()
    (tmp_path / "gt").mkdir()
    for case in range(3):
        gt = np.zeros((12, 12, 8), np.uint8)
        gt[2:6, 2:6, 2:6] = 1
        gt[1:3, 8:11, 1:3] = 2
        gt[8:11, 8:11, 5:7] = 2  # class 2 truly has two parts
        pred = gt.copy()
        pred[10, 1, 7 - case] = 1  # spurious class-1 islands
        nib.save(nib.Nifti1Image(pred, np.eye(4)), tmp_path / "pred" / f"c{case}.nii.gz")
        nib.save(nib.Nifti1Image(gt, np.eye(4)), tmp_path / "gt" / f"c{case}.nii.gz")
    code = cli_main(
        ["postprocess", "--determine", "--pred", str(tmp_path / "pred"), "--gt", str(tmp_path / "gt"),
         "-o", str(tmp_path / "plan.json")]
    )  # fmt: skip
    assert code == 0
    plan = json.loads((tmp_path / "plan.json").read_text())
    assert plan["keep_largest"] == [1]  # class 2 would lose a true part
    assert plan["keep_largest_foreground"] is False
    assert plan["mean_dice_after"] > plan["mean_dice_before"]
    direct = determine_postprocessing(tmp_path / "pred", tmp_path / "gt")
    assert direct["dice_after"][1] == pytest.approx(1.0) and direct["dice_after"][2] == pytest.approx(1.0)

    # Applying the plan to a folder, with the model's names: the islands go, names travel.
    code = cli_main(
        ["postprocess", "-i", str(tmp_path / "pred"), "-o", str(tmp_path / "clean"), "--plan",
         str(tmp_path / "plan.json"), "--names", "0=background,1=liver,2=kidney"]
    )  # fmt: skip
    assert code == 0
    for case in range(3):
        clean = nib.load(tmp_path / "clean" / f"c{case}.nii.gz")
        gt = np.asanyarray(nib.load(tmp_path / "gt" / f"c{case}.nii.gz").dataobj)
        np.testing.assert_array_equal(np.asanyarray(clean.dataobj), gt)
        assert read_nifti_label_names(clean) == {1: "liver", 2: "kidney"}
        assert (tmp_path / "clean" / f"c{case}.labels.json").exists()


def test_postprocess_refuses_labels_outside_the_model_set(tmp_path, capsys):
    _, labels = _case()
    nib.save(nib.Nifti1Image(labels, AFFINE), tmp_path / "seg.nii.gz")
    before = (tmp_path / "seg.nii.gz").read_bytes()
    code = cli_main(
        ["postprocess", "-i", str(tmp_path / "seg.nii.gz"), "-o", str(tmp_path / "out.nii.gz"),
         "--names", "0=background,1=liver,2=kidney_left"]
    )  # fmt: skip
    assert code == 2
    err = capsys.readouterr().err
    assert "seg.nii.gz" in err and "label value(s) 3 are not in the label set" in err
    assert not (tmp_path / "out.nii.gz").exists() and (tmp_path / "seg.nii.gz").read_bytes() == before


# -- segment ----------------------------------------------------------------------------------------------------
def test_segment_writes_every_output_type_from_a_dicom_series(tmp_path, model_dir):
    pytest.importorskip("highdicom")
    import highdicom as hd
    from dicom_series import write_series

    write_series(tmp_path / "ct", tilt_mm_per_slice=0.5)
    before = sorted((p.name, p.read_bytes()) for p in (tmp_path / "ct").iterdir())
    code = cli_main(
        ["segment", "-i", str(tmp_path / "ct"), "-o", str(tmp_path / "out"), "--model", str(model_dir), "--quiet",
         "--output-type", "nifti", "dicom-seg", "rtstruct", "--statistics", "--keep-largest",
         "--remove-small", "2"]
    )  # fmt: skip
    assert code == 0
    assert sorted((p.name, p.read_bytes()) for p in (tmp_path / "ct").iterdir()) == before
    out = tmp_path / "out"
    assert sorted(p.name for p in out.iterdir()) == [
        "segmentations.labels.json", "segmentations.nii.gz", "segmentations.rtstruct.dcm",
        "segmentations.seg.dcm", "segmentations.statistics.csv", "segmentations.statistics.json",
    ]  # fmt: skip
    nifti = nib.load(out / "segmentations.nii.gz")
    assert read_nifti_label_names(nifti) == {1: "liver", 2: "kidney"}
    assert json.loads((out / "segmentations.labels.json").read_text())["labels"] == {
        "0": "background", "1": "liver", "2": "kidney"
    }  # fmt: skip
    # The SEG holds exactly the (cleaned) NIfTI labels on the source slices.
    volume = load_volume(tmp_path / "ct")
    stored = np.asanyarray(nifti.dataobj)  # (columns, rows, slices), slices in the series' order
    seg = hd.seg.segread(out / "segmentations.seg.dcm")
    import pydicom

    by_position = {}
    for path in (tmp_path / "ct").iterdir():
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        by_position[float(np.dot([0, 0, 1], ds.ImagePositionPatient))] = ds.SOPInstanceUID
    uids = [by_position[z] for z in sorted(by_position)]  # normal is +z: slice order = ascending z
    pixels = seg.get_pixels_by_source_instance(uids, combine_segments=True)
    np.testing.assert_array_equal(pixels, stored.transpose(2, 1, 0))
    stats = json.loads((out / "segmentations.statistics.json").read_text())
    assert set(stats) == {"liver", "kidney"}
    assert sum(s["voxels"] for s in stats.values()) == int((stored > 0).sum())
    assert volume.original_shape == stored.shape


def test_segment_refuses_dicom_output_for_nifti_input(tmp_path, model_dir, capsys):
    volume_hu, _ = _case()
    nib.save(nib.Nifti1Image(volume_hu, AFFINE), tmp_path / "ct.nii.gz")
    code = cli_main(
        ["segment", "-i", str(tmp_path / "ct.nii.gz"), "-o", str(tmp_path / "out"), "--model", str(model_dir),
         "--quiet", "--output-type", "rtstruct"]
    )  # fmt: skip
    assert code == 2
    err = capsys.readouterr().err
    assert "ct.nii.gz" in err and "no source series" in err
    assert not (tmp_path / "out").exists()


def test_overlay_uses_carried_names_and_prints_orientation_position_window(tmp_path, monkeypatch):
    from meddinov3_hf import visualize

    volume, hu, labels = _write(tmp_path)
    save_labels(volume.to_canonical(labels), volume, tmp_path / "seg.nii.gz", label_names=NAMES)
    calls = []
    original = visualize.overlay_image

    def spy(*args, **kwargs):
        calls.append((args, kwargs))
        return original(*args, **kwargs)

    monkeypatch.setattr(visualize, "overlay_image", spy)
    code = cli_main(
        ["overlay", "-i", str(tmp_path / "ct.nii.gz"), "--labels", str(tmp_path / "seg.nii.gz"),
         "-o", str(tmp_path / "o.png"), "--slice", "3", "--window", "abdomen"]
    )  # fmt: skip
    assert code == 0 and (tmp_path / "o.png").exists()
    (args, kwargs) = calls[0]
    assert args[2] == {1: "liver", 2: "kidney_left", 3: "spleen"}
    assert kwargs["orientation"] == ("A", "P", "R", "L")
    # Canonical slice 3 of this scan: world z of its centre from the affine (stored axis 0 runs S -> I).
    z = 10.0 - 2.5 * (labels.shape[0] - 1 - 3)
    assert kwargs["caption"] == f"slice 3/{labels.shape[0] - 1}  z {z:+.1f} mm  window abdomen (L 40 W 400)"
    plain = np.asarray(original(hu[:, :, 3] * 0, labels[:, :, 3] * 0))
    marked = np.asarray(original(hu[:, :, 3] * 0, labels[:, :, 3] * 0, orientation=("A", "P", "R", "L")))
    assert plain.shape == marked.shape and (plain != marked).any()


def test_postprocess_converts_an_existing_label_map_to_dicom(tmp_path):
    pytest.importorskip("highdicom")
    import highdicom as hd
    from dicom_series import write_series

    info = write_series(tmp_path / "ct", reverse=True, tilt_mm_per_slice=0.3)
    volume = load_volume(tmp_path / "ct")
    labels = ((volume.hu > 300).astype(np.uint8) + (volume.hu > 800)).astype(np.uint8)
    save_labels(labels, volume, tmp_path / "pred.nii.gz")
    code = cli_main(
        ["postprocess", "-i", str(tmp_path / "pred.nii.gz"), "--source", str(tmp_path / "ct"), "-o",
         str(tmp_path / "out"), "--names", "0=background,1=liver,2=kidney", "--output-type", "dicom-seg", "nifti"]
    )  # fmt: skip
    assert code == 0
    seg = hd.seg.segread(tmp_path / "out" / "pred.seg.dcm")
    stored = np.asanyarray(nib.load(tmp_path / "pred.nii.gz").dataobj)
    order = np.argsort([p[2] for p in info["positions"]])  # slices ascending along +z = stored order
    uids = [info["sop_instances"][i] for i in order]
    np.testing.assert_array_equal(
        seg.get_pixels_by_source_instance(uids, combine_segments=True), stored.transpose(2, 1, 0)
    )
    assert read_nifti_label_names(tmp_path / "out" / "pred.nii.gz") == {1: "liver", 2: "kidney"}
