"""`meddinov3 segment` (whole CT volumes) and `meddinov3 postprocess` (label-map clean-up and conversion)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .common import add_series, check_devices

__all__ = ["add_postprocess", "add_segment"]


def add_segment(sub) -> None:
    p = sub.add_parser("segment", help="segment CT volumes (NIfTI file, DICOM folder or folder of NIfTI)")
    p.add_argument("-i", "--input", required=True)
    p.add_argument(
        "-o",
        "--output",
        required=True,
        help="label .nii.gz (one volume) or folder (a folder input); guard: it may not be or lie inside the "
        "input, and two inputs that would write one output name are refused",
    )
    p.add_argument(
        "--model",
        required=True,
        nargs="+",
        action="extend",
        help="segmentation model folder; several (e.g. five folds) are ensembled by averaging probabilities "
        "(refused when their label maps, processors or patch sizes differ)",
    )
    p.add_argument(
        "--device",
        default=None,
        help="cpu, cuda, cuda:1, or a comma list (cuda:0,cuda:1) for one case per device",
    )
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--tta", action=argparse.BooleanOptionalAction, default=False, help="mirroring TTA")
    p.add_argument(
        "--save-probabilities",
        nargs="?",
        const="nifti",
        default=None,
        choices=["nifti", "npz"],
        help="also write CASE_probabilities.nii.gz (streamed to disk; written before the labels), or with "
        "'npz' nnU-Net's CASE.npz (float32 (K, z, y, x))",
    )
    add_series(p)
    _add_predict_options(p)
    p.add_argument("--quiet", action="store_true")
    from ..volumes.outputs import add_output_arguments

    add_output_arguments(p)  # --output-type, --statistics, --keep-largest, --remove-small
    p.set_defaults(func=_run_segment)


def _add_predict_options(p) -> None:
    """nnU-Net / TotalSegmentator-style options (volumes/predictor.py)."""
    p.add_argument("--step-size", type=float, default=0.5, help="tile step as a fraction of the tile (0.5)")
    p.add_argument(
        "--spacing", type=float, default=None, metavar="MM", help="in-plane working spacing (fast: 1.5, 3)"
    )
    p.add_argument(
        "--body-crop", action="store_true", help="segment only the body's bounding box (HU > -500 + 10 mm)"
    )
    p.add_argument(
        "--roi-subset", default=None, metavar="NAME,...", help="only these structures in the outputs"
    )
    p.add_argument(
        "--continue",
        dest="continue_",
        action="store_true",
        help="skip cases whose outputs exist and read back completely (a truncated one is redone)",
    )


def _predict_options(args):
    from ..volumes.labels import read_label_names
    from ..volumes.predictor import PredictOptions, roi_subset_labels

    subset = [n.strip() for n in args.roi_subset.split(",") if n.strip()] if args.roi_subset else None
    options = PredictOptions(
        step=args.step_size,
        spacing_mm=args.spacing,
        body_crop=args.body_crop,
        roi_subset=subset,
        probabilities_format=args.save_probabilities or "nifti",
    )
    if subset and Path(args.model[0]).is_dir():  # refused before any case is segmented
        roi_subset_labels(subset, read_label_names(args.model[0]))
    return options


def _run_segment(args) -> int:
    from ..volumes.dicom_in import open_input, plan_series_jobs
    from ..volumes.inference import plan_jobs, run_jobs_on_devices
    from ..volumes.outputs import options_from_args, prepare_jobs, single_case_output

    devices = check_devices(args.device)
    outputs = options_from_args(args)  # refuses DICOM outputs for a NIfTI input before anything is written
    source = open_input(args.input)  # a .zip is extracted to a temporary folder for this run
    # A folder tree of several series: one output per CT series (PatientID/SeriesInstanceUID); the series
    # that are not segmented are named on stderr with the reason.
    jobs = plan_series_jobs(
        source,
        args.output,
        args.save_probabilities,
        args.series,
        report=lambda line: print(f"note: {line}", file=sys.stderr),
    )
    if jobs is None:
        jobs = plan_jobs(
            source,
            single_case_output(source, args.output),
            save_probabilities=args.save_probabilities,
            series=args.series,
        )
    prepare_jobs(jobs, source, outputs)
    options = _predict_options(args)
    if options.probabilities_format == "npz":
        from ..volumes.predictor import use_npz_probabilities

        use_npz_probabilities(jobs, source)
    total = len(jobs)
    if args.continue_:
        from ..volumes.predictor import skip_finished

        jobs, done = skip_finished(jobs)
        if done and not args.quiet:
            print(f"--continue: {len(done)} case(s) already segmented, {len(jobs)} to do")
    errors = run_jobs_on_devices(
        jobs, args.model, devices, args.batch_size, args.tta, progress=not args.quiet, options=options
    )
    for message in errors:
        print(f"error: {message}", file=sys.stderr)
    if not args.quiet:
        print(f"segmented {len(jobs) - len(errors)}/{total} volume(s) → {args.output}")
    return 1 if errors else 0


def add_postprocess(sub) -> None:
    from ..volumes.outputs import add_postprocess_arguments

    p = sub.add_parser(
        "postprocess",
        help="clean label maps (largest component, small islands), --determine the clean-up on a validation "
        "set, or convert a label map to DICOM-SEG/RTSTRUCT (--source)",
    )
    add_postprocess_arguments(p)
    p.set_defaults(func=_run_postprocess)


def _run_postprocess(args) -> int:
    from ..volumes.postprocess import run_postprocess

    return run_postprocess(args)
