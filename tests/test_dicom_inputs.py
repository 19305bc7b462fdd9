"""The DICOM inputs people have: a zip, a folder tree of several patients' series, multi-frame CT, compressed
transfer syntaxes — each read exactly and segmented to one output per series, nothing skipped silently."""

from __future__ import annotations

import zipfile

import nibabel as nib
import numpy as np
import pytest

pydicom = pytest.importorskip("pydicom")
hd = pytest.importorskip("highdicom")

from dicom_series import phantom, write_series  # noqa: E402
from pydicom.data import get_testdata_file  # noqa: E402
from pydicom.uid import JPEG2000Lossless, RLELossless, generate_uid  # noqa: E402

from meddinov3_hf.cli import main as cli_main  # noqa: E402
from meddinov3_hf.volumes.dicom_in import find_series  # noqa: E402
from meddinov3_hf.volumes.io import load_volume  # noqa: E402


def _study(root):
    """Two patients: P1 with a plain and a gantry-tilted series, P2 with a reversed one; plus an MR series and
    an RTSTRUCT that must be reported, not segmented."""
    study = generate_uid()
    series = {
        "P1/plain": write_series(root / "P1" / "plain", patient_id="P1", study_uid=study),
        "P1/tilted": write_series(
            root / "P1" / "tilted", patient_id="P1", study_uid=study, tilt_mm_per_slice=0.4
        ),
        "P2/ct": write_series(root / "P2" / "ct", patient_id="P2", reverse=True, hu=phantom(seed=3)),
    }
    write_series(root / "P2" / "mr", patient_id="P2")
    for path in (root / "P2" / "mr").iterdir():
        ds = pydicom.dcmread(path)
        ds.Modality, ds.SOPClassUID = "MR", pydicom.uid.MRImageStorage
        ds.file_meta.MediaStorageSOPClassUID = pydicom.uid.MRImageStorage
        ds.save_as(path)
    rt = pydicom.dcmread(get_testdata_file("rtstruct.dcm"), force=True)
    rt.file_meta = pydicom.dataset.FileMetaDataset()
    rt.file_meta.MediaStorageSOPClassUID, rt.file_meta.MediaStorageSOPInstanceUID = (
        rt.SOPClassUID,
        rt.SOPInstanceUID,
    )
    rt.file_meta.TransferSyntaxUID = pydicom.uid.ImplicitVRLittleEndian
    rt.save_as(root / "P2" / "rtstruct.dcm", enforce_file_format=True)
    nib.save(nib.Nifti1Image(np.zeros((4, 4, 4), np.int16), np.eye(4)), root / "P2" / "mask.nii.gz")
    return series


def _check_outputs(out, series, source_root, capsys_err):
    for key, info in series.items():
        patient = key.split("/")[0]
        label = out / patient / f"{info['series']}.nii.gz"
        assert label.exists(), sorted(str(p) for p in out.rglob("*"))
        volume = load_volume(source_root / key)
        saved = nib.load(label)
        np.testing.assert_allclose(saved.affine, volume.affine, atol=1e-5)
        assert saved.shape == volume.original_shape
        seg = pydicom.dcmread(out / patient / f"{info['series']}.seg.dcm")
        assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == info["series"]
    assert "not segmented" in capsys_err and "MR" in capsys_err and "RTSTRUCT" in capsys_err
    assert "1 NIfTI file(s) in the DICOM folder tree" in capsys_err and "mask.nii.gz" in capsys_err
    assert len(list(out.rglob("*.nii.gz"))) == len(series)


def test_folder_tree_of_several_patients(tmp_path, model_dir, capsys):
    series = _study(tmp_path / "study")
    entries, _ = find_series(tmp_path / "study")
    assert sorted(e.reason is None for e in entries) == [False, False, True, True, True]
    code = cli_main(
        ["segment", "-i", str(tmp_path / "study"), "-o", str(tmp_path / "out"), "--model", str(model_dir),
         "--quiet", "--output-type", "nifti", "dicom-seg"]
    )  # fmt: skip
    assert code == 0
    _check_outputs(tmp_path / "out", series, tmp_path / "study", capsys.readouterr().err)


def test_zip_of_dicom(tmp_path, model_dir, capsys):
    series = _study(tmp_path / "study")
    with zipfile.ZipFile(tmp_path / "study.zip", "w") as archive:
        for path in sorted((tmp_path / "study").rglob("*")):
            if path.is_file():
                archive.write(path, path.relative_to(tmp_path / "study").as_posix())
    before = (tmp_path / "study.zip").read_bytes()
    code = cli_main(
        ["segment", "-i", str(tmp_path / "study.zip"), "-o", str(tmp_path / "out"), "--model", str(model_dir),
         "--quiet", "--output-type", "nifti", "dicom-seg"]
    )  # fmt: skip
    assert code == 0 and (tmp_path / "study.zip").read_bytes() == before
    _check_outputs(tmp_path / "out", series, tmp_path / "study", capsys.readouterr().err)


def test_a_failing_series_is_reported_and_the_others_written(tmp_path, model_dir, capsys):
    write_series(tmp_path / "study" / "good", patient_id="P1")
    info = write_series(tmp_path / "study" / "broken", patient_id="P1")
    (tmp_path / "study" / "broken" / "0003.dcm").unlink()  # a missing slice: spacing not uniform
    code = cli_main(
        ["segment", "-i", str(tmp_path / "study"), "-o", str(tmp_path / "out"), "--model", str(model_dir),
         "--quiet"]
    )  # fmt: skip
    assert code == 1
    err = capsys.readouterr().err
    assert "broken" in err and "not uniform" in err
    assert len(list((tmp_path / "out" / "P1").glob("*.nii.gz"))) == 1
    assert not (tmp_path / "out" / "P1" / f"{info['series']}.nii.gz").exists()


@pytest.mark.parametrize("kind", ["tilted_reversed", "normal_down"])
def test_multiframe_enhanced_ct(tmp_path, model_dir, kind):
    options = {
        "tilted_reversed": {"tilt_mm_per_slice": 0.5, "reverse": True},
        "normal_down": {"orientation": (1.0, 0.0, 0.0, 0.0, -1.0, 0.0)},
    }[kind]
    write_series(tmp_path / "single", **options)
    legacy = [pydicom.dcmread(p) for p in sorted((tmp_path / "single").iterdir())]
    enhanced = hd.legacy.LegacyConvertedEnhancedCTImage(
        legacy_datasets=legacy, series_instance_uid=generate_uid(), series_number=9,
        sop_instance_uid=generate_uid(), instance_number=1,
    )  # fmt: skip
    (tmp_path / "multi").mkdir()
    enhanced.save_as(tmp_path / "multi" / "enhanced.dcm")
    assert int(pydicom.dcmread(tmp_path / "multi" / "enhanced.dcm").NumberOfFrames) == len(legacy)

    single = load_volume(tmp_path / "single")
    multi = load_volume(tmp_path / "multi")
    np.testing.assert_array_equal(multi.hu, single.hu)
    np.testing.assert_allclose(multi.affine, single.affine, atol=1e-5)

    code = cli_main(
        ["segment", "-i", str(tmp_path / "multi"), "-o", str(tmp_path / "out"), "--model", str(model_dir),
         "--quiet", "--output-type", "nifti", "dicom-seg", "rtstruct"]
    )  # fmt: skip
    assert code == 0
    stored = np.asanyarray(
        nib.load(tmp_path / "out" / "segmentations.nii.gz").dataobj
    )  # (cols, rows, slices)
    seg = hd.seg.segread(tmp_path / "out" / "segmentations.seg.dcm")
    source = pydicom.dcmread(tmp_path / "multi" / "enhanced.dcm")
    frames = seg.get_pixels_by_source_frame(
        source.SOPInstanceUID, source_frame_numbers=list(range(1, len(legacy) + 1)), combine_segments=True
    )
    normal = np.cross(np.asarray(legacy[0].ImageOrientationPatient[:3], float),
                      np.asarray(legacy[0].ImageOrientationPatient[3:], float))  # fmt: skip
    for n, item in enumerate(source.PerFrameFunctionalGroupsSequence):
        position = np.asarray(item.PlanePositionSequence[0].ImagePositionPatient, float)
        rank = sorted(
            float(np.dot(normal, i.PlanePositionSequence[0].ImagePositionPatient))
            for i in source.PerFrameFunctionalGroupsSequence
        ).index(float(np.dot(normal, position)))
        np.testing.assert_array_equal(frames[n], stored[:, :, rank].T)
    rt = pydicom.dcmread(tmp_path / "out" / "segmentations.rtstruct.dcm")
    for roi in rt.ROIContourSequence:
        for contour in getattr(roi, "ContourSequence", []):
            image = contour.ContourImageSequence[0]
            assert (
                image.ReferencedSOPInstanceUID == source.SOPInstanceUID and 1 <= image.ReferencedFrameNumber
            )


def test_compressed_transfer_syntaxes(tmp_path, model_dir):
    # A JPEG 2000 CT slice shipped with pydicom (decoded by pylibjpeg-openjpeg).
    path = get_testdata_file("693_J2KI.dcm")
    ds = pydicom.dcmread(path)
    assert ds.file_meta.TransferSyntaxUID.is_compressed
    volume = load_volume(path)
    expected = ds.pixel_array.astype(np.float32) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    np.testing.assert_array_equal(volume.to_original(volume.hu)[:, :, 0], expected.T)

    # A synthetic series compressed losslessly with RLE and JPEG 2000 reads back identical, and segments.
    # (openjpeg's default 6 resolution levels need images of at least 32 pixels a side)
    write_series(tmp_path / "raw", hu=phantom(rows=40, cols=36, slices=6), tilt_mm_per_slice=0.3)
    for syntax, name in ((RLELossless, "rle"), (JPEG2000Lossless, "j2k")):
        (tmp_path / name).mkdir()
        for p in sorted((tmp_path / "raw").iterdir()):
            ds = pydicom.dcmread(p)
            ds.compress(syntax)
            ds.save_as(tmp_path / name / p.name)
        assert pydicom.dcmread(next((tmp_path / name).iterdir())).file_meta.TransferSyntaxUID == syntax
        np.testing.assert_array_equal(load_volume(tmp_path / name).hu, load_volume(tmp_path / "raw").hu)
    code = cli_main(
        ["segment", "-i", str(tmp_path / "j2k"), "-o", str(tmp_path / "out"), "--model", str(model_dir),
         "--quiet", "--output-type", "dicom-seg"]
    )  # fmt: skip
    assert code == 0
    seg = pydicom.dcmread(tmp_path / "out" / "segmentations.seg.dcm")
    assert (
        seg.ReferencedSeriesSequence[0].SeriesInstanceUID
        == pydicom.dcmread(next((tmp_path / "j2k").iterdir())).SeriesInstanceUID
    )
