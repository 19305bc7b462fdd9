"""Tests for meddinov3_hf.volumes.io: canonical orientation, exact round trips, DICOM and error handling."""

from __future__ import annotations

import gzip
import random
import shutil
import warnings
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from nibabel.testing import data_path

from meddinov3_hf.volumes.io import (
    CTVolume,
    VolumeError,
    VolumeNotFoundError,
    atomic_path,
    case_name,
    list_volumes,
    load_volume,
    save_labels,
    save_volume,
)

NOT_HU = "ignore:.*Hounsfield:UserWarning"
SHAPE = (12, 10, 6)  # stored voxel shape (i, j, k)
SPACING = (0.8, 0.9, 3.0)  # voxel sizes along stored axes i, j, k


def _rot_z(deg: float) -> np.ndarray:
    t = np.deg2rad(deg)
    return np.array([[np.cos(t), -np.sin(t), 0], [np.sin(t), np.cos(t), 0], [0, 0, 1.0]])


def _affine(signed_perm: list[tuple[int, int]], rot: np.ndarray | None = None) -> np.ndarray:
    """Affine whose stored axis n points along world axis signed_perm[n][0] with sign signed_perm[n][1]."""
    m = np.zeros((3, 3))
    for n, (world_axis, sign) in enumerate(signed_perm):
        m[world_axis, n] = sign * SPACING[n]
    if rot is not None:
        m = rot @ m
    aff = np.eye(4)
    aff[:3, :3] = m
    aff[:3, 3] = [-30.0, 12.0, -80.0]
    return aff


AFFINES = {
    "RAS": _affine([(0, 1), (1, 1), (2, 1)]),
    "LPS": _affine([(0, -1), (1, -1), (2, 1)]),
    "LAS": _affine([(0, -1), (1, 1), (2, 1)]),
    # sagittal-like storage: stored i -> superior, j -> posterior, k -> right
    "permuted": _affine([(2, 1), (1, -1), (0, 1)]),
    # stored i -> inferior, j -> left, k -> anterior
    "permuted_flipped": _affine([(2, -1), (0, -1), (1, 1)]),
    "oblique20": _affine([(0, 1), (1, -1), (2, 1)], rot=_rot_z(20.0)),
    "oblique20_permuted": _affine([(1, 1), (2, -1), (0, -1)], rot=_rot_z(-20.0)),
}


def _world(affine: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """RAS world coordinates of every voxel centre: (3, *shape)."""
    idx = np.indices(shape).reshape(3, -1)
    return (affine[:3, :3] @ idx + affine[:3, 3:4]).reshape((3, *shape))


def _write(tmp_path: Path, name: str, data: np.ndarray, affine: np.ndarray, **kw) -> Path:
    img = nib.Nifti1Image(data, affine)
    for key, value in kw.items():
        img.header[key] = value
    path = tmp_path / name
    nib.save(img, path)
    return path


# ---------------------------------------------------------------------------------------------------------
# Canonical orientation
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.filterwarnings(NOT_HU)
@pytest.mark.parametrize("kind", sorted(AFFINES))
def test_marker_lands_left_anterior_superior(tmp_path: Path, kind: str) -> None:
    affine = AFFINES[kind]
    world = _world(affine, SHAPE)
    # The voxel furthest towards patient Left(-x), Anterior(+y), Superior(+z) in RAS world.
    score = -world[0] + world[1] + world[2]
    data = np.full(SHAPE, -1000.0, dtype=np.float32)
    marker = np.unravel_index(np.argmax(score), SHAPE)
    data[marker] = 1000.0
    vol = load_volume(_write(tmp_path, f"{kind}.nii.gz", data, affine))

    assert vol.hu.dtype == np.float32
    z, y, x = np.unravel_index(np.argmax(vol.hu), vol.hu.shape)
    nz, ny, nx = vol.hu.shape
    # Superior = last slice, anterior = top row, patient left = last column.
    assert (z, y, x) == (nz - 1, 0, nx - 1)
    # And the canonical affine puts that voxel at the same world position.
    pos = vol.canonical_affine @ np.array([x, y, z, 1.0])
    assert np.allclose(pos[:3], world[(slice(None), *marker)], atol=1e-4)


@pytest.mark.filterwarnings(NOT_HU)
@pytest.mark.parametrize("kind", sorted(AFFINES))
def test_canonical_axes_follow_anatomy(tmp_path: Path, kind: str) -> None:
    affine = AFFINES[kind]
    world = _world(affine, SHAPE).astype(np.float32)
    rl, ap, si = (load_volume(_write(tmp_path, f"{kind}{c}.nii", world[c], affine)).hu for c in range(3))
    assert np.all(np.diff(si, axis=0) > 0)  # z: inferior -> superior
    assert np.all(np.diff(ap, axis=1) < 0)  # y: anterior -> posterior (RAS +y is anterior)
    assert np.all(np.diff(rl, axis=2) < 0)  # x: patient right -> left (RAS +x is right)


@pytest.mark.filterwarnings(NOT_HU)
def test_spacing_is_reordered_to_zyx(tmp_path: Path) -> None:
    vol = load_volume(_write(tmp_path, "p.nii.gz", np.zeros(SHAPE, np.float32), AFFINES["permuted"]))
    # stored i (0.8 mm) -> S, j (0.9 mm) -> P, k (3.0 mm) -> R
    assert vol.hu.shape == (SHAPE[0], SHAPE[1], SHAPE[2])
    assert vol.spacing == pytest.approx((0.8, 0.9, 3.0))
    vol = load_volume(_write(tmp_path, "r.nii.gz", np.zeros(SHAPE, np.float32), AFFINES["RAS"]))
    assert vol.hu.shape == SHAPE[::-1]
    assert vol.spacing == pytest.approx((3.0, 0.9, 0.8))


@pytest.mark.filterwarnings(NOT_HU)
def test_known_layouts_hand_derived(tmp_path: Path) -> None:
    data = np.random.default_rng(0).normal(size=SHAPE).astype(np.float32)
    lps = load_volume(_write(tmp_path, "lps.nii", data, AFFINES["LPS"]))
    assert np.array_equal(lps.hu, data.transpose(2, 1, 0))  # LPS storage is canonical up to axis order
    ras = load_volume(_write(tmp_path, "ras.nii", data, AFFINES["RAS"]))
    assert np.array_equal(ras.hu, data[::-1, ::-1, :].transpose(2, 1, 0))


def test_nifti_scaling_applied(tmp_path: Path) -> None:
    raw = np.arange(np.prod(SHAPE), dtype=np.int16).reshape(SHAPE)
    img = nib.Nifti1Image(raw, AFFINES["LPS"])
    img.header.set_slope_inter(2.0, -1024.0)
    nib.save(img, tmp_path / "s.nii.gz")
    vol = load_volume(tmp_path / "s.nii.gz")
    assert np.array_equal(vol.hu, (raw.astype(np.float32) * 2 - 1024).transpose(2, 1, 0))


# ---------------------------------------------------------------------------------------------------------
# Round trips and output headers
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.filterwarnings(NOT_HU)
@pytest.mark.parametrize("kind", sorted(AFFINES))
def test_save_labels_round_trip(tmp_path: Path, kind: str) -> None:
    src = _write(tmp_path, "img.nii.gz", np.zeros(SHAPE, np.float32), AFFINES[kind])
    img = nib.load(src)
    img.header.set_qform(AFFINES[kind], code=1)
    img.header.set_sform(AFFINES[kind], code=4)
    nib.save(img, src)
    vol = load_volume(src)
    labels = np.random.default_rng(1).integers(0, 7, size=SHAPE).astype(np.int64)

    out = save_labels(vol.to_canonical(labels), vol, tmp_path / "out" / "lab.nii.gz")
    saved = nib.load(out)
    with open(out, "rb") as fh:
        assert fh.read(2) == b"\x1f\x8b"  # really gzipped
    assert saved.get_data_dtype() == np.uint8
    assert np.array_equal(np.asanyarray(saved.dataobj), labels)
    assert np.allclose(saved.affine, vol.affine, atol=1e-6)
    assert int(saved.header["qform_code"]) == 1 and int(saved.header["sform_code"]) == 4
    assert np.allclose(saved.header.get_qform(), img.header.get_qform(), atol=1e-6)
    assert np.allclose(saved.header["pixdim"][1:4], img.header["pixdim"][1:4])
    slope, inter = saved.header.get_slope_inter()
    assert slope in (None, 1.0) and inter in (None, 0.0)
    assert not list(out.parent.glob(".*"))  # no temp file left behind


@pytest.mark.filterwarnings(NOT_HU)
def test_save_labels_dtype_choice(tmp_path: Path) -> None:
    vol = load_volume(np.zeros((3, 4, 5), np.float32), spacing=(2.0, 1.0, 1.0))
    big = np.zeros((3, 4, 5), np.int64)
    big[0, 0, 0] = 300
    assert nib.load(save_labels(big, vol, tmp_path / "a.nii")).get_data_dtype() == np.int16
    big[0, 0, 0] = 40000
    assert nib.load(save_labels(big, vol, tmp_path / "b.nii")).get_data_dtype() == np.uint16
    with pytest.raises(ValueError, match="non-integer"):
        save_labels(np.full((3, 4, 5), 0.5), vol, tmp_path / "c.nii")
    with pytest.raises(ValueError, match="shape"):
        save_labels(np.zeros((3, 4, 6), np.uint8), vol, tmp_path / "d.nii")


@pytest.mark.filterwarnings(NOT_HU)
def test_save_volume_channels_last(tmp_path: Path) -> None:
    affine = AFFINES["oblique20_permuted"]
    vol = load_volume(_write(tmp_path, "img.nii", np.zeros(SHAPE, np.float32), affine))
    probs = np.random.default_rng(2).random((3, *vol.hu.shape)).astype(np.float32)
    saved = nib.load(save_volume(probs, vol, tmp_path / "p.nii.gz", channel_axis=0))
    assert saved.shape == (*SHAPE, 3)
    assert saved.get_data_dtype() == np.float32
    arr = saved.get_fdata(dtype=np.float32)
    for c in range(3):
        assert np.array_equal(vol.to_canonical(arr[..., c]), probs[c])
    assert np.allclose(saved.affine, affine, atol=1e-5)


def test_array_source(tmp_path: Path) -> None:
    arr = np.random.default_rng(3).normal(0, 500, size=(4, 5, 6)).astype(np.float32)
    arr[0, 0, 0] = -1000
    vol = load_volume(arr, spacing=(2.5, 0.7, 0.6))
    assert np.array_equal(vol.hu, arr)
    assert vol.spacing == pytest.approx((2.5, 0.7, 0.6))
    assert np.allclose(vol.affine, np.diag([-0.6, -0.7, 2.5, 1.0]))
    assert vol.to_original(arr).shape == (6, 5, 4)
    with pytest.raises(VolumeError, match="spacing"):
        load_volume(arr)
    out = save_labels((arr > 0).astype(np.uint8), vol, tmp_path / "l.nii.gz")
    assert np.array_equal(load_volume_labels(out, vol), (arr > 0))


def load_volume_labels(path: Path, vol: CTVolume) -> np.ndarray:
    return vol.to_canonical(np.asanyarray(nib.load(path).dataobj)).astype(bool)


def test_refuses_to_overwrite_input(tmp_path: Path) -> None:
    src = _write(
        tmp_path,
        "ct.nii.gz",
        np.full(SHAPE, -1000.0, np.float32) + np.eye(12, 10)[..., None] * 2000,
        AFFINES["LPS"],
    )
    before = src.read_bytes()
    vol = load_volume(src)
    with pytest.raises(VolumeError, match="refusing"):
        save_labels(np.zeros(vol.hu.shape, np.uint8), vol, tmp_path / "." / "ct.nii.gz")
    link = tmp_path / "link.nii.gz"
    link.symlink_to(src)
    with pytest.raises(VolumeError, match="refusing"):
        save_labels(np.zeros(vol.hu.shape, np.uint8), vol, link)
    assert src.read_bytes() == before


def test_atomic_path_cleans_up_on_error(tmp_path: Path) -> None:
    final = tmp_path / "x.json"
    with pytest.raises(RuntimeError):
        with atomic_path(final) as tmp:
            tmp.write_text("partial")
            raise RuntimeError("boom")
    assert not final.exists() and list(tmp_path.iterdir()) == []
    with atomic_path(final) as tmp:
        assert tmp.parent == tmp_path and tmp.suffix == ".json"
        tmp.write_text("ok")
    assert final.read_text() == "ok" and list(tmp_path.iterdir()) == [final]


# ---------------------------------------------------------------------------------------------------------
# nibabel's shipped files and errors
# ---------------------------------------------------------------------------------------------------------


def test_nibabel_test_images() -> None:
    with pytest.raises(VolumeError, match=r"example4d\.nii\.gz.*4-D"):
        load_volume(Path(data_path) / "example4d.nii.gz")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        vol = load_volume(Path(data_path) / "anatomical.nii")
    assert vol.hu.ndim == 3 and vol.hu.dtype == np.float32
    assert vol.original_shape == nib.load(Path(data_path) / "anatomical.nii").shape[:3]


def test_trailing_singleton_4d_accepted(tmp_path: Path) -> None:
    data = np.linspace(-1000, 1000, np.prod(SHAPE), dtype=np.float32).reshape(*SHAPE, 1)
    vol = load_volume(_write(tmp_path, "t.nii.gz", data, AFFINES["LPS"]))
    assert vol.hu.shape == SHAPE[::-1]


def test_non_ct_warning_names_file(tmp_path: Path) -> None:
    path = _write(
        tmp_path, "mri.nii.gz", np.random.default_rng(0).random(SHAPE).astype(np.float32), AFFINES["LPS"]
    )
    with pytest.warns(UserWarning, match=r"mri\.nii\.gz.*Hounsfield"):
        load_volume(path)


def test_errors_name_the_file(tmp_path: Path) -> None:
    good = _write(tmp_path, "good.nii.gz", np.full(SHAPE, -1000, np.float32), AFFINES["LPS"])
    truncated = tmp_path / "trunc.nii.gz"
    truncated.write_bytes(good.read_bytes()[: len(good.read_bytes()) // 2])
    with pytest.raises(VolumeError, match=r"trunc\.nii\.gz"):
        load_volume(truncated)

    text = tmp_path / "notes.nii.gz"
    text.write_text("this is not a nifti file\n")
    with pytest.raises(VolumeError, match=r"notes\.nii\.gz"):
        load_volume(text)

    raw_gz = tmp_path / "raw.nii.gz"  # valid gzip, garbage inside
    raw_gz.write_bytes(gzip.compress(b"\0" * 100))
    with pytest.raises(VolumeError, match=r"raw\.nii\.gz"):
        load_volume(raw_gz)

    empty = tmp_path / "empty.nii"
    empty.write_bytes(b"")
    with pytest.raises(VolumeError, match=r"empty\.nii.*empty"):
        load_volume(empty)

    nan = np.full(SHAPE, -1000, np.float32)
    nan[1, 2, 3] = np.nan
    with pytest.raises(VolumeError, match=r"nan\.nii\.gz.*NaN"):
        load_volume(_write(tmp_path, "nan.nii.gz", nan, AFFINES["LPS"]))

    with pytest.raises(VolumeError, match=r"flat\.nii.*2-D"):
        load_volume(_write(tmp_path, "flat.nii", np.zeros((5, 6), np.float32), np.eye(4)))

    with pytest.raises(VolumeNotFoundError, match="missing"):
        load_volume(tmp_path / "missing.nii.gz")
    assert issubclass(VolumeNotFoundError, FileNotFoundError) and issubclass(VolumeNotFoundError, ValueError)

    other = tmp_path / "scan.txt"
    other.write_text("hello")
    with pytest.raises(VolumeError, match=r"scan\.txt.*not a DICOM"):
        load_volume(other)
    empty_dir = tmp_path / "emptydir"
    empty_dir.mkdir()
    with pytest.raises(VolumeError, match="emptydir.*no DICOM"):
        load_volume(empty_dir)


def test_list_volumes_and_case_name(tmp_path: Path) -> None:
    for name in ["b_0000.nii.gz", "a.nii", "c.txt", ".a.nii.gz.tmp.nii.gz"]:
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / "sub.nii").mkdir()
    assert [p.name for p in list_volumes(tmp_path)] == ["a.nii", "b_0000.nii.gz"]
    assert case_name("x/case_12_0000.nii.gz") == "case_12"
    assert case_name("case_12.nii") == "case_12"
    assert case_name("case_0001.nii.gz") == "case_0001"  # only the _0000 channel suffix is removed
    with pytest.raises(VolumeNotFoundError):
        list_volumes(tmp_path / "nope")


# ---------------------------------------------------------------------------------------------------------
# DICOM
# ---------------------------------------------------------------------------------------------------------


def _dicom_slice(path: Path, raw: np.ndarray, ipp, iop, spacing, slope, intercept, series_uid: str) -> None:
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = "CT"
    ds.SeriesInstanceUID = series_uid
    ds.Rows, ds.Columns = raw.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 1
    ds.ImagePositionPatient = [float(v) for v in ipp]
    ds.ImageOrientationPatient = [float(v) for v in iop]
    ds.PixelSpacing = [float(v) for v in spacing]
    ds.RescaleSlope = slope
    ds.RescaleIntercept = intercept
    ds.PixelData = raw.astype(np.int16).tobytes()
    ds.save_as(path, enforce_file_format=True)


def _series(folder: Path, n: int = 5, step: float = 2.5, uid: str = "1.2.3.4", skip: int | None = None):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(4)
    raws = [rng.integers(0, 2000, size=(6, 7)).astype(np.int16) for _ in range(n)]
    order = list(range(n))
    random.Random(0).shuffle(order)  # written (and named) in shuffled order
    for rank, k in enumerate(order):
        if k == skip:
            continue
        _dicom_slice(
            folder / f"img{rank:03d}.dcm",
            raws[k],
            [-50.0, -40.0, -20.0 + k * step],
            [1, 0, 0, 0, 1, 0],
            [0.7, 0.9],
            2.0,
            -1024.0,
            uid,
        )
    return raws


def test_dicom_series_order_hu_affine(tmp_path: Path) -> None:
    folder = tmp_path / "series"
    raws = _series(folder)
    (folder / "README.txt").write_text("not dicom")
    vol = load_volume(folder)
    assert vol.hu.shape == (5, 6, 7)
    for k, raw in enumerate(raws):  # z ascending = superior; rows = anterior->posterior; cols = R->L
        assert np.array_equal(vol.hu[k], raw.astype(np.float32) * 2 - 1024)
    assert vol.spacing == pytest.approx((2.5, 0.7, 0.9))
    expected = np.array(
        [[-0.9, 0, 0, 50.0], [0, -0.7, 0, 40.0], [0, 0, 2.5, -20.0], [0, 0, 0, 1]]
    )  # LPS -> RAS: first two rows negated
    assert np.allclose(vol.affine, expected, atol=1e-5)

    out = save_labels((vol.hu > 0).astype(np.uint8), vol, tmp_path / "seg.nii.gz")
    saved = nib.load(out)
    assert np.allclose(saved.affine, vol.affine, atol=1e-6) and saved.shape == (7, 6, 5)
    # a voxel of the saved file maps to the same world point as the DICOM pixel (row 2, col 3, slice 4)
    assert np.array_equal(np.asanyarray(saved.dataobj)[3, 2, 4], int(vol.hu[4, 2, 3] > 0))
    assert np.allclose(saved.affine @ [3, 2, 4, 1], [50 - 3 * 0.9, 40 - 2 * 0.7, -20 + 4 * 2.5, 1])


def test_dicom_non_uniform_and_multi_series(tmp_path: Path) -> None:
    _series(tmp_path / "gap", skip=2)
    with pytest.raises(VolumeError, match="gap.*not uniform"):
        load_volume(tmp_path / "gap")

    both = tmp_path / "both"
    raws = _series(both, n=4, uid="1.2.3.4")
    _series(both / "x", n=2, uid="9.9.9")
    for f in (both / "x").iterdir():
        shutil.move(f, both / f"other_{f.name}")
    (both / "x").rmdir()
    # Two series in one folder: refused with both UIDs (never one picked by file order), unless one is chosen.
    with pytest.raises(VolumeError, match=r"2 DICOM series.*1\.2\.3\.4.*9\.9\.9.*--series"):
        load_volume(both)
    vol = load_volume(both, series="1.2.3.4")
    assert vol.hu.shape[0] == 4 and np.array_equal(vol.hu[3], raws[3] * 2.0 - 1024)
    assert load_volume(both, series="9.9.9").hu.shape[0] == 2
    with pytest.raises(VolumeError, match="no DICOM series 7.7"):
        load_volume(both, series="7.7")


def test_dicom_direction_cosines_are_normalised(tmp_path: Path) -> None:
    """Rounded, slightly non-unit ImageOrientationPatient: voxel sizes and corners stay exact."""
    folder = tmp_path / "oblique"
    folder.mkdir()
    angle = np.deg2rad(20)
    row, col = np.array([np.cos(angle), np.sin(angle), 0]), np.array([-np.sin(angle), np.cos(angle), 0])
    stored = np.concatenate([row * 1.0004, col * 0.9996])  # |row| = 1.0004, as rounded headers give
    for k in range(3):
        _dicom_slice(
            folder / f"s{k}.dcm",
            np.zeros((6, 7), np.int16),
            row * 0 + [0, 0, 2.0 * k],
            stored,
            [0.5, 0.5],
            1.0,
            -1024.0,
            "1.2",
        )
    with pytest.warns(UserWarning):  # all air: not HU-looking
        vol = load_volume(folder)
    assert vol.spacing == pytest.approx((2.0, 0.5, 0.5), abs=1e-6)
    assert np.linalg.norm(vol.affine[:3, 0]) == pytest.approx(0.5, abs=1e-6)
    assert np.linalg.norm(vol.affine[:3, 1]) == pytest.approx(0.5, abs=1e-6)


def test_pydicom_ct_small_single_slice(tmp_path: Path) -> None:
    import pydicom
    from pydicom.data import get_testdata_file

    src = Path(get_testdata_file("CT_small.dcm"))
    folder = tmp_path / "ct"
    folder.mkdir()
    shutil.copy(src, folder / "slice.dcm")
    ds = pydicom.dcmread(src)
    vol = load_volume(folder)
    assert vol.hu.shape == (1, int(ds.Rows), int(ds.Columns))
    expected = ds.pixel_array.astype(np.float32) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    iop = [float(v) for v in ds.ImageOrientationPatient]
    assert iop == pytest.approx([1, 0, 0, 0, 1, 0])  # axial, so canonical rows/cols are the DICOM ones
    assert np.array_equal(vol.hu[0], expected)
    assert vol.spacing[1:] == pytest.approx([float(v) for v in ds.PixelSpacing])


@pytest.mark.filterwarnings(NOT_HU)
def test_nifti2_and_non_nifti_images(tmp_path: Path) -> None:
    data = np.zeros(SHAPE, np.float32)
    nib.save(nib.Nifti2Image(data, AFFINES["LAS"]), tmp_path / "n2.nii")
    vol = load_volume(tmp_path / "n2.nii")
    saved = nib.load(save_labels(np.ones(vol.hu.shape, np.uint8), vol, tmp_path / "n2_seg.nii.gz"))
    assert isinstance(saved, nib.Nifti2Image) and np.allclose(saved.affine, AFFINES["LAS"], atol=1e-6)
    # a non-NIfTI nibabel image (MGH): only the affine carries over, output is NIfTI-1
    vol = load_volume(nib.MGHImage(data, AFFINES["permuted"]))
    assert vol.source == "<nibabel image>"
    saved = nib.load(save_labels(np.ones(vol.hu.shape, np.uint8), vol, tmp_path / "mgh_seg.nii"))
    assert isinstance(saved, nib.Nifti1Image) and np.allclose(saved.affine, AFFINES["permuted"], atol=1e-5)
    assert np.array_equal(np.asanyarray(saved.dataobj), np.ones(SHAPE))
