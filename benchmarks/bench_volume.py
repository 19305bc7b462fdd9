"""Seconds per CT volume: the package's volume path vs a straightforward slice-by-slice loop, same model.

GPU: ViT-B/16 MedDINOv3 segmentation net, a 512×512×300 synthetic CT at 0.78 mm resampled to the 896 working
resolution (0.4464 mm), bf16; with and without mirroring TTA; I/O (NIfTI read + label write) included.
CPU: a tiny config on a 128×128×24 volume (the ratio is what to look at).

Baseline: for each slice, resample to the working grid, normalise, run the model at batch 1, resample the
logits back and argmax — what a first implementation does.

    python benchmarks/bench_volume.py [--slices N]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
import torch.nn.functional as F

from meddinov3_hf import MedDINOv3Config, MedDINOv3ForSemanticSegmentation, MedDINOv3ImageProcessor
from meddinov3_hf.data.synthetic import make_synthetic_ct
from meddinov3_hf.volumes.inference import plan_jobs, run_jobs
from meddinov3_hf.volumes.io import load_volume, save_labels


@torch.inference_mode()
def baseline_segment(model, processor, path: Path, output: Path, device, dtype) -> None:
    volume = load_volume(path)
    _, height, width = volume.hu.shape
    target = processor.target_spacing
    size = (round(height * volume.spacing[1] / target[0]), round(width * volume.spacing[2] / target[1]))
    size = tuple(max(16, round(s / 16) * 16) for s in size)
    labels = np.zeros(volume.hu.shape, np.uint8)
    for z in range(volume.hu.shape[0]):
        hu = torch.from_numpy(volume.hu[z]).to(device)[None, None]
        x = processor.normalize(F.interpolate(hu, size=size, mode="bilinear", antialias=True))
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            logits = model(pixel_values=x).logits.float()
        logits = F.interpolate(logits, size=(height, width), mode="bilinear")
        labels[z] = logits.argmax(1)[0].cpu().numpy()
    save_labels(labels, volume, output)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--slices", type=int, default=None)
    args = parser.parse_args()
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    if cuda:
        config = MedDINOv3Config(num_labels=16, image_size=896)
        shape, spacing, work = (args.slices or 300, 512, 512), (2.0, 0.78125, 0.78125), 0.78125 * 512 / 896
        dtype, batch = torch.bfloat16, 16
    else:
        config = MedDINOv3Config(
            num_labels=4,
            hidden_size=64,
            num_hidden_layers=4,
            num_attention_heads=4,
            intermediate_size=128,
            aggregation_layers=[0, 1, 2, 3],
            decoder_hidden_sizes=[64, 32, 16, 16],
            image_size=224,
        )
        shape, spacing, work = (args.slices or 24, 128, 128), (2.0, 1.5, 1.5), 1.5 * 128 / 224
        dtype, batch = None, 8
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model_dir = tmp / "model"
        model = MedDINOv3ForSemanticSegmentation(config)
        model.save_pretrained(model_dir)
        processor = MedDINOv3ImageProcessor(target_spacing=[work, work])
        processor.save_pretrained(model_dir)
        hu, _ = make_synthetic_ct(shape, spacing, seed=0)
        affine = np.diag([-spacing[2], -spacing[1], spacing[0], 1.0])
        nib.save(nib.Nifti1Image(np.ascontiguousarray(hu.transpose(2, 1, 0)), affine), tmp / "scan.nii.gz")
        model = model.to(device).eval()
        name = torch.cuda.get_device_name() if cuda else f"CPU ({torch.get_num_threads()} threads)"
        print(
            f"device: {name}; volume {shape[1]}×{shape[2]}×{shape[0]} → working {work:.4f} mm; "
            f"{'bf16' if dtype else 'fp32'}; hidden {config.hidden_size}"
        )

        def timed(fn) -> float:
            fn()  # warm-up (kernels, caches)
            if cuda:
                torch.cuda.synchronize()
            start = time.perf_counter()
            fn()
            if cuda:
                torch.cuda.synchronize()
            return time.perf_counter() - start

        base = timed(
            lambda: baseline_segment(model, processor, tmp / "scan.nii.gz", tmp / "b.nii.gz", device, dtype)
        )
        rows = [("baseline slice loop (batch 1)", base)]
        for tta in (False, True):
            jobs = plan_jobs(tmp / "scan.nii.gz", tmp / "o.nii.gz")
            seconds = timed(
                lambda jobs=jobs, tta=tta: run_jobs(jobs, model_dir, str(device), batch, tta, progress=False)
            )
            rows.append((f"meddinov3 segment{' --tta' if tta else ''} (batch {batch})", seconds))
        print("| path | seconds / volume | vs baseline |\n|---|---|---|")
        for label, seconds in rows:
            print(f"| {label} | {seconds:.2f} | {base / seconds:.2f}× |")


if __name__ == "__main__":
    main()
