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


def demo_threads() -> int:
    """torch intra-op threads for the demo: `OMP_NUM_THREADS` when set, else torch's default (the usable cores).

    Importing `meddinov3_hf` first sets `OMP_WAIT_POLICY=PASSIVE` (see its `__init__`): on a busy machine
    OpenMP's spinning at barriers, not the thread count itself, is where the CPU time went."""
    import torch

    if os.environ.get("OMP_NUM_THREADS", "").strip().isdigit():
        return max(1, int(os.environ["OMP_NUM_THREADS"]))
    return torch.get_num_threads()


def _cpu_seconds() -> float:
    """CPU time of this process (all threads) and of its finished children, user + system."""
    import resource

    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def run_demo(
    output_dir: str | os.PathLike,
    seed: int = 0,
    steps: int | None = None,
    quiet: bool = False,
    threads: int | None = None,
) -> dict[str, Any]:
    """Run the demo; returns {"passed", "mean_dice", "metrics", "seconds", "cpu_seconds", "threads", ...}.

    `threads`: torch intra-op threads for the run (default: :func:`demo_threads`); restored afterwards. The
    wall-clock and CPU seconds (user + system, all threads) are printed and returned."""
    import torch

    previous_threads = torch.get_num_threads()
    threads = demo_threads() if threads is None else int(threads)
    if threads < 1:
        raise ValueError(f"--threads must be ≥ 1, got {threads}")
    torch.set_num_threads(threads)
    try:
        return _run_demo(output_dir, seed, steps, quiet, threads)
    finally:
        torch.set_num_threads(previous_threads)


class _Stages:
    """Wall-clock seconds per demo stage, and the run's wall-clock and CPU totals."""

    def __init__(self):
        self.start, self.cpu_start = time.perf_counter(), _cpu_seconds()
        self.seconds: dict[str, float] = {}
        self._last = self.start

    def done(self, name: str) -> None:
        now = time.perf_counter()
        self.seconds[name], self._last = now - self._last, now

    def totals(self) -> tuple[float, float]:
        return time.perf_counter() - self.start, _cpu_seconds() - self.cpu_start


def _run_demo(
    output_dir: str | os.PathLike, seed: int, steps: int | None, quiet: bool, threads: int
) -> dict[str, Any]:
    import torch

    from .data.synthetic import synthetic_label_map

    stages = _Stages()
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    steps = DEMO_STEPS if steps is None else steps
    id2label = {v: k for k, v in synthetic_label_map().items()}

    _log(
        quiet, f"[1/4] synthetic CT: {DEMO_CASES} training volumes {DEMO_SHAPE} + 1 held-out → {out / 'data'}"
    )
    dataset, scan_path, labels = _write_data(out, seed)
    stages.done("data")
    _log(
        quiet,
        f"[2/4] fine-tuning a small MedDINOv3 for {steps} steps (Trainer, CPU, {threads} torch thread(s))",
    )
    model_dir = _finetune(out, dataset, id2label, steps, seed, quiet)
    stages.done("fine-tuning")
    _log(quiet, "[3/4] segmenting the held-out volume (NIfTI → NIfTI)")
    prediction = _segment(scan_path, model_dir, out / "heldout_prediction.nii.gz", quiet)
    stages.done("segmentation")
    _log(quiet, "[4/4] scoring and drawing")
    per_class = _score_and_draw(out, scan_path, prediction, labels, id2label)
    stages.done("scoring")

    mean_dice = float(per_class["mean"]["dice"])
    seconds, cpu_seconds = stages.totals()
    if not quiet:
        _print_results(per_class, mean_dice, seconds, cpu_seconds, threads, load, stages.seconds)
        print(
            f"outputs: {prediction}, {out / 'heldout_overlay.png'}, {out / 'metrics.json'}, model in {model_dir}"
        )
    summary = {
        "passed": mean_dice >= PASS_DICE,
        "mean_dice": mean_dice,
        "seconds": seconds,
        "cpu_seconds": cpu_seconds,
        "threads": threads,
        "load_average_at_start": load,
        "stage_seconds": stages.seconds,
        "metrics": str(out / "metrics.json"),
        "prediction": str(prediction),
        "overlay": str(out / "heldout_overlay.png"),
        "model": str(model_dir),
    }
    (out / "demo_summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def _write_data(out: Path, seed: int) -> tuple[Path, Path, np.ndarray]:
    """The training dataset and the held-out scan with its labels → (dataset folder, scan path, labels)."""
    from .data.synthetic import make_synthetic_ct, write_nnunet_dataset
    from .volumes.io import load_volume, save_labels, save_volume

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
    scan_path = out / "heldout" / "heldout_0000.nii.gz"
    save_volume(held_out.hu, held_out, scan_path)
    save_labels(labels, held_out, out / "heldout" / "heldout_labels.nii.gz")
    return dataset, scan_path, labels


def _finetune(out: Path, dataset: Path, id2label: dict[int, str], steps: int, seed: int, quiet: bool) -> Path:
    """A random small MedDINOv3 backbone fine-tuned with `meddinov3 finetune` → the model folder."""
    from .configuration_meddinov3 import MedDINOv3Config
    from .finetuning import run_finetune
    from .image_processing_meddinov3 import MedDINOv3ImageProcessor
    from .modeling_meddinov3 import MedDINOv3Model

    init = out / "init-backbone"
    MedDINOv3Model(MedDINOv3Config(**DEMO_MODEL, id2label=id2label)).save_pretrained(init)
    MedDINOv3ImageProcessor().save_pretrained(init)
    model_dir = out / "model"
    flags = {
        "--dataset": dataset,
        "--model": init,
        "--output_dir": model_dir,
        "--fold": 0,
        "--patch_size": 96,
        "--target_spacing": DEMO_SPACING[1],
        "--max_steps": steps,
        "--per_device_train_batch_size": 8,
        "--learning_rate": "2e-3",
        "--backbone_learning_rate": "1e-3",
        "--warmup_steps": 0,
        "--drop_path_rate": "0.0",
        "--seed": seed,
        "--report_to": "none",
        "--save_strategy": "no",
        "--eval_strategy": "no",
        "--logging_steps": max(1, steps // 10),
        "--volume_eval_during_training": "false",
        "--dataloader_num_workers": 0,
        "--slice_cache_dir": out / "cache",
        "--model_name": "meddinov3-demo",
        "--disable_tqdm": "true" if quiet else "false",
    }
    code = run_finetune([str(item) for flag in flags.items() for item in flag])
    if code != 0:
        raise RuntimeError(f"fine-tuning failed with exit code {code}")
    return model_dir


def _segment(scan_path: Path, model_dir: Path, prediction: Path, quiet: bool) -> Path:
    """Segment the held-out scan with the volume pipeline (NIfTI → NIfTI)."""
    from .volumes.inference import plan_jobs, run_jobs

    errors = run_jobs(
        plan_jobs(scan_path, prediction), model_dir, device="cpu", batch_size=8, progress=not quiet
    )
    if errors:
        raise RuntimeError("; ".join(errors))
    return prediction


def _score_and_draw(
    out: Path, scan_path: Path, prediction: Path, labels: np.ndarray, id2label: dict[int, str]
) -> dict[str, Any]:
    """Dice/HD95/NSD → metrics.json/.csv, the overlay PNG of the most labelled slice; the per-class means."""
    from .visualize import overlay_image, save_png
    from .volumes.evaluation import evaluate_folders, write_metrics
    from .volumes.io import load_volume
    from .volumes.labels import load_labels

    results = evaluate_folders(prediction, out / "heldout" / "heldout_labels.nii.gz", labels=id2label)
    write_metrics(results, out / "metrics.json", out / "metrics.csv")
    predicted = load_volume(scan_path)
    pred_labels = load_labels(prediction, predicted)
    index = int(np.argmax((labels > 0).reshape(labels.shape[0], -1).sum(1)))
    overlay = overlay_image(predicted.hu[index], pred_labels[index], id2label, spacing_yx=DEMO_SPACING[1:])
    save_png(overlay, out / "heldout_overlay.png")
    return results["mean"]


def _print_results(
    per_class: dict[str, Any],
    mean_dice: float,
    seconds: float,
    cpu_seconds: float,
    threads: int,
    load: float,
    stages: dict[str, float],
) -> None:
    print("\nHeld-out volume (Dice / HD95 mm / NSD@1mm):")
    for name, values in per_class.items():
        if name != "mean":
            print(f"  {name:>10}: {values['dice']:.3f} / {values['hd95']:.2f} / {values['nsd']:.3f}")
    verdict = "PASS" if mean_dice >= PASS_DICE else "FAIL"
    print(f"  mean Dice {mean_dice:.3f} (≥ {PASS_DICE} expected): {verdict}")
    print(
        f"time: {seconds:.0f} s wall-clock, {cpu_seconds:.0f} s CPU ({threads} torch thread(s), load average "
        f"{load:.2f} at start; " + ", ".join(f"{k} {v:.0f} s" for k, v in stages.items()) + ")"
    )
