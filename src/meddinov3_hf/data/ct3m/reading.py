"""Reading one CT-3M volume: int16 conversion, content hash and the air rule that filters its slices."""

from __future__ import annotations

import hashlib
import warnings
from typing import Any

import numpy as np

from meddinov3_hf.volumes.io import load_volume

from .discovery import _VolumeTask
from .schema import DEFAULT_AIR_THRESHOLD, DEFAULT_MIN_BODY_FRACTION


def volume_hash(volume: np.ndarray) -> str:
    """Content hash of an int16 volume: blake2b-128 over its shape (int64 LE) and C-order LE bytes."""
    vol = np.ascontiguousarray(volume, dtype="<i2")
    h = hashlib.blake2b(digest_size=16)
    h.update(np.asarray(vol.shape, dtype="<i8").tobytes())
    h.update(memoryview(vol).cast("B"))
    return h.hexdigest()


def slice_keep_mask(
    volume: np.ndarray,
    air_threshold: float = DEFAULT_AIR_THRESHOLD,
    min_body_fraction: float = DEFAULT_MIN_BODY_FRACTION,
) -> np.ndarray:
    """Air rule: keep slice ``z`` iff ``mean(volume[z] > air_threshold) >= min_body_fraction``."""
    body = (volume > air_threshold).reshape(volume.shape[0], -1)
    return body.mean(axis=1) >= min_body_fraction


def _hu_to_int16(hu: np.ndarray, slab: int = 32) -> tuple[np.ndarray, bool, int]:
    """Round + clip to int16; also report whether rounding changed anything and how many voxels clipped.

    Works in slabs of slices so the float temporaries stay small next to the volume itself."""
    out = np.empty(hu.shape, dtype="<i2")
    info = np.iinfo(np.int16)
    non_integer, clipped = False, 0
    for z in range(0, hu.shape[0], slab):
        part = hu[z : z + slab]
        rounded = np.rint(part)
        non_integer = non_integer or bool(np.any(rounded != part))
        clipped += int(np.count_nonzero((rounded < info.min) | (rounded > info.max)))
        np.clip(rounded, info.min, info.max, out=rounded)
        out[z : z + slab] = rounded
    return out, non_integer, clipped


def _read_volume(
    task: _VolumeTask, air_threshold: float, min_body_fraction: float
) -> tuple[dict[str, Any], np.ndarray | None, np.ndarray | None]:
    """(ledger record, int16 volume, slice keep mask); on any error the record says ``failed`` and both
    arrays are None, so a bad volume is only skipped."""
    record: dict[str, Any] = {"source": task.source, "path": task.rel_path, "case_id": task.case_id}
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            volume = load_volume(task.path)
        spacing = volume.spacing
        hu, volume = volume.hu, None  # keep only the array: memory is one volume per worker
        vol16, non_integer, clipped = _hu_to_int16(hu)
        del hu
        digest = volume_hash(vol16)
        keep = slice_keep_mask(vol16, air_threshold, min_body_fraction)
    except Exception as exc:
        record.update(status="failed", error=f"{type(exc).__name__}: {exc}")
        return record, None, None
    record.update(
        hash=digest,
        shape=[int(s) for s in vol16.shape],
        spacing=[float(s) for s in spacing],
        warnings=[str(w.message) for w in caught],
    )
    if non_integer:
        record["non_integer_hu"] = True
    if clipped:
        record["clipped_voxels"] = clipped
    return record, vol16, keep
