"""`meddinov3 convert`: a MedDINOv3 / DINOv3 / nnU-Net checkpoint → a model folder (optionally pushed)."""

from __future__ import annotations

import json
from pathlib import Path

from .common import int_list, labels_arg

__all__ = ["add_convert"]


def add_convert(sub) -> None:
    p = sub.add_parser("convert", help="convert a MedDINOv3 / DINOv3 / nnU-Net checkpoint to a model folder")
    p.add_argument(
        "source",
        help="checkpoint file (.pth), transformers DINOv3 folder, or a Hub repo id (OWNER/NAME, e.g. "
        "ricklisz123/MedDINOv3-ViTB-16-CT-3M or facebook/dinov3-vitb16-pretrain-lvd1689m), downloaded through "
        "huggingface_hub's cache",
    )
    p.add_argument("--revision", default=None, help="Hub source: branch, tag or commit (default: main)")
    p.add_argument(
        "--filename",
        default=None,
        help="Hub source: the checkpoint file (default: config.json layout or model.pth)",
    )
    p.add_argument(
        "--push-to-hub",
        default=None,
        metavar="ORG/NAME",
        help="publish the converted folder (weights, config, processor, model card, model code) to this Hub repo",
    )
    p.add_argument("--private", action="store_true", help="with --push-to-hub: create the repo private")
    p.add_argument("output", help="output folder")
    p.add_argument(
        "--format",
        choices=["meddinov3", "dinov3", "transformers", "nnunet"],
        default=None,
        help="source format (default: detected)",
    )
    p.add_argument(
        "--blocks",
        type=int_list,
        default=None,
        help="aggregated blocks (0-based; default: 4 evenly spaced, 2,5,8,11 for 12 blocks)",
    )
    p.add_argument(
        "--rope-precision",
        choices=["bf16", "fp32"],
        default=None,
        help="RoPE numerics (default: bf16 for reference-code checkpoints, fp32 for transformers ones)",
    )
    p.add_argument("--layer-norm-eps", type=float, default=None)
    p.add_argument("--labels", type=labels_arg, default=None, help="ID=NAME,... or a dataset.json (nnU-Net)")
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="guard: an existing non-empty OUT is refused unless given; then only the files convert writes "
        "are replaced. OUT may never be or contain the source or the current directory",
    )
    p.add_argument(
        "--plans",
        default=None,
        help="nnU-Net plans.json giving the working spacing and patch size (its 2d configuration; default: the "
        "plans in the checkpoint, or plans.json next to --labels dataset.json or the checkpoint)",
    )
    p.add_argument(
        "--target-spacing",
        type=lambda t: [float(v) for v in t.split(",")],
        default=None,
        help="in-plane working spacing in mm, MM or ROW,COL (overrides the plans)",
    )
    p.add_argument(
        "--native-resolution",
        action="store_true",
        help="guard: a segmentation model with no working spacing is refused unless given (it then segments "
        "every scan at its own resolution)",
    )
    p.set_defaults(func=_run_convert)


def _find_nnunet_plans(args) -> Path | None:
    """--plans, else nnU-Net's plans.json beside the --labels dataset.json or the checkpoint (its folder or the
    one above: `nnUNetTrainer__nnUNetPlans__2d/fold_0/checkpoint_final.pth`)."""
    if args.plans is not None:
        if not Path(args.plans).is_file():
            raise FileNotFoundError(f"{args.plans}: --plans file not found")
        return Path(args.plans)
    folders = [args.labels.path.parent] if getattr(args.labels, "path", None) is not None else []
    source = Path(args.source)
    if source.is_file():
        folders += [source.parent, source.parent.parent]
    return next((f / "plans.json" for f in folders if (f / "plans.json").is_file()), None)


def _run_convert(args) -> int:
    from ..convert import convert_checkpoint
    from ..hub import download_checkpoint, is_hub_repo_id, push_converted_folder

    source, hub_source = args.source, None
    if is_hub_repo_id(args.source):
        from ..files import check_output_path

        # Refuse a bad OUT before a download of hundreds of MB.
        check_output_path(args.output, [], kind="folder", overwrite=args.overwrite, option="OUT")
        hub_source = download_checkpoint(args.source, revision=args.revision, filename=args.filename)
        source = hub_source.path
    elif args.revision or args.filename:
        raise ValueError(f"{args.source}: --revision/--filename apply to a Hub repo id, not a local path")
    result = convert_checkpoint(
        source,
        args.output,
        source_note=hub_source.describe() if hub_source else None,
        model_name=args.push_to_hub,
        source_format=args.format,
        aggregation_layers=args.blocks,
        rope_precision=args.rope_precision,
        layer_norm_eps=args.layer_norm_eps,
        id2label=args.labels,
        overwrite=args.overwrite,
        plans=_find_nnunet_plans(args),
        target_spacing=args.target_spacing,
        native_resolution=args.native_resolution,
    )
    from ..heads import is_segmentation_config

    kind = "segmentation model" if is_segmentation_config(result.config) else "backbone"
    if kind == "segmentation model":
        spacing = json.loads((Path(result.output_dir) / "preprocessor_config.json").read_text())
        spacing = spacing.get("target_spacing")
        kind += f", working spacing {spacing} mm" if spacing else ", native resolution (no working spacing)"
    heads = len(result.pretraining_head_keys)
    print(
        f"converted {args.source} ({result.source_format}) → {result.output_dir} [{kind}, "
        f"RoPE {result.config.rope_precision}"
        + (f", {heads} pretraining-head tensors kept in pretraining_heads.safetensors" if heads else "")
        + "]"
    )
    if args.push_to_hub:
        url = push_converted_folder(
            result.output_dir, args.push_to_hub, source=hub_source, private=args.private
        )
        print(f"pushed {result.output_dir} → {args.push_to_hub} ({url})")
    return 0
