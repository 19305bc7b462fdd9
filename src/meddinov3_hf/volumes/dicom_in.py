"""The DICOM inputs people have: a zip of DICOM, a folder tree of several patients' series, multi-frame
(Enhanced / Legacy Converted Enhanced) CT, compressed transfer syntaxes.

* :func:`open_input` extracts a ``.zip`` once per run into a temporary folder named after the archive (so
  messages read ``.../study.zip/PAT1/3/0001.dcm``), refusing members that would land outside it; the folder is
  removed when the process exits.
* :func:`find_series` walks a folder tree and groups DICOM objects by (folder, SeriesInstanceUID). Every
  series found is either planned (one output per CT series, ``OUT/PatientID/SeriesInstanceUID.nii.gz``), or
  reported with the reason it is not segmented (another modality, a screenshot, a non-image object such as
  an RTSTRUCT or SEG) — never skipped silently.
* :func:`load_multiframe` reads one multi-frame CT file: frame positions, orientation and pixel spacing from
  the per-frame / shared functional groups (PS3.3 C.7.6.16), rescale from the Pixel Value Transformation
  group, frames sorted along the slice normal with the same checks as single-frame series.
* Compressed pixel data decode through pydicom's plugins: RLE natively, JPEG / JPEG-LS / JPEG 2000 through
  ``pylibjpeg`` with ``pylibjpeg-libjpeg`` and ``pylibjpeg-openjpeg`` (the ``[dicom]`` extra).
"""

from __future__ import annotations

import atexit
import os
import re
import shutil
import tempfile
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .io import CTVolume, VolumeError, _build_volume, _fresh_header, _import_pydicom

__all__ = [
    "SeriesEntry",
    "find_series",
    "frame_geometry",
    "load_multiframe",
    "open_input",
    "plan_series_jobs",
]

# CT image storage SOP classes: CT, Enhanced CT, Legacy Converted Enhanced CT.
CT_SOP_CLASSES = ("1.2.840.10008.5.1.4.1.1.2", "1.2.840.10008.5.1.4.1.1.2.1", "1.2.840.10008.5.1.4.1.1.2.2")
_NON_IMAGE_MODALITIES = {"SEG", "RTSTRUCT", "RTPLAN", "RTDOSE", "SR", "PR", "KO", "REG"}


# --------------------------------------------------------------------------------------------------------
# Zip archives
# --------------------------------------------------------------------------------------------------------


def open_input(source: str | os.PathLike[str]) -> str:
    """``source`` unchanged, or for a ``.zip`` the folder it is extracted to (removed at process exit)."""
    path = Path(source)
    if not (path.is_file() and path.suffix.lower() == ".zip"):
        return str(source)
    if not zipfile.is_zipfile(path):
        raise VolumeError(f"{path}: not a readable zip archive")
    root = Path(tempfile.mkdtemp(prefix="meddinov3-zip-"))
    atexit.register(shutil.rmtree, root, ignore_errors=True)  # only the folder this function created
    target = root / path.name
    target.mkdir()
    with zipfile.ZipFile(path) as archive:
        members = [m for m in archive.infolist() if not m.is_dir()]
        total = sum(m.file_size for m in members)
        free = shutil.disk_usage(root).free
        if total > free:
            raise VolumeError(
                f"{path}: unpacks to {total / 1e9:.1f} GB but only {free / 1e9:.1f} GB are free"
            )
        base = target.resolve()
        for member in members:
            destination = (target / member.filename).resolve()
            if base not in destination.parents:
                raise VolumeError(
                    f"{path}: member {member.filename!r} would be written outside the archive folder"
                )
            if (member.external_attr >> 16) & 0o170000 == 0o120000:
                raise VolumeError(f"{path}: member {member.filename!r} is a symbolic link")
            destination.parent.mkdir(parents=True, exist_ok=True)
            with archive.open(member) as src, open(destination, "wb") as dst:
                shutil.copyfileobj(src, dst)
    return str(target)


# --------------------------------------------------------------------------------------------------------
# Series discovery
# --------------------------------------------------------------------------------------------------------


@dataclass
class SeriesEntry:
    """One (folder, SeriesInstanceUID) group of DICOM objects."""

    folder: Path
    uid: str
    patient_id: str
    modality: str
    description: str
    files: list[Path] = field(default_factory=list)
    frames: int = 0
    reason: str | None = None  # why it is not segmented (None: a CT series to segment)


def _reason(ds: Any) -> str | None:
    modality = str(ds.get("Modality", "") or "")
    if modality in _NON_IMAGE_MODALITIES or "Rows" not in ds:
        return f"not an image series (Modality {modality or '?'})"
    from .dicom_series import not_ct_reason as _not_ct_reason

    not_ct = _not_ct_reason(ds)
    if not_ct:
        return not_ct
    if modality != "CT" and str(ds.get("SOPClassUID", "")) not in CT_SOP_CLASSES:
        return f"Modality {modality or '?'}: not a CT series"
    return None


def find_series(root: str | os.PathLike[str]) -> tuple[list[SeriesEntry], list[tuple[Path, str]]]:
    """All DICOM series under ``root`` (recursively), grouped by (folder, SeriesInstanceUID), and the other
    files seen with what they are (``"NIfTI"`` or ``"not DICOM"``; hidden files excluded)."""
    pydicom = _import_pydicom()
    from pydicom.errors import InvalidDicomError

    groups: dict[tuple[Path, str], SeriesEntry] = {}
    other: list[tuple[Path, str]] = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(files):
            path = Path(folder) / name
            if name.startswith("."):
                continue
            if name.lower().endswith((".nii", ".nii.gz")):
                other.append((path, "NIfTI"))
                continue
            try:
                ds = pydicom.dcmread(path, stop_before_pixels=True)
            except (InvalidDicomError, EOFError, OSError, ValueError, KeyError, TypeError):
                other.append((path, "not DICOM"))
                continue
            if "SeriesInstanceUID" not in ds and "SOPClassUID" not in ds:
                other.append((path, "not DICOM"))  # DICOMDIR and other non-instance files
                continue
            key = (Path(folder), str(ds.get("SeriesInstanceUID", "")))
            entry = groups.get(key)
            if entry is None:
                entry = groups[key] = SeriesEntry(
                    folder=Path(folder),
                    uid=key[1],
                    patient_id=str(ds.get("PatientID", "") or ""),
                    modality=str(ds.get("Modality", "") or ""),
                    description=str(ds.get("SeriesDescription", "") or ""),
                    reason=_reason(ds),
                )
            entry.files.append(path)
            entry.frames += int(ds.get("NumberOfFrames", 1) or 1)
    return list(groups.values()), other


def _safe(name: str, fallback: str) -> str:
    cleaned = re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._")
    return cleaned or fallback


def _report_skipped(entries: list[SeriesEntry], other: list[tuple[Path, str]], report: Any) -> None:
    """Tell `report` about the series that are not segmented, NIfTI files in the tree and other files."""
    for entry in entries:
        if entry.reason is not None:
            report(
                f"not segmented: {entry.folder} series {entry.uid or '<no UID>'} "
                f"({len(entry.files)} file(s)): {entry.reason}"
            )
    nifti = [p for p, kind in other if kind == "NIfTI"]
    if nifti:
        shown = ", ".join(str(p) for p in nifti[:3]) + (", ..." if len(nifti) > 3 else "")
        report(
            f"not segmented: {len(nifti)} NIfTI file(s) in the DICOM folder tree ({shown}); only DICOM series "
            "are read from a tree, segment NIfTI files from a folder of NIfTI files"
        )
    if len(other) > len(nifti):
        report(f"ignored: {len(other) - len(nifti)} file(s) that are not DICOM")


def plan_series_jobs(
    source: str | os.PathLike[str],
    output: str | os.PathLike[str],
    save_probabilities: bool = False,
    series: str | None = None,
    report: Any = None,
) -> list[Any] | None:
    """Jobs for a folder tree of DICOM series (one per CT series, ``OUT/PatientID/SeriesInstanceUID``), or
    ``None`` when ``source`` is a single series / NIfTI input that `plan_jobs` handles.

    Series that are not segmented are written to ``report`` (a callable taking one line) with the reason.

    Raises:
        ValueError: a NIfTI file name as output for several series, two series that would share an output,
            no CT series at all, or ``series`` not found.
    """
    from ..files import check_output_path
    from .inference import SegmentJob

    root = Path(source)
    if not root.is_dir():
        return None
    top_files = [p for p in root.iterdir() if p.is_file() and not p.name.startswith(".")]
    if any(p.name.lower().endswith((".nii", ".nii.gz")) for p in top_files):
        return None  # a folder of NIfTI cases (or a mixed folder, refused by plan_jobs)
    entries, other = find_series(root)
    if series is not None:
        entries = [e for e in entries if e.uid == series]
        if not entries:
            raise ValueError(f"{root}: no DICOM series {series} anywhere in the folder tree")
    nested = any(e.folder != root for e in entries)
    segmentable = [e for e in entries if e.reason is None]
    if not nested and len(segmentable) <= 1:
        return None  # one series in the folder itself: the single-series path (with its own checks)
    if report is not None:
        _report_skipped(entries, other, report)
    if not segmentable:
        raise ValueError(f"{root}: no CT image series in the folder tree ({len(entries)} other DICOM series)")
    out = Path(output)
    if out.name.lower().endswith((".nii", ".nii.gz")):
        if len(segmentable) > 1:
            listing = "; ".join(f"{e.folder} {e.uid}" for e in segmentable[:6])
            raise ValueError(
                f"{root}: {len(segmentable)} CT series ({listing}); -o must be a folder (one output per series, "
                "named PatientID/SeriesInstanceUID), or choose one with --series UID"
            )
        entry = segmentable[0]
        jobs = [SegmentJob(str(entry.folder), str(out), series=entry.uid)]
    else:
        check_output_path(out, [root], kind="into", option="-o")
        seen: dict[Path, SeriesEntry] = {}
        jobs = []
        for entry in segmentable:
            target = out / _safe(entry.patient_id, "unknown-patient") / f"{_safe(entry.uid, 'no-uid')}.nii.gz"
            if target in seen:
                raise ValueError(
                    f"{root}: series {entry.uid} appears in {seen[target].folder} and {entry.folder}; both would "
                    f"be written to {target} (a series split over folders is not joined)"
                )
            seen[target] = entry
            jobs.append(SegmentJob(str(entry.folder), str(target), series=entry.uid))
    for job in jobs:
        check_output_path(job.output, [root], suffixes=(".nii.gz", ".nii"), overwrite=True, option="-o")
        if save_probabilities:
            job.probabilities = job.output[: -len(".nii.gz")] + "_probabilities.nii.gz"
    return jobs


# --------------------------------------------------------------------------------------------------------
# Multi-frame CT
# --------------------------------------------------------------------------------------------------------


def _group(ds: Any, item: Any, name: str) -> Any | None:
    for source in (item, ds.get("SharedFunctionalGroupsSequence", [None])[0]):
        value = source.get(name) if source is not None else None
        if value:
            return value[0]
    return None


def frame_geometry(ds: Any) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """(ImageOrientationPatient, ImagePositionPatient, PixelSpacing) of every frame of a single- or
    multi-frame image (functional groups, per-frame before shared)."""
    if "PerFrameFunctionalGroupsSequence" not in ds:
        return [
            (
                np.asarray(ds.ImageOrientationPatient, float),
                np.asarray(ds.ImagePositionPatient, float),
                np.asarray(ds.PixelSpacing, float),
            )
        ]
    out = []
    for n, item in enumerate(ds.PerFrameFunctionalGroupsSequence, start=1):
        orientation = _group(ds, item, "PlaneOrientationSequence")
        position = _group(ds, item, "PlanePositionSequence")
        measures = _group(ds, item, "PixelMeasuresSequence")
        if orientation is None or position is None or measures is None:
            raise KeyError(f"frame {n} has no plane orientation / position / pixel measures")
        out.append(
            (
                np.asarray(orientation.ImageOrientationPatient, float),
                np.asarray(position.ImagePositionPatient, float),
                np.asarray(measures.PixelSpacing, float),
            )
        )
    return out


def _rescale(ds: Any, item: Any) -> tuple[float, float]:
    group = _group(ds, item, "PixelValueTransformationSequence")
    source = group if group is not None else ds
    return float(source.get("RescaleSlope", 1.0) or 1.0), float(source.get("RescaleIntercept", 0.0) or 0.0)


def load_multiframe(path: str | os.PathLike[str], name: str | None = None) -> CTVolume:
    """Read one multi-frame (Enhanced / Legacy Converted Enhanced) CT file into a canonical volume.

    Frames are sorted along the slice normal; all must share orientation and pixel spacing and be equally
    spaced (a tilted stack is a sheared grid, as for single-frame series)."""
    pydicom = _import_pydicom()
    path = Path(path)
    name = name or str(path)
    try:
        ds = pydicom.dcmread(path)
        geometry = frame_geometry(ds)
    except (KeyError, AttributeError, TypeError, ValueError) as exc:
        raise VolumeError(f"{path}: multi-frame image without usable plane geometry ({exc})") from exc
    if reason := _reason(ds):
        raise VolumeError(f"{path}: {reason}")
    iop0, _, ps0 = geometry[0]
    row_dir, col_dir = iop0[:3] / np.linalg.norm(iop0[:3]), iop0[3:] / np.linalg.norm(iop0[3:])
    if abs(float(np.dot(row_dir, col_dir))) > 1e-2:
        raise VolumeError(f"{path}: ImageOrientationPatient is not two orthogonal vectors")
    normal = np.cross(row_dir, col_dir)
    for n, (iop, _, ps) in enumerate(geometry, start=1):
        if not np.allclose(iop, iop0, atol=1e-4) or not np.allclose(ps, ps0, rtol=1e-3):
            raise VolumeError(f"{path}: frame {n} has another orientation/pixel spacing than frame 1")
    depth_of = np.array([float(np.dot(normal, ipp)) for _, ipp, _ in geometry])
    order = np.argsort(depth_of, kind="stable")
    positions = np.array([geometry[i][1] for i in order])
    n = len(order)
    if n > 1:
        dists = np.diff(depth_of[order])
        if np.any(dists <= 1e-6):
            raise VolumeError(
                f"{path}: frames {int(order[int(np.argmin(dists))]) + 1} and {int(order[int(np.argmin(dists)) + 1]) + 1} "
                "share one position (several stacks, phases or echoes in one file?)"
            )
        median = float(np.median(dists))
        if np.max(np.abs(dists - median)) > 0.01 * median:
            raise VolumeError(
                f"{path}: frame spacing is not uniform (from {dists.min():.4g} to {dists.max():.4g} mm)"
            )
        step = (positions[-1] - positions[0]) / (n - 1)
    else:
        step = normal * float(ds.get("SpacingBetweenSlices", 0) or ds.get("SliceThickness", 0) or 1.0)
    lps = np.eye(4)
    lps[:3, 0] = row_dir * ps0[1]
    lps[:3, 1] = col_dir * ps0[0]
    lps[:3, 2] = step
    lps[:3, 3] = positions[0]
    affine = np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps
    header = _fresh_header(affine, code=1)
    affine = header.get_best_affine()
    try:
        pixels = ds.pixel_array
    except Exception as exc:  # compressed syntax without a decoder, truncated pixel data, ...
        raise VolumeError(f"{path}: cannot decode pixel data ({type(exc).__name__}: {exc})") from exc
    pixels = pixels.reshape(len(geometry), int(ds.Rows), int(ds.Columns))
    items = list(ds.PerFrameFunctionalGroupsSequence)
    slices = []
    for i in order:
        slope, intercept = _rescale(ds, items[i])
        slices.append(pixels[i].astype(np.float32) * np.float32(slope) + np.float32(intercept))
    data = np.stack([s.T for s in slices], axis=-1)
    return _build_volume(data, affine, header, name)


def pick_multiframe(
    path: Path,
    multiframe: Sequence[tuple[Path, Any]],
    single_frame: Sequence[tuple[Path, Any]],
    series_uid: str | None,
) -> Path | None:
    """Which multi-frame file of a folder to read (None: read the single-frame slices instead)."""
    candidates = [
        (f, ds)
        for f, ds in multiframe
        if series_uid is None or str(ds.get("SeriesInstanceUID")) == series_uid
    ]
    singles = [
        (f, ds)
        for f, ds in single_frame
        if series_uid is None or str(ds.get("SeriesInstanceUID")) == series_uid
    ]
    if not candidates:
        return None
    if singles or len(candidates) > 1:
        uids = sorted({str(ds.get("SeriesInstanceUID", "")) for _, ds in [*candidates, *singles]})
        if len(uids) > 1:
            raise VolumeError(
                f"{path}: {len(uids)} DICOM series in one folder (multi-frame and/or single-frame): "
                f"{', '.join(uids)}; choose one with --series UID"
            )
        raise VolumeError(
            f"{path}: series {uids[0]} is split over {len(candidates)} multi-frame file(s)"
            f"{' and single-frame slices' if singles else ''}; joining them is not supported"
        )
    return candidates[0][0]
