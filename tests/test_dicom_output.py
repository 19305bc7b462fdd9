"""DICOM-SEG and RTSTRUCT outputs read back against the label map on the source slices (voxel-exact for SEG,
the pixel outlines for RTSTRUCT), including gantry-tilted and reversed series, and the refusals."""

from __future__ import annotations

import numpy as np
import pytest

pydicom = pytest.importorskip("pydicom")
hd = pytest.importorskip("highdicom")

from dicom_series import phantom, write_series  # noqa: E402
from scipy import ndimage  # noqa: E402

from meddinov3_hf.volumes.dicom_out import (  # noqa: E402
    DicomGeometryError,
    anatomy_code,
    read_source_series,
    write_dicom_seg,
)
from meddinov3_hf.volumes.io import load_volume  # noqa: E402
from meddinov3_hf.volumes.labels import LabelSetError  # noqa: E402
from meddinov3_hf.volumes.rtstruct import label_contours, write_rtstruct  # noqa: E402

NAMES = {0: "background", 1: "liver", 2: "kidney_left", 3: "mystery_blob"}
SERIES = {
    "plain": {},
    "tilted": {"tilt_mm_per_slice": 0.8},
    "reversed_files": {"reverse": True},
    "normal_down": {"orientation": (1.0, 0.0, 0.0, 0.0, -1.0, 0.0)},  # slice order runs head to foot
    "tilted_reversed": {"tilt_mm_per_slice": -0.6, "reverse": True},
}


def _labels(volume):
    labels = np.zeros(volume.hu.shape, np.uint8)
    labels[volume.hu > 300] = 1
    labels[volume.hu > 800] = 2
    return labels


def _source_slices(folder):
    """Independent reading: {SOPInstanceUID: dataset} of the series files."""
    return {ds.SOPInstanceUID: ds for ds in (pydicom.dcmread(p) for p in sorted(folder.iterdir()))}


def _expected_mask(source, volume, labels, value):
    """The label map's mask on one source slice, found from the slice's own position (not the writer's
    bookkeeping): the canonical slice whose world z-centre is nearest, mapped back to (rows, columns)."""
    stored = volume.to_original(labels)  # (columns, rows, slices)
    lps = np.diag([-1.0, -1.0, 1.0, 1.0]) @ volume.affine
    ipp = np.asarray(source.ImagePositionPatient, float)
    ks = [float(np.linalg.norm(lps[:3, 3] + k * lps[:3, 2] - ipp)) for k in range(stored.shape[2])]
    k = int(np.argmin(ks))
    assert ks[k] < 1e-3
    return stored[:, :, k].T == value


@pytest.mark.parametrize("kind", sorted(SERIES))
def test_dicom_seg_reads_back_voxel_exact(tmp_path, kind):
    write_series(tmp_path / "ct", **SERIES[kind])
    volume = load_volume(tmp_path / "ct")
    labels = _labels(volume)
    out = write_dicom_seg(labels, volume, tmp_path / "seg.dcm", NAMES, model_name="tiny-test")
    sources = _source_slices(tmp_path / "ct")

    # highdicom: every segment's frames equal the labels on each source instance.
    seg = hd.seg.segread(out)
    assert [seg.get_segment_description(n).segment_label for n in (1, 2, 3)] == [
        "liver", "kidney_left", "mystery_blob"
    ]  # fmt: skip
    uids = list(sources)
    pixels = seg.get_pixels_by_source_instance(uids, segment_numbers=[1, 2, 3])
    for i, uid in enumerate(uids):
        for n, value in enumerate((1, 2, 3)):
            np.testing.assert_array_equal(
                pixels[i, :, :, n], _expected_mask(sources[uid], volume, labels, value)
            )

    # pydicom alone: per-frame references, positions equal to the source slice's, unpacked bits.
    ds = pydicom.dcmread(out)
    assert ds.StudyInstanceUID == next(iter(sources.values())).StudyInstanceUID
    assert ds.FrameOfReferenceUID == next(iter(sources.values())).FrameOfReferenceUID
    assert ds.ReferencedSeriesSequence[0].SeriesInstanceUID == next(iter(sources.values())).SeriesInstanceUID
    assert ds.SegmentSequence[0].SegmentAlgorithmName == "tiny-test"
    frames = ds.pixel_array.reshape(-1, ds.Rows, ds.Columns)
    seen = set()
    for frame, group in zip(frames, ds.PerFrameFunctionalGroupsSequence):
        number = group.SegmentIdentificationSequence[0].ReferencedSegmentNumber
        uid = group.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
        np.testing.assert_allclose(
            group.PlanePositionSequence[0].ImagePositionPatient, sources[uid].ImagePositionPatient, atol=1e-4
        )
        np.testing.assert_array_equal(
            frame.astype(bool), _expected_mask(sources[uid], volume, labels, number)
        )
        seen.add((uid, number))
    for uid in uids:  # omitted frames are empty
        for number in (1, 2):
            if (uid, number) not in seen:
                assert not _expected_mask(sources[uid], volume, labels, number).any()


def test_seg_codes_anatomy_and_algorithm(tmp_path):
    write_series(tmp_path / "ct")
    volume = load_volume(tmp_path / "ct")
    out = write_dicom_seg(_labels(volume), volume, tmp_path / "seg.dcm", NAMES, model_name="tiny")
    ds = pydicom.dcmread(out)
    liver, kidney, blob = ds.SegmentSequence
    assert liver.SegmentedPropertyTypeCodeSequence[0].CodeValue == "10200004"  # SNOMED CT Liver
    assert kidney.SegmentedPropertyTypeCodeSequence[0].CodeValue == "64033007"  # Kidney
    assert blob.SegmentedPropertyTypeCodeSequence[0].CodingSchemeDesignator == "99MEDDINOV3"
    assert blob.SegmentedPropertyTypeCodeSequence[0].CodeMeaning == "mystery_blob"
    algorithm = liver.SegmentationAlgorithmIdentificationSequence[0]
    assert algorithm.AlgorithmName == "tiny" and algorithm.AlgorithmVersion
    assert anatomy_code("Right Kidney") == (anatomy_code("kidney")[0], "Right")
    assert anatomy_code("gall_bladder")[0].value == "28231008"
    assert anatomy_code("liver_tumor") == (None, None)


def _fill_even_odd(polygons, shape):
    """Pixel centres inside an odd number of polygons (independent ray casting along each row)."""
    rows, cols = shape
    yy, xx = np.mgrid[0:rows, 0:cols].astype(float)
    inside = np.zeros(shape, bool)
    for poly in polygons:
        x0, y0 = poly[:, 0], poly[:, 1]
        x1, y1 = np.roll(x0, -1), np.roll(y0, -1)
        for a, b, c, d in zip(x0, y0, x1, y1):
            crosses = (b > yy) != (d > yy)
            with np.errstate(divide="ignore", invalid="ignore"):
                x_at = a + (yy - b) * (c - a) / (d - b)
            inside ^= crosses & (xx < x_at)
    return inside


def test_label_contours_are_exact_outlines():
    rng = np.random.default_rng(3)
    for _ in range(20):
        mask = ndimage.binary_opening(rng.random((23, 17)) > 0.45) | (rng.random((23, 17)) > 0.97)
        outlines = label_contours(mask)
        np.testing.assert_array_equal(_fill_even_odd(outlines, mask.shape), mask)
    assert label_contours(np.zeros((4, 4), bool)) == []


@pytest.mark.parametrize("kind", ["plain", "tilted", "reversed_files", "normal_down"])
def test_rtstruct_rasterises_back(tmp_path, kind):
    write_series(tmp_path / "ct", **SERIES[kind])
    volume = load_volume(tmp_path / "ct")
    labels = _labels(volume)
    labels[volume.hu.shape[0] // 2, 8:11, 12:15] = 3
    labels[volume.hu.shape[0] // 2, 9, 13] = 0  # a hole
    out = write_rtstruct(labels, volume, tmp_path / "rt.dcm", NAMES, model_name="tiny")
    sources = _source_slices(tmp_path / "ct")
    ds = pydicom.dcmread(out)
    assert ds.Modality == "RTSTRUCT" and ds.StudyInstanceUID == next(iter(sources.values())).StudyInstanceUID
    referenced = ds.ReferencedFrameOfReferenceSequence[0].RTReferencedStudySequence[0]
    assert {
        i.ReferencedSOPInstanceUID for i in referenced.RTReferencedSeriesSequence[0].ContourImageSequence
    } == set(sources)
    names = {roi.ROINumber: roi.ROIName for roi in ds.StructureSetROISequence}
    assert sorted(names.values()) == ["kidney_left", "liver", "mystery_blob"]
    for roi in ds.ROIContourSequence:
        value = {v: k for k, v in NAMES.items()}[names[roi.ReferencedROINumber]]
        per_slice = {uid: [] for uid in sources}
        for contour in getattr(roi, "ContourSequence", []):
            src = sources[contour.ContourImageSequence[0].ReferencedSOPInstanceUID]
            points = np.asarray(contour.ContourData, float).reshape(-1, 3)
            iop = np.asarray(src.ImageOrientationPatient, float)
            offset = points - np.asarray(src.ImagePositionPatient, float)
            assert np.abs(offset @ np.cross(iop[:3], iop[3:])).max() < 1e-3  # on the slice's own plane
            col = offset @ iop[:3] / float(src.PixelSpacing[1])
            row = offset @ iop[3:] / float(src.PixelSpacing[0])
            per_slice[src.SOPInstanceUID].append(np.stack([col, row], axis=1))
        for uid, polygons in per_slice.items():
            got = _fill_even_odd(polygons, (sources[uid].Rows, sources[uid].Columns))
            np.testing.assert_array_equal(got, _expected_mask(sources[uid], volume, labels, value))


def test_rtstruct_readable_by_rt_utils_within_one_voxel(tmp_path):
    rt_utils = pytest.importorskip("rt_utils")
    hu = phantom(rows=20, cols=20, slices=5)
    write_series(tmp_path / "ct", hu=hu, pixel_spacing=(0.7, 0.7))
    volume = load_volume(tmp_path / "ct")
    labels = _labels(volume)
    write_rtstruct(labels, volume, tmp_path / "rt.dcm", NAMES)
    rt = rt_utils.RTStructBuilder.create_from(str(tmp_path / "ct"), str(tmp_path / "rt.dcm"))
    stored = volume.to_original(labels)  # (columns, rows, slices); rt-utils gives (rows, columns, slices)
    for value, name in ((1, "liver"), (2, "kidney_left")):
        mask = stored.transpose(1, 0, 2) == value
        got = rt.get_roi_mask_by_name(name)
        boundary = np.zeros_like(mask)
        for k in range(mask.shape[2]):
            square = np.ones((3, 3), bool)  # one voxel, diagonals included
            inner = ndimage.binary_erosion(mask[:, :, k], square)
            boundary[:, :, k] = ndimage.binary_dilation(mask[:, :, k], square) & ~inner
        assert not (got ^ mask)[~boundary].any()  # differences only at the boundary: within one voxel
        assert (got & mask).sum() >= 0.5 * mask.sum()


def test_refusals(tmp_path):
    import nibabel as nib

    write_series(tmp_path / "ct")
    volume = load_volume(tmp_path / "ct")
    labels = _labels(volume)
    with pytest.raises(LabelSetError, match=r"label value\(s\) 2 are not in the label set"):
        write_dicom_seg(labels, volume, tmp_path / "seg.dcm", {0: "background", 1: "liver"})
    assert not (tmp_path / "seg.dcm").exists()

    nib.save(nib.Nifti1Image(volume.to_original(volume.hu), volume.affine), tmp_path / "ct.nii.gz")
    nifti = load_volume(tmp_path / "ct.nii.gz")
    with pytest.raises(DicomGeometryError, match="no source series"):
        write_rtstruct(labels, nifti, tmp_path / "rt.dcm", NAMES)

    # One slice shifted in-plane by 1.5 mm: slice spacing along the normal stays uniform, so the volume loads,
    # but the slices are not on one line -> refused, naming the slice and the offset.
    info = write_series(tmp_path / "bent")
    positions = [p.copy() for p in info["positions"]]
    positions[3] = positions[3] + np.array([1.5, 0.0, 0.0])
    write_series(tmp_path / "bent2", positions=positions)
    bent = load_volume(tmp_path / "bent2")
    with pytest.raises(DicomGeometryError, match=r"0004\.dcm: slice 3 lies 1\.\d+ mm off"):
        read_source_series(bent)


def test_seg_and_rtstruct_on_pydicoms_ct_small(tmp_path):
    from pydicom.data import get_testdata_file

    path = get_testdata_file("CT_small.dcm")
    volume = load_volume(path)
    labels = (volume.hu > 100).astype(np.uint8)
    seg = hd.seg.segread(write_dicom_seg(labels, volume, tmp_path / "seg.dcm", {0: "background", 1: "bone"}))
    source = pydicom.dcmread(path)
    pixels = seg.get_pixels_by_source_instance([source.SOPInstanceUID], combine_segments=True)
    np.testing.assert_array_equal(pixels[0], volume.to_original(labels)[:, :, 0].T)
    rt = pydicom.dcmread(write_rtstruct(labels, volume, tmp_path / "rt.dcm", {1: "bone"}))
    polygons = []
    iop = np.asarray(source.ImageOrientationPatient, float)
    for contour in rt.ROIContourSequence[0].ContourSequence:
        offset = np.asarray(contour.ContourData, float).reshape(-1, 3) - np.asarray(
            source.ImagePositionPatient, float
        )
        polygons.append(
            np.stack(
                [
                    offset @ iop[:3] / float(source.PixelSpacing[1]),
                    offset @ iop[3:] / float(source.PixelSpacing[0]),
                ],
                1,
            )
        )
    got = _fill_even_odd(polygons, (source.Rows, source.Columns))
    np.testing.assert_array_equal(got, volume.to_original(labels)[:, :, 0].T == 1)


def test_both_writers_keep_their_public_signature():
    # write_dicom_seg and write_rtstruct are made by one factory (dicom_label_writer): the positional order, the
    # names and the defaults of both stay the public API they were written with.
    import inspect

    order = ["labels_zyx", "volume", "path", "names", "model_name", "series", "series_description"]
    for writer, name, description in (
        (write_dicom_seg, "write_dicom_seg", "MedDINOv3 segmentation"),
        (write_rtstruct, "write_rtstruct", "MedDINOv3 structures"),
    ):
        params = inspect.signature(writer).parameters
        assert list(params) == order and writer.__name__ == name and writer.__doc__.startswith("Write ")
        defaults = {k: p.default for k, p in params.items() if p.default is not inspect.Parameter.empty}
        assert defaults == {"model_name": "MedDINOv3", "series": None, "series_description": description}
