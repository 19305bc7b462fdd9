"""Pretraining loop: a few steps of each stage with a tiny model, exact resume, export, 2-process launch."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from transformers import AutoModel

import meddinov3_hf  # noqa: F401  (registers the Auto classes)
from meddinov3_hf import MedDINOv3Config, MedDINOv3Model
from meddinov3_hf.data.ct3m import build_ct3m
from meddinov3_hf.data.synthetic import make_synthetic_ct
from meddinov3_hf.pretraining.config import apply_overrides, load_config
from meddinov3_hf.pretraining.loop import CropSizePlan, train

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "training" / "configs"

TINY_BACKBONE = dict(
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=2,
    intermediate_size=64,
    num_register_tokens=4,
    patch_size=16,
    aggregation_layers=[0, 1],
)
TINY = [
    "heads.out_dim=64",
    "heads.hidden_dim=32",
    "heads.bottleneck_dim=16",
    "crops.global_size=32",
    "crops.local_size=16",
    "crops.n_local=2",
    "train.batch_size=4",
    "train.mixed_precision=no",
    "train.num_workers=0",
    "train.log_with=none",
    "train.log_every=1",
    "train.shuffle_buffer_size=8",
    "health.every=2",
    "health.num_slices=6",
    "health.image_size=32",
    "schedule.iters_per_epoch=4",
    "schedule.epochs=2",
    "schedule.warmup_epochs=0.5",
    "schedule.warmup_teacher_temp_epochs=0.5",
    "schedule.freeze_last_layer_epochs=0.25",
]
STAGE3_SIZES = "crops.size_choices=[{global: 32, local: 16, gram: 48, p: 0.5}, {global: 48, local: 16, gram: 64, p: 0.5}]"
SCRATCH = "model.scratch={" + ", ".join(f"{k}: {v}" for k, v in TINY_BACKBONE.items()) + "}"


def _reset_accelerate() -> None:
    # Several Accelerator instances in one test process: the shared state must be cleared between runs.
    from accelerate.state import AcceleratorState, GradientState, PartialState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    PartialState._reset_state()


@pytest.fixture(autouse=True)
def _no_stream_shutdown_sleep(monkeypatch):
    # datasets sleeps 5 s whenever a Parquet stream ends early or an epoch ends (an Arrow thread workaround);
    # harmless in training, but it would dominate these tiny runs.
    import datasets.config

    monkeypatch.setattr(datasets.config, "SLEEP_TIME_ON_THREADS_SHUTDOWN", 0)


@pytest.fixture(scope="module")
def ct3m(tmp_path_factory) -> Path:
    """A tiny CT-3M build (6 synthetic volumes → 6 Parquet shards of 6 slices) from NIfTI files."""
    root = tmp_path_factory.mktemp("ct3m")
    for i in range(6):
        hu, _ = make_synthetic_ct(shape=(6, 48, 48), seed=i)
        path = root / "src" / f"case{i}.nii.gz"
        path.parent.mkdir(parents=True, exist_ok=True)
        nib.save(nib.Nifti1Image(np.transpose(hu, (2, 1, 0)), np.diag([0.8, 0.8, 2.5, 1.0])), path)
    build_ct3m([f"synth={root / 'src'}"], root / "ct3m", max_rows_per_shard=6, quiet=True)
    return root / "ct3m"


@pytest.fixture(scope="module")
def tiny_init(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("init") / "tiny"
    torch.manual_seed(0)
    MedDINOv3Model(MedDINOv3Config(**TINY_BACKBONE)).save_pretrained(folder)
    return folder


def _cfg(stage: int, ct3m: Path, out: Path, *extra: str, init: Path | None = None):
    cfg = load_config(CONFIGS / f"stage{stage}.yaml", [*TINY, SCRATCH, *extra])
    cfg.dataset, cfg.output_dir = str(ct3m), str(out)
    cfg.init = str(init) if init is not None else None
    return cfg


def _run(cfg):
    _reset_accelerate()
    try:
        return train(cfg)
    finally:
        _reset_accelerate()


def _losses(history):
    return [(h["step"], h["loss/loss"], h["loss/dino"], h["loss/ibot"], h["loss/koleo"]) for h in history]


def test_config_overrides_and_errors():
    cfg = load_config(CONFIGS / "stage1.yaml", ["optim.base_lr=5e-4", "crops.global_scale=[0.4, 1.0]"])
    assert cfg.optim.base_lr == 5e-4 and cfg.crops.global_scale == [0.4, 1.0]
    assert cfg.crops.n_local == 8 and cfg.train.batch_size == 64 and cfg.optim.clip_grad == 3.0
    with pytest.raises(KeyError, match="unknown config key"):
        apply_overrides(cfg, ["optim.base_rl=1"])
    with pytest.raises(ValueError, match="gram"):
        load_config(CONFIGS / "stage1.yaml", ["loss.gram_weight=1"])


def test_stage3_sizes_are_a_function_of_step():
    cfg = load_config(CONFIGS / "stage3.yaml")
    a, b = CropSizePlan(cfg.crops, True, seed=0), CropSizePlan(cfg.crops, True, seed=0)
    draws = [a.at(s) for s in range(200)]
    assert draws == [b.at(s) for s in range(200)]
    assert {d[0] for d in draws} == {512, 768} and len(set(draws)) >= 3
    assert sum(d[0] == 512 for d in draws) / 200 == pytest.approx(0.3, abs=0.1)


def test_stage1_resume_is_exact_and_export_loads(ct3m, tiny_init, tmp_path):
    full = _run(_cfg(1, ct3m, tmp_path / "full", "train.checkpoint_every=0", init=tiny_init))
    assert full["step"] == 8 and len(full["history"]) == 8
    assert all(np.isfinite(v) for row in _losses(full["history"]) for v in row)

    part = tmp_path / "part"
    # stop_at_step: stop early with the full run's schedules (max_steps would shorten them).
    first = _run(_cfg(1, ct3m, part, "train.checkpoint_every=4", "train.stop_at_step=4", init=tiny_init))
    assert (part / "checkpoints" / "step_00000004" / "pretrain_state.json").is_file()
    second = _run(_cfg(1, ct3m, part, "train.checkpoint_every=4", "resume=latest", init=tiny_init))
    resumed = _losses(first["history"]) + _losses(second["history"])
    np.testing.assert_allclose(np.array(resumed), np.array(_losses(full["history"])), rtol=0, atol=1e-6)

    # Same teacher weights at the end, exported as a MedDINOv3Model folder that AutoModel loads.
    a = AutoModel.from_pretrained(tmp_path / "full" / "export" / "final")
    b = AutoModel.from_pretrained(part / "export" / "final")
    assert isinstance(a, MedDINOv3Model) and a.config.drop_path_rate == 0.0
    for (name, p), q in zip(a.state_dict().items(), b.state_dict().values()):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-6, msg=name)
    assert (part / "export" / "final" / "preprocessor_config.json").is_file()
    health = [json.loads(line) for line in (part / "metrics.jsonl").read_text().splitlines()]
    health = [h["health"] for h in health if "health" in h]
    assert health and all(0.0 <= h["retrieval_top1"] <= 1.0 and h["effective_rank"] >= 1 for h in health)


def test_stage2_and_stage3_from_previous_export(ct3m, tiny_init, tmp_path):
    s1 = _run(_cfg(1, ct3m, tmp_path / "s1", "train.max_steps=2", "train.checkpoint_every=0", init=tiny_init))
    s2 = _run(
        _cfg(
            2,
            ct3m,
            tmp_path / "s2",
            "train.max_steps=2",
            "crops.gram_size=48",
            "gram.refresh_every=1",
            "health.every=0",
            "train.checkpoint_every=2",
            init=Path(s1["export"]),
        )
    )
    assert all(np.isfinite(h["loss/gram"]) for h in s2["history"])
    # Stage 3 starts from the stage-2 checkpoint folder; crop sizes change per step.
    s3 = _run(
        _cfg(
            3,
            ct3m,
            tmp_path / "s3",
            "train.max_steps=4",
            STAGE3_SIZES,
            "health.every=0",
            "model.gradient_checkpointing=true",
            "train.checkpoint_every=0",
            init=tmp_path / "s2" / "checkpoints" / "step_00000002",
        )
    )
    assert all(np.isfinite(h["loss/loss"]) and np.isfinite(h["loss/gram"]) for h in s3["history"])
    assert {h["train/global_crop_size"] for h in s3["history"]} <= {32.0, 48.0}


def test_from_scratch_refuses_overwrite(ct3m, tmp_path):
    cfg = _cfg(1, ct3m, tmp_path / "run", "train.max_steps=1", "train.checkpoint_every=1", "health.every=0")
    result = _run(cfg)
    assert result["step"] == 1
    with pytest.raises(FileExistsError, match="--resume"):
        _run(cfg)


@pytest.mark.slow
def test_two_process_launch(ct3m, tiny_init, tmp_path):
    """2-process DDP (gloo) through `accelerate launch training/pretrain.py`: stage 1, then --resume.

    accelerate 1.x's `launch --cpu --num_processes 2` starts ONE process (its simple launcher); two CPU
    processes need the torchrun path: `--multi_gpu` with ACCELERATE_USE_CPU=1 and no visible GPU."""
    env = dict(
        os.environ,
        CUDA_VISIBLE_DEVICES="",
        ACCELERATE_USE_CPU="1",
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        OMP_NUM_THREADS="1",
        TOKENIZERS_PARALLELISM="false",
    )
    out = tmp_path / "ddp"
    base = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        str(REPO / "training" / "pretrain.py"),
        "--config",
        str(CONFIGS / "stage1.yaml"),
        "--dataset",
        str(ct3m),
        "--init",
        str(tiny_init),
        "--output_dir",
        str(out),
        *TINY,
        "train.num_workers=1",
        "train.checkpoint_every=2",
        "health.every=0",
    ]
    # The resumed launch uses no loader worker: batch content does not depend on the number of workers.
    for extra in (["--stop_at_step", "2"], ["--stop_at_step", "3", "--resume", "train.num_workers=0"]):
        proc = subprocess.run(
            base + extra, env=env, capture_output=True, text=True, timeout=240, cwd=tmp_path
        )
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert records[0]["step"] == 0 and "peak_lr" in records[0]["start"]
    records = records[1:]
    assert [r["step"] for r in records] == [1, 2, 3]
    assert all(np.isfinite(r["loss/loss"]) for r in records)
    state = json.loads((out / "checkpoints" / "step_00000003" / "pretrain_state.json").read_text())
    assert state["world_size"] == 2 and len(state["positions"]) == 2
    assert isinstance(AutoModel.from_pretrained(out / "export" / "final"), MedDINOv3Model)


# accelerate (1.15) never enables FSDP on CPU: with ACCELERATE_USE_CPU its state stays MULTI_CPU and the
# FSDP plugin built from `launch --use_fsdp` is dropped. This shim (test only) keeps everything else of
# accelerate's path (plugin from the launch flags, FSDP2 prepare, sharded save/load_state) and only turns the
# gloo MULTI_CPU state into FSDP, which torch's `fully_shard` supports on CPU.
_FSDP_ON_CPU = """
import runpy, sys
from accelerate.state import AcceleratorState, PartialState
from accelerate.utils import DistributedType

_init = AcceleratorState.__init__


def _fsdp_on_cpu(self, *args, **kwargs):
    _init(self, *args, **kwargs)
    plugin = kwargs.get("fsdp_plugin")
    if plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
        self.distributed_type = DistributedType.FSDP
        self.fsdp_plugin = plugin
        PartialState._shared_state["distributed_type"] = DistributedType.FSDP  # as accelerate does on GPUs


AcceleratorState.__init__ = _fsdp_on_cpu
script = sys.argv.pop(1)
sys.argv[0] = script
runpy.run_path(script, run_name="__main__")
"""


def _launch(launch_args: list[str], script_args: list[str], cwd: Path) -> None:
    env = dict(
        os.environ,
        CUDA_VISIBLE_DEVICES="",
        ACCELERATE_USE_CPU="1",
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        OMP_NUM_THREADS="1",
        TOKENIZERS_PARALLELISM="false",
    )
    common = ["--num_processes", "2", "--num_machines", "1", "--dynamo_backend", "no"]
    cmd = [sys.executable, "-m", "accelerate.commands.launch", *common, *launch_args, *script_args]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=cwd)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


FSDP_LAUNCH = [
    "--use_fsdp",  # the torchrun path, like --multi_gpu (only one of them may be given)
    "--fsdp_version",
    "2",
    "--fsdp_auto_wrap_policy",
    "TRANSFORMER_BASED_WRAP",
    "--fsdp_transformer_layer_cls_to_wrap",
    "MedDINOv3Layer,DINOHead",
    "--fsdp_state_dict_type",
    "SHARDED_STATE_DICT",
    "--fsdp_reshard_after_forward",
    "true",
]


@pytest.mark.slow
def test_fsdp_two_process_launch(ct3m, tiny_init, tmp_path):
    """2-process FSDP2 (gloo, CPU) through `accelerate launch --use_fsdp --fsdp_version 2`: stage 1 equal to
    the same run under DDP (losses and EMA teacher), export equal to the gathered teacher, then --resume."""
    shim = tmp_path / "fsdp_on_cpu.py"
    shim.write_text(_FSDP_ON_CPU)

    def script(out: Path, *extra: str) -> list[str]:
        return [
            str(REPO / "training" / "pretrain.py"),
            "--config",
            str(CONFIGS / "stage1.yaml"),
            "--dataset",
            str(ct3m),
            "--init",
            str(tiny_init),
            "--output_dir",
            str(out),
            *TINY,
            "train.num_workers=0",
            "train.export_every=2",
            *extra,
        ]

    ddp, out = tmp_path / "ddp", tmp_path / "fsdp"
    _launch(
        ["--multi_gpu", "--mixed_precision", "no"],
        script(ddp, "--stop_at_step", "2", "health.every=0"),
        tmp_path,
    )
    fsdp = [*FSDP_LAUNCH, "--mixed_precision", "no", str(shim)]
    for extra in (["--stop_at_step", "2"], ["--stop_at_step", "3", "--resume"]):
        _launch(fsdp, script(out, "train.checkpoint_every=2", "health.every=2", *extra), tmp_path)

    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [r for r in records if "loss/loss" in r]
    assert [r["step"] for r in losses] == [1, 2, 3]
    assert all(np.isfinite(r["loss/loss"]) for r in losses)
    assert any("health" in r for r in records)  # the probe ran on a gathered teacher
    reference = [json.loads(line) for line in (ddp / "metrics.jsonl").read_text().splitlines()]
    reference = [r for r in reference if "loss/loss" in r]  # without the step-0 "start" record (peak lr)
    for a, b in zip(losses[:2], reference, strict=True):
        for key in ("loss/loss", "loss/dino", "loss/ibot", "loss/koleo"):
            assert a[key] == pytest.approx(b[key], abs=1e-5), (a["step"], key)
    ckpt = out / "checkpoints" / "step_00000002"
    state = json.loads((ckpt / "pretrain_state.json").read_text())
    assert state["world_size"] == 2 and len(state["positions"]) == 2
    assert any(p.name.startswith("pytorch_model_fsdp") for p in ckpt.iterdir())  # the student, sharded

    # The checkpoint's teacher is the full (gathered) state; the step-2 export is exactly its backbone, loads
    # through AutoModel, equals the DDP run's EMA teacher, and moved away from the initial weights.
    teacher = torch.load(ckpt / "custom_checkpoint_1.pkl", map_location="cpu", weights_only=True)
    exported = AutoModel.from_pretrained(out / "export" / "step_00000002")
    assert isinstance(exported, MedDINOv3Model)
    ddp_teacher = AutoModel.from_pretrained(ddp / "export" / "step_00000002").state_dict()
    init = MedDINOv3Model.from_pretrained(tiny_init).state_dict()
    moved = 0.0
    for name, value in exported.state_dict().items():
        torch.testing.assert_close(value, teacher[f"backbone.{name}"], rtol=0, atol=0, msg=name)
        torch.testing.assert_close(value, ddp_teacher[name], rtol=0, atol=1e-5, msg=name)
        moved = max(moved, float((value - init[name]).abs().max()))
    assert moved > 0.0
    final = AutoModel.from_pretrained(out / "export" / "final").state_dict()
    assert any(not torch.equal(final[k], v) for k, v in exported.state_dict().items())  # step 3 moved it
