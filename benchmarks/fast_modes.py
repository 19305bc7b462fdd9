"""Time and Dice of `meddinov3 segment`'s fast and subset modes against the default, on the demo's held-out volume.

Run the demo first (`meddinov3 demo -o meddinov3-demo`), then:

    python benchmarks/fast_modes.py --demo meddinov3-demo [--repeats 5]

Prints a Markdown table: median wall seconds of segmentation (model loaded once per mode, volume read once),
the ratio to the default, and mean Dice over liver/kidney/spleen against the held-out reference.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

import numpy as np


def _dice(pred: np.ndarray, ref: np.ndarray, labels: list[int]) -> float:
    scores = []
    for k in labels:
        a, b = pred == k, ref == k
        denominator = a.sum() + b.sum()
        scores.append(2 * np.logical_and(a, b).sum() / denominator if denominator else 1.0)
    return float(np.mean(scores))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--demo", default="meddinov3-demo", help="output folder of `meddinov3 demo`")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--wide", action="store_true", help="embed the volume in a 2× wider field of view")
    args = parser.parse_args()

    import torch  # after meddinov3_hf, which sets OMP_WAIT_POLICY before torch loads

    from meddinov3_hf.volumes.io import load_volume
    from meddinov3_hf.volumes.labels import load_labels
    from meddinov3_hf.volumes.predictor import PredictOptions, apply_roi_subset, build_predictor

    demo = Path(args.demo)
    volume = load_volume(demo / "heldout" / "heldout_0000.nii.gz")
    reference = load_labels(demo / "heldout" / "heldout_labels.nii.gz", volume)
    if args.wide:  # the same body in a 2× wider field of view (air around it), as on many clinical scans
        depth, height, width = volume.hu.shape
        hu = np.full((depth, 2 * height, 2 * width), -1000, np.float32)
        labels = np.zeros(hu.shape, reference.dtype)
        hu[:, height // 2 : height // 2 + height, width // 2 : width // 2 + width] = volume.hu
        labels[:, height // 2 : height // 2 + height, width // 2 : width // 2 + width] = reference
        volume, reference = load_volume(hu, spacing=volume.spacing), labels
    modes = {
        "default (step 0.5)": None,
        "--step-size 0.25": PredictOptions(step=0.25),
        "--step-size 1.0": PredictOptions(step=1.0),
        "--spacing 3": PredictOptions(spacing_mm=3.0),
        "--body-crop": PredictOptions(body_crop=True),
        "--roi-subset liver": PredictOptions(roi_subset=["liver"]),
    }
    print(f"demo volume {volume.hu.shape} (Z, Y, X) at {volume.spacing} mm; torch threads {torch.get_num_threads()}; "
          f"load average {os.getloadavg()[0]:.2f}")  # fmt: skip
    print(f"\n| mode | seconds (median of {args.repeats}) | × default | mean Dice (liver, kidney, spleen) |")
    print("|---|---|---|---|")
    runs = {}
    for name, options in modes.items():
        segmenter, names = build_predictor(demo / "model", "cpu", 8, False, options)
        keep = None
        if options is not None and options.roi_subset:
            keep = {k: v for k, v in names.items() if v in options.roi_subset}
        scored = sorted(keep) if keep else [k for k in names if k != 0]
        runs[name] = {"segmenter": segmenter, "keep": keep, "scored": scored, "times": [], "labels": None}
    for _ in range(args.repeats):  # modes interleaved, so that a change in machine load hits all of them
        for run in runs.values():
            start = time.perf_counter()
            run["labels"] = apply_roi_subset(run["segmenter"].segment(volume).labels, run["keep"])
            run["times"].append(time.perf_counter() - start)
    baseline = None
    for name, run in runs.items():
        seconds = statistics.median(run["times"])
        baseline = baseline or seconds
        dice = _dice(run["labels"], reference, run["scored"])
        what = "liver only" if run["keep"] else "mean"
        print(f"| {name} | {seconds:.3f} | {seconds / baseline:.2f} | {dice:.3f} ({what}) |")


if __name__ == "__main__":
    main()
