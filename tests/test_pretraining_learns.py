"""Fast version of benchmarks/pretrain_learns.py: a few steps of the shipped stage-1 recipe from scratch, tiny
sizes. No loss is NaN, and the label-free health probe of the EMA teacher moves away from collapse: the mean
pairwise cosine of held-out CLS features drops below its value at init (the benchmark measures retrieval and the
organ probe, which need hundreds of steps)."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from meddinov3_hf.data.ct3m import build_ct3m
from meddinov3_hf.data.synthetic import make_synthetic_ct
from meddinov3_hf.pretraining.config import load_config
from meddinov3_hf.pretraining.health import HealthProbe
from meddinov3_hf.pretraining.loop import _health_slices, build_backbone, train

CONFIGS = Path(__file__).resolve().parents[1] / "training" / "configs"


@pytest.fixture(autouse=True)
def _fast_streams(monkeypatch):
    import datasets.config

    monkeypatch.setattr(datasets.config, "SLEEP_TIME_ON_THREADS_SHUTDOWN", 0)


def test_scratch_stage1_moves_health_metric_and_stays_finite(tmp_path):
    from accelerate.state import AcceleratorState, GradientState, PartialState

    for i in range(4):
        hu, _ = make_synthetic_ct(shape=(6, 64, 64), seed=100 + i)
        path = tmp_path / "src" / f"case{i}.nii.gz"
        path.parent.mkdir(parents=True, exist_ok=True)
        nib.save(nib.Nifti1Image(np.transpose(hu, (2, 1, 0)), np.diag([0.8, 0.8, 2.5, 1.0])), path)
    build_ct3m([f"synth={tmp_path / 'src'}"], tmp_path / "ct3m", quiet=True)
    steps = 30
    cfg = load_config(
        CONFIGS / "stage1.yaml",
        [
            "model.scratch={hidden_size: 32, num_hidden_layers: 2, num_attention_heads: 2, intermediate_size: 64,"
            " patch_size: 8}",
            "heads.out_dim=128",
            "heads.ibot_out_dim=128",
            "heads.hidden_dim=64",
            "heads.bottleneck_dim=32",
            "crops.global_size=32",
            "crops.local_size=16",
            "crops.n_local=2",
            "train.batch_size=12",
            "train.mixed_precision=no",
            "train.num_workers=0",
            "train.log_with=none",
            "train.log_every=1",
            "train.checkpoint_every=0",
            "train.shuffle_buffer_size=16",
            f"train.max_steps={steps}",
            f"health.every={steps}",
            "health.num_slices=16",
            "health.image_size=32",
        ],
    )
    cfg.dataset, cfg.output_dir = str(tmp_path / "ct3m"), str(tmp_path / "run")
    torch.manual_seed(cfg.train.seed)  # as train() does before building the scratch backbone
    init_backbone, _ = build_backbone(cfg, None)
    at_init = HealthProbe(_health_slices(cfg), image_size=cfg.health.image_size).evaluate(init_backbone)

    for reset in (
        lambda: AcceleratorState._reset_state(True),
        GradientState._reset_state,
        PartialState._reset_state,
    ):
        reset()
    try:
        result = train(cfg)
    finally:
        for reset in (
            lambda: AcceleratorState._reset_state(True),
            GradientState._reset_state,
            PartialState._reset_state,
        ):
            reset()
    history = result["history"]
    assert len(history) == steps
    assert all(np.isfinite(v) for h in history for k, v in h.items() if k.startswith("loss/"))
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    trained = [r["health"] for r in records if "health" in r][-1]
    assert at_init["mean_cosine"] < 0.9999  # a fresh ViT's CLS features differ between images (LayerScale)
    assert trained["mean_cosine"] < at_init["mean_cosine"] - 1e-3, (at_init, trained)
