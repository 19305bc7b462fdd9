"""Fine-tuning throughput: the Trainer path (`MedDINOv3Trainer`) against a hand-written PyTorch loop over the
same model, and CPU data-loading throughput of `TrainSliceDataset`.

GPU (CUDA available): ViT-B MedDINOv3, 896×896, bf16 autocast; images/s and peak memory of both paths in the
same process. CPU: a tiny config at 64 px in fp32, so only the ratio means something. Data loading: random
896 patches with full nnU-Net augmentation from synthetic 512² slices, one process (= one worker).

    python benchmarks/bench_finetune.py [--batch_size 2] [--steps 20] [--warmup 5] [--data_samples 64]
"""

from __future__ import annotations

import argparse
import copy
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.data import Dataset
from transformers import TrainerCallback

from meddinov3_hf import MedDINOv3Config, MedDINOv3ForSemanticSegmentation
from meddinov3_hf.data.augment import spacing_for_patch
from meddinov3_hf.data.slices import build_slice_dataset
from meddinov3_hf.data.synthetic import write_nnunet_dataset
from meddinov3_hf.finetuning.arguments import FinetuneTrainingArguments
from meddinov3_hf.finetuning.data import TrainSliceDataset, collate_segmentation
from meddinov3_hf.finetuning.trainer import MedDINOv3Trainer

TINY = dict(hidden_size=32, num_hidden_layers=4, num_attention_heads=2, intermediate_size=64,
            aggregation_layers=[0, 1, 2, 3], decoder_hidden_sizes=[32, 16, 16, 8], layerscale_value=1.0)  # fmt: skip
NUM_LABELS = 14  # AMOS-like


class RandomBatches(Dataset):
    """Pre-made tensors: the compute comparison must not measure data loading."""

    def __init__(self, n: int, size: int, num_labels: int):
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(8, 1, size, size, generator=g)
        self.y = torch.randint(0, num_labels, (8, size, size), generator=g)
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"pixel_values": self.x[i % 8], "labels": self.y[i % 8]}


class StepTimer(TrainerCallback):
    def __init__(self, warmup: int, device: torch.device):
        self.warmup, self.device, self.start = warmup, device, None

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.warmup:
            _sync(self.device)
            if self.device.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
            self.start = time.perf_counter()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _peak_gib(device: torch.device) -> float:
    return torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")


def bench_trainer(model, size, batch, steps, warmup, device, bf16) -> tuple[float, float]:
    with tempfile.TemporaryDirectory() as out:
        args = FinetuneTrainingArguments(
            output_dir=out, max_steps=warmup + steps, per_device_train_batch_size=batch, bf16=bf16,
            report_to="none", save_strategy="no", logging_steps=10**6, disable_tqdm=True,
            dataloader_pin_memory=device.type == "cuda", use_cpu=device.type == "cpu",
        )  # fmt: skip
        timer = StepTimer(warmup, device)
        trainer = MedDINOv3Trainer(
            model=model, args=args, train_dataset=RandomBatches((warmup + steps) * batch, size, NUM_LABELS),
            data_collator=collate_segmentation, callbacks=[timer], backbone_learning_rate=3e-5,
        )  # fmt: skip
        trainer.train()
        _sync(device)
        return steps * batch / (time.perf_counter() - timer.start), _peak_gib(device)


def bench_plain(model, size, batch, steps, warmup, device, bf16) -> tuple[float, float]:
    model = model.to(device).train()
    backbone = [p for n, p in model.named_parameters() if n.startswith("meddinov3.")]
    head = [p for n, p in model.named_parameters() if not n.startswith("meddinov3.")]
    opt = torch.optim.AdamW([{"params": head, "lr": 3e-4}, {"params": backbone, "lr": 3e-5}],
                            betas=(0.9, 0.98), weight_decay=0.05)  # fmt: skip
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1 - s / (warmup + steps))
    data = RandomBatches(batch, size, NUM_LABELS)
    x = torch.stack([data[i]["pixel_values"] for i in range(batch)]).to(device)
    y = torch.stack([data[i]["labels"] for i in range(batch)]).to(device)
    start = None
    for step in range(warmup + steps):
        if step == warmup:
            _sync(device)
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
            start = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            loss = model(pixel_values=x, labels=y).loss
        loss.backward()
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
    _sync(device)
    return steps * batch / (time.perf_counter() - start), _peak_gib(device)


def bench_data(samples: int) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        root = write_nnunet_dataset(
            Path(tmp) / "ds", n_cases=2, shape=(8, 512, 512), spacing=(2.5, 0.78, 0.78)
        )
        slices = build_slice_dataset(root, Path(tmp) / "cache")
        dataset = TrainSliceDataset(slices, samples, 896, spacing_for_patch(0.78, 512, 896), seed=0)
        dataset[0]  # warm-up (imports, first Arrow read)
        start = time.perf_counter()
        for i in range(samples):
            dataset[i]
        return samples / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--batch_size", type=int, default=2)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--data_samples", type=int, default=64)
    parser.add_argument("--skip_data", action="store_true")
    args = parser.parse_args()

    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    size, bf16 = (896, True) if cuda else (64, False)
    config = (
        MedDINOv3Config(num_labels=NUM_LABELS) if cuda else MedDINOv3Config(num_labels=NUM_LABELS, **TINY)
    )
    torch.manual_seed(0)
    model = MedDINOv3ForSemanticSegmentation(config)
    plain_model = copy.deepcopy(model)
    what = (
        f"{'ViT-B' if cuda else 'tiny (CPU)'}, {size}², batch {args.batch_size}, {'bf16' if bf16 else 'fp32'}"
    )
    name = torch.cuda.get_device_name() if cuda else "CPU"

    trainer_ips, trainer_mem = bench_trainer(
        model, size, args.batch_size, args.steps, args.warmup, device, bf16
    )
    del model
    if cuda:
        torch.cuda.empty_cache()
    plain_ips, plain_mem = bench_plain(
        plain_model, size, args.batch_size, args.steps, args.warmup, device, bf16
    )

    print("\n| path | model | device | images/s | peak GiB |\n|---|---|---|---|---|")
    print(f"| Trainer (MedDINOv3Trainer) | {what} | {name} | {trainer_ips:.2f} | {trainer_mem:.2f} |")
    print(f"| plain PyTorch loop | {what} | {name} | {plain_ips:.2f} | {plain_mem:.2f} |")
    print(f"\nTrainer / plain throughput ratio: {trainer_ips / plain_ips:.3f}")
    if not args.skip_data:
        per_worker = bench_data(args.data_samples)
        needed = 70 / per_worker
        print(
            f"\n| data loading (896² patches, full augmentation, 512² int16 slices) | slices/s per worker |\n"
            f"|---|---|\n| TrainSliceDataset, 1 CPU process | {per_worker:.1f} |\n\n"
            f"Workers needed to feed 70 images/s: {needed:.1f} (--dataloader_num_workers {max(1, round(needed + 0.5))})"
        )


if __name__ == "__main__":
    main()
