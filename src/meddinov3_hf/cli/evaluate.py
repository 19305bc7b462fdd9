"""`meddinov3 evaluate`: Dice, HD95 and NSD of predicted label maps against references."""

from __future__ import annotations

import sys

from .common import labels_arg

__all__ = ["add_evaluate"]


def add_evaluate(sub) -> None:
    p = sub.add_parser("evaluate", help="Dice, HD95 and NSD of predictions against references")
    p.add_argument("--pred", required=True, help="label NIfTI file or folder")
    p.add_argument("--gt", required=True, help="reference NIfTI file or folder (matched by case name)")
    p.add_argument(
        "-o",
        "--output",
        default=None,
        help="metrics .json (a .csv table is written beside it); guard: it must end in .json and may not be "
        "or lie inside an input",
    )
    p.add_argument(
        "--labels",
        type=labels_arg,
        default=None,
        help="ID=NAME,..., dataset.json, or a model folder / its config.json (id2label); label values in the "
        "files but not here are reported under 'warnings' in the JSON",
    )
    p.add_argument("--tolerance", type=float, default=1.0, help="NSD tolerance in mm")
    p.add_argument(
        "--allow-grid-mismatch",
        action="store_true",
        help="guard: a prediction whose grid (affine) differs from the reference's other than by an axis "
        "permutation/flip (which is undone exactly) is refused unless given; then it is scored voxel by voxel",
    )
    p.set_defaults(func=_run_evaluate)


def _run_evaluate(args) -> int:
    from ..files import check_output_path
    from ..volumes.evaluation import evaluate_folders, write_metrics

    output = None
    if args.output:
        inputs = [args.pred, args.gt]
        output = check_output_path(args.output, inputs, suffixes=(".json",), overwrite=True, option="-o")
        check_output_path(output.with_suffix(".csv"), inputs, suffixes=(".csv",), overwrite=True, option="-o")
    results = evaluate_folders(
        args.pred,
        args.gt,
        labels=args.labels,
        tolerance_mm=args.tolerance,
        allow_grid_mismatch=args.allow_grid_mismatch,
    )
    if output is not None:
        write_metrics(results, output, output.with_suffix(".csv"))
    for note in results.get("warnings", []):
        print(f"warning: {note}", file=sys.stderr)
    mean = results.get("mean", {})
    for name, values in mean.items() if isinstance(mean, dict) else []:
        if isinstance(values, dict):
            print(
                f"{name:>20}: " + "  ".join(f"{k} {v:.4f}" for k, v in values.items() if isinstance(v, float))
            )
        elif isinstance(values, float):
            print(f"{name:>20}: {values:.4f}")
    return 0
