"""Convert other public CT segmentation layouts into nnU-Net raw format (what fine-tuning reads).

Medical Segmentation Decathlon (`convert_msd`)::

    Task03_Liver/dataset.json     {"modality": {"0": "CT"}, "labels": {"0": "background", "1": "liver", ...},
                                   "training": [{"image": "./imagesTr/liver_0.nii.gz",
                                                 "label": "./labelsTr/liver_0.nii.gz"}, ...],
                                   "test": ["./imagesTs/liver_132.nii.gz", ...]}
    Task03_Liver/imagesTr/liver_0.nii.gz, labelsTr/liver_0.nii.gz, imagesTs/...

Only single-channel CT tasks convert: a 4-D image (the multi-modal and multi-phase tasks) is refused with a
message naming the file. Cases are the `training` list of dataset.json (so the `._*` files of the official
archives are ignored); `test` images go to `imagesTs/`.

TotalSegmentator (`convert_totalsegmentator`)::

    Totalsegmentator_dataset/s0000/ct.nii.gz
    Totalsegmentator_dataset/s0000/segmentations/liver.nii.gz, spleen.nii.gz, ...   (one 0/1 mask each)

The masks of a case become one label map with ids 1..n in the order of `structures` (default: every mask
name found, sorted); every case must have every structure's mask, on the CT's voxel grid, and masks must not
overlap.

Both write `OUT/dataset.json`, `OUT/imagesTr/{case}_0000.nii.gz` (the source CT, byte for byte when it is
gzipped) and `OUT/labelsTr/{case}.nii.gz`. OUT must be new or empty; it appears only once complete.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from meddinov3_hf.files import atomic_dir, check_output_path
from meddinov3_hf.volumes.io import VolumeError
from meddinov3_hf.volumes.labels import grid_problems, read_labels

from .nnunet import DatasetValidationError, _check_labels, _validate_case

__all__ = [
    "DatasetConversionError",
    "add_convert_dataset_arguments",
    "convert_msd",
    "convert_totalsegmentator",
    "run_convert_dataset",
]

_ENDING = ".nii.gz"


class DatasetConversionError(ValueError):
    """A source dataset that cannot be converted; the message names the file and the problem."""


# --------------------------------------------------------------------------------------------------------
# Shared steps
# --------------------------------------------------------------------------------------------------------


def _check_paths(source: str | os.PathLike, output: str | os.PathLike) -> tuple[Path, Path]:
    src = Path(source)
    if not src.is_dir():
        raise DatasetConversionError(f"{src}: source dataset folder does not exist")
    return src, check_output_path(output, [src], kind="folder", option="OUT")


def _nifti_header(path: Path) -> nib.Nifti1Image:
    if not path.is_file():
        raise DatasetConversionError(f"{path}: file does not exist")
    if not path.name.lower().endswith((".nii", ".nii.gz")):
        raise DatasetConversionError(f"{path}: not a NIfTI file (.nii or .nii.gz)")
    try:
        return nib.load(path)
    except Exception as exc:  # nibabel raises many types for garbage
        raise DatasetConversionError(
            f"{path}: not a readable NIfTI file ({type(exc).__name__}: {exc})"
        ) from exc


def _check_3d_image(path: Path) -> nib.Nifti1Image:
    """The header of a 3-D image; a 4-D image (several channels or time points) is refused."""
    img = _nifti_header(path)
    shape = tuple(int(s) for s in img.shape)
    if len(shape) > 3 and any(s != 1 for s in shape[3:]):
        raise DatasetConversionError(
            f"{path}: 4-D image of shape {shape} (several channels or phases); only single-channel 3-D CT "
            "can be converted"
        )
    if len(shape) < 3:
        raise DatasetConversionError(f"{path}: image must be 3-D, got shape {shape}")
    return img


def _copy_image(source: Path, target: Path) -> None:
    """Copy a CT file as `.nii.gz`: byte for byte when already gzipped, else compressed on the way."""
    target.parent.mkdir(parents=True, exist_ok=True)
    if source.name.lower().endswith(".gz"):
        shutil.copyfile(source, target)
        return
    with open(source, "rb") as fin, gzip.open(target, "wb", compresslevel=6) as fout:
        shutil.copyfileobj(fin, fout, length=1 << 20)


def _write_dataset_json(folder: Path, labels: dict[str, int], n_training: int, extra: dict[str, Any]) -> None:
    problems = _check_labels(labels)
    if problems:
        raise DatasetConversionError(f"labels {labels}: {'; '.join(problems)}")
    meta = {
        "channel_names": {"0": "CT"},
        "labels": labels,
        "numTraining": n_training,
        "file_ending": _ENDING,
        **extra,
    }
    (folder / "dataset.json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")


def _case_id(path: Path) -> str:
    name = path.name
    for ending in (".nii.gz", ".nii"):
        if name.lower().endswith(ending):
            return name[: -len(ending)]
    return name


# --------------------------------------------------------------------------------------------------------
# Medical Segmentation Decathlon
# --------------------------------------------------------------------------------------------------------


def _read_msd_json(src: Path) -> dict[str, Any]:
    path = src / "dataset.json"
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DatasetConversionError(
            f"{path}: cannot read the MSD dataset.json ({type(exc).__name__}: {exc})"
        ) from exc
    if not isinstance(meta, dict) or not isinstance(meta.get("training"), list):
        raise DatasetConversionError(f"{path}: not an MSD dataset.json (no 'training' list)")
    modality = meta.get("modality")
    if not isinstance(modality, dict) or [str(v).strip().upper() for v in modality.values()] != ["CT"]:
        raise DatasetConversionError(
            f"{path}: modality {modality!r}; only single-channel CT tasks can be converted"
        )
    labels = meta.get("labels")
    if not isinstance(labels, dict) or not all(str(k).isdigit() for k in labels):
        raise DatasetConversionError(f"{path}: 'labels' must map ids to names, got {labels!r}")
    return meta


def _msd_path(src: Path, entry: Any, what: str) -> Path:
    if not isinstance(entry, str) or not entry:
        raise DatasetConversionError(f"{src / 'dataset.json'}: {what} entry {entry!r} is not a file path")
    return (src / entry).resolve() if not Path(entry).is_absolute() else Path(entry)


def _msd_cases(src: Path, meta: dict[str, Any]) -> list[tuple[str, Path, Path]]:
    cases: dict[str, tuple[Path, Path]] = {}
    for entry in meta["training"]:
        if not isinstance(entry, dict):
            raise DatasetConversionError(f"{src / 'dataset.json'}: training entry {entry!r} is not an object")
        image = _msd_path(src, entry.get("image"), "training image")
        label = _msd_path(src, entry.get("label"), "training label")
        case = _case_id(label)
        if case in cases:
            raise DatasetConversionError(f"{label}: case {case!r} is listed twice in dataset.json")
        cases[case] = (image, label)
    if not cases:
        raise DatasetConversionError(f"{src / 'dataset.json'}: the 'training' list is empty")
    return [(case, image, label) for case, (image, label) in sorted(cases.items())]


def convert_msd(source: str | os.PathLike, output: str | os.PathLike) -> Path:
    """Convert a Medical Segmentation Decathlon CT task folder into an nnU-Net raw dataset at `output`.

    Every training pair is checked first (3-D image, label map on the same grid, label values declared);
    all problems are reported together (`DatasetValidationError`), and nothing is written then.
    Returns the output folder."""
    src, out = _check_paths(source, output)
    meta = _read_msd_json(src)
    labels = {str(name): int(i) for i, name in sorted(meta["labels"].items(), key=lambda kv: int(kv[0]))}
    cases = _msd_cases(src, meta)
    problems: list[str] = []
    for _, image, label in cases:
        _check_3d_image(image)
        problems += _validate_case(image, label, set(labels.values()), check_image_data=False)
    if problems:
        raise DatasetValidationError(src, problems)
    tests = [_msd_path(src, entry, "test image") for entry in meta.get("test") or []]
    for image in tests:
        _check_3d_image(image)
    extra = {k: meta[k] for k in ("name", "description", "reference", "licence", "release") if k in meta}
    with atomic_dir(out) as tmp:
        for case, image, label in cases:
            _copy_image(image, tmp / "imagesTr" / f"{case}_0000{_ENDING}")
            _copy_image(label, tmp / "labelsTr" / f"{case}{_ENDING}")
        for image in tests:
            _copy_image(image, tmp / "imagesTs" / f"{_case_id(image)}_0000{_ENDING}")
        _write_dataset_json(tmp, labels, len(cases), extra)
    return out


# --------------------------------------------------------------------------------------------------------
# TotalSegmentator
# --------------------------------------------------------------------------------------------------------


def _ts_cases(src: Path) -> list[Path]:
    cases = sorted(
        p for p in src.iterdir() if p.is_dir() and not p.name.startswith(".") and (p / "ct.nii.gz").is_file()
    )
    if not cases:
        raise DatasetConversionError(f"{src}: no case folders holding ct.nii.gz (TotalSegmentator layout)")
    return cases


def _ts_structures(cases: Sequence[Path], structures: Sequence[str] | None) -> list[str]:
    if structures is not None:
        names = [str(s).strip() for s in structures]
        if not names or any(not n or "/" in n for n in names) or len(set(names)) != len(names):
            raise DatasetConversionError(
                f"structures must be distinct, non-empty names, got {list(structures)}"
            )
        return names
    found = {_case_id(p) for case in cases for p in (case / "segmentations").glob("*.nii*")}
    found = {n for n in found if not n.startswith(".")}
    if not found:
        raise DatasetConversionError(f"{cases[0].parent}: no segmentations/<structure>.nii.gz masks found")
    return sorted(found)


def _ts_mask_path(case: Path, name: str) -> Path:
    for ending in (".nii.gz", ".nii"):
        path = case / "segmentations" / f"{name}{ending}"
        if path.is_file():
            return path
    raise DatasetConversionError(f"{case / 'segmentations' / (name + '.nii.gz')}: mask file does not exist")


def _ts_label_map(case: Path, structures: Sequence[str], ct: nib.Nifti1Image) -> np.ndarray:
    """The masks of one case as one label map in the CT's stored voxel order (ids 1..n)."""
    shape = tuple(int(s) for s in ct.shape[:3])
    dtype = np.uint8 if len(structures) < 256 else np.uint16
    labels = np.zeros(shape, dtype=dtype)
    for value, name in enumerate(structures, start=1):
        path = _ts_mask_path(case, name)
        try:
            stored = read_labels(path)
        except VolumeError as exc:
            raise DatasetConversionError(str(exc)) from exc
        problems = grid_problems(stored, shape, ct.affine, "ct.nii.gz")
        if problems:
            raise DatasetConversionError(problems[0])
        data = stored.array
        mask = data != 0
        if not np.all(data[mask] == 1):
            raise DatasetConversionError(f"{path}: mask values must be 0 or 1")
        overlap = mask & (labels != 0)
        if overlap.any():
            other = structures[int(labels[overlap].flat[0]) - 1]
            raise DatasetConversionError(
                f"{path}: {int(overlap.sum())} voxel(s) also belong to {other!r}; masks must not overlap"
            )
        labels[mask] = value
    return labels


def _save_label_map(labels: np.ndarray, ct: nib.Nifti1Image, path: Path) -> None:
    """Save with the CT's affine, qform and sform, so image and labels share the grid exactly."""
    img = nib.Nifti1Image(labels, ct.affine)
    img.set_qform(ct.get_qform(), code=int(ct.header["qform_code"]))
    img.set_sform(ct.get_sform(), code=int(ct.header["sform_code"]))
    img.header.set_xyzt_units(*ct.header.get_xyzt_units())
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(img, path)


def convert_totalsegmentator(
    source: str | os.PathLike, output: str | os.PathLike, structures: Sequence[str] | None = None
) -> Path:
    """Convert a TotalSegmentator-layout folder (one folder per case: `ct.nii.gz` and `segmentations/`
    with one 0/1 mask per structure) into an nnU-Net raw dataset at `output`; returns the output folder.

    Args:
        structures: mask names to keep, in label-id order (1..n); others become background. Default:
            every mask name found in any case, sorted.
    """
    src, out = _check_paths(source, output)
    cases = _ts_cases(src)
    names = _ts_structures(cases, structures)
    labels = {"background": 0, **{name: i for i, name in enumerate(names, start=1)}}
    with atomic_dir(out) as tmp:
        for case in cases:
            ct = _check_3d_image(case / "ct.nii.gz")
            label_map = _ts_label_map(case, names, ct)
            _copy_image(case / "ct.nii.gz", tmp / "imagesTr" / f"{case.name}_0000{_ENDING}")
            _save_label_map(label_map, ct, tmp / "labelsTr" / f"{case.name}{_ENDING}")
        extra = {"name": src.name, "description": f"TotalSegmentator layout converted from {src.name}"}
        _write_dataset_json(tmp, labels, len(cases), extra)
    return out


# --------------------------------------------------------------------------------------------------------
# Command line (`meddinov3 convert-dataset`)
# --------------------------------------------------------------------------------------------------------


def add_convert_dataset_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the `convert-dataset` options to `parser`."""
    parser.add_argument("--format", required=True, choices=("msd", "totalsegmentator"), help="source layout")
    parser.add_argument("source", metavar="SRC", help="source dataset folder (read only)")
    parser.add_argument("output", metavar="OUT", help="new nnU-Net raw dataset folder (must be new or empty)")
    parser.add_argument(
        "--structures",
        type=lambda text: [s for s in text.split(",") if s.strip()],
        help="totalsegmentator: comma-separated mask names to keep, in label order (default: all, sorted)",
    )


def run_convert_dataset(args: argparse.Namespace) -> int:
    """Run a conversion from parsed arguments; errors propagate as ValueError/OSError (exit status 2)."""
    if args.format == "msd":
        if args.structures:
            raise DatasetConversionError("--structures applies to --format totalsegmentator only")
        out = convert_msd(args.source, args.output)
    else:
        out = convert_totalsegmentator(args.source, args.output, args.structures)
    n = json.loads((out / "dataset.json").read_text(encoding="utf-8"))["numTraining"]
    print(f"{args.format}: {n} case(s) converted -> {out}")
    return 0
