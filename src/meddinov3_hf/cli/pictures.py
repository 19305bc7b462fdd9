"""`meddinov3 features` (PCA of dense features) and `meddinov3 overlay` (labels drawn on a slice): PNGs."""

from __future__ import annotations

from .common import add_series, check_devices, labels_arg

__all__ = ["add_pictures"]


def add_pictures(sub) -> None:
    p = sub.add_parser("features", help="PCA of dense features of one slice as an RGB picture")
    p.add_argument("-i", "--input", required=True, help="NIfTI file or DICOM folder")
    p.add_argument("--model", required=True, help="backbone or segmentation model folder")
    p.add_argument("-o", "--output", required=True, help="PNG path (guard: not inside an input folder)")
    p.add_argument("--slice", type=int, default=None, help="axial slice index (default: the middle)")
    p.add_argument("--size", type=int, default=896, help="input resolution (multiple of 16)")
    p.add_argument("--layer", type=int, default=None, help="0-based block (default: the last)")
    p.add_argument("--window", default="abdomen")
    p.add_argument("--device", default="cpu")
    add_series(p)
    p.set_defaults(func=_run_features)

    p = sub.add_parser("overlay", help="a label volume drawn on one CT slice (PNG)")
    p.add_argument("-i", "--input", required=True, help="CT NIfTI file or DICOM folder")
    p.add_argument("--labels", required=True, help="label NIfTI on the same grid")
    p.add_argument("-o", "--output", required=True, help="PNG path (guard: not inside an input folder)")
    p.add_argument("--slice", type=int, default=None, help="axial slice (default: most labelled voxels)")
    p.add_argument("--window", default="abdomen")
    p.add_argument(
        "--names",
        type=labels_arg,
        default=None,
        help="ID=NAME,..., dataset.json, or a model folder / its config.json (id2label)",
    )
    add_series(p)
    p.set_defaults(func=_run_overlay)


def _pick_slice(volume_depth: int, index: int | None, path: str) -> int:
    index = volume_depth // 2 if index is None else index
    if not 0 <= index < volume_depth:
        raise ValueError(f"{path}: slice {index} outside [0, {volume_depth - 1}]")
    return index


def _run_features(args) -> int:
    from transformers import AutoModel

    from ..files import check_output_path
    from ..image_processing_meddinov3 import MedDINOv3ImageProcessor
    from ..visualize import feature_pca_image, save_png
    from ..volumes.inference import from_pretrained_or_explain
    from ..volumes.io import load_volume

    check_output_path(args.output, [args.input, args.model], suffixes=(".png",), overwrite=True, option="-o")
    device = check_devices(args.device)[0]
    volume = load_volume(args.input, series=args.series)
    index = _pick_slice(volume.hu.shape[0], args.slice, args.input)
    model = from_pretrained_or_explain(AutoModel, args.model).to(device).eval()
    processor = from_pretrained_or_explain(MedDINOv3ImageProcessor, args.model)
    image = feature_pca_image(
        model, processor, volume.hu[index], size=args.size, layer=args.layer, window=args.window
    )
    save_png(image, args.output)
    print(f"wrote {args.output} (slice {index})")
    return 0


def _run_overlay(args) -> int:
    import numpy as np

    from ..files import check_output_path
    from ..visualize import overlay_image, save_png
    from ..volumes.io import load_volume
    from ..volumes.labels import load_labels

    inputs = [args.input, args.labels, getattr(args.names, "path", None)]
    check_output_path(args.output, inputs, suffixes=(".png",), overwrite=True, option="-o")
    volume = load_volume(args.input, series=args.series)
    labels = load_labels(args.labels, volume, str(args.input))
    if args.slice is None:
        index = int(np.argmax((labels > 0).reshape(labels.shape[0], -1).sum(1)))
    else:
        index = _pick_slice(volume.hu.shape[0], args.slice, args.input)
    names = args.names
    if names is None:  # names carried in the label map's header extension (ours or TotalSegmentator's)
        from ..volumes.labels import read_nifti_label_names

        names = read_nifti_label_names(args.labels)
    from ..image_processing_meddinov3 import resolve_window

    # Canonical axial slices are radiological: anterior up, patient right on the picture's left.
    depth, rows, cols = volume.hu.shape
    z_mm = float((volume.canonical_affine @ np.array([(cols - 1) / 2, (rows - 1) / 2, index, 1.0]))[2])
    low, high = resolve_window(args.window)
    caption = (
        f"slice {index}/{depth - 1}  z {z_mm:+.1f} mm  window {args.window} "
        f"(L {(low + high) / 2:g} W {high - low:g})"
    )
    image = overlay_image(
        volume.hu[index],
        labels[index],
        names,
        window=args.window,
        spacing_yx=volume.spacing[1:],
        orientation=("A", "P", "R", "L"),
        caption=caption,
    )
    save_png(image, args.output)
    print(f"wrote {args.output} (slice {index})")
    return 0
