"""RTSTRUCT output referencing the source series (pydicom), next to `dicom_out`'s DICOM-SEG.

One ROI per structure; each slice's contours are the exact outlines of its pixels (the pixel edges, in patient
mm from that slice's own ImagePositionPatient), closed planar, with holes as separate contours. Filling them
with the even-odd or the non-zero rule at pixel centres gives back the mask exactly. Written with pydicom:
rt-utils 1.2.7 places contours with one slice normal and swaps the two PixelSpacing values, which breaks
tilted series and non-square pixels (``rt_utils/image_helper.py``, ``get_pixel_to_patient_transformation_matrix``).
"""

from __future__ import annotations

import datetime
import os
from typing import Any

import numpy as np

from .dicom_out import (
    DicomLabels,
    SourceSeries,
    _import_dicom,
    _package_version,
    anatomy_code,
    dicom_label_writer,
)

__all__ = ["label_contours", "write_rtstruct"]


# Directions of the four edge kinds in (x = column, y = row) corner coordinates; foreground on the right.
_DIRS = np.array([[1, 0], [0, 1], [-1, 0], [0, -1]])


def label_contours(mask: np.ndarray) -> list[np.ndarray]:
    """Closed outlines of a 2-D boolean mask ``(rows, columns)`` along pixel edges.

    Returns a list of ``(n, 2)`` float arrays of ``(column, row)`` pixel coordinates of the outline's corners
    (pixel ``(r, c)`` spans ``[c - 0.5, c + 0.5] x [r - 0.5, r + 0.5]``), collinear points removed. Outer
    outlines run clockwise on screen (rows downward) and holes counter-clockwise, so a pixel is inside the mask
    exactly when it is inside an odd number of outlines (and when the outlines' winding number is non-zero).
    At a corner shared diagonally by two pixels the outline turns so that it follows 4-connected pixels.
    """
    m = np.pad(np.asarray(mask, dtype=bool), 1)
    r, c = np.nonzero(m)
    if r.size == 0:
        return []
    # Edge kinds: 0 top (bg above, moving +x), 1 right (+y), 2 bottom (-x), 3 left (-y); start corners below.
    kinds = [
        (~m[r - 1, c], c, r),
        (~m[r, c + 1], c + 1, r),
        (~m[r + 1, c], c + 1, r + 1),
        (~m[r, c - 1], c, r + 1),
    ]
    starts, dirs = [], []
    for kind, (sel, x, y) in enumerate(kinds):
        starts.append(np.stack([x[sel], y[sel]], axis=1))
        dirs.append(np.full(int(sel.sum()), kind))
    start = np.concatenate(starts)
    kind = np.concatenate(dirs)
    end = start + _DIRS[kind]
    width = m.shape[1] + 2
    start_key = start[:, 1] * width + start[:, 0]
    end_key = end[:, 1] * width + end[:, 0]
    outgoing: dict[int, list[int]] = {}
    for i, key in enumerate(start_key.tolist()):
        outgoing.setdefault(key, []).append(i)
    used = np.zeros(len(start), dtype=bool)
    loops = []
    kinds_list = kind.tolist()
    end_list = end_key.tolist()
    for first in range(len(start)):
        if used[first]:
            continue
        loop = [first]
        used[first] = True
        current = first
        while True:
            options = [e for e in outgoing[end_list[current]] if not used[e]]
            if not options:
                break
            if len(options) > 1:  # a saddle corner: turn right (keeps to the current pixel)
                right = (kinds_list[current] + 1) % 4
                options.sort(key=lambda e: (kinds_list[e] - right) % 4)
            current = options[0]
            used[current] = True
            loop.append(current)
        corners = start[loop]
        turn = kind[loop] != np.roll(kind[loop], 1)  # keep only corners where the direction changes
        loops.append(corners[turn].astype(np.float64) - 1.5)  # undo the padding, corner -> pixel coords
    return loops


def _rtstruct(labels: DicomLabels) -> Any:
    """Write a canonical label map as an RTSTRUCT referencing the source series (atomically).

    One ROI per named structure (background excluded; structures absent from the map get an ROI without
    contours); contours are the exact pixel outlines on each source slice (see :func:`label_contours`). The
    arguments are :func:`~meddinov3_hf.volumes.dicom_out.write_dicom_seg`'s."""
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence as DicomSequence

    series, model_name = labels.series, labels.model_name
    ds = _rtstruct_dataset(labels.path, series, model_name, labels.series_description)
    frame_of_reference = series.first.FrameOfReferenceUID
    rois, contours, observations = [], [], []
    for number, (label, name) in enumerate(labels.structures, start=1):
        roi = Dataset()
        roi.ROINumber, roi.ReferencedFrameOfReferenceUID = number, frame_of_reference
        roi.ROIName, roi.ROIGenerationAlgorithm = name[:64], "AUTOMATIC"
        roi.ROIGenerationDescription = f"{model_name}"[:64]
        rois.append(roi)
        items = _contours(labels.stored, label, series)
        roi_contour = Dataset()
        roi_contour.ReferencedROINumber = number
        r, g, b = _colour(label)
        roi_contour.ROIDisplayColor = [r, g, b]
        if items:
            roi_contour.ContourSequence = DicomSequence(items)
        contours.append(roi_contour)
        observations.append(_roi_observation(number, name))
    ds.StructureSetROISequence = DicomSequence(rois)
    ds.ROIContourSequence = DicomSequence(contours)
    ds.RTROIObservationsSequence = DicomSequence(observations)
    ds.ApprovalStatus = "UNAPPROVED"
    return ds


write_rtstruct = dicom_label_writer(
    "write_rtstruct", "MedDINOv3 structures", _rtstruct, enforce_file_format=True
)


def _rtstruct_dataset(
    path: str | os.PathLike[str], series: SourceSeries, model_name: str, series_description: str
) -> Any:
    """An RTSTRUCT without ROIs: patient and study copied from the source, a new series, and the referenced
    frame of reference listing every source slice."""
    pydicom = _import_dicom()
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.sequence import Sequence as DicomSequence
    from pydicom.uid import ExplicitVRLittleEndian, RTStructureSetStorage, generate_uid

    first = series.first
    now = datetime.datetime.now()
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = RTStructureSetStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = pydicom.dataset.FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SpecificCharacterSet = first.get("SpecificCharacterSet", "ISO_IR 100")
    ds.SOPClassUID, ds.SOPInstanceUID = RTStructureSetStorage, meta.MediaStorageSOPInstanceUID
    ds.InstanceCreationDate, ds.InstanceCreationTime = now.strftime("%Y%m%d"), now.strftime("%H%M%S")
    for keyword in (
        "PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyInstanceUID", "StudyDate",
        "StudyTime", "StudyID", "AccessionNumber", "ReferringPhysicianName", "StudyDescription",
    ):  # fmt: skip
        setattr(ds, keyword, first.get(keyword, ""))
    ds.Modality, ds.SeriesInstanceUID = "RTSTRUCT", generate_uid()
    ds.SeriesNumber = int(first.get("SeriesNumber", 0) or 0) + 2000
    ds.SeriesDescription = series_description[:64]
    ds.InstanceNumber = 1
    ds.Manufacturer, ds.ManufacturerModelName = "meddinov3-hf", model_name[:64]
    ds.SoftwareVersions = _package_version()[:64]
    ds.OperatorsName = ""
    ds.StructureSetLabel = "MedDINOv3"[:16]
    ds.StructureSetDate, ds.StructureSetTime = ds.InstanceCreationDate, ds.InstanceCreationTime
    ref_series = Dataset()
    ref_series.SeriesInstanceUID = first.SeriesInstanceUID
    ref_series.ContourImageSequence = DicomSequence(
        [_image_ref(series, k) for k in range(len(series.frames))]
    )
    ref_study = Dataset()
    ref_study.ReferencedSOPClassUID = (
        "1.2.840.10008.3.1.2.3.1"  # Study Component Management (Retired), per PS3.3
    )
    ref_study.ReferencedSOPInstanceUID = first.StudyInstanceUID
    ref_study.RTReferencedSeriesSequence = DicomSequence([ref_series])
    ref_for = Dataset()
    ref_for.FrameOfReferenceUID = first.FrameOfReferenceUID
    ref_for.RTReferencedStudySequence = DicomSequence([ref_study])
    ds.ReferencedFrameOfReferenceSequence = DicomSequence([ref_for])
    return ds


def _image_ref(series: SourceSeries, k: int) -> Any:
    """The reference to the source image (and frame) of stored slice `k`."""
    from pydicom.dataset import Dataset

    index, frame = series.frames[k]
    item = Dataset()
    item.ReferencedSOPClassUID = series.datasets[index].SOPClassUID
    item.ReferencedSOPInstanceUID = series.datasets[index].SOPInstanceUID
    if frame is not None:
        item.ReferencedFrameNumber = frame
    return item


def _contours(stored: np.ndarray, label: int, series: SourceSeries) -> list[Any]:
    """CLOSED_PLANAR contour items of `label`: the exact pixel outlines on each source slice, in patient mm."""
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence as DicomSequence

    ps_row, ps_col = series.pixel_spacing
    items = []
    for k in range(stored.shape[2]):
        mask = stored[:, :, k].T == label  # (rows, columns)
        if not mask.any():
            continue
        origin = series.positions[k]
        for outline in label_contours(mask):
            world = (
                origin
                + outline[:, :1] * ps_col * series.row_dir  # column index moves along the row direction
                + outline[:, 1:] * ps_row * series.col_dir
            )
            contour = Dataset()
            contour.ContourImageSequence = DicomSequence([_image_ref(series, k)])
            contour.ContourGeometricType = "CLOSED_PLANAR"
            contour.NumberOfContourPoints = len(world)
            contour.ContourData = [f"{v:.4f}" for v in world.ravel()]
            items.append(contour)
    return items


def _roi_observation(number: int, name: str) -> Any:
    """The RT ROI observation of structure `number`, with its SNOMED CT code when known."""
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence as DicomSequence

    observation = Dataset()
    observation.ObservationNumber, observation.ReferencedROINumber = number, number
    observation.ROIObservationLabel = name[:16]
    observation.RTROIInterpretedType, observation.ROIInterpreter = "ORGAN", ""
    code, _ = anatomy_code(name)
    if code is not None:
        coded = Dataset()
        coded.CodeValue, coded.CodingSchemeDesignator = code.value, code.scheme_designator
        coded.CodeMeaning = code.meaning
        observation.RTROIIdentificationCodeSequence = DicomSequence([coded])
    return observation


def _colour(label: int) -> tuple[int, int, int]:
    from .labels import _COLOURS

    return _COLOURS[label % len(_COLOURS)]
