"""`meddinov3 demo`: the whole path offline, on synthetic CT, in a few minutes on two CPU cores.

1. writes a small labelled nnU-Net-format dataset of synthetic abdominal CT volumes (plus a held-out case),
2. fine-tunes a small randomly initialised MedDINOv3 on it with the package's Trainer path,
3. segments the held-out volume NIfTI → NIfTI with the volume pipeline,
4. scores it (Dice, HD95, NSD), draws an overlay, and writes everything to the output folder.

No weights or data are downloaded: the model is small and starts from random weights, so the demo shows the
machinery (and that it learns), not the pretrained model's accuracy.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import numpy as np

# Small enough to train in minutes on two CPU cores, still a real MedDINOv3 (RoPE ViT + aggregation decoder).
DEMO_MODEL = dict(
    hidden_size=96,
    num_hidden_layers=4,
    num_attention_heads=4,
    intermediate_size=192,
    aggregation_layers=[0, 1, 2, 3],
    decoder_hidden_sizes=[96, 64, 32],
    layerscale_value=0.1,
    patch_size=8,
    image_size=96,
)
DEMO_SHAPE = (20, 96, 96)  # (Z, Y, X) voxels
DEMO_SPACING = (3.0, 1.5, 1.5)  # mm
DEMO_CASES = 10
DEMO_STEPS = 800
PASS_DICE = 0.8


def _log(quiet: bool, message: str) -> None:
    if not quiet:
        print(message, flush=True)


def run_demo(
    output_dir: str | os.PathLike, seed: int = 0, steps: int | None = None, quiet: bool = False
) -> dict[str, Any]:
    """Run the demo; returns {"passed", "mean_dice", "metrics", "paths", "seconds"}."""
    import torch

    from .configuration_meddinov3 import MedDINOv3Config
    from .data.synthetic import make_synthetic_ct, synthetic_label_map, write_nnunet_dataset
    from .finetuning import run_finetune
    from .image_processing_meddinov3 import MedDINOv3ImageProcessor
    from .metrics import evaluate_folders, write_metrics
    from .modeling_meddinov3 import MedDINOv3Model
    from .visualize import overlay_image, save_png
    from .volumes.inference import plan_jobs, run_jobs
    from .volumes.io import load_volume, save_labels

    start = time.perf_counter()
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    steps = DEMO_STEPS if steps is None else steps

    _log(
        quiet, f"[1/4] synthetic CT: {DEMO_CASES} training volumes {DEMO_SHAPE} + 1 held-out → {out / 'data'}"
    )
    dataset = write_nnunet_dataset(
        out / "data" / "Dataset001_SyntheticCT",
        n_cases=DEMO_CASES,
        shape=DEMO_SHAPE,
        spacing=DEMO_SPACING,
        seed=seed,
    )
    hu, labels = make_synthetic_ct(DEMO_SHAPE, DEMO_SPACING, seed=seed * 1000 + 999)
    held_out = load_volume(hu.astype(np.float32), spacing=DEMO_SPACING)
    (out / "heldout").mkdir(exist_ok=True)
    from .volumes.io import save_volume

    scan_path = out / "heldout" / "heldout_0000.nii.gz"
    save_volume(held_out.hu, held_out, scan_path)
    save_labels(labels, held_out, out / "heldout" / "heldout_labels.nii.gz")

    _log(quiet, f"[2/4] fine-tuning a small MedDINOv3 for {steps} steps (Trainer, CPU)")
    label_map = synthetic_label_map()
    init = out / "init-backbone"
    config = MedDINOv3Config(**DEMO_MODEL, id2label={v: k for k, v in label_map.items()})
    MedDINOv3Model(config).save_pretrained(init)
    MedDINOv3ImageProcessor().save_pretrained(init)
    model_dir = out / "model"
    argv = [
        "--dataset",
        str(dataset),
        "--model",
        str(init),
        "--output_dir",
        str(model_dir),
        "--fold",
        "0",
        "--patch_size",
        "96",
        "--target_spacing",
        str(DEMO_SPACING[1]),
        "--max_steps",
        str(steps),
        "--per_device_train_batch_size",
        "8",
        "--learning_rate",
        "2e-3",
        "--backbone_learning_rate",
        "1e-3",
        "--warmup_steps",
        "0",
        "--drop_path_rate",
        "0.0",
        "--seed",
        str(seed),
        "--report_to",
        "none",
        "--save_strategy",
        "no",
        "--eval_strategy",
        "no",
        "--logging_steps",
        str(max(1, steps // 10)),
        "--volume_eval_during_training",
        "false",
        "--dataloader_num_workers",
        "0",
        "--slice_cache_dir",
        str(out / "cache"),
        "--model_name",
        "meddinov3-demo",
        "--disable_tqdm",
        "true" if quiet else "false",
    ]
    code = run_finetune(argv)
    if code != 0:
        raise RuntimeError(f"fine-tuning failed with exit code {code}")

    _log(quiet, "[3/4] segmenting the held-out volume (NIfTI → NIfTI)")
    prediction = out / "heldout_prediction.nii.gz"
    errors = run_jobs(
        plan_jobs(scan_path, prediction), model_dir, device="cpu", batch_size=8, progress=not quiet
    )
    if errors:
        raise RuntimeError("; ".join(errors))

    _log(quiet, "[4/4] scoring and drawing")
    id2label = {v: k for k, v in label_map.items()}
    results = evaluate_folders(prediction, out / "heldout" / "heldout_labels.nii.gz", labels=id2label)
    write_metrics(results, out / "metrics.json", out / "metrics.csv")
    predicted = load_volume(scan_path)
    from .data.nnunet import read_label_array

    pred_labels = predicted.to_canonical(read_label_array(prediction)[0])
    index = int(np.argmax((labels > 0).reshape(labels.shape[0], -1).sum(1)))
    overlay = overlay_image(predicted.hu[index], pred_labels[index], id2label, spacing_yx=DEMO_SPACING[1:])
    save_png(overlay, out / "heldout_overlay.png")

    per_class = results["mean"]
    mean_dice = float(per_class["mean"]["dice"])
    seconds = time.perf_counter() - start
    if not quiet:
        print("\nHeld-out volume (Dice / HD95 mm / NSD@1mm):")
        for name, values in per_class.items():
            if name != "mean":
                print(f"  {name:>10}: {values['dice']:.3f} / {values['hd95']:.2f} / {values['nsd']:.3f}")
        verdict = "PASS" if mean_dice >= PASS_DICE else "FAIL"
        print(f"  mean Dice {mean_dice:.3f} (≥ {PASS_DICE} expected): {verdict}   [{seconds:.0f} s]")
        print(
            f"outputs: {prediction}, {out / 'heldout_overlay.png'}, {out / 'metrics.json'}, model in {model_dir}"
        )
    summary = {
        "passed": mean_dice >= PASS_DICE,
        "mean_dice": mean_dice,
        "seconds": seconds,
        "metrics": str(out / "metrics.json"),
        "prediction": str(prediction),
        "overlay": str(out / "heldout_overlay.png"),
        "model": str(model_dir),
    }
    (out / "demo_summary.json").write_text(json.dumps(summary, indent=2))
    return summary
