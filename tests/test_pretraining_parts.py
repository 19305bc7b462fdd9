"""Heads, masks, schedules, parameter groups and multi-crop augmentation for pretraining."""

from __future__ import annotations

import math
import time

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers import DINOv3ViTConfig, DINOv3ViTModel

from meddinov3_hf.image_processing_meddinov3 import normalize_hu
from meddinov3_hf.pretraining.config import ScheduleConfig, load_config
from meddinov3_hf.pretraining.crops import MultiCropAugmentation, collate_multicrop
from meddinov3_hf.pretraining.heads import DINOHead
from meddinov3_hf.pretraining.masking import BlockMaskGenerator, sample_masks
from meddinov3_hf.pretraining.schedules import (
    PretrainSchedules,
    cosine_schedule,
    linear_warmup_then_constant,
    param_groups,
    scaled_lr,
)

# ---------------------------------------------------------------------------------------------------------
# Head


def test_dino_head_is_dinov3s_plain_bias_free_head():
    head = DINOHead(in_dim=32, out_dim=50, hidden_dim=24, bottleneck_dim=8, nlayers=3)
    x = torch.randn(3, 5, 32)
    logits = head(x)
    assert logits.shape == (3, 5, 50)
    # DINOv3 (dinov3/layers/dino_head.py): a plain bias-free Linear after the L2-normalised bottleneck, no
    # weight norm; the state dict has exactly the release's key names.
    assert type(head.last_layer) is nn.Linear and head.last_layer.bias is None
    assert sorted(head.state_dict()) == [
        "last_layer.weight",
        "mlp.0.bias",
        "mlp.0.weight",
        "mlp.2.bias",
        "mlp.2.weight",
        "mlp.4.bias",
        "mlp.4.weight",
    ]
    z = torch.nn.functional.normalize(head.mlp(x), dim=-1)
    torch.testing.assert_close(logits, z @ head.last_layer.weight.t())
    direction = head.last_layer.weight
    assert head.last_layer_parameters() == [direction]
    assert sorted(DINOHead(32, 50, 24, 8, nlayers=1).state_dict()) == [
        "last_layer.weight",
        "mlp.bias",
        "mlp.weight",
    ]
    linears = [m for m in head.mlp if isinstance(m, nn.Linear)]
    assert [m.out_features for m in linears] == [24, 24, 8]
    assert all(m.bias.abs().max() == 0 for m in linears)
    assert all(m.weight.std() < 0.03 for m in linears)
    assert sum(isinstance(m, nn.GELU) for m in head.mlp) == 2
    logits.sum().backward()
    assert direction.grad is not None


# ---------------------------------------------------------------------------------------------------------
# Masks


def test_sample_masks_fraction_ratios_and_spread():
    batch, grid = 64, (14, 14)
    n = grid[0] * grid[1]
    masks = sample_masks(batch, grid, generator=torch.Generator().manual_seed(0))
    assert masks.shape == (batch, n) and masks.dtype == torch.bool
    counts = masks.sum(dim=1)
    masked = counts > 0
    assert int(masked.sum()) == batch // 2
    ratios = np.sort(counts[masked].numpy() / n)
    assert ratios.min() >= 0.1 - 0.5 / n and ratios.max() <= 0.5 + 0.5 / n
    # One ratio per equal bin of [0.1, 0.5] → the sorted ratios sit in consecutive bins.
    edges = np.linspace(0.1, 0.5, batch // 2 + 1)
    assert np.all(ratios >= edges[:-1] - 1.0 / n) and np.all(ratios <= edges[1:] + 1.0 / n)
    # The masked images are spread over the batch, not all at its start.
    assert 0 < int(masked[: batch // 2].sum()) < batch // 2


def test_sample_masks_deterministic_under_seed():
    a = sample_masks(16, (16, 16), generator=torch.Generator().manual_seed(3))
    b = sample_masks(16, (16, 16), generator=torch.Generator().manual_seed(3))
    c = sample_masks(16, (16, 16), generator=torch.Generator().manual_seed(4))
    assert torch.equal(a, b) and not torch.equal(a, c)
    torch.manual_seed(11)
    d = sample_masks(16, (16, 16))
    torch.manual_seed(11)
    assert torch.equal(d, sample_masks(16, (16, 16)))


def test_block_masks_are_blocks_and_reach_target():
    gen = BlockMaskGenerator((20, 20), fill_to_target=False)
    exact = BlockMaskGenerator((20, 20))
    rng = np.random.default_rng(0)
    for target in (8, 40, 120, 200):
        mask = gen.generate(target, rng)
        assert 0 < mask.sum() <= target
        # Every masked patch lies in a rectangle of ≥ 2 patches, so it has a masked 4-neighbour.
        padded = np.pad(mask, 1)
        neighbours = padded[:-2, 1:-1] | padded[2:, 1:-1] | padded[1:-1, :-2] | padded[1:-1, 2:]
        assert np.all(neighbours[mask])
        assert exact.generate(target, rng).sum() == target
    assert exact(30, torch.Generator().manual_seed(0)).shape == (20, 20)


def test_sample_masks_fast_enough():
    gen = torch.Generator().manual_seed(0)
    for grid in ((14, 14), (48, 48)):
        start = time.perf_counter()
        for _ in range(2):
            sample_masks(64, grid, generator=gen)
        elapsed = time.perf_counter() - start
        assert elapsed < 0.5, f"{grid}: {elapsed:.3f}s"  # ~30 ms measured; loose bound for busy CI


# ---------------------------------------------------------------------------------------------------------
# Schedules


def test_cosine_schedule_endpoints_warmup_and_freeze():
    s = cosine_schedule(1.0, 0.1, 100)
    assert len(s) == 100 and s[0] == pytest.approx(1.0) and s[-1] == pytest.approx(0.1)
    assert np.all(np.diff(s) <= 1e-12)
    assert s[50] == pytest.approx(0.1 + 0.45 * (1 + math.cos(math.pi * 50 / 99)))

    s = cosine_schedule(1.0, 0.0, 100, warmup_steps=10, start_warmup_value=0.0, freeze_steps=5)
    assert len(s) == 100
    assert np.all(s[:5] == 0.0)
    np.testing.assert_allclose(s[5:15], np.arange(10) / 10)  # linear, reaching base at the first cosine step
    assert s[15] == pytest.approx(1.0) and s[-1] == pytest.approx(0.0)
    with pytest.raises(ValueError):
        cosine_schedule(1.0, 0.0, 10, warmup_steps=8, freeze_steps=5)


def test_linear_warmup_then_constant():
    s = linear_warmup_then_constant(0.04, 0.07, 30, 100)
    assert len(s) == 100
    assert s[0] == pytest.approx(0.04) and s[15] == pytest.approx(0.055)
    assert np.all(s[30:] == 0.07) and np.all(np.diff(s[:31]) > 0)
    assert len(linear_warmup_then_constant(0.04, 0.07, 30, 10)) == 10
    np.testing.assert_allclose(linear_warmup_then_constant(0.04, 0.07, 0, 5), 0.07)


def test_pretrain_schedules_from_config():
    cfg = {
        "epochs": 4,
        "iters_per_epoch": 10,
        "base_lr": 1e-3,
        "min_lr": 1e-6,
        "warmup_epochs": 1,
        "wd": 0.04,
        "wd_end": 0.4,
        "momentum_teacher": 0.992,
        "final_momentum_teacher": 1.0,
        "teacher_temp": 0.07,
        "warmup_teacher_temp": 0.04,
        "warmup_teacher_temp_epochs": 2,
        "freeze_last_layer_epochs": 1,
        "batch_size": 256,
    }
    s = PretrainSchedules.from_config(cfg)
    assert len(s) == 40
    peak = 1e-3 * 4 * math.sqrt(256 / 1024)  # DINOv3 sqrt_wrt_1024: 4·sqrt(B/1024) → 2e-3 at B = 256
    assert peak == pytest.approx(2e-3)
    assert s.lr[0] == 0.0 and s.lr[10] == pytest.approx(peak) and s.lr.max() == pytest.approx(peak)
    assert s.lr[-1] == pytest.approx(1e-6)
    assert np.all(s.last_layer_lr[:10] == 0.0) and np.array_equal(s.last_layer_lr[10:], s.lr[10:])
    assert s.wd[0] == pytest.approx(0.04) and s.wd[-1] == pytest.approx(0.4)
    assert s.momentum[0] == pytest.approx(0.992) and s.momentum[-1] == pytest.approx(1.0)
    assert s.teacher_temp[0] == pytest.approx(0.04) and np.all(s.teacher_temp[20:] == 0.07)
    now = s.at(10)
    assert set(now) == {"lr", "wd", "momentum", "teacher_temp", "last_layer_lr"}
    assert now["lr"] == pytest.approx(peak) and now["last_layer_lr"] == pytest.approx(peak)
    assert s.at(10_000) == s.at(39)
    # No batch size → no scaling.
    assert PretrainSchedules.from_config({**cfg, "batch_size": None}).lr.max() == pytest.approx(1e-3)


def test_schedule_defaults_are_the_configs():
    # pretraining/config.py owns the defaults: a key left out of from_config takes PretrainConfig's value.
    cfg = load_config(None, ["schedule.epochs=3", "schedule.iters_per_epoch=7", "schedule.warmup_epochs=1"])
    settings = cfg.schedule_settings()
    extra = {"base_lr", "min_lr", "batch_size", "total_steps"}
    assert set(settings) == {*ScheduleConfig.__dataclass_fields__, *extra}
    full = PretrainSchedules.from_config(settings)
    short = PretrainSchedules.from_config({"epochs": 3, "iters_per_epoch": 7, "warmup_epochs": 1})
    for name in ("lr", "wd", "momentum", "teacher_temp", "last_layer_lr"):
        np.testing.assert_array_equal(getattr(short, name), getattr(full, name))
    assert len(PretrainSchedules.from_config({})) == ScheduleConfig.epochs * ScheduleConfig.iters_per_epoch


def test_lr_scaling_rule_is_dinov3s_sqrt_wrt_1024():
    # dinov3/configs/config.py: lr *= 4 * sqrt(B / 1024); at B = 1024 the peak is 4x base_lr.
    assert scaled_lr(1e-3, 1024) == pytest.approx(4e-3)
    assert scaled_lr(1e-3, 64) == pytest.approx(1e-3)
    assert scaled_lr(1e-3, 16) == pytest.approx(5e-4)
    assert scaled_lr(1e-3, None) == 1e-3


def test_total_steps_makes_every_schedule_span_it():
    # --max_steps N: the full recipe compressed into N steps (warm-ups and freezes in proportion).
    cfg = {
        "epochs": 100,
        "iters_per_epoch": 1250,
        "warmup_epochs": 10,
        "warmup_teacher_temp_epochs": 30,
        "freeze_last_layer_epochs": 1,
        "batch_size": 1024,
        "total_steps": 200,
    }
    s = PretrainSchedules.from_config(cfg)
    assert len(s) == 200
    assert s.lr[20] == pytest.approx(4e-3) and s.lr.max() == pytest.approx(4e-3)  # warm-up = 10 % of 200
    assert s.lr[-1] == pytest.approx(1e-6) and s.momentum[-1] == pytest.approx(1.0)
    assert np.all(s.last_layer_lr[:2] == 0) and s.last_layer_lr[2] > 0
    assert s.teacher_temp[60] == pytest.approx(0.07) and s.teacher_temp[59] < 0.07
    assert s.lr[4] > 1e-4  # a short run trains at a real lr, not at ~0 as a 125 000-step schedule would
    full = PretrainSchedules.from_config({**cfg, "total_steps": None})
    assert len(full) == 125_000 and full.lr[4] < 2e-6


def test_constant_lr_schedule_of_later_stages():
    # DINOv3 v2 schedules with peak == end (dinov3_vit7b16_gram_anchor.yaml): warm-up from 0, then constant.
    cfg = {
        "lr_schedule": "constant",
        "epochs": 2,
        "iters_per_epoch": 10,
        "base_lr": 1e-5,
        "min_lr": 1e-6,
        "warmup_epochs": 0.5,
        "wd": 0.04,
        "wd_end": 0.04,
        "momentum_teacher": 0.999,
        "final_momentum_teacher": 0.999,
        "batch_size": 256,
    }
    s = PretrainSchedules.from_config(cfg)
    peak = 1e-5 * 4 * math.sqrt(256 / 1024)
    assert s.lr[0] == 0.0 and np.all(np.diff(s.lr[:6]) > 0)
    np.testing.assert_allclose(s.lr[5:], peak)
    np.testing.assert_allclose(s.wd, 0.04) and np.testing.assert_allclose(s.momentum, 0.999)
    with pytest.raises(ValueError, match="lr_schedule"):
        PretrainSchedules.from_config({**cfg, "lr_schedule": "linear"})


# ---------------------------------------------------------------------------------------------------------
# Parameter groups


class _TinyPretrainModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        config = DINOv3ViTConfig(
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=64,
            num_register_tokens=4,
            patch_size=16,
        )
        self.backbone = DINOv3ViTModel(config)
        self.dino_head = DINOHead(32, out_dim=16, hidden_dim=8, bottleneck_dim=4)
        self.ibot_head = DINOHead(32, out_dim=16, hidden_dim=8, bottleneck_dim=4)


def _lookup(groups: list[dict]) -> dict[int, dict]:
    out: dict[int, dict] = {}
    for g in groups:
        for p in g["params"]:
            assert id(p) not in out, "parameter in two groups"
            out[id(p)] = g
    return out


def test_param_groups_layer_decay_wd_and_last_layer():
    model = _TinyPretrainModel()
    groups = param_groups(model.named_parameters(), layer_decay=0.9, patch_embed_lr_mult=0.2, num_layers=2)
    by_param = _lookup(groups)
    params = dict(model.named_parameters())
    trainable = {n for n, p in params.items() if p.requires_grad}
    assert {n for n, p in params.items() if id(p) in by_param} == trainable

    def group(name: str) -> dict:
        return by_param[id(params[name])]

    expected_lr = {
        "backbone.embeddings.cls_token": 0.9**3,
        "backbone.embeddings.register_tokens": 0.9**3,
        "backbone.embeddings.mask_token": 0.9**3,
        "backbone.embeddings.patch_embeddings.weight": 0.9**3 * 0.2,
        "backbone.embeddings.patch_embeddings.bias": 0.9**3 * 0.2,
        "backbone.model.layer.0.attention.q_proj.weight": 0.9**2,
        "backbone.model.layer.0.norm1.weight": 0.9**2,
        "backbone.model.layer.1.mlp.up_proj.weight": 0.9,
        "backbone.model.layer.1.layer_scale2.lambda1": 0.9,
        "backbone.norm.weight": 1.0,
        "dino_head.mlp.0.weight": 1.0,
        "ibot_head.last_layer.weight": 1.0,
    }
    for name, mult in expected_lr.items():
        assert group(name)["lr_multiplier"] == pytest.approx(mult), name

    no_wd = [
        "backbone.embeddings.cls_token",
        "backbone.embeddings.register_tokens",
        "backbone.embeddings.mask_token",
        "backbone.embeddings.patch_embeddings.bias",
        "backbone.model.layer.0.norm1.weight",
        "backbone.model.layer.0.attention.q_proj.bias",
        "backbone.model.layer.1.layer_scale1.lambda1",
        "backbone.norm.weight",
        "backbone.norm.bias",
        "dino_head.mlp.0.bias",
    ]
    with_wd = [
        "backbone.embeddings.patch_embeddings.weight",
        "backbone.model.layer.0.attention.k_proj.weight",
        "backbone.model.layer.1.mlp.down_proj.weight",
        "dino_head.mlp.4.weight",
        "dino_head.last_layer.weight",
    ]
    assert all(group(n)["wd_multiplier"] == 0.0 for n in no_wd)
    assert all(group(n)["wd_multiplier"] == 1.0 for n in with_wd)

    last = {n for n in trainable if group(n)["is_last_layer"]}
    assert last == {
        "dino_head.last_layer.weight",
        "ibot_head.last_layer.weight",
    }
    # Groups are keyed by (lr, wd, last-layer): 4 lr levels (+ patch embed) × wd on/off + last layer.
    assert len(groups) <= 2 * 5 + 1
    # They feed AdamW directly.
    torch.optim.AdamW(groups, lr=1e-3)


def test_param_groups_without_prefix_match_prefixed():
    config = DINOv3ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)
    model = DINOv3ViTModel(config)
    plain = _lookup(param_groups(model.named_parameters(), num_layers=2))
    prefixed = _lookup(
        param_groups([(f"meddinov3.{n}", p) for n, p in model.named_parameters()], num_layers=2)
    )
    for _, p in model.named_parameters():
        assert plain[id(p)]["lr_multiplier"] == prefixed[id(p)]["lr_multiplier"]
        assert plain[id(p)]["wd_multiplier"] == prefixed[id(p)]["wd_multiplier"]
    assert plain[id(model.embeddings.cls_token)]["lr_multiplier"] == pytest.approx(0.9**3)


# ---------------------------------------------------------------------------------------------------------
# Crops


def _ct_slice(h: int = 160, w: int = 192, seed: int = 0) -> torch.Tensor:
    """Smooth synthetic CT-like slice in HU (so resampling differences stay small)."""
    gen = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, h), torch.linspace(-1, 1, w), indexing="ij")
    phase = torch.rand(2, generator=gen) * 6
    body = torch.where(xx**2 / 0.8 + yy**2 / 0.6 < 1.0, 40.0, -1000.0)
    return body + 300.0 * torch.sin(3 * xx + phase[0]) * torch.cos(2 * yy + phase[1])


def test_multicrop_shapes_and_overrides():
    aug = MultiCropAugmentation(global_size=64, local_size=32, n_local=3)
    out = aug(_ct_slice(), generator=torch.Generator().manual_seed(0))
    assert out["global"].shape == (2, 1, 64, 64) and out["local"].shape == (3, 1, 32, 32)
    assert out["global"].dtype == torch.float32 and "global_gram" not in out
    out = aug(
        _ct_slice(), generator=torch.Generator().manual_seed(0), global_size=48, local_size=16, gram_size=96
    )
    assert out["global"].shape == (2, 1, 48, 48) and out["local"].shape == (3, 1, 16, 16)
    assert out["global_gram"].shape == (2, 1, 96, 96)
    out = MultiCropAugmentation(global_size=32, local_size=16, n_local=0)(_ct_slice())
    assert out["local"].shape == (0, 1, 16, 16)


def test_multicrop_deterministic_under_generator():
    aug = MultiCropAugmentation(global_size=48, local_size=24, n_local=4, gram_size=96, noise_p=1.0)
    img = _ct_slice()
    a = aug(img, generator=torch.Generator().manual_seed(5))
    b = aug(img, generator=torch.Generator().manual_seed(5))
    c = aug(img, generator=torch.Generator().manual_seed(6))
    for key in ("global", "local", "global_gram"):
        assert torch.equal(a[key], b[key])
    assert not torch.equal(a["global"], c["global"])
    # Switching the Gram crops off leaves the student crops unchanged.
    no_gram = MultiCropAugmentation(global_size=48, local_size=24, n_local=4, noise_p=1.0)
    d = no_gram(img, generator=torch.Generator().manual_seed(5))
    assert torch.equal(a["global"], d["global"]) and torch.equal(a["local"], d["local"])


def test_multicrop_identity_settings_give_normalised_slice_and_flips():
    size = 64
    img = _ct_slice(size, size)
    off = {
        "global_scale": (1.0, 1.0),
        "ratio": (1.0, 1.0),
        "n_local": 0,
        "global_blur_p": (0.0,),
        "noise_p": 0.0,
        "window_p": 0.0,
        "gamma_p": 0.0,
    }
    plain = MultiCropAugmentation(global_size=size, hflip_p=0.0, **off)(img)["global"]
    torch.testing.assert_close(plain[0, 0], normalize_hu(img))
    flipped = MultiCropAugmentation(global_size=size, hflip_p=1.0, vflip_p=1.0, **off)(img)["global"]
    torch.testing.assert_close(flipped[1, 0], normalize_hu(img).flip(0).flip(1))


def test_gram_crops_align_with_global_crops():
    aug = MultiCropAugmentation(global_size=48, local_size=16, n_local=1, gram_size=96, noise_p=0.0)
    img = _ct_slice()
    for seed in range(4):
        out = aug(img, generator=torch.Generator().manual_seed(seed))
        down = F.interpolate(out["global_gram"], size=(48, 48), mode="bilinear", antialias=True)
        err = (down - out["global"]).abs().mean()
        assert err < 0.05 * out["global"].std(), f"seed {seed}: {err}"
        # A different crop of the same slice is far off: the check has teeth.
        assert (down.flip(0) - out["global"]).abs().mean() > 4 * err


def test_multicrop_small_input_slice():
    img = _ct_slice(20, 24)
    out = MultiCropAugmentation(global_size=64, local_size=32, n_local=2, gram_size=128)(img[None])
    assert out["global"].shape == (2, 1, 64, 64) and out["global_gram"].shape == (2, 1, 128, 128)
    assert all(torch.isfinite(v).all() for v in out.values())


def test_collate_multicrop():
    aug = MultiCropAugmentation(global_size=32, local_size=16, n_local=3, gram_size=64)
    samples = [aug(_ct_slice(seed=i), generator=torch.Generator().manual_seed(i)) for i in range(4)]
    batch = collate_multicrop(samples)
    assert batch["global"].shape == (2, 4, 1, 32, 32)
    assert batch["local"].shape == (3, 4, 1, 16, 16)
    assert batch["global_gram"].shape == (2, 4, 1, 64, 64)
    assert torch.equal(batch["global"][:, 2], samples[2]["global"])
    assert torch.equal(batch["local"][1, 3], samples[3]["local"][1])


def test_fresh_head_prototype_rows_dinov3_or_unit():
    torch.manual_seed(0)
    dinov3 = DINOHead(32, out_dim=500, hidden_dim=24, bottleneck_dim=8)  # dinov3/layers/dino_head.py init
    assert float(dinov3.last_layer.weight.std()) == pytest.approx(0.02, rel=0.15)
    unit = DINOHead(32, out_dim=500, hidden_dim=24, bottleneck_dim=8, last_layer_init="unit")
    torch.testing.assert_close(unit.last_layer.weight.norm(dim=1), torch.ones(500))
    assert type(unit.last_layer) is nn.Linear  # still a plain, freely trained layer
    with pytest.raises(ValueError, match="last_layer_init"):
        DINOHead(32, 50, last_layer_init="weight_norm")
