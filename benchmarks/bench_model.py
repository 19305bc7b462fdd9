"""Segmentation network speed: MedDINOv3ForSemanticSegmentation vs a straightforward equivalent.

Baseline (same weights, same process): transformers' `DINOv3ViTBackbone` (all 12 blocks, all hidden states
kept) + an NCHW decoder with a hand-written channel LayerNorm (mean/var over C, as the reference code does),
ConvTranspose2d and GELU. Ours: `MedDINOv3ForSemanticSegmentation` (runs only the blocks it needs, channels-
last token decoder, LayerNorm in the activation dtype).

GPU (CUDA available): ViT-B/16 at 896×896, bf16 autocast, 16 classes — inference images/s (batch 16),
training-step images/s (batch 8, AdamW), peak memory; eager, and with --compile also torch.compile.
CPU: a small config at 224×224, fp32 — latency ratio only (CPU numbers say nothing about a GPU).

    python benchmarks/bench_model.py [--compile] [--iters N]
"""

from __future__ import annotations

import argparse
import time

import torch
from torch import nn
from transformers import DINOv3ViTBackbone

from meddinov3_hf import MedDINOv3Config, MedDINOv3ForSemanticSegmentation


class NaiveChannelLayerNorm(nn.Module):
    """The reference decoder's LayerNorm over C of NCHW, written out (mean/var on channel 1)."""

    def __init__(self, channels: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.eps = eps

    def forward(self, x):
        mean = x.mean(1, keepdim=True)
        var = (x - mean).pow(2).mean(1, keepdim=True)
        x = (x - mean) / torch.sqrt(var + self.eps)
        return self.weight[:, None, None] * x + self.bias[:, None, None]


class BaselineNetwork(nn.Module):
    def __init__(self, config: MedDINOv3Config):
        super().__init__()
        backbone_config = config.to_dinov3_vit_config(out_indices=[i + 1 for i in config.aggregation_layers])
        self.backbone = DINOv3ViTBackbone(backbone_config)
        widths = [config.hidden_size * len(config.aggregation_layers), *config.decoder_hidden_sizes]
        layers = []
        for c_in, c_out in zip(widths[:-1], widths[1:]):
            layers += [nn.ConvTranspose2d(c_in, c_out, 2, 2), NaiveChannelLayerNorm(c_out), nn.GELU()]
        self.decoder = nn.Sequential(*layers, nn.Conv2d(widths[-1], config.num_labels, 1))

    def load_from(self, ours: MedDINOv3ForSemanticSegmentation) -> None:
        self.backbone.load_state_dict(ours.meddinov3.state_dict(), strict=True)
        for i, stage in enumerate(ours.decoder.stages):
            self.decoder[3 * i].load_state_dict(stage.upsample.state_dict())
            self.decoder[3 * i + 1].load_state_dict(stage.norm.state_dict())
        self.decoder[-1].load_state_dict(ours.decoder.classifier.state_dict())

    def forward(self, pixel_values, labels=None):
        maps = self.backbone(pixel_values.expand(-1, 3, -1, -1)).feature_maps
        logits = self.decoder(torch.cat(maps, dim=1))
        loss = None
        if labels is not None:
            from meddinov3_hf.modeling_meddinov3 import segmentation_loss

            loss = segmentation_loss(logits, labels)
        return loss, logits


def _timeit(fn, iters: int, device: torch.device) -> float:
    for _ in range(2):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(iters):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / iters


def measure(model, x, labels, iters, device, dtype, train: bool) -> tuple[float, float]:
    """(seconds per batch, peak GiB)."""
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)
    if train:
        model.train()
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=device.type == "cuda")

        def step():
            with autocast:
                out = model(x, labels=labels)
                loss = out[0] if isinstance(out, tuple) else out.loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    else:
        model.eval()

        def step():
            with torch.inference_mode(), autocast:
                model(x)

    seconds = _timeit(step, iters, device)
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
    return seconds, peak


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--compile", action="store_true", help="also time torch.compile'd models (GPU)")
    parser.add_argument("--iters", type=int, default=None)
    args = parser.parse_args()
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    torch.manual_seed(0)
    if cuda:
        config = MedDINOv3Config(num_labels=16)
        size, batches, dtype, iters = 896, {"inference": 16, "training": 8}, torch.bfloat16, args.iters or 10
        torch.backends.cuda.matmul.allow_tf32 = True
    else:
        config = MedDINOv3Config(
            num_labels=16,
            hidden_size=192,
            num_attention_heads=3,
            intermediate_size=768,
            decoder_hidden_sizes=[384, 192, 96, 48],
        )
        size, batches, dtype, iters = 224, {"inference": 4, "training": 2}, None, args.iters or 5
    ours = MedDINOv3ForSemanticSegmentation(config).to(device)
    baseline = BaselineNetwork(config).to(device)
    baseline.load_from(ours)
    name = torch.cuda.get_device_name() if cuda else f"CPU ({torch.get_num_threads()} threads)"
    print(
        f"device: {name}; {size}×{size}, {config.num_labels} classes, hidden {config.hidden_size}, "
        f"{'bf16 autocast' if dtype else 'fp32'}"
    )

    with torch.no_grad():  # same function before timing anything
        x = torch.randn(2, 1, size, size, device=device)
        diff = (ours.eval()(x).logits - baseline.eval()(x)[1]).abs().max().item()
    print(f"max |logits difference| ours vs baseline (fp32): {diff:.2e}")

    variants = [("eager", ours, baseline)]
    if args.compile and cuda:
        variants.append(("compiled", torch.compile(ours), torch.compile(baseline)))
    print(
        "| mode | task | batch | baseline img/s | ours img/s | speed-up | baseline peak GiB | ours peak GiB |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for mode, model_ours, model_base in variants:
        for task, batch in batches.items():
            x = torch.randn(batch, 1, size, size, device=device)
            labels = torch.randint(0, config.num_labels, (batch, size, size), device=device)
            t_base, m_base = measure(model_base, x, labels, iters, device, dtype, task == "training")
            t_ours, m_ours = measure(model_ours, x, labels, iters, device, dtype, task == "training")
            print(
                f"| {mode} | {task} | {batch} | {batch / t_base:.1f} | {batch / t_ours:.1f} | "
                f"{t_base / t_ours:.2f}× | {m_base:.1f} | {m_ours:.1f} |"
            )


if __name__ == "__main__":
    main()
