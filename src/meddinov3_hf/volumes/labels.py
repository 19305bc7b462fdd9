"""Label maps on disk: the one reader (integer, 3-D, on its scan's grid) and the names that travel with them.

:func:`read_labels` reads a label NIfTI in its stored voxel order and checks what every caller needs (readable,
3-D, integer-valued, no negative values); :func:`load_labels` also checks that it lies on a scan's voxel grid
(shape and affine) and returns it in the scan's canonical ``(Z, Y, X)`` order. :func:`integer_labels` is the
integer rule itself, also applied to label arrays before they are written.

Names travel in the NIfTI header extension, a `labels.json` sidecar, or the model folder.

The NIfTI header extension follows TotalSegmentator's convention (`totalsegmentator/nifti_ext_header.py`): the
first extension holds a Caret/Workbench XML ``<CaretExtension>`` with a ``<LabelTable>`` of
``<Label Key="id" Red=".." Green=".." Blue=".." Alpha="1"><![CDATA[name]]></Label>`` entries (structures only,
background 0 is implied), stored with extension code 0 as TotalSegmentator writes it. TotalSegmentator's own
``load_multilabel_nifti`` therefore reads the names of our label maps and :func:`read_nifti_label_names` reads
theirs. The ``labels.json`` sidecar maps ids to names (``{"labels": {"0": "background", "1": "liver"}}``).
"""

from __future__ import annotations

import json
import os
import re
import xml.etree.ElementTree as ET
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import nibabel as nib
import numpy as np

from ..files import atomic_path
from .io import VolumeError

if TYPE_CHECKING:
    from .io import CTVolume

__all__ = [
    "GRID_TOLERANCE_MM",
    "LabelSetError",
    "StoredLabels",
    "check_label_values",
    "grid_problems",
    "integer_labels",
    "label_table_extension",
    "load_labels",
    "read_label_names",
    "read_labels",
    "read_nifti_label_names",
    "set_nifti_label_names",
    "write_labels_json",
]

# TotalSegmentator writes its label table as extension code 0 (nibabel: "ignore", i.e. private content).
_EXTENSION_CODE = 0
_COLOURS = [
    (255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0), (255, 0, 255), (0, 255, 255),
    (255, 128, 0), (255, 0, 128), (128, 255, 128), (0, 128, 255), (128, 128, 128), (185, 170, 155),
]  # fmt: skip
_DEFAULT_NAME = re.compile(r"^LABEL_\d+$")  # transformers' placeholder id2label


class LabelSetError(ValueError):
    """A label map holds values outside the label set it is used with; the message lists what differs."""


# --------------------------------------------------------------------------------------------------------
# Reading label maps
# --------------------------------------------------------------------------------------------------------

# Two voxel grids are the same when their affines agree to this many mm on every entry (float32 headers
# round at ~1e-5 mm).
GRID_TOLERANCE_MM = 1e-3


def integer_labels(labels: np.ndarray, name: str) -> np.ndarray:
    """The label rule: integer values >= 0. Returns ``labels`` as an integer array.

    Booleans become uint8 and integer-valued floats int64; integer arrays are returned unchanged.

    Raises:
        VolumeError: naming ``name``, for non-integer, NaN or negative values or a non-numeric dtype.
    """
    array = np.asanyarray(labels)
    if array.dtype == bool:
        return array.astype(np.uint8)
    if not np.issubdtype(array.dtype, np.integer):
        if not np.issubdtype(array.dtype, np.floating):
            raise VolumeError(f"{name}: labels must be integers, got dtype {array.dtype}")
        if not np.all(np.isfinite(array)) or not np.array_equal(array, np.round(array)):
            raise VolumeError(f"{name}: label map has non-integer or NaN values (dtype {array.dtype})")
        array = array.astype(np.int64)
    if array.size and np.issubdtype(array.dtype, np.signedinteger) and array.min() < 0:
        negative = np.unique(array[array < 0])[:5].tolist()
        raise VolumeError(f"{name}: negative label values {negative}; labels must be >= 0")
    return array


class StoredLabels(NamedTuple):
    """A label map as stored on disk: the integer array in the file's voxel order and its nibabel image."""

    path: Path
    array: np.ndarray
    image: Any

    @property
    def affine(self) -> np.ndarray:
        """The 4x4 voxel-to-world affine of the stored voxel order."""
        return np.asarray(self.image.affine, dtype=np.float64)


def read_labels(path: str | os.PathLike[str]) -> StoredLabels:
    """Read a label NIfTI in its stored voxel order.

    Trailing axes of length 1 are dropped; scaling in the header is applied.

    Raises:
        FileNotFoundError: when ``path`` does not exist.
        VolumeError: naming the file, when it is unreadable, not 3-D, or breaks :func:`integer_labels`.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such label file")
    try:
        image = nib.load(path)
        data = np.asanyarray(image.dataobj)
    except Exception as exc:  # nibabel raises many types for garbage: corrupt, truncated, not NIfTI
        raise VolumeError(f"{path}: cannot read label map ({type(exc).__name__}: {exc})") from exc
    if data.ndim > 3 and all(s == 1 for s in data.shape[3:]):
        data = data.reshape(data.shape[:3])
    if data.ndim != 3:
        raise VolumeError(f"{path}: label map must be 3-D, got shape {data.shape}")
    return StoredLabels(path, integer_labels(data, str(path)), image)


def grid_problems(
    labels: StoredLabels, shape: tuple[int, ...], affine: np.ndarray, reference: str
) -> list[str]:
    """Why ``labels`` does not lie on the voxel grid ``(shape, affine)`` of ``reference``; empty if it does."""
    problems = []
    if tuple(labels.array.shape) != tuple(shape):
        problems.append(
            f"{labels.path}: shape {tuple(labels.array.shape)} differs from {reference} shape {tuple(shape)}"
        )
    if not np.allclose(labels.affine, affine, rtol=0, atol=GRID_TOLERANCE_MM):
        diff = float(np.abs(labels.affine - np.asarray(affine)).max())
        problems.append(f"{labels.path}: affine differs from {reference} (max abs difference {diff:.4g} mm)")
    return problems


def load_labels(
    labels: str | os.PathLike[str] | StoredLabels, reference: CTVolume, reference_name: str | None = None
) -> np.ndarray:
    """A label map on ``reference``'s grid, in its canonical ``(Z, Y, X)`` order (exact reorientation).

    Args:
        labels: a label NIfTI, or one already read with :func:`read_labels`.
        reference: the scan the labels belong to; shape and affine must match its stored grid.
        reference_name: how messages name the scan (default: its file name).

    Raises:
        VolumeError: naming the label file, when :func:`read_labels` refuses it or it lies on another grid.
    """
    stored = labels if isinstance(labels, StoredLabels) else read_labels(labels)
    name = reference_name or Path(str(reference.source)).name
    problems = grid_problems(stored, reference.original_shape, reference.affine, name)
    if problems:
        raise VolumeError(problems[0])
    return reference.to_canonical(stored.array)


def _normalise(names: Mapping[Any, Any], source: str) -> dict[int, str]:
    try:
        out = {int(k): str(v) for k, v in names.items()}
    except (TypeError, ValueError) as err:
        raise ValueError(f"{source}: label ids must be integers ({err})") from err
    if any(k < 0 for k in out):
        raise ValueError(f"{source}: negative label id {min(out)}")
    return dict(sorted(out.items()))


def _from_json(data: Any, source: str) -> dict[int, str]:
    if isinstance(data, dict) and "id2label" in data:  # a transformers config.json
        return _normalise(data["id2label"], source)
    data = data.get("labels", data) if isinstance(data, dict) else data
    if not isinstance(data, dict) or not data:
        raise ValueError(
            f"{source}: no label table (expected id2label, or labels {{id: name}} / {{name: id}})"
        )
    if all(isinstance(v, int) and not isinstance(v, bool) for v in data.values()):  # nnU-Net {name: id}
        return _normalise({v: k for k, v in data.items()}, source)
    return _normalise(data, source)


def read_label_names(source: str | os.PathLike[str] | Mapping[Any, Any]) -> dict[int, str]:
    """Label names ``{id: name}`` from any of the places they live.

    Args:
        source: a mapping; a model folder (its ``config.json`` ``id2label``); a ``config.json``, nnU-Net
            ``dataset.json`` or ``labels.json``; a NIfTI label map carrying the header extension; or the text
            ``"0=background,1=liver"``.

    Raises:
        ValueError: naming the source when no label table can be read from it.
    """
    if isinstance(source, Mapping):
        return _normalise(source, "<mapping>")
    path = Path(source)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ValueError(f"{path}: folder has no config.json with id2label (not a model folder)")
        path = path / "config.json"
    if path.is_file():
        name = path.name.lower()
        if name.endswith((".nii", ".nii.gz")):
            names = read_nifti_label_names(path)
            if names is None:
                raise ValueError(f"{path}: label map carries no label-name header extension")
            return names
        try:
            data = json.loads(path.read_text())
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise ValueError(f"{path}: not a JSON label table ({err})") from err
        return _from_json(data, str(path))
    text = str(source)
    if "=" not in text:
        raise ValueError(f"{text}: no such file or folder, and not 'ID=NAME,...'")
    try:
        return _normalise(dict(item.split("=", 1) for item in text.split(",") if item.strip()), text)
    except ValueError as err:
        raise ValueError(f"{text}: labels must be 'ID=NAME,...' ({err})") from err


def has_real_names(names: Mapping[int, str] | None) -> bool:
    """Whether ``names`` are more than transformers' ``LABEL_0, LABEL_1, ...`` placeholders."""
    return bool(names) and not all(_DEFAULT_NAME.match(n) for n in names.values())


def _cdata(text: str) -> str:
    return "<![CDATA[" + text.replace("]]>", "]]]]><![CDATA[>") + "]]>"


def label_table_extension(names: Mapping[int, str]) -> nib.nifti1.Nifti1Extension:
    """The TotalSegmentator-style Caret XML label table (structures, background omitted) as an extension."""
    body = []
    for label, name in sorted(names.items()):
        if label == 0:
            continue
        r, g, b = _COLOURS[label % len(_COLOURS)]
        body.append(
            f'<Label Key="{int(label)}" Red="{r / 255:g}" Green="{g / 255:g}" Blue="{b / 255:g}" '
            f'Alpha="1">{_cdata(str(name))}</Label>'
        )
    xml = (
        '<?xml version="1.0" encoding="UTF-8"?> <CaretExtension> <VolumeInformation Index="0"> <LabelTable>\n'
        + "\n".join(body)
        + "\n</LabelTable> <StudyMetaDataLinkSet> </StudyMetaDataLinkSet> "
        "<VolumeType><![CDATA[Label]]></VolumeType> </VolumeInformation></CaretExtension>\n"
    )
    return nib.nifti1.Nifti1Extension(_EXTENSION_CODE, xml.encode("utf-8"))


def _parse_label_table(content: bytes) -> dict[int, str] | None:
    if b"CaretExtension" not in content[:512]:
        return None
    try:
        root = ET.fromstring(content.decode("utf-8").strip().rstrip("\x00").strip())
    except (ET.ParseError, UnicodeDecodeError):
        return None
    table = root.find("./VolumeInformation/LabelTable")
    if table is None:
        return None
    names = {}
    for label in table.findall("Label"):
        try:
            names[int(label.get("Key", ""))] = (label.text or "").strip()
        except ValueError:
            return None
    return dict(sorted(names.items()))


def set_nifti_label_names(header: nib.Nifti1Header, names: Mapping[int, str]) -> None:
    """Put the label table first in ``header``'s extensions (replacing any earlier label table)."""
    kept = [e for e in header.extensions if _parse_label_table(_content(e)) is None]
    header.extensions.clear()
    header.extensions.append(label_table_extension(names))
    header.extensions.extend(kept)


def _content(extension: Any) -> bytes:
    content = extension.get_content()
    return content if isinstance(content, bytes) else str(content).encode("utf-8")


def read_nifti_label_names(source: str | os.PathLike[str] | nib.Nifti1Image) -> dict[int, str] | None:
    """Names from a NIfTI label map's header extension (ours or TotalSegmentator's), or None without one."""
    img = source if isinstance(source, nib.Nifti1Image) else nib.load(source)
    for extension in getattr(img.header, "extensions", []):
        names = _parse_label_table(_content(extension))
        if names is not None:
            return names
    return None


def write_labels_json(path: str | os.PathLike[str], names: Mapping[int, str]) -> Path:
    """Write the ``labels.json`` sidecar ``{"labels": {"0": "background", ...}}`` atomically."""
    path = Path(path)
    text = json.dumps({"labels": {str(k): v for k, v in sorted(names.items())}}, indent=2) + "\n"
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return path


def check_label_values(labels: np.ndarray, names: Mapping[int, str], source: str) -> None:
    """Refuse a label map holding values that are not ids of ``names`` (listing the values and the set)."""
    present = np.unique(np.asarray(labels))
    extra = sorted(int(v) for v in present if int(v) not in names)
    if extra:
        shown = ", ".join(map(str, extra[:10])) + (", ..." if len(extra) > 10 else "")
        raise LabelSetError(
            f"{source}: label value(s) {shown} are not in the label set {{{_describe(names)}}}"
        )


def _describe(names: Mapping[int, str]) -> str:
    items = [f"{k}: {v}" for k, v in sorted(names.items())]
    return ", ".join(items[:12]) + (", ..." if len(items) > 12 else "")
