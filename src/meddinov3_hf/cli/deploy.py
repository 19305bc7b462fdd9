"""`meddinov3 export` (ONNX), `meddinov3 app` (the browser app) and `meddinov3 push` (a fine-tuned model
to the Hub)."""

from __future__ import annotations

import warnings
from pathlib import Path

from .common import options

__all__ = ["add_export_and_app", "add_push"]


def add_export_and_app(sub) -> None:
    p = sub.add_parser("export", help="export a segmentation model to ONNX, checked with onnxruntime")
    p.add_argument("--format", choices=["onnx"], default="onnx")
    p.add_argument("model", help="segmentation model folder")
    p.add_argument("output", help="OUT.onnx")
    p.add_argument("--height", type=int, default=None, help="traced height (default: the processor's size)")
    p.add_argument("--width", type=int, default=None, help="traced width (default: the processor's size)")
    p.add_argument("--batch-size", type=int, default=1, help="traced batch size (fixed graphs)")
    p.add_argument(
        "--dynamic", action="store_true", help="dynamic batch, height and width (multiples of the patch)"
    )
    p.add_argument("--opset", type=int, default=18)
    p.add_argument("--tolerance", type=float, default=1e-4, help="max abs logits difference accepted")
    p.add_argument("--overwrite", action="store_true", help="replace an existing OUT.onnx")
    p.set_defaults(func=_run_export)

    p = sub.add_parser(
        "app", help="the interactive segmentation app in the browser (Gradio; the [app] extra)"
    )
    p.add_argument("--model", required=True, help="segmentation model folder")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=7860)
    p.add_argument("--device", default="cpu")
    p.add_argument("--share", action="store_true", help="a public gradio.live link (needs the network)")
    p.set_defaults(func=_run_app)


def _run_export(args) -> int:
    from ..export import export_onnx

    names = ("height", "width", "batch_size", "dynamic", "opset", "tolerance", "overwrite")
    result = export_onnx(args.model, args.output, **options(args, names))
    shapes = ", ".join("×".join(map(str, s)) for s in result.checked_shapes)
    print(
        f"exported {args.model} → {result.path} (input {tuple(result.input_shape)}); onnxruntime vs PyTorch "
        f"max abs logits {result.max_abs_diff:.2e} on {shapes}"
    )
    return 0


def _run_app(args) -> int:
    from ..app import launch_app

    warnings.simplefilter("ignore", ResourceWarning)  # gradio's event loops, not the user's problem
    launch_app(args.model, host=args.host, port=args.port, device=args.device, share=args.share)
    return 0


def add_push(sub) -> None:
    p = sub.add_parser(
        "push", help="push a fine-tuned model folder to the Hub (e.g. to retry finetune --push_to_hub)"
    )
    p.add_argument("folder", help="fine-tuned model folder (finetune's --output_dir)")
    p.add_argument("repo_id", help="Hub repo id, ORG/NAME")
    p.add_argument("--token", default=None, help="Hub token (default: the logged-in one)")
    p.add_argument("--private", action="store_true", help="create the repository as private")
    p.set_defaults(func=_run_push)


def _run_push(args) -> int:
    from ..finetuning.hub import model_files_to_push, push_finetuned_model
    from ..finetuning.preflight import check_hub_push

    if not Path(args.folder).is_dir():
        raise FileNotFoundError(f"{args.folder}: no such model folder")
    files = model_files_to_push(args.folder)  # refuses a folder without weights, config, processor, card
    check_hub_push(args.repo_id, token=args.token, option="push")
    push_finetuned_model(args.folder, args.repo_id, token=args.token, private=args.private or None)
    print(f"pushed {len(files)} file(s) of {args.folder} → https://huggingface.co/{args.repo_id}")
    return 0
