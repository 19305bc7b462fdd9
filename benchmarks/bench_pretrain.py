#!/usr/bin/env python
"""Pretraining step throughput: the library step vs a straightforward implementation, same process.

    python benchmarks/bench_pretrain.py [--stages 1 3] [--batch 64] [--compile] [--steps 10]

"optimised" = the library's step (`SelfDistillationMetaArch.forward_losses`): bf16 autocast, SDPA attention,
all local crops of a size in one forward, fused AdamW, foreach EMA. "straightforward" = the same model and
losses in fp32 with eager attention, one backbone forward per crop, unfused (for-loop) AdamW and a per-tensor
EMA loop. Throughput counts global crops (images/s = B·G / step time). MFU counts model FLOPs analytically:
2·params·tokens + 4·T²·D per block per crop forward, heads on CLS / masked tokens, ×3 for the student
(forward + backward), ×1 for the teacher and the Gram teacher, against a bf16 dense peak of 790 TFLOP/s
(H100/H200 SXM). On CPU a tiny model runs and only ratios are meaningful.
"""

from __future__ import annotations

import argparse
import time
from contextlib import nullcontext

import torch

from meddinov3_hf import MedDINOv3Config, MedDINOv3Model
from meddinov3_hf.pretraining.config import HeadsConfig, LossConfig
from meddinov3_hf.pretraining.masking import sample_masks
from meddinov3_hf.pretraining.meta_arch import SelfDistillationMetaArch, StepInputs
from meddinov3_hf.pretraining.schedules import param_groups

PEAK_BF16 = 790e12


def _setup(stage: int, cuda: bool, attn: str, batch: int):
    if cuda:
        backbone_cfg = MedDINOv3Config(drop_path_rate=0.3)
        heads = HeadsConfig()
        sizes = (224, 96, None) if stage == 1 else (768, 112, 1152)
    else:  # tiny stand-in
        backbone_cfg = MedDINOv3Config(
            hidden_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=128,
            aggregation_layers=[0, 1],
            drop_path_rate=0.3,
        )
        heads = HeadsConfig(out_dim=256, hidden_dim=64, bottleneck_dim=32)
        sizes = (64, 32, None) if stage == 1 else (96, 32, 128)
    backbone_cfg._attn_implementation = attn
    torch.manual_seed(0)
    backbone = MedDINOv3Model(backbone_cfg)
    loss = LossConfig(gram_weight=0.0 if stage == 1 else 1.5)
    gram = MedDINOv3Model(backbone_cfg) if stage != 1 else None
    meta = SelfDistillationMetaArch(backbone, heads, loss, gram)
    return meta, sizes


def _inputs(sizes, batch: int, n_local: int, device) -> StepInputs:
    g, lsz, gram = sizes
    grid = (g // 16, g // 16)
    masks = sample_masks(2 * batch, grid, 0.5, (0.1, 0.5), generator=torch.Generator().manual_seed(0))
    return StepInputs(
        global_crops=torch.randn(2, batch, 1, g, g, device=device),
        local_crops=torch.randn(n_local, batch, 1, lsz, lsz, device=device),
        masks=masks.to(device),
        gram_crops=torch.randn(2, batch, 1, gram, gram, device=device) if gram else None,
    )


def _flops(meta: SelfDistillationMetaArch, inputs: StepInputs) -> float:
    cfg = meta.student.backbone.config
    p_bb = sum(p.numel() for p in meta.student.backbone.parameters())
    p_head = sum(p.numel() for p in meta.student.dino_head.parameters())
    d, n_layers, prefix = cfg.hidden_size, cfg.num_hidden_layers, 1 + cfg.num_register_tokens

    def fwd(n_crops: int, size: int) -> float:
        t = (size // 16) ** 2 + prefix
        return n_crops * (2 * p_bb * t + 4 * t * t * d * n_layers)

    n_g, b = inputs.global_crops.shape[:2]
    n_l = inputs.local_crops.shape[0]
    masked = int(inputs.masks.sum())
    student = fwd(n_g * b, inputs.global_crops.shape[-1]) + fwd(n_l * b, inputs.local_crops.shape[-1])
    student += 2 * p_head * ((n_g + n_l) * b + masked)
    teacher = fwd(n_g * b, inputs.global_crops.shape[-1]) + 2 * p_head * (n_g * b + masked)
    gram = 0.0
    if meta.gram_teacher is not None:
        size = inputs.gram_crops.shape[-1] if inputs.gram_crops is not None else inputs.global_crops.shape[-1]
        gram = fwd(n_g * b, size)
    return 3 * student + teacher + gram


def optimised_step(meta, opt, inputs, device, compile_: bool):
    amp = (
        (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if device.type == "cuda" else nullcontext
    )
    with amp():
        terms = meta.forward_losses(meta.student, inputs, 0.07, amp)
    terms["loss"].backward()
    torch.nn.utils.clip_grad_norm_(meta.student.parameters(), 3.0, foreach=True)
    opt.step()
    opt.zero_grad(set_to_none=True)
    meta.update_teacher(0.994)
    return terms["loss"]


def straightforward_step(meta, opt, inputs, device, compile_: bool):
    """Per-crop forwards in fp32; losses from the same library objects."""
    s, t = meta.student, meta.teacher
    prefix = 1 + s.backbone.config.num_register_tokens
    n_g, b = inputs.global_crops.shape[:2]
    masks = inputs.masks.view(n_g, b, -1)
    from meddinov3_hf.pretraining.losses import sinkhorn_knopp

    with torch.no_grad():
        t_cls, t_patch = [], []
        for i in range(n_g):
            tok = t.encode(inputs.global_crops[i])
            t_cls.append(t.dino_head(tok[:, 0]))
            t_patch.append(t.ibot_head(tok[:, prefix:][masks[i]]))
        dino_t = sinkhorn_knopp(torch.cat(t_cls), 0.07).view(n_g, b, -1)
        ibot_t = sinkhorn_knopp(torch.cat(t_patch), 0.07)
    cls, logits, ibot_logits, patches = [], [], [], []
    for i in range(n_g):
        tok = s.encode(inputs.global_crops[i], masks[i])
        cls.append(tok[:, 0])
        patches.append(tok[:, prefix:])
        logits.append(s.dino_head(tok[:, 0]))
        ibot_logits.append(s.ibot_head(tok[:, prefix:][masks[i]]))
    for j in range(inputs.local_crops.shape[0]):
        logits.append(s.dino_head(s.encode(inputs.local_crops[j])[:, 0]))
    dino = meta.dino_loss(torch.stack(logits), dino_t)["loss"]
    ibot = meta.ibot_loss(torch.cat(ibot_logits), ibot_t, inputs.masks)
    koleo = sum(meta.koleo_loss(c) for c in cls)
    loss = dino + ibot + 0.1 * koleo
    if meta.gram_teacher is not None:
        with torch.no_grad():
            target = meta.gram_targets(inputs, (inputs.global_crops.shape[-1] // 16,) * 2)
        loss = loss + 1.5 * meta.gram_loss(torch.cat(patches), target)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(s.parameters(), 3.0, foreach=False)
    opt.step()
    opt.zero_grad(set_to_none=True)
    with torch.no_grad():
        for pt, ps in zip(t.parameters(), s.parameters()):
            pt.mul_(0.994).add_(ps, alpha=0.006)
    return loss


def run(stage: int, mode: str, batch: int, n_local: int, steps: int, compile_: bool) -> dict[str, float]:
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    attn = "sdpa" if mode == "optimised" else "eager"
    meta, sizes = _setup(stage, cuda, attn, batch)
    meta.to(device).train()
    if compile_ and mode == "optimised":
        for m in (meta.student.backbone, meta.teacher.backbone):
            m.compile()
    groups = param_groups(
        meta.student.named_parameters(), num_layers=meta.student.backbone.config.num_hidden_layers
    )
    for g in groups:
        g["lr"], g["weight_decay"] = 1e-4 * g["lr_multiplier"], 0.04 * g["wd_multiplier"]
    if mode == "optimised":
        opt = torch.optim.AdamW(groups, fused=cuda or None)
    else:
        opt = torch.optim.AdamW(groups, foreach=False)
    inputs = _inputs(sizes, batch, n_local, device)
    step = optimised_step if mode == "optimised" else straightforward_step
    for _ in range(2):  # warm-up (compile, cuDNN/cuBLAS heuristics, allocator)
        step(meta, opt, inputs, device, compile_)
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(steps):
        loss = step(meta, opt, inputs, device, compile_)
    if cuda:
        torch.cuda.synchronize()
    dt = (time.perf_counter() - start) / steps
    flops = _flops(meta, inputs)
    result = {
        "step_s": dt,
        "images_s": 2 * batch / dt,
        "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else float("nan"),
        "mfu": flops / dt / PEAK_BF16 if cuda else float("nan"),
        "loss": float(loss.detach()),
    }
    del meta, opt, inputs
    if cuda:
        torch.cuda.empty_cache()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--stages", type=int, nargs="+", default=[1, 3])
    parser.add_argument(
        "--batch", type=int, default=None, help="images per crop (default 64 stage 1, 4 stage 3)"
    )
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--skip_baseline", action="store_true")
    args = parser.parse_args()
    cuda = torch.cuda.is_available()
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = False  # the straightforward step is honest fp32
    device = torch.cuda.get_device_name() if cuda else "CPU (tiny model: ratios only)"
    print(f"device: {device}")
    print("| stage | implementation | batch/crop | images/s (global crops) | step ms | peak GiB | MFU |")
    print("|---|---|---|---|---|---|---|")
    for stage in args.stages:
        batch = args.batch or ((64 if stage == 1 else 4) if cuda else 4)
        n_local = 8
        modes = ["optimised"] + ([] if args.skip_baseline else ["straightforward"])
        results = {}
        for mode in modes:
            try:
                results[mode] = run(stage, mode, batch, n_local, args.steps if cuda else 2, args.compile)
            except torch.OutOfMemoryError:
                results[mode] = None
                torch.cuda.empty_cache()
        for mode, r in results.items():
            name = mode + (" + compile" if args.compile and mode == "optimised" else "")
            if r is None:
                print(f"| {stage} | {name} | {batch} | OOM | | | |")
                continue
            print(
                f"| {stage} | {name} | {batch} | {r['images_s']:.1f} | {1000 * r['step_s']:.1f} | "
                f"{r['peak_gib']:.1f} | {100 * r['mfu']:.1f} % |"
            )
        if all(results.get(m) for m in ("optimised", "straightforward")):
            speedup = results["straightforward"]["step_s"] / results["optimised"]["step_s"]
            print(f"| {stage} | speed-up | | {speedup:.2f}x | | | |")


if __name__ == "__main__":
    main()
