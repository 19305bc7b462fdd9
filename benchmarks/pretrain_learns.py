#!/usr/bin/env python
"""Does pretraining learn? Frozen features of a small ViT before and after the shipped stage-1 recipe.

    python benchmarks/pretrain_learns.py                 # CPU, ~10 min on two cores
    python benchmarks/pretrain_learns.py --preset gpu    # the same at full size on a GPU

1. Builds a small CT-3M (training/build_ct3m.py's builder) from synthetic CT volumes
   (meddinov3_hf.data.synthetic) and keeps other synthetic volumes, with their organ labels, held out.
2. Pretrains a small ViT from scratch with training/configs/stage1.yaml: only sizes (model, crops, heads, batch,
   number of local crops) are scaled down, and the CPU preset changes 4 recipe values (see PRESETS['cpu']
   'recipe' and benchmarks/README.md); `--max_steps` makes every schedule span the run, as for the Trainer.
3. Measures the frozen teacher backbone at init and after training on the held-out volumes:
   - two-view retrieval top-1 of CLS features (the training loop's health metric) over one slice from each of 64
     further held-out volumes, and the effective rank / mean pairwise cosine of CLS features;
   - the same retrieval over slices that differ in content (one slice per level), and whether a slice's nearest
     CLS in other volumes lies within one level of it (does the CLS encode anatomy?);
   - a linear probe of organ labels on patch features, fitted on some held-out volumes and scored as mean Dice
     (foreground organs, 3D) on another held-out volume.

A start from a DINOv3 init would need Meta's weights, which cannot be obtained offline here; the run starts from
scratch (the harder case). Prints a Markdown table and writes the numbers as JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from meddinov3_hf import MedDINOv3Model  # noqa: E402
from meddinov3_hf.data.synthetic import make_synthetic_ct, synthetic_label_map  # noqa: E402
from meddinov3_hf.image_processing_meddinov3 import normalize_hu  # noqa: E402
from meddinov3_hf.pretraining.config import load_config  # noqa: E402
from meddinov3_hf.pretraining.crops import MultiCropAugmentation  # noqa: E402
from meddinov3_hf.pretraining.health import HealthProbe, feature_statistics  # noqa: E402
from meddinov3_hf.pretraining.loop import build_backbone, train  # noqa: E402

PRESETS = {
    # CPU: ~10 minutes on two cores.
    "cpu": dict(
        n_train=24,
        n_probe=3,
        n_test=1,
        shape=(20, 96, 96),
        steps=700,
        batch=32,
        n_local=4,
        global_size=48,
        local_size=24,
        hidden=96,
        layers=3,
        heads=3,
        patch=8,
        out_dim=1024,
        head_hidden=256,
        bottleneck=64,
        # Not sizes: with stage1.yaml's values the DINO and iBOT losses never leave log K at this size (fresh
        # prototypes of norm 0.16 give near-uniform Sinkhorn targets, and the student cannot reproduce their tiny
        # sample-specific part, so the uniform point attracts). Measured (100-150 steps): drop path 0.3 on 3
        # blocks (88 % of student forwards drop a branch) leaves student-vs-teacher same-view CLS cosine 0.03
        # (0.21 without); drop path 0 + unit prototypes alone still sat at log K; adding teacher temperature
        # 0.04 (no warm-up to 0.07) and student temperature 0.2 made both losses fall. Not ablated further.
        recipe=[
            "model.drop_path_rate=0.0",
            "heads.last_layer_init=unit",
            "schedule.teacher_temp=0.04",
            "loss.student_temp=0.2",
        ],
        threads=2,
        workers=1,
    ),
    # GPU: the same recipe at a larger size.
    "gpu": dict(
        n_train=200,
        n_probe=6,
        n_test=2,
        shape=(48, 192, 192),
        steps=3000,
        batch=64,
        n_local=8,
        global_size=128,
        local_size=64,
        hidden=384,
        layers=8,
        heads=6,
        patch=16,
        out_dim=65536,
        head_hidden=2048,
        bottleneck=256,
        threads=8,
        workers=6,
    ),
}


def build_data(root: Path, p: dict) -> tuple[Path, list[tuple[np.ndarray, np.ndarray]]]:
    """Training volumes → CT-3M build; held-out volumes (other seeds) with labels → memory."""
    from meddinov3_hf.data.ct3m import build_ct3m

    src = root / "volumes"
    src.mkdir(parents=True, exist_ok=True)
    spacing = (2.5, 0.8, 0.8)
    for i in range(p["n_train"]):
        hu, _ = make_synthetic_ct(shape=p["shape"], spacing=spacing, seed=1000 + i)
        affine = np.diag([spacing[2], spacing[1], spacing[0], 1.0])
        nib.save(nib.Nifti1Image(np.transpose(hu, (2, 1, 0)), affine), src / f"case{i:04d}.nii.gz")
    build_ct3m([f"synth={src}"], root / "ct3m", max_rows_per_shard=64, quiet=True)
    held_out = [
        make_synthetic_ct(shape=p["shape"], spacing=spacing, seed=5000 + i)
        for i in range(p["n_probe"] + p["n_test"])
    ]
    return root / "ct3m", held_out


def overrides(p: dict, out: Path, data: Path) -> list[str]:
    """Sizes scaled down; everything else as training/configs/stage1.yaml ships it."""
    backbone = dict(
        hidden_size=p["hidden"],
        num_hidden_layers=p["layers"],
        num_attention_heads=p["heads"],
        intermediate_size=4 * p["hidden"],
        patch_size=p["patch"],
        num_register_tokens=4,
    )
    return [
        "model.scratch={" + ", ".join(f"{k}: {v}" for k, v in backbone.items()) + "}",
        f"heads.out_dim={p['out_dim']}",
        f"heads.ibot_out_dim={p['out_dim']}",
        f"heads.hidden_dim={p['head_hidden']}",
        f"heads.bottleneck_dim={p['bottleneck']}",
        f"crops.global_size={p['global_size']}",
        f"crops.local_size={p['local_size']}",
        f"crops.n_local={p['n_local']}",
        f"train.batch_size={p['batch']}",
        f"train.max_steps={p['steps']}",
        f"train.num_workers={p['workers']}",
        "train.mixed_precision=" + ("bf16" if torch.cuda.is_available() else "no"),
        "train.log_with=none",
        "train.log_every=25",
        "train.checkpoint_every=0",
        "train.shuffle_buffer_size=256",
        "health.every=0",
        f"dataset={data}",
        f"output_dir={out}",
        *p.get("recipe", []),
    ]


@torch.no_grad()
def encode(
    backbone: MedDINOv3Model, images: torch.Tensor, batch: int = 64
) -> tuple[torch.Tensor, torch.Tensor]:
    """CLS (N, D) and patch features (N, h, w, D) of normalised 1-channel images (N, 1, H, W)."""
    device = next(backbone.parameters()).device
    backbone.eval()
    prefix = 1 + backbone.config.num_register_tokens
    h, w = images.shape[-2] // backbone.config.patch_size, images.shape[-1] // backbone.config.patch_size
    cls, patches = [], []
    for i in range(0, len(images), batch):
        tokens = backbone(images[i : i + batch].to(device)).last_hidden_state.float().cpu()
        cls.append(tokens[:, 0])
        patches.append(tokens[:, prefix:].reshape(-1, h, w, tokens.shape[-1]))
    return torch.cat(cls), torch.cat(patches)


def _slices(volumes: list[tuple[np.ndarray, np.ndarray]]) -> tuple[torch.Tensor, torch.Tensor]:
    hu = torch.cat([torch.as_tensor(v[0]).float() for v in volumes])  # (Z, H, W)
    labels = torch.cat([torch.as_tensor(v[1]).long() for v in volumes])
    return normalize_hu(hu)[:, None], labels


def organ_probe(backbone: MedDINOv3Model, probe, test, n_classes: int, seed: int = 0) -> float:
    """Linear probe (softmax regression on standardised patch features, labels = majority per patch), fitted on
    `probe` volumes; mean 3D Dice over the foreground organs of the `test` volumes at pixel resolution
    (logits upsampled bilinearly)."""
    x_fit, y_fit = _slices(probe)
    x_test, y_test = _slices(test)
    _, f_fit = encode(backbone, x_fit)
    _, f_test = encode(backbone, x_test)
    ph, pw = f_fit.shape[1:3]
    # Patch labels: the most frequent label inside each patch.
    onehot = F.one_hot(y_fit, n_classes).permute(0, 3, 1, 2).float()
    y_patch = F.adaptive_avg_pool2d(onehot, (ph, pw)).argmax(1)
    feats = f_fit.reshape(-1, f_fit.shape[-1])
    mean, std = feats.mean(0), feats.std(0) + 1e-6
    feats = (feats - mean) / std
    target = y_patch.reshape(-1)
    torch.manual_seed(seed)
    probe_layer = torch.nn.Linear(feats.shape[1], n_classes)
    opt = torch.optim.AdamW(probe_layer.parameters(), lr=1e-2, weight_decay=1e-4)
    counts = torch.bincount(target, minlength=n_classes).float().clamp_min(1)
    weight = (counts.sum() / counts) ** 0.5  # organs are small: balance the classes a little
    for _ in range(300):
        opt.zero_grad()
        F.cross_entropy(probe_layer(feats), target, weight=weight / weight.mean()).backward()
        opt.step()
    with torch.no_grad():
        logits = probe_layer((f_test - mean) / std).permute(0, 3, 1, 2)  # (N, C, h, w)
        logits = F.interpolate(logits, size=y_test.shape[-2:], mode="bilinear", align_corners=False)
        pred = logits.argmax(1)
    dices = []
    for c in range(1, n_classes):
        a, b = pred == c, y_test == c
        denom = a.sum() + b.sum()
        if denom > 0:
            dices.append(float(2 * (a & b).sum() / denom))
    return float(np.mean(dices))


def retrieval_slices(p: dict, n: int = 64) -> list[torch.Tensor]:
    """One axial slice (random level in the middle half) from each of `n` further held-out volumes: neighbouring
    slices of one volume are near-duplicates, which would make "find the same slice" ill-posed."""
    rng = np.random.default_rng(0)
    out = []
    for i in range(n):
        hu, _ = make_synthetic_ct(shape=p["shape"], spacing=(2.5, 0.8, 0.8), seed=9000 + i)
        z = int(rng.integers(len(hu) // 4, 3 * len(hu) // 4))
        out.append(torch.as_tensor(hu[z]).float())
    return out


def augmented_views(slices: list[torch.Tensor], p: dict, draws: int, seed: int = 1234) -> torch.Tensor:
    """`draws` pairs of training-style global crops of every HU slice: (draws, 2, N, 1, s, s)."""
    aug = MultiCropAugmentation(global_size=p["global_size"], n_local=0)
    out = []
    for d in range(draws):
        g = torch.Generator().manual_seed(seed + d)
        out.append(torch.stack([aug(s, generator=g)["global"] for s in slices], 1))
    return torch.stack(out)


def _cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Cosine similarities of rows after removing the features' common mean (the CLS of a fresh ViT is
    dominated by one shared direction)."""
    mean = torch.cat([a, b]).mean(0)
    return F.normalize(a - mean, dim=-1) @ F.normalize(b - mean, dim=-1).t()


def level_retrieval(backbone: MedDINOv3Model, p: dict, draws: int = 6) -> float:
    """Two-view retrieval top-1 over slices that differ in content: slice z of volume z (n levels from n further
    held-out volumes, n = the preset's slice count), averaged over `draws` view pairs. The health probe's
    gallery (one slice from the middle half of each of 64 volumes) holds several near-identical phantoms at
    the same level, which no feature can tell apart after a crop."""
    n = p["shape"][0]
    slices = [
        torch.as_tensor(
            make_synthetic_ct(shape=p["shape"], spacing=(2.5, 0.8, 0.8), seed=11000 + z)[0][z]
        ).float()
        for z in range(n)
    ]
    hits = []
    for v1, v2 in augmented_views(slices, p, draws):
        sim = _cosine(encode(backbone, v1)[0], encode(backbone, v2)[0])
        hits.append((sim.argmax(1) == torch.arange(n)).float().mean())
    return float(torch.stack(hits).mean())


def level_neighbour(backbone: MedDINOv3Model, p: dict, n_volumes: int = 8) -> float:
    """Does the CLS encode the anatomical level? Every slice of `n_volumes` held-out volumes, one augmented
    global crop each; share of slices whose nearest CLS among the *other* volumes' slices lies within one
    level (chance about 3 / slices per volume)."""
    vols = [
        make_synthetic_ct(shape=p["shape"], spacing=(2.5, 0.8, 0.8), seed=12000 + i)[0]
        for i in range(n_volumes)
    ]
    slices = [torch.as_tensor(hu[z]).float() for hu in vols for z in range(len(hu))]
    views = augmented_views(slices, p, draws=1)[0, 0]
    cls = encode(backbone, views)[0]
    n_z = p["shape"][0]
    level = torch.arange(n_z).repeat(n_volumes)
    volume = torch.arange(n_volumes).repeat_interleave(n_z)
    sim = _cosine(cls, cls)
    sim[volume[:, None] == volume[None, :]] = -torch.inf
    return float(((level[sim.argmax(1)] - level).abs() <= 1).float().mean())


def evaluate(backbone: MedDINOv3Model, held_out, retrieval, p: dict, n_classes: int) -> dict[str, float]:
    probe_vols, test_vols = held_out[: p["n_probe"]], held_out[p["n_probe"] :]
    health = HealthProbe(retrieval, image_size=p["global_size"]).evaluate(backbone)
    x_all, _ = _slices(held_out)
    cls, _ = encode(backbone, x_all)
    stats = feature_statistics(cls)
    return {
        "retrieval_top1": health["retrieval_top1"],
        "chance_top1": health["chance_top1"],
        "effective_rank": stats["effective_rank"],
        "cls_mean_cosine": stats["mean_cosine"],
        "level_retrieval_top1": level_retrieval(backbone, p),
        "level_neighbour": level_neighbour(backbone, p),
        "organ_dice": organ_probe(backbone, probe_vols, test_vols, n_classes),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    parser.add_argument("--steps", type=int, help="override the preset's number of training steps")
    parser.add_argument("--threads", type=int, help="override the preset's torch threads (main process)")
    parser.add_argument("--work", type=Path, help="working folder (default: a temporary one)")
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="extra config override (repeatable)"
    )
    args = parser.parse_args(argv)
    p = dict(PRESETS[args.preset])
    if args.steps:
        p["steps"] = args.steps
    if args.threads:
        p["threads"] = args.threads
    torch.set_num_threads(p["threads"])
    n_classes = len(synthetic_label_map())
    device = "cuda" if torch.cuda.is_available() else "cpu"

    with tempfile.TemporaryDirectory() as tmp:
        work = args.work or Path(tmp)
        t0 = time.perf_counter()
        data, held_out = build_data(work, p)
        retrieval = retrieval_slices(p)
        t_data = time.perf_counter() - t0
        cfg = load_config(
            REPO / "training" / "configs" / "stage1.yaml", overrides(p, work / "run", data) + args.set
        )

        torch.manual_seed(cfg.train.seed)  # as train() does before building the scratch backbone
        init_backbone, _ = build_backbone(cfg, None)
        init = evaluate(init_backbone.to(device), held_out, retrieval, p, n_classes)
        del init_backbone

        t0 = time.perf_counter()
        result = train(cfg)
        t_train = time.perf_counter() - t0
        losses = [h["loss/loss"] for h in result["history"]]
        trained_backbone = MedDINOv3Model.from_pretrained(result["export"]).to(device)
        trained = evaluate(trained_backbone, held_out, retrieval, p, n_classes)

    rows = [
        ("retrieval top-1 (two views)", "retrieval_top1"),
        ("effective rank (CLS)", "effective_rank"),
        ("mean CLS cosine", "cls_mean_cosine"),
        (f"retrieval top-1, one slice per level (chance {1 / p['shape'][0]:.3f})", "level_retrieval_top1"),
        ("CLS nearest neighbour within one level", "level_neighbour"),
        ("organ probe mean Dice", "organ_dice"),
    ]
    print(
        f"\npreset {args.preset}: {p['steps']} steps, batch {p['batch']}, ViT {p['hidden']}x{p['layers']} "
        f"patch {p['patch']}, data {t_data:.0f} s, training {t_train:.0f} s on {device}"
    )
    print(
        f"loss {losses[0]:.3f} (first log) -> {losses[-1]:.3f} (last); chance top-1 {init['chance_top1']:.3f}\n"
    )
    print("| measure (frozen teacher backbone, held-out volumes) | scratch init | after stage-1 recipe |")
    print("|---|---|---|")
    for name, key in rows:
        print(f"| {name} | {init[key]:.3f} | {trained[key]:.3f} |")
    if args.json:
        args.json.write_text(
            json.dumps(
                {"preset": p, "init": init, "trained": trained, "losses": losses, "train_seconds": t_train},
                indent=1,
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
