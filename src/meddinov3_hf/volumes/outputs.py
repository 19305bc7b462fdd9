"""What `meddinov3 segment` writes for one case: clean-up, then NIfTI with names, `labels.json`, DICOM-SEG,
RTSTRUCT and statistics, all named after one stem.

For an output ``out/case.nii.gz`` the stem is ``out/case``::

    out/case.nii.gz               --output-type nifti (default): labels, names in the header extension
    out/case.labels.json          always: {"labels": {"0": "background", "1": "liver", ...}}
    out/case.seg.dcm              --output-type dicom-seg
    out/case.rtstruct.dcm         --output-type rtstruct
    out/case.statistics.json/.csv --statistics

For one DICOM series with a folder as output (TotalSegmentator's style), the stem is
``out/segmentations``.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "OUTPUT_TYPES",
    "OutputOptions",
    "add_output_arguments",
    "add_postprocess_arguments",
    "check_output_request",
    "output_paths",
    "single_case_output",
    "write_case_outputs",
]

OUTPUT_TYPES = ("nifti", "dicom-seg", "rtstruct")
DICOM_TYPES = ("dicom-seg", "rtstruct")
SINGLE_CASE_STEM = "segmentations"


@dataclass
class OutputOptions:
    """The outputs and clean-up of `segment` (see the module docstring for the file names).

    ``keep_largest``: ``None`` (off), ``[]`` (every class on its own) or group specs such as ``["1", "2+3"]``
    (ids or names). ``names`` overrides the model's ``id2label``."""

    types: tuple[str, ...] = ("nifti",)
    statistics: bool = False
    keep_largest: list[str] | None = None
    remove_small_mm3: float | None = None
    names: dict[int, str] | None = None
    model_name: str = "MedDINOv3"
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        unknown = [t for t in self.types if t not in OUTPUT_TYPES]
        if unknown:
            raise ValueError(f"--output-type: unknown {unknown}; choose from {', '.join(OUTPUT_TYPES)}")
        if self.remove_small_mm3 is not None and not self.remove_small_mm3 > 0:
            raise ValueError(f"--remove-small: expected a volume > 0 mm³, got {self.remove_small_mm3}")


def _stem(output: str | os.PathLike[str]) -> str:
    text = str(output)
    for suffix in (".nii.gz", ".nii"):
        if text.lower().endswith(suffix):
            return text[: -len(suffix)]
    return text


def output_paths(output: str | os.PathLike[str], options: OutputOptions) -> dict[str, Path]:
    """The files one case writes, by kind (``nifti``, ``labels``, ``dicom-seg``, ``rtstruct``, ``statistics``,
    ``statistics_csv``), for the planned label file ``output``."""
    stem = _stem(output)
    paths = {"labels": Path(stem + ".labels.json")}
    if "nifti" in options.types:
        paths["nifti"] = Path(output)
    if "dicom-seg" in options.types:
        paths["dicom-seg"] = Path(stem + ".seg.dcm")
    if "rtstruct" in options.types:
        paths["rtstruct"] = Path(stem + ".rtstruct.dcm")
    if options.statistics:
        paths["statistics"] = Path(stem + ".statistics.json")
        paths["statistics_csv"] = Path(stem + ".statistics.csv")
    return paths


def _is_nifti(path: Path) -> bool:
    return path.name.lower().endswith((".nii", ".nii.gz"))


def single_case_output(source: str | os.PathLike[str], output: str | os.PathLike[str]) -> str:
    """``-o folder/`` for one DICOM series (or one file) → ``folder/segmentations.nii.gz``; otherwise unchanged.

    A folder of NIfTI files keeps its folder output, and a NIfTI-named output stays as it is."""
    source, out = Path(source), Path(output)
    if _is_nifti(out):
        return str(output)
    if source.is_dir() and any(_is_nifti(p) for p in source.iterdir() if not p.name.startswith(".")):
        return str(output)  # a folder of NIfTI cases
    if (
        source.is_dir()
        and any(p.is_dir() for p in source.iterdir())
        and not any(p.is_file() for p in source.iterdir() if not p.name.startswith("."))
    ):
        return str(output)  # a tree of series: planned per series elsewhere
    if source.exists():
        return str(out / f"{SINGLE_CASE_STEM}.nii.gz")
    return str(output)


def check_output_request(source: str | os.PathLike[str], options: OutputOptions) -> None:
    """Refuse DICOM outputs for a NIfTI input before any work: there is no series to reference."""
    wanted = [t for t in options.types if t in DICOM_TYPES]
    if not wanted:
        return
    for module, what in (("pydicom", "DICOM output"), ("highdicom", "--output-type dicom-seg")):
        if module == "highdicom" and "dicom-seg" not in wanted:
            continue
        try:
            __import__(module)
        except ImportError as err:
            raise ValueError(f"{what} needs {module}: pip install 'meddinov3-hf[dicom]'") from err
    path = Path(source)
    nifti = _is_nifti(path) or (
        path.is_dir() and any(_is_nifti(p) for p in path.iterdir() if not p.name.startswith("."))
    )
    if nifti:
        raise ValueError(
            f"{source}: --output-type {' '.join(wanted)} needs a DICOM series input; a NIfTI input has no "
            "source series (Study/Series/Frame of Reference, slice instances) to reference. Use "
            "--output-type nifti, or segment the original DICOM series"
        )


def add_output_arguments(parser: argparse.ArgumentParser) -> None:
    """`segment`'s output flags: --output-type, --statistics, --keep-largest, --remove-small."""
    parser.add_argument(
        "--output-type",
        nargs="+",
        choices=OUTPUT_TYPES,
        default=["nifti"],
        help="one or more of nifti (default), dicom-seg, rtstruct (DICOM outputs need a DICOM series input)",
    )
    parser.add_argument(
        "--statistics",
        action="store_true",
        help="per structure: voxels, volume (ml), HU mean/std/min/max/median, bounding box, truncation "
        "(STEM.statistics.json + .csv)",
    )
    parser.add_argument(
        "--keep-largest",
        nargs="*",
        default=None,
        metavar="GROUP",
        help="keep only the largest connected component per class; or per group, e.g. 1 2+3 or "
        "kidney_left+kidney_right (ids or names)",
    )
    parser.add_argument(
        "--remove-small",
        type=float,
        default=None,
        metavar="MM3",
        help="remove connected components smaller than MM3 mm³ (a class's largest component is always kept)",
    )


def options_from_args(args: argparse.Namespace) -> OutputOptions:
    """`segment`'s parsed flags → :class:`OutputOptions`, refusing DICOM outputs for a NIfTI input."""
    model = getattr(args, "model", None)
    models = [m for m in (model if isinstance(model, (list, tuple)) else [model]) if m]
    options = OutputOptions(
        types=tuple(dict.fromkeys(args.output_type)),
        statistics=bool(args.statistics),
        keep_largest=args.keep_largest,
        remove_small_mm3=args.remove_small,
        model_name="+".join(Path(str(m).rstrip("/")).name for m in models) if models else "MedDINOv3",
    )
    check_output_request(args.input, options)
    if options.keep_largest and models and Path(str(models[0])).is_dir():
        # Class names in --keep-largest groups are checked against the model before any case is segmented.
        from .labels import read_label_names
        from .postprocess import parse_class_groups

        parse_class_groups(options.keep_largest, read_label_names(models[0]))
    return options


def prepare_jobs(jobs: Sequence[Any], source: str | os.PathLike[str], options: OutputOptions) -> None:
    """Attach ``options`` to each planned job and check every file it will write (guards of `files.py`)."""
    from ..files import check_output_path

    check_output_request(source, options)
    suffixes = {
        "nifti": (".nii.gz", ".nii"),
        "labels": (".json",),
        "dicom-seg": (".dcm",),
        "rtstruct": (".dcm",),
        "statistics": (".json",),
        "statistics_csv": (".csv",),
    }
    for job in jobs:
        job.outputs = options
        for kind, path in output_paths(job.output, options).items():
            check_output_path(path, [source], suffixes=suffixes[kind], overwrite=True, option="-o")


def _names(names: Mapping[Any, Any] | None, labels: np.ndarray) -> dict[int, str]:
    from .labels import has_real_names

    if names and has_real_names({int(k): str(v) for k, v in names.items()}):
        return {int(k): str(v) for k, v in names.items()}
    present = {int(v) for v in np.unique(labels)} | {int(k) for k in (names or {})}
    return {v: ("background" if v == 0 else f"label_{v}") for v in sorted(present)}


def write_case_outputs(
    labels_zyx: np.ndarray,
    volume: Any,
    output: str | os.PathLike[str],
    options: OutputOptions,
    names: Mapping[Any, Any] | None = None,
    series_uid: str | None = None,
) -> dict[str, Path]:
    """Clean up and write one case's outputs; returns the written paths by kind.

    Everything that can be refused (label values outside the label set, a series off a regular grid) is
    checked before the first file is written; each file is written atomically and the NIfTI label map last,
    so its presence means the case is complete."""
    from .io import save_labels
    from .labels import check_label_values, write_labels_json
    from .postprocess import apply_postprocessing, parse_class_groups

    names = _names(options.names or names, labels_zyx)
    check_label_values(labels_zyx, names, str(volume.source))
    groups = None
    if options.keep_largest is not None:
        groups = parse_class_groups(options.keep_largest, names) or True
    from .statistics import voxel_volume_mm3

    labels = apply_postprocessing(
        labels_zyx, volume.spacing, groups, options.remove_small_mm3, voxel_mm3=voxel_volume_mm3(volume)
    )
    paths = output_paths(output, options)
    series = None
    if any(t in options.types for t in DICOM_TYPES):
        from .dicom_out import read_source_series

        series = read_source_series(volume, series_uid=series_uid)
    statistics = None
    if options.statistics:
        from .statistics import compute_statistics

        statistics = compute_statistics(labels, volume, names)
    written: dict[str, Path] = {}
    if "dicom-seg" in paths:
        from .dicom_out import write_dicom_seg

        written["dicom-seg"] = write_dicom_seg(
            labels, volume, paths["dicom-seg"], names, model_name=options.model_name, series=series
        )
    if "rtstruct" in paths:
        from .rtstruct import write_rtstruct

        written["rtstruct"] = write_rtstruct(
            labels, volume, paths["rtstruct"], names, model_name=options.model_name, series=series
        )
    if statistics is not None:
        from .statistics import write_statistics

        written["statistics"], written["statistics_csv"] = write_statistics(statistics, paths["statistics"])
    written["labels"] = write_labels_json(paths["labels"], names)
    if "nifti" in paths:
        written["nifti"] = save_labels(labels, volume, paths["nifti"], label_names=names)
    return written


def add_postprocess_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of `meddinov3 postprocess` (determine a plan on a validation folder, or clean/convert label maps)."""
    parser.add_argument(
        "--determine",
        action="store_true",
        help="choose the clean-up on a validation folder (--pred, --gt) and write the plan JSON to -o",
    )
    parser.add_argument("--pred", default=None, help="validation predictions folder (with --determine)")
    parser.add_argument("--gt", default=None, help="validation references folder (with --determine)")
    parser.add_argument("-i", "--input", default=None, help="label NIfTI file or folder to clean / convert")
    parser.add_argument("-o", "--output", required=True, help="plan .json, or cleaned label file / folder")
    parser.add_argument("--plan", default=None, help="a plan written by --determine to apply")
    parser.add_argument("--keep-largest", nargs="*", default=None, metavar="GROUP", help="as for segment")
    parser.add_argument("--remove-small", type=float, default=None, metavar="MM3", help="as for segment")
    parser.add_argument(
        "--names",
        default=None,
        help="label names: model folder, config.json, dataset.json, labels.json or ID=NAME,...; label values "
        "outside it are refused",
    )
    parser.add_argument(
        "--source",
        default=None,
        help="the DICOM series (or CT) the label map (-i, one file) was computed on: enables --output-type "
        "dicom-seg/rtstruct and --statistics",
    )
    parser.add_argument("--output-type", nargs="+", choices=OUTPUT_TYPES, default=["nifti"])
    parser.add_argument("--statistics", action="store_true")
