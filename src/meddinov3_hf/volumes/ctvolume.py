"""The :class:`CTVolume` container (the canonical orientation is described in :mod:`.io`), the volume
errors, and the NIfTI file-name helpers. :mod:`.io` re-exports everything here; import from there."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np
from nibabel.orientations import apply_orientation, axcodes2ornt, inv_ornt_aff, io_orientation, ornt_transform

__all__ = [
    "CANONICAL_AXCODES",
    "CTVolume",
    "VolumeError",
    "VolumeNotFoundError",
    "case_name",
    "list_volumes",
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
        return np.ascontiguousarray(self._original_view(array_zyx, channel_axis))

    def _original_view(self, array_zyx: np.ndarray, channel_axis: int | None = None) -> np.ndarray:
        """:meth:`to_original` without the copy: a strided view (permutation + flips) of the array."""
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
        return apply_orientation(xyz, back)
