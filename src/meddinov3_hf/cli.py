"""The `meddinov3` command: convert, segment, evaluate, features, overlay, demo, build-ct3m, finetune, pretrain."""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path


def _int_list(text: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from err


def _labels_arg(text: str) -> dict[int, str]:
    """`0=background,1=liver` or a dataset.json / JSON file with {"labels": {name: id}} or {id: name}."""
    path = Path(text)
    if path.is_file():
        data = json.loads(path.read_text())
        data = data.get("labels", data)
        if all(isinstance(v, int) for v in data.values()):
            return {int(v): str(k) for k, v in data.items()}
        return {int(k): str(v) for k, v in data.items()}
    try:
        return {int(k): v for k, v in (item.split("=", 1) for item in text.split(","))}
    except ValueError as err:
        raise argparse.ArgumentTypeError(
            f"labels must be 'ID=NAME,...' or a JSON file, got {text!r}"
        ) from err


# -- convert -------------------------------------------------------------------------------------------------
def _add_convert(sub) -> None:
    p = sub.add_parser("convert", help="convert a MedDINOv3 / DINOv3 / nnU-Net checkpoint to a model folder")
    p.add_argument("source", help="checkpoint file (.pth) or transformers DINOv3 folder")
    p.add_argument("output", help="output folder")
    p.add_argument(
        "--format",
        choices=["meddinov3", "dinov3", "transformers", "nnunet"],
        default=None,
        help="source format (default: detected)",
    )
    p.add_argument("--blocks", type=_int_list, default=[2, 5, 8, 11], help="aggregated blocks (0-based)")
    p.add_argument(
        "--rope-precision",
        choices=["bf16", "fp32"],
        default=None,
        help="RoPE numerics (default: bf16 for reference-code checkpoints, fp32 for transformers ones)",
    )
    p.add_argument("--layer-norm-eps", type=float, default=None)
    p.add_argument("--labels", type=_labels_arg, default=None, help="ID=NAME,... or a dataset.json (nnU-Net)")
    p.set_defaults(func=_run_convert)


def _run_convert(args) -> int:
    from .convert import convert_checkpoint

    result = convert_checkpoint(
        args.source,
        args.output,
        source_format=args.format,
        aggregation_layers=args.blocks,
        rope_precision=args.rope_precision,
        layer_norm_eps=args.layer_norm_eps,
        id2label=args.labels,
    )
    kind = (
        "segmentation model"
        if result.config.architectures and "Seg" in result.config.architectures[0]
        else "backbone"
    )
    print(
        f"converted {args.source} ({result.source_format}) → {result.output_dir} [{kind}, "
        f"RoPE {result.config.rope_precision}, dropped {len(result.dropped_keys)} head keys]"
    )
    return 0


# -- segment -------------------------------------------------------------------------------------------------
def _add_segment(sub) -> None:
    p = sub.add_parser("segment", help="segment CT volumes (NIfTI file, DICOM folder or folder of NIfTI)")
    p.add_argument("-i", "--input", required=True)
    p.add_argument(
        "-o", "--output", required=True, help="label .nii.gz (one volume) or folder (a folder input)"
    )
    p.add_argument("--model", required=True, help="segmentation model folder")
    p.add_argument(
        "--device",
        default=None,
        help="cpu, cuda, cuda:1, or a comma list (cuda:0,cuda:1) for one case per device",
    )
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--tta", action=argparse.BooleanOptionalAction, default=False, help="mirroring TTA")
    p.add_argument("--save-probabilities", action="store_true")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=_run_segment)


def _run_segment(args) -> int:
    import torch

    from .volumes.inference import plan_jobs, run_jobs_on_devices

    devices = [
        d.strip() for d in (args.device or ("cuda" if torch.cuda.is_available() else "cpu")).split(",")
    ]
    jobs = plan_jobs(args.input, args.output, save_probabilities=args.save_probabilities)
    errors = run_jobs_on_devices(
        jobs, args.model, devices, args.batch_size, args.tta, progress=not args.quiet
    )
    for message in errors:
        print(f"error: {message}", file=sys.stderr)
    if not args.quiet:
        print(f"segmented {len(jobs) - len(errors)}/{len(jobs)} volume(s) → {args.output}")
    return 1 if errors else 0


# -- evaluate ------------------------------------------------------------------------------------------------
def _add_evaluate(sub) -> None:
    p = sub.add_parser("evaluate", help="Dice, HD95 and NSD of predictions against references")
    p.add_argument("--pred", required=True, help="label NIfTI file or folder")
    p.add_argument("--gt", required=True, help="reference NIfTI file or folder (matched by case name)")
    p.add_argument("-o", "--output", default=None, help="metrics.json (a CSV table is written beside it)")
    p.add_argument("--labels", type=_labels_arg, default=None, help="ID=NAME,... or dataset.json")
    p.add_argument("--tolerance", type=float, default=1.0, help="NSD tolerance in mm")
    p.set_defaults(func=_run_evaluate)


def _run_evaluate(args) -> int:
    from .metrics import evaluate_folders, write_metrics

    results = evaluate_folders(args.pred, args.gt, labels=args.labels, tolerance_mm=args.tolerance)
    if args.output:
        output = Path(args.output)
        write_metrics(results, output, output.with_suffix(".csv"))
    mean = results.get("mean", {})
    for name, values in mean.items() if isinstance(mean, dict) else []:
        if isinstance(values, dict):
            print(
                f"{name:>20}: " + "  ".join(f"{k} {v:.4f}" for k, v in values.items() if isinstance(v, float))
            )
        elif isinstance(values, float):
            print(f"{name:>20}: {values:.4f}")
    return 0


# -- features / overlay -------------------------------------------------------------------------------------
def _add_pictures(sub) -> None:
    p = sub.add_parser("features", help="PCA of dense features of one slice as an RGB picture")
    p.add_argument("-i", "--input", required=True, help="NIfTI file or DICOM folder")
    p.add_argument("--model", required=True, help="backbone or segmentation model folder")
    p.add_argument("-o", "--output", required=True, help="PNG path")
    p.add_argument("--slice", type=int, default=None, help="axial slice index (default: the middle)")
    p.add_argument("--size", type=int, default=896, help="input resolution (multiple of 16)")
    p.add_argument("--layer", type=int, default=None, help="0-based block (default: the last)")
    p.add_argument("--window", default="abdomen")
    p.add_argument("--device", default="cpu")
    p.set_defaults(func=_run_features)

    p = sub.add_parser("overlay", help="a label volume drawn on one CT slice (PNG)")
    p.add_argument("-i", "--input", required=True, help="CT NIfTI file or DICOM folder")
    p.add_argument("--labels", required=True, help="label NIfTI on the same grid")
    p.add_argument("-o", "--output", required=True, help="PNG path")
    p.add_argument("--slice", type=int, default=None, help="axial slice (default: most labelled voxels)")
    p.add_argument("--window", default="abdomen")
    p.add_argument(
        "--names", type=_labels_arg, default=None, help="ID=NAME,... or dataset.json / model config"
    )
    p.set_defaults(func=_run_overlay)


def _pick_slice(volume_depth: int, index: int | None, path: str) -> int:
    index = volume_depth // 2 if index is None else index
    if not 0 <= index < volume_depth:
        raise ValueError(f"{path}: slice {index} outside [0, {volume_depth - 1}]")
    return index


def _run_features(args) -> int:
    from transformers import AutoModel

    from .image_processing_meddinov3 import MedDINOv3ImageProcessor
    from .visualize import feature_pca_image, save_png
    from .volumes.io import load_volume

    volume = load_volume(args.input)
    index = _pick_slice(volume.hu.shape[0], args.slice, args.input)
    model = AutoModel.from_pretrained(args.model).to(args.device).eval()
    processor = MedDINOv3ImageProcessor.from_pretrained(args.model)
    image = feature_pca_image(
        model, processor, volume.hu[index], size=args.size, layer=args.layer, window=args.window
    )
    save_png(image, args.output)
    print(f"wrote {args.output} (slice {index})")
    return 0


def _run_overlay(args) -> int:
    import numpy as np

    from .data.nnunet import read_label_array
    from .visualize import overlay_image, save_png
    from .volumes.io import load_volume

    volume = load_volume(args.input)
    stored, _ = read_label_array(args.labels)
    if tuple(stored.shape) != volume.original_shape:
        raise ValueError(
            f"{args.labels}: shape {stored.shape} differs from {args.input} {volume.original_shape}"
        )
    labels = volume.to_canonical(stored)
    if args.slice is None:
        index = int(np.argmax((labels > 0).reshape(labels.shape[0], -1).sum(1)))
    else:
        index = _pick_slice(volume.hu.shape[0], args.slice, args.input)
    names = args.names
    image = overlay_image(
        volume.hu[index], labels[index], names, window=args.window, spacing_yx=volume.spacing[1:]
    )
    save_png(image, args.output)
    print(f"wrote {args.output} (slice {index})")
    return 0


# -- demo ----------------------------------------------------------------------------------------------------
def _add_demo(sub) -> None:
    p = sub.add_parser("demo", help="offline end-to-end demo on synthetic CT (no downloads)")
    p.add_argument("-o", "--output", default="meddinov3-demo", help="output folder")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=None, help="fine-tuning steps (default: the demo's own)")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=_run_demo)


def _run_demo(args) -> int:
    from .demo import run_demo

    result = run_demo(args.output, seed=args.seed, steps=args.steps, quiet=args.quiet)
    return 0 if result["passed"] else 1


# -- delegated subcommands ---------------------------------------------------------------------------------
def _add_delegated(sub) -> None:
    from .data import ct3m

    p = sub.add_parser("build-ct3m", help="build a CT-3M-style slice dataset from CT volumes")
    ct3m.add_build_ct3m_arguments(p)
    p.set_defaults(func=ct3m.run_build_ct3m)

    p = sub.add_parser(
        "finetune", help="fine-tune on an nnU-Net-format dataset (Trainer flags apply)", add_help=False
    )
    p.set_defaults(func=None, passthrough="finetune")
    p = sub.add_parser("pretrain", help="domain-adaptive pretraining (see training/configs)", add_help=False)
    p.set_defaults(func=None, passthrough="pretrain")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="meddinov3", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    _add_convert(sub)
    _add_segment(sub)
    _add_evaluate(sub)
    _add_pictures(sub)
    _add_demo(sub)
    _add_delegated(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "finetune":
        from .finetuning import run_finetune

        return run_finetune(argv[1:])
    if argv and argv[0] == "pretrain":
        from .pretraining.loop import add_pretrain_arguments, run_pretrain

        parser = argparse.ArgumentParser(prog="meddinov3 pretrain", description="domain-adaptive pretraining")
        add_pretrain_arguments(parser)
        # Intermixed: dotted `section.key=value` overrides may come before or after options.
        return run_pretrain(parser.parse_intermixed_args(argv[1:]))
    args = build_parser().parse_args(argv)
    warnings.simplefilter("default")
    try:
        return int(args.func(args) or 0)
    except (ValueError, OSError, KeyError) as err:
        message = err.args[0] if isinstance(err, KeyError) and err.args else err
        print(f"error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
