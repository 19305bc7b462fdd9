"""nnU-Net raw-format datasets: reading `dataset.json`, validating a dataset, cross-validation splits.

Layout (nnU-Net v2 "raw" format, CT only, one channel)::

    root/dataset.json           {"channel_names": {"0": "CT"}, "labels": {"background": 0, ...},
                                 "numTraining": N, "file_ending": ".nii.gz"}
    root/imagesTr/CASE_0000.nii.gz
    root/labelsTr/CASE.nii.gz

Images are read with :func:`meddinov3_hf.volumes.io.load_volume` (canonical (Z, Y, X) orientation); label
maps with :func:`meddinov3_hf.volumes.labels.load_labels`, which checks that they share the image's shape and
affine and puts them through the *image's* reorientation, so image and labels stay voxel-aligned by
construction.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from meddinov3_hf.volumes.io import CTVolume, VolumeError, atomic_path, load_volume
from meddinov3_hf.volumes.labels import GRID_TOLERANCE_MM, grid_problems, load_labels, read_labels

__all__ = [
    "AFFINE_TOLERANCE",
    "DatasetValidationError",
    "NnUNetDataset",
    "split_cases",
    "validate",
    "write_splits_file",
]

AFFINE_TOLERANCE = GRID_TOLERANCE_MM  # absolute, on every affine entry (mm): float32 header round-off
_REQUIRED_KEYS = ("channel_names", "labels", "numTraining", "file_ending")
_CHANNEL_SUFFIX = "_0000"


class DatasetValidationError(ValueError):
    """A dataset has one or more problems; `problems` lists all of them (each names the file)."""

    def __init__(self, root: str | os.PathLike, problems: Sequence[str]):
        self.root = Path(root)
        self.problems = list(problems)
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"{self.root}: dataset is invalid ({len(self.problems)} problem(s)):\n{lines}")


# --------------------------------------------------------------------------------------------------------
# dataset.json
# --------------------------------------------------------------------------------------------------------


def _read_dataset_json(root: Path) -> tuple[dict[str, Any] | None, list[str]]:
    """Parse and check dataset.json. Returns (json or None if unusable, problems)."""
    path = root / "dataset.json"
    if not path.is_file():
        return None, [f"{path}: missing dataset.json"]
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        return None, [f"{path}: unreadable JSON ({type(exc).__name__}: {exc})"]
    if not isinstance(meta, dict):
        return None, [f"{path}: top level must be a JSON object"]
    problems = [f"{path}: missing key {k!r}" for k in _REQUIRED_KEYS if k not in meta]
    # nnU-Net v1 used "modality"; accept it as an alias so old datasets get a useful message, not two.
    channels = meta.get("channel_names", meta.get("modality"))
    if channels is not None:
        if not isinstance(channels, dict) or len(channels) != 1:
            problems.append(f"{path}: channel_names must have exactly one channel (CT), got {channels!r}")
        else:
            ((key, value),) = channels.items()
            if str(key) != "0" or str(value).strip().upper() != "CT":
                problems.append(f"{path}: channel_names must be {{'0': 'CT'}}, got {channels!r}")
    labels = meta.get("labels")
    if labels is not None:
        problems += [f"{path}: {p}" for p in _check_labels(labels)]
    ending = meta.get("file_ending")
    if ending is not None and ending not in (".nii.gz", ".nii"):
        problems.append(f"{path}: file_ending {ending!r} not supported (use '.nii.gz' or '.nii')")
    n = meta.get("numTraining")
    if n is not None and (not isinstance(n, int) or isinstance(n, bool) or n < 0):
        problems.append(f"{path}: numTraining must be a non-negative integer, got {n!r}")
    return meta, problems


def _check_labels(labels: Any) -> list[str]:
    if not isinstance(labels, dict) or not labels:
        return [f"'labels' must be a non-empty name -> id object, got {labels!r}"]
    problems = []
    ids: dict[int, str] = {}
    for name, value in labels.items():
        if isinstance(value, (list, tuple)):
            problems.append(f"label {name!r}: region-based labels ({value!r}) are not supported")
            continue
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            problems.append(f"label {name!r}: id must be a non-negative integer, got {value!r}")
            continue
        if value in ids:
            problems.append(f"labels {ids[value]!r} and {name!r} share id {value}")
        ids[value] = name
    if ids and ids.get(0) is None:
        problems.append("labels must map a background class to 0")
    # nnU-Net requires consecutive ids; an 'ignore' label, if any, must be the highest id.
    regular = sorted(i for i, n in ids.items() if n != "ignore")
    if regular and regular != list(range(len(regular))):
        problems.append(f"label ids must be consecutive from 0, got {regular}")
    if (
        "ignore" in labels
        and isinstance(labels["ignore"], int)
        and regular
        and labels["ignore"] < max(regular)
    ):
        problems.append("the 'ignore' label must have the highest id")
    return problems


# --------------------------------------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------------------------------------


def _listing(folder: Path, ending: str) -> list[Path]:
    if not folder.is_dir():
        return []
    return sorted(
        p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".") and p.name.endswith(ending)
    )


def _read_header(path: Path) -> tuple[tuple[int, ...], np.ndarray]:
    """(shape, affine) from the header only (cheap). Raises VolumeError naming the file."""
    try:
        img = nib.load(path)
    except Exception as exc:  # nibabel raises many types for garbage
        raise VolumeError(f"{path}: not a readable NIfTI file ({type(exc).__name__}: {exc})") from exc
    shape = tuple(int(s) for s in img.shape)
    if len(shape) > 3 and all(s == 1 for s in shape[3:]):
        shape = shape[:3]
    return shape, np.asarray(img.affine, dtype=np.float64)


class _CaseFiles:
    __slots__ = ("images", "labels")

    def __init__(self) -> None:
        self.images: dict[str, Path] = {}
        self.labels: dict[str, Path] = {}


def _collect_case_files(root: Path, ending: str) -> tuple[_CaseFiles, list[str]]:
    files, problems = _CaseFiles(), []
    for sub in ("imagesTr", "labelsTr"):
        if not (root / sub).is_dir():
            problems.append(f"{root / sub}: missing folder")
    for p in _listing(root / "imagesTr", ending):
        stem = p.name[: -len(ending)]
        if not stem.endswith(_CHANNEL_SUFFIX):
            # A "_0001" etc. means a second input channel, which a CT-only model cannot use.
            problems.append(f"{p}: image name must end with '{_CHANNEL_SUFFIX}{ending}' (single CT channel)")
            continue
        files.images[stem[: -len(_CHANNEL_SUFFIX)]] = p
    for p in _listing(root / "labelsTr", ending):
        files.labels[p.name[: -len(ending)]] = p
    for case in sorted(files.images.keys() - files.labels.keys()):
        problems.append(f"{files.images[case]}: image has no label file labelsTr/{case}{ending}")
    for case in sorted(files.labels.keys() - files.images.keys()):
        problems.append(
            f"{files.labels[case]}: label has no image file imagesTr/{case}{_CHANNEL_SUFFIX}{ending}"
        )
    return files, problems


# --------------------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------------------


def validate(root: str | os.PathLike, check_image_data: bool = True) -> list[str]:
    """Check an nnU-Net raw dataset and return EVERY problem found (empty list = valid).

    Checks: dataset.json present, parseable, with required keys; a single CT channel; label ids sane;
    numTraining equals the number of cases; every image has a label and vice versa; per case, matching
    shapes and affines (tolerance `AFFINE_TOLERANCE`), readable files, and label values all declared.

    Args:
        check_image_data: also decompress every image to catch truncated files (slower; headers are
            always checked). Volumes are read one at a time, so memory stays bounded.
    """
    root = Path(root)
    if not root.is_dir():
        return [f"{root}: dataset folder does not exist"]
    meta, problems = _read_dataset_json(root)
    ending = meta.get("file_ending") if meta else None
    if ending not in (".nii.gz", ".nii"):
        ending = ".nii.gz"  # still check the files with the nnU-Net default so all problems show at once
    files, file_problems = _collect_case_files(root, ending)
    problems += file_problems

    declared: set[int] | None = None
    if meta and isinstance(meta.get("labels"), dict):
        declared = {v for v in meta["labels"].values() if isinstance(v, int) and not isinstance(v, bool)}
    n_cases = len(files.images)  # as nnU-Net: numTraining counts training images
    n_training = meta.get("numTraining") if meta else None
    if isinstance(n_training, int) and n_training != n_cases:
        problems.append(
            f"{root / 'dataset.json'}: numTraining is {n_training} but {n_cases} case(s) were found"
        )

    for case in sorted(files.images.keys() & files.labels.keys()):
        problems += _validate_case(files.images[case], files.labels[case], declared, check_image_data)
    return problems


def _validate_case(image: Path, label: Path, declared: set[int] | None, check_image_data: bool) -> list[str]:
    problems = []
    try:
        img_shape, img_affine = _read_header(image)
    except VolumeError as exc:
        problems.append(str(exc))
        img_shape = img_affine = None
    if img_shape is not None and len(img_shape) != 3:
        problems.append(f"{image}: image must be 3-D, got shape {img_shape}")
    if img_shape is not None and check_image_data:
        try:
            # Decompress in full: a truncated .gz only fails here. dataobj avoids a float64 copy.
            np.asanyarray(nib.load(image).dataobj)
        except Exception as exc:
            problems.append(f"{image}: cannot read voxel data ({type(exc).__name__}: {exc})")
    try:
        stored = read_labels(label)
    except (VolumeError, FileNotFoundError) as exc:
        return [*problems, str(exc)]
    if img_shape is not None and img_affine is not None:
        problems += grid_problems(stored, img_shape, img_affine, f"image {image.name}")
    if declared is not None:
        undeclared = sorted(int(v) for v in np.unique(stored.array) if int(v) not in declared)
        if undeclared:
            problems.append(f"{label}: label value(s) {undeclared} not declared in dataset.json 'labels'")
    return problems


# --------------------------------------------------------------------------------------------------------
# Dataset
# --------------------------------------------------------------------------------------------------------


class NnUNetDataset:
    """An nnU-Net raw CT dataset.

    Attributes:
        root: dataset folder. meta: parsed dataset.json. label2id / id2label: class mapping (an 'ignore'
        label, if declared, is excluded and exposed as `ignore_label`). case_ids: sorted ids having both an
        image and a label file. file_ending: ".nii.gz" or ".nii".

    Construction only needs a usable dataset.json (raises `DatasetValidationError` otherwise); call
    `validate()` / `validate_or_raise()` for the full per-file check.
    """

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        if not self.root.is_dir():
            raise DatasetValidationError(self.root, [f"{self.root}: dataset folder does not exist"])
        meta, problems = _read_dataset_json(self.root)
        if meta is None or problems:
            raise DatasetValidationError(self.root, problems)
        self.meta: dict[str, Any] = meta
        self.file_ending: str = meta["file_ending"]
        labels = {str(k): int(v) for k, v in meta["labels"].items()}
        self.ignore_label: int | None = labels.pop("ignore", None)
        self.label2id: dict[str, int] = dict(sorted(labels.items(), key=lambda kv: kv[1]))
        self.id2label: dict[int, str] = {v: k for k, v in self.label2id.items()}
        files, _ = _collect_case_files(self.root, self.file_ending)
        self._images, self._labels = files.images, files.labels
        self.case_ids: list[str] = sorted(files.images.keys() & files.labels.keys())

    @property
    def num_labels(self) -> int:
        """Number of classes including background (ignore label excluded)."""
        return len(self.id2label)

    def __len__(self) -> int:
        return len(self.case_ids)

    def __repr__(self) -> str:
        return f"NnUNetDataset({str(self.root)!r}, cases={len(self)}, labels={self.id2label})"

    def image_path(self, case_id: str) -> Path:
        return self._paths(case_id)[0]

    def label_path(self, case_id: str) -> Path:
        return self._paths(case_id)[1]

    def _paths(self, case_id: str) -> tuple[Path, Path]:
        if case_id not in self._images or case_id not in self._labels:
            raise KeyError(f"{self.root}: no case {case_id!r} with both an image and a label file")
        return self._images[case_id], self._labels[case_id]

    def files(self, case_ids: Iterable[str] | None = None) -> list[Path]:
        """dataset.json plus image and label files of `case_ids` (default: all), e.g. for cache keys."""
        ids = self.case_ids if case_ids is None else list(case_ids)
        return [self.root / "dataset.json", *(p for c in ids for p in self._paths(c))]

    def validate(self, check_image_data: bool = True) -> list[str]:
        return validate(self.root, check_image_data=check_image_data)

    def validate_or_raise(self, check_image_data: bool = True) -> None:
        """Raise one `DatasetValidationError` listing every problem, if there are any."""
        problems = self.validate(check_image_data=check_image_data)
        if problems:
            raise DatasetValidationError(self.root, problems)

    def load_case(self, case_id: str) -> tuple[CTVolume, np.ndarray]:
        """Image and labels of one case, both canonical (Z, Y, X).

        Returns:
            (CTVolume with float32 HU, labels uint8 (Z, Y, X) [int16 if ids exceed 255]).

        Raises:
            VolumeError: naming the file, when the label map does not match the image.
        """
        image_path, label_path = self._paths(case_id)
        volume = load_volume(image_path)
        labels = load_labels(label_path, volume, f"image {image_path.name}")  # values >= 0, on the grid
        hi = int(labels.max()) if labels.size else 0
        if hi > np.iinfo(np.int16).max:
            raise VolumeError(f"{label_path}: label values outside [0, 32767] (max {hi})")
        dtype = np.uint8 if hi <= 255 else np.int16
        return volume, np.ascontiguousarray(labels, dtype=dtype)


# --------------------------------------------------------------------------------------------------------
# Cross-validation splits
# --------------------------------------------------------------------------------------------------------


def _kfold_splits(case_ids: Sequence[str], n_folds: int, seed: int) -> list[dict[str, list[str]]]:
    """nnU-Net's 5-fold split: `KFold(n_splits, shuffle=True, random_state=seed)` over the sorted ids.

    Re-derived without sklearn: KFold shuffles `arange(n)` with `RandomState(seed).shuffle`, cuts the
    shuffled indices into contiguous test chunks (the first n % k chunks one larger), and returns train
    indices in ascending order while test indices keep the shuffled order.
    """
    keys = np.sort(np.asarray(list(case_ids), dtype=object))
    n = len(keys)
    if n_folds < 2:
        raise ValueError(f"n_folds must be >= 2, got {n_folds}")
    if n < n_folds:
        raise ValueError(f"cannot split {n} case(s) into {n_folds} folds")
    indices = np.arange(n)
    np.random.RandomState(seed).shuffle(indices)
    sizes = np.full(n_folds, n // n_folds, dtype=int)
    sizes[: n % n_folds] += 1
    splits, start = [], 0
    for size in sizes:
        test = indices[start : start + size]
        mask = np.ones(n, dtype=bool)
        mask[test] = False
        splits.append({"train": [str(k) for k in keys[mask]], "val": [str(k) for k in keys[test]]})
        start += size
    return splits


def _read_splits_file(path: Path) -> list[dict[str, list[str]]]:
    try:
        splits = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path}: cannot read splits file ({type(exc).__name__}: {exc})") from exc
    ok = isinstance(splits, list) and all(
        isinstance(s, dict) and isinstance(s.get("train"), list) and isinstance(s.get("val"), list)
        for s in splits
    )
    if not ok or not splits:
        raise ValueError(f"{path}: expected a non-empty list of {{'train': [...], 'val': [...]}} objects")
    return [{"train": [str(c) for c in s["train"]], "val": [str(c) for c in s["val"]]} for s in splits]


def split_cases(
    case_ids: Sequence[str],
    fold: int | str,
    n_folds: int = 5,
    seed: int = 12345,
    splits_file: str | os.PathLike | None = None,
) -> tuple[list[str], list[str]]:
    """(train, val) case ids for one fold, following nnU-Net.

    Args:
        case_ids: all training case ids (order irrelevant; sorted internally as nnU-Net does).
        fold: 0..n_folds-1, or "all" (train on everything; val = all cases too, as nnU-Net does).
        splits_file: an nnU-Net `splits_final.json` (list of {"train", "val"}); when given it overrides
            the generated split, and its ids must all be in `case_ids`.
    """
    if fold == "all":
        ids = sorted(str(c) for c in case_ids)
        return ids, list(ids)
    if isinstance(fold, bool) or not isinstance(fold, (int, np.integer)):
        raise ValueError(f"fold must be an integer or 'all', got {fold!r}")
    if splits_file is not None:
        path = Path(splits_file)
        splits = _read_splits_file(path)
        if not 0 <= fold < len(splits):
            raise ValueError(f"{path}: fold {fold} requested but the file defines {len(splits)} fold(s)")
        split = splits[fold]
        unknown = sorted((set(split["train"]) | set(split["val"])) - {str(c) for c in case_ids})
        if unknown:
            raise ValueError(f"{path}: fold {fold} names case(s) not in the dataset: {unknown[:10]}")
        return split["train"], split["val"]
    if not 0 <= fold < n_folds:
        raise ValueError(f"fold must be in [0, {n_folds}) or 'all', got {fold}")
    split = _kfold_splits(case_ids, n_folds, seed)[fold]
    return split["train"], split["val"]


def write_splits_file(
    path: str | os.PathLike, case_ids: Sequence[str], n_folds: int = 5, seed: int = 12345
) -> Path:
    """Write nnU-Net's `splits_final.json` for `case_ids` atomically; returns the path."""
    splits = _kfold_splits(case_ids, n_folds, seed)
    path = Path(path)
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(splits, indent=2) + "\n", encoding="utf-8")
    return path
