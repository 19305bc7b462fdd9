"""CT-3M sources (``NAME=FOLDER``) and the volumes found in them: NIfTI files and DICOM series folders."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from meddinov3_hf.volumes.io import case_name

_NOT_DICOM_SUFFIXES = frozenset(
    ".txt .json .csv .tsv .xml .yaml .yml .md .html .pdf .png .jpg .jpeg .bmp .tif .tiff .gz .zip .tar "
    ".nii .mha .mhd .nrrd .raw .npy .npz .h5 .hdf5 .pkl .py .sh .log .parquet".split()
)
_SOURCE_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]*$")


@dataclass(frozen=True)
class CT3MSource:
    """One input dataset: ``name`` becomes the ``source`` column, ``folder`` is searched recursively."""

    name: str
    folder: Path


def parse_source(spec: str) -> CT3MSource:
    """Parse ``NAME=FOLDER`` (the folder must exist)."""
    name, sep, folder = spec.partition("=")
    name = name.strip()
    if not sep or not folder:
        raise ValueError(f"source {spec!r}: expected NAME=FOLDER")
    if not _SOURCE_NAME_RE.match(name):
        raise ValueError(f"source {spec!r}: name must be letters, digits, '_', '.', '+' or '-'")
    path = Path(folder).expanduser()
    if not path.is_dir():
        raise ValueError(f"source {name}: folder {path} does not exist or is not a folder")
    return CT3MSource(name, path)


def _is_nifti(name: str) -> bool:
    lower = name.lower()
    return lower.endswith(".nii") or lower.endswith(".nii.gz")


def _looks_like_dicom(path: Path) -> bool:
    suffix = path.suffix.lower()
    if suffix == ".dcm":
        return True
    if suffix in _NOT_DICOM_SUFFIXES:
        return False
    # Anything else (no extension, UID-style names like 1.2.840.10008.5) is checked for the magic.
    try:
        with open(path, "rb") as f:
            head = f.read(132)
    except OSError:
        return False
    return len(head) == 132 and head[128:] == b"DICM"  # Part-10 preamble + magic


@dataclass(frozen=True)
class _VolumeTask:
    source: str
    rel_path: str  # posix path inside the source folder; the resume key together with `source`
    path: str  # absolute path handed to load_volume
    case_id: str


def discover_volumes(source: CT3MSource) -> list[_VolumeTask]:
    """All volumes of a source in sorted order: ``*.nii``/``*.nii.gz`` files at any depth, and every folder
    that directly contains DICOM files (``*.dcm`` or extension-less files with the ``DICM`` magic) as one
    series. Hidden files and folders (e.g. temporary files) are ignored."""
    root = source.folder.resolve()
    tasks: list[_VolumeTask] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))  # sorted -> deterministic walk
        here = Path(dirpath)
        visible = sorted(f for f in filenames if not f.startswith("."))
        for fname in visible:
            if _is_nifti(fname):
                rel = (here / fname).relative_to(root).as_posix()
                parent = PurePosixPath(rel).parent
                case = case_name(fname) if parent == PurePosixPath(".") else f"{parent}/{case_name(fname)}"
                tasks.append(_VolumeTask(source.name, rel, str(here / fname), case))
        if any(not _is_nifti(f) and _looks_like_dicom(here / f) for f in visible):
            rel = here.relative_to(root).as_posix()
            case = root.name if rel == "." else rel
            tasks.append(_VolumeTask(source.name, rel + "/", str(here), case))
    tasks.sort(key=lambda t: t.rel_path)
    return tasks
