"""Synthetic CT DICOM series for the tests (pydicom only): plain, gantry-tilted, reversed, multi-frame."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileDataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

AXIAL = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)


def phantom(rows: int = 24, cols: int = 20, slices: int = 6, seed: int = 0) -> np.ndarray:
    """int16 HU (slices, rows, cols): air border, soft tissue, two 'organs' and a stray island."""
    rng = np.random.default_rng(seed)
    hu = rng.normal(40, 20, (slices, rows, cols)).astype(np.int16)
    hu[:, :2] = -1000
    hu[:, :, :2] = -1000
    hu[1:5, 5:14, 4:10] = 500
    hu[0:3, 15:21, 12:18] = 900
    hu[4, 18:20, 3:5] = 500
    return hu


def _patient_study(ds: Dataset, patient_id: str, study_uid: str) -> None:
    ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex = (
        f"Test^{patient_id}",
        patient_id,
        "",
        "O",
    )
    ds.StudyInstanceUID, ds.StudyDate, ds.StudyTime, ds.StudyID = study_uid, "20260101", "120000", "1"
    ds.AccessionNumber, ds.ReferringPhysicianName = "", ""


def write_series(
    folder: str | Path,
    hu: np.ndarray | None = None,
    pixel_spacing: tuple[float, float] = (0.9, 0.8),
    slice_step: float = 2.5,
    orientation: tuple[float, ...] = AXIAL,
    origin: tuple[float, float, float] = (-10.0, -12.0, 30.0),
    tilt_mm_per_slice: float = 0.0,
    reverse: bool = False,
    patient_id: str = "P1",
    study_uid: str | None = None,
    series_uid: str | None = None,
    frame_of_reference_uid: str | None = None,
    positions: list[np.ndarray] | None = None,
) -> dict:
    """Write ``hu`` (slices, rows, cols) as one CT series, one file per slice.

    Slice k lies at ``origin + k * slice_step * normal + k * tilt_mm_per_slice * column_direction`` (a gantry
    tilt shears the stack along the column direction); ``reverse`` numbers the files and instances from the
    top down. Returns the UIDs and the per-slice positions (in slice index order k)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    hu = phantom() if hu is None else hu
    n, rows, cols = hu.shape
    study_uid = study_uid or generate_uid()
    series_uid = series_uid or generate_uid()
    for_uid = frame_of_reference_uid or generate_uid()
    row_dir, col_dir = np.array(orientation[:3], float), np.array(orientation[3:], float)
    normal = np.cross(row_dir, col_dir)
    if positions is None:
        positions = [
            np.array(origin) + k * slice_step * normal + k * tilt_mm_per_slice * col_dir for k in range(n)
        ]
    uids = []
    for k in range(n):
        number = n - k if reverse else k + 1
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = FileDataset(str(folder / f"{number:04d}.dcm"), {}, file_meta=meta, preamble=b"\0" * 128)
        ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, meta.MediaStorageSOPInstanceUID
        _patient_study(ds, patient_id, study_uid)
        ds.Modality, ds.SeriesInstanceUID, ds.SeriesNumber, ds.InstanceNumber = "CT", series_uid, 3, number
        ds.FrameOfReferenceUID, ds.PositionReferenceIndicator = for_uid, ""
        ds.Manufacturer, ds.ImageType = "test", ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.Rows, ds.Columns, ds.PixelSpacing = rows, cols, [f"{v:g}" for v in pixel_spacing]
        ds.ImageOrientationPatient = [f"{v:g}" for v in orientation]
        ds.ImagePositionPatient = [f"{v:.6f}" for v in positions[k]]
        ds.SliceThickness = f"{slice_step:g}"
        if tilt_mm_per_slice:
            ds.GantryDetectorTilt = f"{np.degrees(np.arctan2(tilt_mm_per_slice, slice_step)):.4f}"
        ds.RescaleSlope, ds.RescaleIntercept, ds.RescaleType = 1, -1024, "HU"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.KVP, ds.AcquisitionNumber = 120, 1
        ds.PixelData = (hu[k].astype(np.int32) + 1024).astype(np.uint16).tobytes()
        ds.save_as(folder / f"{number:04d}.dcm", enforce_file_format=True)
        uids.append(ds.SOPInstanceUID)
    return {
        "study": study_uid,
        "series": series_uid,
        "frame_of_reference": for_uid,
        "sop_instances": uids,
        "positions": positions,
        "row_dir": row_dir,
        "col_dir": col_dir,
        "pixel_spacing": pixel_spacing,
    }
