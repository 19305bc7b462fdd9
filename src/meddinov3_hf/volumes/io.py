"""CT volume input/output with an exact, lossless canonical orientation.

Every volume the package works on is held as a :class:`CTVolume` whose ``hu`` array has shape
``(Z, Y, X)`` in the package's *canonical* orientation:

* ``hu[z]`` is an axial slice; ``z`` runs inferior -> superior,
* ``y`` (image rows) runs anterior -> posterior (top row = anterior),
* ``x`` (image columns) runs patient-right -> patient-left (radiological display).

In nibabel axis-code terms the array indexed as ``hu[z, y, x]`` is an ``(x, y, z)`` = ``LPS`` image stored
with its axes reversed, which is also how DICOM / SimpleITK arrays look. Reorientation is only ever a
permutation plus flips (``nibabel.orientations``), so :meth:`CTVolume.to_original` maps any canonical
array (labels, probabilities) back to the source file's voxel order bit-exactly, and
:func:`save_labels` writes it with the source's own affine and header so it overlays the input in any
viewer.
"""

from __future__ import annotations

import gzip
import os
import warnings
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
from nibabel.orientations import apply_orientation, inv_ornt_aff, io_orientation, ornt_transform

from ..files import atomic_path
from .ctvolume import (
    _CANONICAL_ORNT,
    CANONICAL_AXCODES,
    CTVolume,
    VolumeError,
    VolumeNotFoundError,
    _nifti_suffix,
    case_name,
    list_volumes,
)

__all__ = [
    "CANONICAL_AXCODES",
    "CTVolume",
    "VolumeError",
    "VolumeNotFoundError",
    "atomic_path",
    "case_name",
    "list_volumes",
    "load_volume",
    "save_labels",
    "save_volume",
]

# --------------------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------------------


def _fresh_header(affine: np.ndarray, code: int) -> nib.Nifti1Header:
    hdr = nib.Nifti1Header()
    hdr.set_qform(affine, code=code)
    hdr.set_sform(affine, code=code)
    hdr.set_xyzt_units("mm", "sec")
    return hdr


def _as_nifti_header(header: Any, affine: np.ndarray) -> nib.Nifti1Header:
    """A single-file NIfTI header (NIfTI-1 or -2) to reuse for outputs, keeping as much as possible."""
    if isinstance(header, nib.Nifti1Header) and header.is_single:  # Nifti2Header subclasses Nifti1Header
        return header.copy()
    if isinstance(header, nib.Nifti1Header):  # .hdr/.img pair header -> single-file header
        return (nib.Nifti2Header if isinstance(header, nib.Nifti2Header) else nib.Nifti1Header).from_header(
            header
        )
    return _fresh_header(affine, code=2)  # other formats (MGH, Analyze, ...): only the affine carries over


def _check_intensities(hu: np.ndarray, name: str) -> None:
    if not np.isfinite(hu).all():
        n_bad = int(np.size(hu) - np.count_nonzero(np.isfinite(hu)))
        raise VolumeError(f"{name}: volume contains {n_bad} NaN/inf voxel(s)")
    lo, hi = float(hu.min()), float(hu.max())
    if lo > -500 or hi < 100 or (lo >= 0 and hi <= 1):
        warnings.warn(
            f"{name}: intensities [{lo:g}, {hi:g}] do not look like CT Hounsfield units "
            "(expected air near -1000 and bone/contrast above 100)",
            UserWarning,
            stacklevel=3,
        )


def _build_volume(
    data: np.ndarray, affine: np.ndarray, header: nib.Nifti1Header, name: str, warn_non_ct: bool = True
) -> CTVolume:
    """Validate ``data`` (stored voxel order, float) and reorient it to canonical ``(Z, Y, X)``."""
    if data.ndim > 3 and all(s == 1 for s in data.shape[3:]):
        data = data.reshape(data.shape[:3])  # (X, Y, Z, 1): a 3-D volume saved as 4-D
    if data.ndim != 3:
        raise VolumeError(f"{name}: expected a 3-D volume, got {data.ndim}-D data of shape {data.shape}")
    if data.size == 0:
        raise VolumeError(f"{name}: volume is empty (shape {data.shape})")
    affine = np.asarray(affine, dtype=np.float64)
    if affine.shape != (4, 4) or not np.isfinite(affine).all():
        raise VolumeError(f"{name}: invalid affine {affine.tolist()}")
    ornt = io_orientation(affine)
    if np.isnan(ornt).any():
        raise VolumeError(f"{name}: affine is degenerate (a voxel axis has zero length): {affine.tolist()}")
    hu = np.asarray(data, dtype=np.float32)
    if warn_non_ct:
        _check_intensities(hu, name)
    elif not np.isfinite(hu).all():
        raise VolumeError(f"{name}: volume contains NaN/inf voxels")
    to_canonical = ornt_transform(ornt, _CANONICAL_ORNT)
    canonical_xyz = apply_orientation(hu, to_canonical)
    canon_affine = affine @ inv_ornt_aff(to_canonical, data.shape)
    zooms = np.sqrt((canon_affine[:3, :3] ** 2).sum(axis=0))  # (sx, sy, sz) along canonical x, y, z
    return CTVolume(
        hu=np.ascontiguousarray(np.swapaxes(canonical_xyz, 0, 2)),
        spacing=(float(zooms[2]), float(zooms[1]), float(zooms[0])),
        source=name,
        _affine=affine,
        _header=header,
        _original_shape=tuple(int(s) for s in data.shape[:3]),
        _to_canonical=to_canonical,
    )


# Largest volume accepted (voxels): 2^31, e.g. 1024 x 1024 x 2048, already 8 GiB as float32 HU.
MAX_VOXELS = 2**31
# Deflate cannot compress better than about 1032:1, so a .nii.gz declaring more data than that is lying.
_MAX_GZIP_RATIO = 1032


def _check_declared_size(img: Any, path: Path) -> None:
    """Refuse a header whose declared shape cannot be in the file (or is implausibly large) before reading."""
    shape = tuple(int(s) for s in img.shape)
    voxels = int(np.prod(shape, dtype=np.float64)) if shape else 0
    if voxels > MAX_VOXELS:
        raise VolumeError(
            f"{path}: header declares shape {shape} ({voxels:.3g} voxels), more than the {MAX_VOXELS:.3g} "
            "this package reads; the header is corrupt or the file is not a CT volume"
        )
    declared = voxels * img.get_data_dtype().itemsize
    size = path.stat().st_size
    offset = int(img.header.get("vox_offset", 0)) if hasattr(img.header, "get") else 0
    limit = size * _MAX_GZIP_RATIO if _nifti_suffix(path) == ".nii.gz" else size - offset
    if declared > limit:
        raise VolumeError(
            f"{path}: header declares shape {shape} ({declared} bytes of {img.get_data_dtype()}) but the file "
            f"({size} bytes{', compressed' if _nifti_suffix(path) == '.nii.gz' else ''}) cannot hold that much; "
            "the file is truncated or its header is wrong"
        )


def _is_dicom_file(path: Path) -> bool:
    if path.suffix.lower() == ".dcm":
        return True
    try:
        with open(path, "rb") as handle:
            return handle.read(132)[128:132] == b"DICM"
    except OSError:
        return False


def check_not_mixed_folder(folder: str | os.PathLike[str]) -> None:
    """Refuse a folder that holds both DICOM and NIfTI files: which of them is the scan is a guess."""
    folder = Path(folder)
    files = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))
    nifti = [p for p in files if _nifti_suffix(p)]
    if not nifti:
        return
    dicom = next((p for p in files if not _nifti_suffix(p) and _is_dicom_file(p)), None)
    if dicom is not None:
        raise VolumeError(
            f"{folder}: holds both DICOM files (e.g. {dicom.name}) and NIfTI files (e.g. {nifti[0].name}); "
            "it is unclear which is the scan, so nothing is read: put the DICOM series and the NIfTI files "
            "in separate folders"
        )


def _load_nifti_image(img: Any, name: str) -> CTVolume:
    try:
        data = img.get_fdata(dtype=np.float32)  # applies scl_slope / scl_inter -> HU
    except (OSError, EOFError, ValueError, gzip.BadGzipFile) as exc:  # truncated or corrupt payload
        raise VolumeError(f"{name}: cannot read voxel data ({type(exc).__name__}: {exc})") from exc
    affine = img.affine
    if affine is None:
        raise VolumeError(f"{name}: image has no affine")
    header = _as_nifti_header(img.header, affine)
    return _build_volume(data, affine, header, name)


def _array_volume(array: np.ndarray, spacing: Any) -> CTVolume:
    name = "<array>"
    if spacing is None:
        raise VolumeError(f"{name}: `spacing` (sz, sy, sx) in mm is required when loading a numpy array")
    sp = np.asarray(spacing, dtype=np.float64).reshape(-1)
    if sp.shape != (3,) or not np.all(np.isfinite(sp)) or np.any(sp <= 0):
        raise VolumeError(f"{name}: spacing must be three positive numbers (sz, sy, sx), got {spacing!r}")
    array = np.asarray(array)
    if array.ndim != 3:
        raise VolumeError(f"{name}: expected a canonical (Z, Y, X) array, got shape {array.shape}")
    if not np.issubdtype(array.dtype, np.number) or np.iscomplexobj(array):
        raise VolumeError(f"{name}: array dtype {array.dtype} is not a real number type")
    sz, sy, sx = (float(s) for s in sp)
    # Canonical (x, y, z) index directions are L, P, S: in nibabel's RAS world that is diag(-sx, -sy, sz).
    affine = np.diag([-sx, -sy, sz, 1.0])
    header = _fresh_header(affine, code=2)
    affine = header.get_best_affine()
    return _build_volume(np.swapaxes(array, 0, 2), affine, header, name)


def load_volume(
    source: str | os.PathLike[str] | np.ndarray | nib.spatialimages.SpatialImage,
    spacing: tuple[float, float, float] | None = None,
    series: str | None = None,
) -> CTVolume:
    """Load a CT volume and reorient it to the canonical ``(Z, Y, X)`` layout.

    Args:
        source: a NIfTI file (``.nii`` / ``.nii.gz``), a folder holding one DICOM series (or a single
            DICOM file), a nibabel image, or a numpy array that is ALREADY canonical ``(Z, Y, X)``.
        spacing: ``(sz, sy, sx)`` in mm; required for numpy arrays, must be ``None`` otherwise (the
            spacing comes from the file).
        series: the SeriesInstanceUID to read from a DICOM folder holding several series (a folder with
            several and no ``series`` is refused with the list of UIDs and descriptions).

    Returns:
        :class:`CTVolume` with float32 HU (NIfTI scaling / DICOM rescale applied).

    Raises:
        VolumeNotFoundError: the path does not exist.
        VolumeError: not NIfTI/DICOM, corrupt or truncated, empty, not 3-D, NaN/inf voxels, ...

    A ``UserWarning`` naming the source is emitted when intensities do not look like HU.
    """
    if isinstance(source, np.ndarray):
        return _array_volume(source, spacing)
    if spacing is not None:
        raise VolumeError(f"{source}: `spacing` is only accepted for numpy arrays; files carry their own")
    if isinstance(source, nib.spatialimages.SpatialImage):
        name = source.get_filename() or "<nibabel image>"
        return _load_nifti_image(source, str(name))
    if not isinstance(source, (str, os.PathLike)):
        raise TypeError(f"load_volume: unsupported source type {type(source).__name__}")
    path = Path(source)
    if not path.exists():
        raise VolumeNotFoundError(f"{path}: no such file or folder")
    if path.is_dir():
        check_not_mixed_folder(path)
        return _load_dicom_series(path, series)
    if _nifti_suffix(path):
        if series is not None:
            raise VolumeError(f"{path}: --series selects a DICOM series; this is a NIfTI file")
        if path.stat().st_size == 0:
            raise VolumeError(f"{path}: file is empty")
        try:
            img = nib.load(path)
        except Exception as exc:  # nibabel raises many types for garbage (ImageFileError, OSError, ...)
            raise VolumeError(f"{path}: not a readable NIfTI file ({type(exc).__name__}: {exc})") from exc
        _check_declared_size(img, path)
        return _load_nifti_image(img, str(path))
    # Anything else: accept a lone DICOM file as a one-slice series, otherwise report the format problem.
    return _load_dicom_series(path, series)


# --------------------------------------------------------------------------------------------------------
# DICOM
# --------------------------------------------------------------------------------------------------------


def _import_pydicom(
    message: str = "Reading DICOM needs pydicom: pip install 'meddinov3-hf[dicom]' (or pip install pydicom)",
) -> Any:
    try:
        import pydicom
    except ImportError as exc:  # optional dependency
        raise ImportError(message) from exc
    return pydicom


def _load_dicom_series(path: Path, series_uid: str | None = None) -> CTVolume:
    """Read one DICOM series (a folder, or a single file) into a canonical :class:`CTVolume`
    (:mod:`.dicom_series`)."""
    from .dicom_series import load_dicom_series

    return load_dicom_series(path, series_uid)


# --------------------------------------------------------------------------------------------------------
# Saving
# --------------------------------------------------------------------------------------------------------


def _check_output_path(path: str | os.PathLike[str], reference: CTVolume) -> Path:
    out = Path(path)
    if not _nifti_suffix(out):
        raise VolumeError(f"{out}: output must end with .nii or .nii.gz")
    if reference.source not in ("<array>", "<nibabel image>"):
        src = Path(reference.source)
        if out.resolve() == src.resolve() or (out.exists() and src.exists() and os.path.samefile(out, src)):
            raise VolumeError(f"{out}: refusing to overwrite the input volume {reference.source}")
    return out


def _write_nifti(
    data: np.ndarray, header: nib.Nifti1Header, reference: CTVolume, out: Path, streamed: bool = False
) -> Path:
    header.set_data_shape(data.shape)
    header.set_slope_inter(1.0, 0.0)  # outputs are stored unscaled
    header["cal_min"] = 0
    header["cal_max"] = 0
    image_cls = nib.Nifti2Image if isinstance(header, nib.Nifti2Header) else nib.Nifti1Image
    # Passing the reference's own best affine leaves qform/sform (codes + matrices) untouched.
    img = image_cls(data, reference._affine, header=header)
    with atomic_path(out) as tmp:
        if not streamed:
            nib.save(img, tmp)
            return out
        from nibabel.openers import ImageOpener
        from nibabel.volumeutils import seek_tell

        img.update_header()  # what nib.save does first: shape, magic, qform/sform
        header = img.header
        dtype = header.get_data_dtype()
        with ImageOpener(tmp, "wb") as handle:
            header.write_to(handle)
            seek_tell(handle, header.get_data_offset(), write0=True)
            # NIfTI stores voxels in Fortran order: the first axis fastest, channels (4th axis) slowest.
            for channel in np.ndindex(*data.shape[3:]):
                for k in range(data.shape[2]):
                    plane = data[(slice(None), slice(None), k, *channel)]
                    handle.write(np.asarray(plane, dtype=dtype).tobytes(order="F"))
    return out


def save_labels(
    labels_zyx: np.ndarray,
    reference: CTVolume,
    path: str | os.PathLike[str],
    label_names: dict[int, str] | None = None,
) -> Path:
    """Write a canonical ``(Z, Y, X)`` integer label map as NIfTI that overlays ``reference``'s source.

    With ``label_names`` (``{id: name}``) the names travel in the header extension TotalSegmentator uses
    (see :mod:`meddinov3_hf.volumes.labels`).

    The data is mapped back to the source's stored voxel order and written with the source's exact affine
    and a copy of its header (qform/sform codes and matrices, pixdim, units kept). Datatype is uint8 when
    the max label < 256, else int16 (< 32768), uint16 (< 65536) or int32; scaling is reset (slope 1,
    intercept 0) and the intent set to "label". Written atomically; refuses to overwrite the source.
    """
    from .labels import integer_labels, set_nifti_label_names

    out = _check_output_path(path, reference)
    labels = integer_labels(labels_zyx, str(out))
    max_label = int(labels.max()) if labels.size else 0
    dtype: type[np.integer]
    if max_label < 256:
        dtype = np.uint8
    elif max_label < 32768:
        dtype = np.int16
    elif max_label < 65536:
        dtype = np.uint16
    else:
        dtype = np.int32
    data = reference.to_original(labels).astype(dtype)
    header = reference.header
    header.set_data_dtype(dtype)
    header.set_intent("label")
    if label_names:
        set_nifti_label_names(header, label_names)
    return _write_nifti(data, header, reference, out)


def save_volume(
    array_zyx: np.ndarray,
    reference: CTVolume,
    path: str | os.PathLike[str],
    channel_axis: int | None = None,
) -> Path:
    """Write a canonical float map (probabilities, HU, ...) as float32 NIfTI aligned to ``reference``.

    Args:
        array_zyx: ``(Z, Y, X)``, or with a channel axis at ``channel_axis`` (e.g. ``(C, Z, Y, X)``).
        channel_axis: position of the channel axis; channels are stored as the 4th NIfTI dimension
            (``original_shape + (C,)``), nibabel's convention.

    Memory stays bounded: the array is reoriented as a view and converted and written one stored slice
    (of one channel) at a time, so no full-size copy is ever made (`--save-probabilities` on large scans).
    """
    out = _check_output_path(path, reference)
    data = reference._original_view(np.asanyarray(array_zyx), channel_axis)
    header = reference.header
    header.set_data_dtype(np.float32)
    header.set_intent("none")
    if data.ndim == 4:
        zooms = header.get_zooms()[:3]
        header.set_data_shape(data.shape)
        header.set_zooms(tuple(zooms) + (1.0,))  # the channel axis has no physical size
    return _write_nifti(data, header, reference, out, streamed=True)
