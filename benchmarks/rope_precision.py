"""How much the reference's bfloat16 RoPE changes MedDINOv3's outputs compared with float32 RoPE.

    python benchmarks/rope_precision.py [--model CONVERTED_FOLDER] [--size 448]

With `--model` (e.g. a folder converted from the MedDINOv3 release) it measures the real checkpoint on
CT-like inputs. Without it there is no trained model to measure: it prints (1) the weight-independent effect,
the relative error of bf16-rotated q/k per element, and (2) how the whole-model difference of random ViT-Bs
depends on LayerScale and on how peaked attention is — which shows that the end-to-end figure is a property
of the trained weights, not of the code.
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
    hu, _ = make_synthetic_ct((2, args.size, args.size), (3.0, 0.8, 0.8), seed=1)
    x = normalize_hu(torch.from_numpy(hu.astype("float32")))[:, None]
    if not args.model:
        _without_trained_weights(x[:1, :, :224, :224])
        return
    fp32 = MedDINOv3Model.from_pretrained(args.model, rope_precision="fp32").eval()
    source = args.model
    bf16 = MedDINOv3Model(MedDINOv3Config(**{**fp32.config.to_dict(), "rope_precision": "bf16"})).eval()
    bf16.load_state_dict(fp32.state_dict())
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


def _without_trained_weights(x: torch.Tensor) -> None:
    from meddinov3_hf.modeling_meddinov3 import MedDINOv3RopePositionEmbedding, apply_rope_in_table_dtype

    config = MedDINOv3Config()
    q, k = torch.randn(2, 1, 12, 5 + 196, 64).unbind(0)
    pixels = torch.zeros(1, 1, 224, 224)
    exact = apply_rope_in_table_dtype(q, k, *MedDINOv3RopePositionEmbedding(config)(pixels))
    rounded = apply_rope_in_table_dtype(
        q, k, *MedDINOv3RopePositionEmbedding(MedDINOv3Config(rope_precision="bf16"))(pixels)
    )
    for name, a, b in (("q", exact[0], rounded[0]), ("k", exact[1], rounded[1])):
        print(
            f"rotated {name}: relative error of bf16 RoPE per element {((a - b).norm() / a.norm()).item():.2e}"
        )
    print("\nrandom ViT-B/16, 224×224 synthetic CT: relative L2 difference of last_hidden_state")
    print("| LayerScale | q/k weight scale | relative difference |\n|---|---|---|")
    for layerscale in (1e-5, 0.1, 1.0):
        for scale in (1, 4, 10):
            torch.manual_seed(0)
            fp32 = MedDINOv3Model(MedDINOv3Config(layerscale_value=layerscale)).eval()
            with torch.no_grad():
                for layer in fp32.model.layer:
                    layer.attention.q_proj.weight.mul_(scale)
                    layer.attention.k_proj.weight.mul_(scale)
            bf16 = MedDINOv3Model(MedDINOv3Config(layerscale_value=layerscale, rope_precision="bf16")).eval()
            bf16.load_state_dict(fp32.state_dict())
            with torch.no_grad():
                a, b = fp32(x).last_hidden_state, bf16(x).last_hidden_state
            print(f"| {layerscale:g} | {scale} | {((a - b).norm() / a.norm()).item():.2e} |")


if __name__ == "__main__":
    main()
