"""How much the reference's bfloat16 RoPE changes MedDINOv3's outputs compared with float32 RoPE.

    python benchmarks/rope_precision.py [--model CONVERTED_FOLDER] [--size 448]

With `--model` (e.g. a folder converted from the MedDINOv3 release) it measures the real checkpoint on
CT-like inputs; without it, a ViT-B with random weights whose attention is made peaked (q/k scaled ×30, as
in trained ViTs) stands in, and the numbers are only indicative.
"""

from __future__ import annotations

import argparse

import torch

from meddinov3_hf import MedDINOv3Config, MedDINOv3Model
from meddinov3_hf.data.synthetic import make_synthetic_ct
from meddinov3_hf.image_processing_meddinov3 import normalize_hu


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default=None)
    parser.add_argument("--size", type=int, default=448)
    args = parser.parse_args()
    torch.manual_seed(0)
    if args.model:
        fp32 = MedDINOv3Model.from_pretrained(args.model, rope_precision="fp32").eval()
        source = args.model
    else:
        fp32 = MedDINOv3Model(MedDINOv3Config(layerscale_value=1.0)).eval()
        with torch.no_grad():
            for layer in fp32.model.layer:
                layer.attention.q_proj.weight.mul_(30)
                layer.attention.k_proj.weight.mul_(30)
        source = "random ViT-B/16 weights with peaked attention (stand-in)"
    bf16 = MedDINOv3Model(MedDINOv3Config(**{**fp32.config.to_dict(), "rope_precision": "bf16"})).eval()
    bf16.load_state_dict(fp32.state_dict())
    hu, _ = make_synthetic_ct((2, args.size, args.size), (3.0, 0.8, 0.8), seed=1)
    x = normalize_hu(torch.from_numpy(hu.astype("float32")))[:, None]
    with torch.no_grad():
        a, b = fp32(x), bf16(x)
    for name, ya, yb in (
        ("last_hidden_state", a.last_hidden_state, b.last_hidden_state),
        ("CLS (pooler_output)", a.pooler_output, b.pooler_output),
    ):
        rel = ((ya - yb).norm() / ya.norm()).item()
        cos = torch.nn.functional.cosine_similarity(ya.flatten(1), yb.flatten(1)).min().item()
        print(
            f"{name}: relative L2 difference {rel:.2e}, max |diff| {(ya - yb).abs().max().item():.2e}, "
            f"min cosine {cos:.6f}"
        )
    print(f"model: {source}; input {args.size}×{args.size} synthetic CT, CPU fp32 apart from the RoPE mode")


if __name__ == "__main__":
    main()
