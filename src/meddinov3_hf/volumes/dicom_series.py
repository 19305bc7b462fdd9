"""One single-frame DICOM CT series (a folder, or one file) → a canonical `CTVolume`.

The geometry follows the DICOM standard (PS3.3 C.7.6.2.1.1): slices are ordered along the normal of
ImageOrientationPatient, the voxel axes are (column, row, slice) in LPS patient coordinates, and the step
between slices is the true position difference (sheared for a tilted gantry). Multi-frame files are handed to
`dicom_in.load_multiframe`; screenshots and colour images are refused with the reason (`not_ct_reason`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from .io import CTVolume, VolumeError, _build_volume, _fresh_header, _import_pydicom

__all__ = ["load_dicom_series", "not_ct_reason"]

# Secondary capture image storage SOP classes (screenshots, dose reports): never CT slices to segment.
_SECONDARY_CAPTURE = ("1.2.840.10008.5.1.4.1.1.7",)

_Item = tuple[Path, Any]  # (file, pydicom header)


def not_ct_reason(ds: Any) -> str | None:
    """Why a DICOM image is not a CT slice (secondary capture, colour), or None."""
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2"))
    samples = int(ds.get("SamplesPerPixel", 1) or 1)
    bits = int(ds.get("BitsAllocated", 16) or 16)
    capture = str(ds.get("SOPClassUID", "")).startswith(_SECONDARY_CAPTURE)
    if samples != 1 or not photometric.startswith("MONOCHROME") or (capture and bits == 8):
        return (
            f"not CT: secondary capture / photometric {photometric} ({bits}-bit, {samples} sample(s) per "
            f"pixel{', secondary capture' if capture else ''}); a CT image series is needed"
        )
    return None


def load_dicom_series(path: Path, series_uid: str | None = None) -> CTVolume:
    """Read one DICOM series (a folder, or a single file) into a canonical :class:`CTVolume`."""
    pydicom = _import_pydicom()
    headers, not_ct, multiframe = _scan_headers(pydicom, path)
    if multiframe:
        from .dicom_in import load_multiframe, pick_multiframe

        chosen_file = pick_multiframe(path, multiframe, headers, series_uid)
        if chosen_file is not None:
            return load_multiframe(chosen_file, str(path))
    if not headers and not_ct:
        raise VolumeError(f"{not_ct[0][0]}: {not_ct[0][1]}")
    if not headers:
        what = "folder contains no" if path.is_dir() else "file is not a"
        raise VolumeError(
            f"{path}: {what} DICOM image slice with ImagePositionPatient/ImageOrientationPatient/"
            "PixelSpacing (and it is not a .nii/.nii.gz file)"
        )
    chosen, positions, row_dir, col_dir, pixel_spacing, step = _ordered_slices(
        path, _choose_series(path, headers, series_uid)
    )
    # Voxel (i, j, k) = (column, row, slice); LPS patient coordinates as in the DICOM standard.
    lps = np.eye(4)
    lps[:3, 0] = row_dir * pixel_spacing[1]  # along a row = next column; PixelSpacing[1] = column spacing
    lps[:3, 1] = col_dir * pixel_spacing[0]  # down a column = next row; PixelSpacing[0] = row spacing
    lps[:3, 2] = step
    lps[:3, 3] = positions[0]
    affine = np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps  # LPS -> nibabel's RAS world
    header = _fresh_header(affine, code=1)  # scanner-anatomical coordinates
    affine = header.get_best_affine()  # what a saved/reloaded NIfTI will carry
    return _build_volume(_read_pixels(pydicom, chosen), affine, header, str(path))


def _scan_headers(pydicom: Any, path: Path) -> tuple[list[_Item], list[tuple[Path, str]], list[_Item]]:
    """(single-frame image slices with geometry, refused non-CT images with the reason, multi-frame files)."""
    from pydicom.errors import InvalidDicomError

    files = sorted(p for p in path.iterdir() if p.is_file()) if path.is_dir() else [path]
    headers: list[_Item] = []
    not_ct: list[tuple[Path, str]] = []
    multiframe: list[_Item] = []
    for f in files:
        try:
            ds = pydicom.dcmread(f, stop_before_pixels=True)
        except (InvalidDicomError, EOFError, OSError, ValueError, KeyError, TypeError):
            continue  # not DICOM (README, .DS_Store, ...) -> skipped by design
        if "Rows" in ds and (reason := not_ct_reason(ds)):
            not_ct.append((f, reason))  # a screenshot or dose report next to a series is skipped
            continue
        if "Rows" in ds and "PerFrameFunctionalGroupsSequence" in ds:
            multiframe.append((f, ds))  # Enhanced / Legacy Converted Enhanced CT: geometry per frame
            continue
        # Only image slices with geometry take part (skips DICOMDIR, structured reports, ...).
        if "ImagePositionPatient" in ds and "ImageOrientationPatient" in ds and "PixelSpacing" in ds:
            headers.append((f, ds))
    return headers, not_ct, multiframe


def _choose_series(path: Path, headers: list[_Item], series_uid: str | None) -> list[_Item]:
    """The slices of `series_uid`, or of the only series; several series without a choice are refused."""
    series: dict[str, list[_Item]] = {}
    for f, ds in headers:
        series.setdefault(str(ds.get("SeriesInstanceUID", "")), []).append((f, ds))

    def listing() -> str:
        return "; ".join(
            f"{uid or '<no UID>'} ({str(items[0][1].get('SeriesDescription', '') or 'no description')}, "
            f"{len(items)} slices)"
            for uid, items in series.items()
        )

    if series_uid is not None:
        if series_uid not in series:
            raise VolumeError(f"{path}: no DICOM series {series_uid}; the folder holds {listing()}")
        return series[series_uid]
    if len(series) > 1:
        raise VolumeError(
            f"{path}: {len(series)} DICOM series in one folder: {listing()}; choose one with --series UID"
        )
    return next(iter(series.values()))


def _geometry(item: _Item) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(ImageOrientationPatient (6,), ImagePositionPatient (3,), PixelSpacing (2,)) of one slice, checked."""
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


def _ordered_slices(
    path: Path, chosen: list[_Item]
) -> tuple[list[_Item], list[np.ndarray], np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The slices sorted along the normal, their positions, the unit row/column directions, the pixel
    spacing and the step between slices; mixed orientations, duplicate positions and gaps are refused."""
    iop0, _, ps0 = _geometry(chosen[0])
    row_dir, col_dir = iop0[:3], iop0[3:]
    norms = np.linalg.norm(row_dir), np.linalg.norm(col_dir)
    if not np.allclose(norms, 1.0, atol=1e-2) or abs(float(np.dot(row_dir, col_dir))) > 1e-2:
        raise VolumeError(f"{chosen[0][0]}: ImageOrientationPatient is not two orthonormal vectors")
    # Stored cosines are rounded (often to 6 digits); unit length is restored so that voxel sizes and the far
    # corner of an oblique scan are exact (the DICOM standard defines them as unit vectors, PS3.3 C.7.6.2.1.1).
    row_dir, col_dir = row_dir / norms[0], col_dir / norms[1]
    normal = np.cross(row_dir, col_dir)
    normal /= np.linalg.norm(normal)
    positions = []
    for item in chosen:
        iop, ipp, ps = _geometry(item)
        if not np.allclose(iop, iop0, atol=1e-4) or not np.allclose(ps, ps0, rtol=1e-3):
            raise VolumeError(
                f"{item[0]}: orientation/pixel spacing differs from the rest of series in {path}"
            )
        positions.append(ipp)
    order = np.argsort([float(np.dot(normal, p)) for p in positions], kind="stable")
    chosen = [chosen[i] for i in order]
    positions = [positions[i] for i in order]
    n = len(chosen)
    if n == 1:
        ds = chosen[0][1]
        thickness = float(ds.get("SpacingBetweenSlices", 0) or ds.get("SliceThickness", 0) or 1.0)
        return chosen, positions, row_dir, col_dir, ps0, normal * thickness
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
    return chosen, positions, row_dir, col_dir, ps0, step


def _read_pixels(pydicom: Any, chosen: list[_Item]) -> np.ndarray:
    """HU float32 (columns, rows, slices) = (i, j, k) of the ordered slices (rescale applied)."""
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
    return np.stack([s.T for s in slices], axis=-1)
