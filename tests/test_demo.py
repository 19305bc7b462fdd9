"""The README's first command: `meddinov3 demo` end to end, offline, on two CPU cores."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import nibabel as nib
import numpy as np


def test_demo_runs_offline_and_reaches_the_dice_target(tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", CUDA_VISIBLE_DEVICES="")
    out = tmp_path / "demo"
    result = subprocess.run(
        [sys.executable, "-m", "meddinov3_hf.cli", "demo", "-o", str(out), "--quiet"],
        capture_output=True, text=True, env=env, timeout=900,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    summary = json.loads((out / "demo_summary.json").read_text())
    assert summary["passed"] and summary["mean_dice"] >= 0.8
    assert summary["seconds"] > 0 and summary["cpu_seconds"] > 0 and summary["threads"] >= 1  # printed too
    metrics = json.loads((out / "metrics.json").read_text())
    assert {"liver", "kidney", "spleen"} <= set(metrics["mean"])
    scan = nib.load(out / "heldout" / "heldout_0000.nii.gz")
    labels = nib.load(out / "heldout_prediction.nii.gz")
    assert labels.shape == scan.shape and np.allclose(labels.affine, scan.affine)
    assert labels.get_data_dtype() == np.uint8
    assert (out / "heldout_overlay.png").stat().st_size > 0
    assert (out / "model" / "model.safetensors").is_file() and (out / "model" / "README.md").is_file()
