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

import contextlib
import gzip
import os
import re
import uuid
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
from nibabel.orientations import apply_orientation, axcodes2ornt, inv_ornt_aff, io_orientation, ornt_transform

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

# Axis codes of the canonical array read in (x, y, z) index order: x -> Left, y -> Posterior, z -> Superior.
CANONICAL_AXCODES: tuple[str, str, str] = ("L", "P", "S")
_CANONICAL_ORNT = axcodes2ornt(CANONICAL_AXCODES)
_NIFTI_SUFFIXES = (".nii.gz", ".nii")


class VolumeError(ValueError):
    """A volume (file, folder or array) cannot be read or written; the message names it and the problem."""


class VolumeNotFoundError(VolumeError, FileNotFoundError):
    """The volume path does not exist (also a :class:`FileNotFoundError`)."""


# --------------------------------------------------------------------------------------------------------
# Small path helpers
# --------------------------------------------------------------------------------------------------------


def _nifti_suffix(path: str | os.PathLike[str]) -> str | None:
    name = Path(path).name.lower()
    for suffix in _NIFTI_SUFFIXES:
        if name.endswith(suffix):
            return suffix
    return None


@contextlib.contextmanager
def atomic_path(final_path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path next to ``final_path``; move it into place only if the block succeeds.

    The temporary name is hidden (leading dot) and keeps the final suffix (``.nii.gz``, ``.json``, ...)
    so writers that dispatch on the extension (nibabel gzips ``.gz``) behave as for the real name.
    ``os.replace`` within one directory is atomic, so readers never see a half-written file. On error the
    temporary file is removed and the exception propagates. The parent directory is created if needed.
    """
    final = Path(final_path)
    final.parent.mkdir(parents=True, exist_ok=True)
    suffix = _nifti_suffix(final) or "".join(final.suffixes[-1:])
    tmp = final.parent / f".{final.name}.{uuid.uuid4().hex[:12]}.tmp{suffix}"
    try:
        yield tmp
        if not tmp.exists():
            raise VolumeError(f"{final}: nothing was written to the temporary file {tmp.name}")
        os.replace(tmp, final)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise


def list_volumes(folder: str | os.PathLike[str]) -> list[Path]:
    """Sorted ``.nii`` / ``.nii.gz`` files directly inside ``folder`` (hidden/temporary files skipped)."""
    folder = Path(folder)
    if not folder.exists():
        raise VolumeNotFoundError(f"{folder}: folder does not exist")
    if not folder.is_dir():
        raise VolumeError(f"{folder}: not a folder")
    return sorted(
        p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".") and _nifti_suffix(p)
    )


def case_name(path: str | os.PathLike[str]) -> str:
    """Case identifier of a volume file: the name without ``.nii.gz``/``.nii`` and without a trailing
    nnU-Net channel suffix ``_0000`` (so ``img/case_7_0000.nii.gz`` and ``lbl/case_7.nii.gz`` match)."""
    name = Path(path).name
    suffix = _nifti_suffix(name)
    if suffix:
        name = name[: -len(suffix)]
    return re.sub(r"_0000$", "", name)


# --------------------------------------------------------------------------------------------------------
# The volume container
# --------------------------------------------------------------------------------------------------------


@dataclass
class CTVolume:
    """A CT volume in canonical orientation plus what is needed to map results back to the source.

    Attributes:
        hu: float32 array ``(Z, Y, X)``, Hounsfield units, canonical orientation (see module docstring).
        spacing: voxel size in mm as ``(sz, sy, sx)`` matching ``hu``'s axes.
        source: the file/folder path, or ``"<array>"`` / ``"<nibabel image>"``.
    """

    hu: np.ndarray
    spacing: tuple[float, float, float]
    source: str
    _affine: np.ndarray = field(repr=False)
    _header: nib.Nifti1Header = field(repr=False)
    _original_shape: tuple[int, int, int] = field(repr=False)
    # nibabel orientation transform: original voxel axes -> canonical (x, y, z) = LPS axes.
    _to_canonical: np.ndarray = field(repr=False)

    @property
    def affine(self) -> np.ndarray:
        """4x4 voxel->RAS-world affine of the ORIGINAL stored voxel order (a copy)."""
        return self._affine.copy()

    @property
    def header(self) -> nib.Nifti1Header:
        """A copy of the NIfTI header used when writing outputs for this volume."""
        return self._header.copy()

    @property
    def original_shape(self) -> tuple[int, int, int]:
        """Shape of the volume in the source's stored voxel order."""
        return self._original_shape

    @property
    def canonical_affine(self) -> np.ndarray:
        """4x4 affine mapping canonical index ``(x, y, z)`` (i.e. ``hu[z, y, x]``) to RAS world mm."""
        return self._affine @ inv_ornt_aff(self._to_canonical, self._original_shape)

    def to_canonical(self, array: np.ndarray) -> np.ndarray:
        """Map an array in the ORIGINAL stored voxel order ``original_shape`` (+ optional trailing channel
        axes) to canonical ``(Z, Y, X, ...)`` order. Inverse of :meth:`to_original`."""
        array = np.asanyarray(array)
        if tuple(array.shape[:3]) != self._original_shape:
            raise ValueError(
                f"{self.source}: array of shape {array.shape} does not start with the original shape "
                f"{self._original_shape}"
            )
        xyz = apply_orientation(array, self._to_canonical)
        return np.swapaxes(xyz, 0, 2)

    def to_original(self, array_zyx: np.ndarray, channel_axis: int | None = None) -> np.ndarray:
        """Map a canonical array back to the source's stored voxel order (exact: permutation + flips).

        Args:
            array_zyx: ``(Z, Y, X)`` (same spatial shape as ``hu``), any dtype. With ``channel_axis`` set
                it has one extra axis at that position, e.g. ``(C, Z, Y, X)`` with ``channel_axis=0`` or
                ``(Z, Y, X, C)`` with ``channel_axis=-1``.
            channel_axis: position of the channel axis in ``array_zyx``, or ``None`` for no channels.

        Returns:
            ``original_shape`` array, or ``original_shape + (C,)`` with channels LAST (nibabel's 4-D
            convention), regardless of where the channel axis was in the input.
        """
        array = np.asanyarray(array_zyx)
        if channel_axis is not None:
            if array.ndim != 4:
                raise ValueError(f"{self.source}: channel_axis given but array has shape {array.shape}")
            array = np.moveaxis(array, channel_axis, -1)
        elif array.ndim != 3:
            raise ValueError(
                f"{self.source}: expected a (Z, Y, X) array, got shape {array.shape} "
                "(pass channel_axis for a channel dimension)"
            )
        if tuple(array.shape[:3]) != tuple(self.hu.shape):
            raise ValueError(
                f"{self.source}: array spatial shape {tuple(array.shape[:3])} != canonical volume shape "
                f"{tuple(self.hu.shape)}"
            )
        xyz = np.swapaxes(array, 0, 2)
        back = ornt_transform(_CANONICAL_ORNT, io_orientation(self._affine))
        return np.ascontiguousarray(apply_orientation(xyz, back))


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
) -> CTVolume:
    """Load a CT volume and reorient it to the canonical ``(Z, Y, X)`` layout.

    Args:
        source: a NIfTI file (``.nii`` / ``.nii.gz``), a folder holding one DICOM series (or a single
            DICOM file), a nibabel image, or a numpy array that is ALREADY canonical ``(Z, Y, X)``.
        spacing: ``(sz, sy, sx)`` in mm; required for numpy arrays, must be ``None`` otherwise (the
            spacing comes from the file).

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
        return _load_dicom_series(path)
    if _nifti_suffix(path):
        if path.stat().st_size == 0:
            raise VolumeError(f"{path}: file is empty")
        try:
            img = nib.load(path)
        except Exception as exc:  # nibabel raises many types for garbage (ImageFileError, OSError, ...)
            raise VolumeError(f"{path}: not a readable NIfTI file ({type(exc).__name__}: {exc})") from exc
        return _load_nifti_image(img, str(path))
    # Anything else: accept a lone DICOM file as a one-slice series, otherwise report the format problem.
    return _load_dicom_series(path)


# --------------------------------------------------------------------------------------------------------
# DICOM
# --------------------------------------------------------------------------------------------------------


def _import_pydicom() -> Any:
    try:
        import pydicom
    except ImportError as exc:  # optional dependency
        raise ImportError(
            "Reading DICOM needs pydicom: pip install 'meddinov3-hf[dicom]' (or pip install pydicom)"
        ) from exc
    return pydicom


def _load_dicom_series(path: Path) -> CTVolume:
    """Read one DICOM series (a folder, or a single file) into a canonical :class:`CTVolume`."""
    pydicom = _import_pydicom()
    from pydicom.errors import InvalidDicomError

    files = sorted(p for p in path.iterdir() if p.is_file()) if path.is_dir() else [path]
    headers: list[tuple[Path, Any]] = []
    for f in files:
        try:
            ds = pydicom.dcmread(f, stop_before_pixels=True)
        except (InvalidDicomError, EOFError, OSError, ValueError, KeyError, TypeError):
            continue  # not DICOM (README, .DS_Store, ...) -> skipped by design
        # Only image slices with geometry take part (skips DICOMDIR, structured reports, ...).
        if "ImagePositionPatient" in ds and "ImageOrientationPatient" in ds and "PixelSpacing" in ds:
            headers.append((f, ds))
    if not headers:
        what = "folder contains no" if path.is_dir() else "file is not a"
        raise VolumeError(
            f"{path}: {what} DICOM image slice with ImagePositionPatient/ImageOrientationPatient/"
            "PixelSpacing (and it is not a .nii/.nii.gz file)"
        )

    series: dict[str, list[tuple[Path, Any]]] = {}
    for f, ds in headers:
        series.setdefault(str(ds.get("SeriesInstanceUID", "")), []).append((f, ds))
    if len(series) > 1:
        uid, chosen = max(series.items(), key=lambda kv: len(kv[1]))
        counts = ", ".join(f"{k or '<no UID>'}: {len(v)}" for k, v in series.items())
        warnings.warn(
            f"{path}: {len(series)} DICOM series found ({counts}); using {uid} with {len(chosen)} slices",
            UserWarning,
            stacklevel=3,
        )
    else:
        chosen = next(iter(series.values()))

    def geom(item: tuple[Path, Any]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        f, ds = item
        try:
            iop = np.asarray([float(v) for v in ds.ImageOrientationPatient], dtype=np.float64)
            ipp = np.asarray([float(v) for v in ds.ImagePositionPatient], dtype=np.float64)
            ps = np.asarray([float(v) for v in ds.PixelSpacing], dtype=np.float64)
        except (TypeError, ValueError) as exc:
            raise VolumeError(f"{f}: unreadable geometry tags ({exc})") from exc
        if iop.shape != (6,) or ipp.shape != (3,) or ps.shape != (2,) or np.any(ps <= 0):
            raise VolumeError(f"{f}: malformed ImageOrientationPatient/ImagePositionPatient/PixelSpacing")
        return iop, ipp, ps

    iop0, _, ps0 = geom(chosen[0])
    row_dir, col_dir = iop0[:3], iop0[3:]
    normal = np.cross(row_dir, col_dir)
    if not np.isclose(np.linalg.norm(normal), 1.0, atol=1e-3):
        raise VolumeError(f"{chosen[0][0]}: ImageOrientationPatient is not two orthonormal vectors")
    positions = []
    for item in chosen:
        iop, ipp, ps = geom(item)
        if not np.allclose(iop, iop0, atol=1e-4) or not np.allclose(ps, ps0, rtol=1e-3):
            raise VolumeError(
                f"{item[0]}: orientation/pixel spacing differs from the rest of series in {path}"
            )
        positions.append(ipp)
    order = np.argsort([float(np.dot(normal, p)) for p in positions], kind="stable")
    chosen = [chosen[i] for i in order]
    positions = [positions[i] for i in order]

    n = len(chosen)
    if n > 1:
        dists = np.diff([float(np.dot(normal, p)) for p in positions])
        if np.any(dists <= 1e-6):
            dup = chosen[int(np.argmin(dists)) + 1][0]
            raise VolumeError(f"{path}: two slices share one position (e.g. {dup}); several series/echoes?")
        median = float(np.median(dists))
        if np.max(np.abs(dists - median)) > 0.01 * median:
            raise VolumeError(
                f"{path}: slice spacing is not uniform (from {dists.min():.4g} to {dists.max():.4g} mm); "
                "missing slices or a variable-spacing series"
            )
        # The true step vector (equals normal * spacing, or is sheared for a tilted gantry).
        step = (positions[-1] - positions[0]) / (n - 1)
    else:
        ds = chosen[0][1]
        thickness = float(ds.get("SpacingBetweenSlices", 0) or ds.get("SliceThickness", 0) or 1.0)
        step = normal * thickness

    # Voxel (i, j, k) = (column, row, slice); LPS patient coordinates as in the DICOM standard.
    lps = np.eye(4)
    lps[:3, 0] = row_dir * ps0[1]  # moving along a row = next column; PixelSpacing[1] = column spacing
    lps[:3, 1] = col_dir * ps0[0]  # moving down a column = next row; PixelSpacing[0] = row spacing
    lps[:3, 2] = step
    lps[:3, 3] = positions[0]
    affine = np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps  # LPS -> nibabel's RAS world
    header = _fresh_header(affine, code=1)  # scanner-anatomical coordinates
    affine = header.get_best_affine()  # what a saved/reloaded NIfTI will carry

    slices = []
    rows, cols = int(chosen[0][1].Rows), int(chosen[0][1].Columns)
    for f, _ in chosen:
        try:
            ds = pydicom.dcmread(f)
            pixels = ds.pixel_array
        except Exception as exc:  # compressed syntax without a decoder, truncated pixel data, ...
            raise VolumeError(f"{f}: cannot decode pixel data ({type(exc).__name__}: {exc})") from exc
        if pixels.shape != (rows, cols):
            raise VolumeError(f"{f}: pixel array shape {pixels.shape} != ({rows}, {cols}) of the series")
        slope = float(ds.get("RescaleSlope", 1.0) or 1.0)
        intercept = float(ds.get("RescaleIntercept", 0.0) or 0.0)
        slices.append(pixels.astype(np.float32) * np.float32(slope) + np.float32(intercept))
    data = np.stack([s.T for s in slices], axis=-1)  # (columns, rows, slices) = (i, j, k)
    return _build_volume(data, affine, header, str(path))


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


def _write_nifti(data: np.ndarray, header: nib.Nifti1Header, reference: CTVolume, out: Path) -> Path:
    header.set_data_shape(data.shape)
    header.set_slope_inter(1.0, 0.0)  # outputs are stored unscaled
    header["cal_min"] = 0
    header["cal_max"] = 0
    image_cls = nib.Nifti2Image if isinstance(header, nib.Nifti2Header) else nib.Nifti1Image
    # Passing the reference's own best affine leaves qform/sform (codes + matrices) untouched.
    img = image_cls(data, reference._affine, header=header)
    with atomic_path(out) as tmp:
        nib.save(img, tmp)
    return out


def save_labels(labels_zyx: np.ndarray, reference: CTVolume, path: str | os.PathLike[str]) -> Path:
    """Write a canonical ``(Z, Y, X)`` integer label map as NIfTI that overlays ``reference``'s source.

    The data is mapped back to the source's stored voxel order and written with the source's exact affine
    and a copy of its header (qform/sform codes and matrices, pixdim, units kept). Datatype is uint8 when
    the max label < 256, else int16 (< 32768), uint16 (< 65536) or int32; scaling is reset (slope 1,
    intercept 0) and the intent set to "label". Written atomically; refuses to overwrite the source.
    """
    out = _check_output_path(path, reference)
    labels = np.asanyarray(labels_zyx)
    if labels.dtype == bool:
        labels = labels.astype(np.uint8)
    if not np.issubdtype(labels.dtype, np.integer):
        if not np.issubdtype(labels.dtype, np.floating) or not np.all(np.isfinite(labels)):
            raise ValueError(f"{out}: labels must be integers, got dtype {labels.dtype}")
        if not np.array_equal(labels, np.round(labels)):
            raise ValueError(f"{out}: labels have non-integer values (dtype {labels.dtype})")
    if labels.size and labels.min() < 0:
        raise ValueError(f"{out}: labels must be >= 0, found {labels.min()}")
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
    """
    out = _check_output_path(path, reference)
    data = reference.to_original(np.asanyarray(array_zyx), channel_axis=channel_axis).astype(np.float32)
    header = reference.header
    header.set_data_dtype(np.float32)
    header.set_intent("none")
    if data.ndim == 4:
        zooms = header.get_zooms()[:3]
        header.set_data_shape(data.shape)
        header.set_zooms(tuple(zooms) + (1.0,))  # the channel axis has no physical size
    return _write_nifti(data, header, reference, out)
