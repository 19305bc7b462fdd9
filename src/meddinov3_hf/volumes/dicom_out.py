"""DICOM outputs that reference the source series: DICOM-SEG (highdicom) here, RTSTRUCT (pydicom) in `rtstruct`.

Both are written on the source slices themselves, never on a resampled grid: frame / contour ``k`` is the label
map's slice ``k`` in the stored voxel order of the :class:`~meddinov3_hf.volumes.io.CTVolume` read from the
series, and references that slice's SOP instance (and frame, for a multi-frame Enhanced CT). Before writing,
every slice's ImagePositionPatient / ImageOrientationPatient / PixelSpacing / size is checked against the
volume's affine, so a series whose slices do not lie on one regular grid is refused with the slice and the
offset named (a gantry tilt is a regular, sheared grid and is accepted as it is).

* **DICOM-SEG** — one binary segment per named structure (background excluded), segment label = the name,
  property type coded in SNOMED CT when the name is a known anatomical structure (``liver``, ``kidney_left``,
  ...; otherwise a private ``99MEDDINOV3`` code carrying the name), algorithm identification with the model name
  and the package version. Plane positions are each source slice's own, so tilted and reversed series stay
  exact. Read it back with ``highdicom.seg.segread(path).get_pixels_by_source_instance(...)``.
* **RTSTRUCT** — one ROI per structure with the exact pixel outlines as contours: :mod:`.rtstruct`
  (``write_rtstruct``, ``label_contours``), which uses this module's source-series check.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..files import atomic_path
from .dicom_in import frame_geometry
from .io import CTVolume, VolumeError, _import_pydicom
from .labels import check_label_values

__all__ = [
    "DicomGeometryError",
    "DicomLabels",
    "SourceSeries",
    "anatomy_code",
    "dicom_label_writer",
    "read_source_series",
    "write_dicom_seg",
]

_PRIVATE_SCHEME = "99MEDDINOV3"
_ALIASES = {
    "gall_bladder": "Gallbladder",
    "urinary_bladder": "Bladder",
    "ivc": "InferiorVenaCava",
    "postcava": "InferiorVenaCava",
    "adrenal": "AdrenalGland",
    "adrenal_gland": "AdrenalGland",
    "oesophagus": "Esophagus",
    "thyroid_gland": "Thyroid",
    "spinal_cord": "SpinalCord",
}
_LATERALITY = {"left": "Left", "l": "Left", "right": "Right", "r": "Right"}


class DicomGeometryError(VolumeError):
    """The source series cannot carry a DICOM output (no series, or slices off a regular grid)."""


@dataclass
class SourceSeries:
    """The source slices in the label map's stored slice order ``k``.

    ``frames[k] = (dataset index, frame number or None)``; ``positions[k]`` is that slice's
    ImagePositionPatient (LPS mm)."""

    datasets: list[Any]
    frames: list[tuple[int, int | None]]
    positions: np.ndarray
    row_dir: np.ndarray
    col_dir: np.ndarray
    pixel_spacing: tuple[float, float]  # (between rows, between columns), DICOM order
    files: list[Path] = field(default_factory=list)

    @property
    def first(self) -> Any:
        return self.datasets[0]


def _import_dicom() -> Any:
    return _import_pydicom("DICOM output needs pydicom and highdicom: pip install 'meddinov3-hf[dicom]'")


def _is_dicom_source(volume: CTVolume) -> bool:
    source = str(volume.source)
    if source.startswith("<"):
        return False
    path = Path(source)
    return path.is_dir() or (path.is_file() and not path.name.lower().endswith((".nii", ".nii.gz")))


def read_source_series(
    volume: CTVolume,
    files: Sequence[str | os.PathLike[str]] | None = None,
    series_uid: str | None = None,
) -> SourceSeries:
    """The DICOM slices ``volume`` was read from, in its stored slice order, checked against its geometry.

    Args:
        volume: a volume loaded from a DICOM series folder or file.
        files: the series' files when known (e.g. one of several series in a folder); by default the image
            files of ``volume.source`` (the files directly in the folder, as the reader takes them) of
            the series matching the volume.
        series_uid: restrict to this SeriesInstanceUID (a folder holding several series).

    Raises:
        DicomGeometryError: the volume is not from DICOM, or a slice's position, orientation, pixel spacing or
            size differs from the volume's regular grid (the message names the file and what differs).
    """
    pydicom = _import_dicom()
    if not _is_dicom_source(volume):
        raise DicomGeometryError(
            f"{volume.source}: DICOM output needs a DICOM series input (there is no source series to "
            "reference for a NIfTI or array input); use --output-type nifti"
        )
    if files is None:
        path = Path(volume.source)
        candidates = sorted(p for p in path.iterdir() if p.is_file()) if path.is_dir() else [path]
    else:
        candidates = [Path(f) for f in files]
    grid = _VolumeGrid.of(volume)
    by_series = _image_headers(pydicom, candidates, series_uid)
    if not by_series:
        raise DicomGeometryError(f"{volume.source}: no DICOM image slices found to reference")
    # The series whose slices match the volume (several series in one folder: pick by geometry, never size).
    matching = [uid for uid, items in by_series.items() if len(_frames_of(items, grid.normal)) == grid.depth]
    if not matching:
        counts = ", ".join(
            f"{uid or '<no UID>'}: {len(_frames_of(v, grid.normal))}" for uid, v in by_series.items()
        )
        raise DicomGeometryError(
            f"{volume.source}: no series has the volume's {grid.depth} slices ({counts}); DICOM output needs the "
            "exact source series"
        )
    problems = {uid: _mismatch(by_series[uid], grid) for uid in matching}
    good = [uid for uid, problem in problems.items() if problem is None]
    if not good:
        raise DicomGeometryError(next(iter(problems.values())))
    if len(good) > 1:
        raise DicomGeometryError(
            f"{volume.source}: {len(good)} series match the volume's geometry ({', '.join(good)}); pass the "
            "series' own files"
        )
    items = by_series[good[0]]
    ordered = _frames_of(items, grid.normal)
    used = list(dict.fromkeys(index for _, index, _, _, _ in ordered))  # datasets in slice order
    remap = {old: new for new, old in enumerate(used)}
    return SourceSeries(
        datasets=[items[i][1] for i in used],
        frames=[(remap[index], frame) for _, index, frame, _, _ in ordered],
        positions=np.array([ipp for _, _, _, ipp, _ in ordered]),
        row_dir=grid.row_dir,
        col_dir=grid.col_dir,
        pixel_spacing=grid.spacing,
        files=[items[i][0] for i in used],
    )


@dataclass
class _VolumeGrid:
    """A volume's stored grid in DICOM terms: voxel (i, j, k) = (column, row, slice) -> LPS, as io.py builds it."""

    lps: np.ndarray
    rows: int
    cols: int
    depth: int
    spacing: tuple[float, float]  # (row, column) spacing
    row_dir: np.ndarray
    col_dir: np.ndarray
    normal: np.ndarray
    tol: float  # mm a slice may lie off the regular grid

    @classmethod
    def of(cls, volume: CTVolume) -> _VolumeGrid:
        lps = np.diag([-1.0, -1.0, 1.0, 1.0]) @ volume.affine
        cols, rows, depth = volume.original_shape
        col_step, row_step = lps[:3, 0], lps[:3, 1]
        spacing = (float(np.linalg.norm(row_step)), float(np.linalg.norm(col_step)))
        row_dir, col_dir = col_step / spacing[1], row_step / spacing[0]
        tol = 0.01 * min(spacing + (float(np.linalg.norm(lps[:3, 2])),))
        return cls(lps, rows, cols, depth, spacing, row_dir, col_dir, np.cross(row_dir, col_dir), tol)


def _image_headers(
    pydicom: Any, candidates: list[Path], series_uid: str | None
) -> dict[str, list[tuple[Path, Any]]]:
    """Image slices with geometry among `candidates`, by SeriesInstanceUID (earlier SEG/RTSTRUCT skipped)."""
    from pydicom.errors import InvalidDicomError

    by_series: dict[str, list[tuple[Path, Any]]] = {}
    for f in candidates:
        try:
            ds = pydicom.dcmread(f, stop_before_pixels=True)
        except (InvalidDicomError, EOFError, OSError, ValueError, KeyError, TypeError):
            continue
        if "PixelData" not in ds and "Rows" not in ds:
            continue
        try:
            frame_geometry(ds)
        except (AttributeError, KeyError, TypeError, ValueError):
            continue  # no image geometry: DICOMDIR, SR, an earlier RTSTRUCT/SEG output, ...
        if ds.get("Modality") in ("SEG", "RTSTRUCT"):
            continue
        if series_uid is not None and str(ds.get("SeriesInstanceUID", "")) != series_uid:
            continue
        by_series.setdefault(str(ds.get("SeriesInstanceUID", "")), []).append((f, ds))
    return by_series


def _frames_of(
    items: list[tuple[Path, Any]], normal: np.ndarray
) -> list[tuple[float, int, int | None, np.ndarray, Path]]:
    """(position along the normal, dataset index, frame number or None, position, file), sorted."""
    out = []
    for index, (f, ds) in enumerate(items):
        geometry = frame_geometry(ds)
        multi = len(geometry) > 1 or "PerFrameFunctionalGroupsSequence" in ds
        for n, (_, ipp, _) in enumerate(geometry):
            out.append((float(np.dot(normal, ipp)), index, n + 1 if multi else None, ipp, f))
    return sorted(out, key=lambda t: t[0])


def _mismatch(items: list[tuple[Path, Any]], grid: _VolumeGrid) -> str | None:
    """What makes the series' slices differ from the volume's grid (size, orientation, spacing, position)."""
    directions = np.r_[grid.row_dir, grid.col_dir]
    for k, (_, index, frame, ipp, f) in enumerate(_frames_of(items, grid.normal)):
        ds = items[index][1]
        iop, _, ps = frame_geometry(ds)[(frame or 1) - 1]
        iop = np.r_[iop[:3] / np.linalg.norm(iop[:3]), iop[3:] / np.linalg.norm(iop[3:])]
        where = f"{f}" + (f" frame {frame}" if frame else "")
        if (int(ds.Rows), int(ds.Columns)) != (grid.rows, grid.cols):
            return f"{where}: size {ds.Rows}x{ds.Columns} differs from the volume's {grid.rows}x{grid.cols}"
        if not np.allclose(iop, directions, atol=1e-4):
            return f"{where}: ImageOrientationPatient {list(iop)} differs from the series' {list(directions.round(6))}"
        if not np.allclose(ps, grid.spacing, rtol=1e-4):
            return (
                f"{where}: PixelSpacing {list(ps)} differs from the series' {list(np.round(grid.spacing, 6))}"
            )
        expected = (grid.lps @ np.array([0.0, 0.0, k, 1.0]))[:3]
        offset = float(np.linalg.norm(ipp - expected))
        if offset > grid.tol:
            return (
                f"{where}: slice {k} lies {offset:.3g} mm off the series' regular grid (position "
                f"{np.round(ipp, 3).tolist()}, expected {np.round(expected, 3).tolist()}); DICOM output "
                "needs equally spaced slices on one line"
            )
    return None


def anatomy_code(name: str) -> tuple[Any | None, str | None]:
    """SNOMED CT code (pydicom ``Code``) of an anatomical structure named like ``liver``, ``kidney_left``,
    ``Left Kidney``, ``gall_bladder``; and its laterality (``"Left"``/``"Right"``/None). (None, None) if
    unknown."""
    from pydicom.sr.codedict import codes

    tokens = [t for t in re.split(r"[\s_\-./]+", name.strip().lower()) if t]
    laterality = None
    kept = []
    for token in tokens:
        if token in _LATERALITY and len(tokens) > 1:
            laterality = _LATERALITY[token]
        else:
            kept.append(token)
    key = "_".join(kept)
    candidates = [_ALIASES.get(key), "".join(t.capitalize() for t in kept)]
    if key.endswith("s"):
        candidates.append("".join(t.capitalize() for t in kept)[:-1])
    for keyword in candidates:
        if not keyword:
            continue
        try:
            return getattr(codes.SCT, keyword), laterality
        except AttributeError:
            continue
    return None, None


def _segment_codes(name: str, label: int) -> tuple[Any, Any, list[Any] | None]:
    """(category, type, anatomic regions) for a SEG segment."""
    from highdicom.sr import CodedConcept
    from pydicom.sr.codedict import codes

    code, _ = anatomy_code(name)
    if code is not None:
        return codes.SCT.AnatomicalStructure, code, [code]
    private = CodedConcept(
        value=f"L{label}", scheme_designator=_PRIVATE_SCHEME, meaning=name[:64] or str(label)
    )
    return codes.SCT.AnatomicalStructure, private, None


def _package_version() -> str:
    try:
        from importlib.metadata import version

        return version("meddinov3-hf")
    except Exception:  # not installed as a distribution (source checkout)
        return "0+unknown"


def _stored_labels(labels_zyx: np.ndarray, volume: CTVolume, names: Mapping[int, str]) -> np.ndarray:
    labels = np.asarray(labels_zyx)
    if labels.shape != volume.hu.shape:
        raise ValueError(
            f"{volume.source}: label map shape {labels.shape} differs from the volume {volume.hu.shape}"
        )
    check_label_values(labels, {0: "background", **dict(names)}, volume.source)
    return volume.to_original(labels)  # (columns, rows, slices) in the series' slice order


def _structures(names: Mapping[int, str]) -> list[tuple[int, str]]:
    return [(int(k), str(v)) for k, v in sorted(names.items()) if int(k) != 0]


@dataclass(frozen=True)
class DicomLabels:
    """A label map checked against its volume and names, on the DICOM series it is written for."""

    path: Path  # the output file
    stored: np.ndarray  # labels in the series' stored voxel order (columns, rows, slices)
    series: SourceSeries
    structures: list[tuple[int, str]]  # (label, name) in label order, background excluded
    model_name: str
    series_description: str
    source: str  # the volume's source, for messages


def dicom_label_writer(
    name: str, series_description: str, build: Callable[[DicomLabels], Any], enforce_file_format: bool = False
) -> Callable[..., Path]:
    """The public writer `name` of one DICOM label output, with the signature every such writer shares:

        name(labels_zyx, volume, path, names, model_name="MedDINOv3", series=None,
             series_description=series_description) -> Path

    It checks the canonical ``(Z, Y, X)`` label map against ``volume`` and ``names``, reads the source series
    (:func:`read_source_series`) unless ``series`` is given, has ``build`` make the DICOM dataset of the
    resulting :class:`DicomLabels`, and saves it to ``path`` atomically. Its docstring is ``build``'s."""

    def write(
        labels_zyx: np.ndarray,
        volume: CTVolume,
        path: str | os.PathLike[str],
        names: Mapping[int, str],
        model_name: str = "MedDINOv3",
        series: SourceSeries | None = None,
        series_description: str = series_description,
    ) -> Path:
        _import_dicom()
        series = series or read_source_series(volume)
        stored = _stored_labels(labels_zyx, volume, names)
        labels = DicomLabels(
            Path(path), stored, series, _structures(names), model_name, series_description, str(volume.source)
        )
        dataset = build(labels)
        with atomic_path(labels.path) as tmp:
            dataset.save_as(tmp, enforce_file_format=enforce_file_format)
        return labels.path

    write.__name__ = write.__qualname__ = name
    write.__doc__, write.__module__ = build.__doc__, build.__module__
    return write


def _dicom_seg(labels: DicomLabels) -> Any:
    """Write a canonical label map as a binary DICOM-SEG on the source series' own slices (atomically).

    Args:
        labels_zyx: canonical ``(Z, Y, X)`` integer labels of ``volume``.
        volume: the CT read from the DICOM series.
        path: output ``.dcm`` file.
        names: ``{id: name}`` of the structures; one segment each (background 0 omitted), in id order.
        model_name: recorded as the algorithm name (with the package version as its version).
        series: the source slices (default: :func:`read_source_series`).
        series_description: the SEG series' description.
    """
    import highdicom as hd
    from pydicom.sr.codedict import codes

    series, structures, model_name = labels.series, labels.structures, labels.model_name
    if not structures:
        raise ValueError(f"{labels.path}: no structures to write (the label set holds only background)")
    lookup = np.zeros(max(int(labels.stored.max()), max(k for k, _ in structures)) + 1, dtype=np.uint16)
    for number, (label, _) in enumerate(structures, start=1):
        lookup[label] = number
    frames = lookup[labels.stored].transpose(2, 1, 0)  # (slices, rows, columns), segment numbers
    dtype = np.uint8 if len(structures) < 256 else np.uint16
    version = _package_version()
    algorithm = hd.AlgorithmIdentificationSequence(
        name=model_name[:64], family=codes.cid7162.ArtificialIntelligence, version=version[:64]
    )
    descriptions = []
    for number, (label, name) in enumerate(structures, start=1):
        category, kind, regions = _segment_codes(name, label)
        descriptions.append(
            hd.seg.SegmentDescription(
                segment_number=number,
                segment_label=name[:64],
                segmented_property_category=category,
                segmented_property_type=kind,
                algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
                algorithm_identification=algorithm,
                anatomic_regions=regions,
                tracking_uid=hd.UID(),
                tracking_id=name[:64],
            )
        )
    if any(frame is not None for _, frame in series.frames):  # one multi-frame source: its frame order
        if len(series.datasets) != 1:
            raise DicomGeometryError(f"{labels.source}: slices spread over several multi-frame images")
        frames = frames[np.argsort([frame for _, frame in series.frames])]
    return hd.seg.Segmentation(
        source_images=series.datasets,
        pixel_array=frames.astype(dtype),
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions,
        series_instance_uid=hd.UID(),
        series_number=int(series.first.get("SeriesNumber", 0) or 0) + 1000,
        sop_instance_uid=hd.UID(),
        instance_number=1,
        manufacturer="meddinov3-hf",
        manufacturer_model_name=model_name[:64],
        software_versions=version[:64],
        device_serial_number="0",
        series_description=labels.series_description[:64],
        content_label="SEGMENTATION",
        content_description=f"{model_name} labels"[:64],
        omit_empty_frames=True,
    )


write_dicom_seg = dicom_label_writer("write_dicom_seg", "MedDINOv3 segmentation", _dicom_seg)


# --------------------------------------------------------------------------------------------------------
# Contours: the exact pixel outlines of a 2-D mask
# --------------------------------------------------------------------------------------------------------
