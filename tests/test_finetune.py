"""Fine-tuning (issue #4): data wrappers, Trainer runs on CPU, resume equivalence, 2-process accelerate launch,
Hub push against a local stand-in. Tiny model (hidden 32, 4 blocks), 64-px patches, 12×96×96 volumes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import huggingface_hub
import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from conftest import tiny_config
from transformers import AutoImageProcessor, AutoModelForSemanticSegmentation, TrainerCallback, pipeline
from transformers.trainer_utils import get_last_checkpoint

from meddinov3_hf import MedDINOv3ImageProcessor, MedDINOv3Model
from meddinov3_hf.data.slices import build_slice_dataset
from meddinov3_hf.data.synthetic import write_nnunet_dataset
from meddinov3_hf.finetuning import hub as hub_module
from meddinov3_hf.finetuning import run_finetune
from meddinov3_hf.finetuning.arguments import FinetuneArguments, FinetuneTrainingArguments
from meddinov3_hf.finetuning.data import EpochSampler, TrainSliceDataset, derive_target_spacing
from meddinov3_hf.finetuning.hub import push_finetuned_model, push_slice_dataset
from meddinov3_hf.finetuning.trainer import SliceDiceMetric, build_trainer

REPO = Path(__file__).resolve().parents[1]
SPACING = (2.5, 0.8, 0.8)


class FakeHfApi:
    """Stand-in for `huggingface_hub.HfApi`: records repos and the files of each commit (read at commit time)."""

    instances: list[FakeHfApi] = []

    def __init__(self, token: str | None = None):
        self.repos: list[dict] = []
        self.commits: list[dict] = []
        FakeHfApi.instances.append(self)

    def whoami(self):  # what the pre-training push check asks (a write token of user "me")
        return {"name": "me", "orgs": [], "auth": {"accessToken": {"role": "write"}}}

    def create_repo(self, **kwargs):
        self.repos.append(kwargs)

    def create_commit(self, repo_id, operations, commit_message, repo_type=None):
        files = {}
        for op in operations:
            source = op.path_or_fileobj
            files[op.path_in_repo] = Path(source).read_bytes() if isinstance(source, str) else source
        self.commits.append({"repo_id": repo_id, "repo_type": repo_type, "files": files})
        return f"https://hub.invalid/{repo_id}"


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("finetune")
    write_nnunet_dataset(root / "ds", n_cases=5, shape=(12, 96, 96), spacing=SPACING, seed=0)
    model = MedDINOv3Model(tiny_config())
    model.save_pretrained(root / "backbone")
    MedDINOv3ImageProcessor().save_pretrained(root / "backbone")
    return root


def _argv(ws: Path, out: Path, *extra: str, model: Path | None = None) -> list[str]:
    return [
        "--dataset", str(ws / "ds"), "--model", str(model or ws / "backbone"), "--fold", "0", "--patch_size", "64",
        "--slice_cache_dir", str(ws / "cache"), "--output_dir", str(out), "--per_device_train_batch_size", "2",
        "--iterations_per_epoch", "2", "--report_to", "none", "--disable_tqdm", "true", "--seed", "7",
        *extra,
    ]  # fmt: skip


# ---------------------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------------------


def test_target_spacing_follows_the_896_rule(workspace):
    slices = build_slice_dataset(workspace / "ds", workspace / "cache")
    # median spacing 0.8 mm × median shape 96 / patch 64 = 1.2 mm; a cap of 80 px replaces the shape.
    assert derive_target_spacing(slices, 64) == pytest.approx((1.2, 1.2))
    assert derive_target_spacing(slices, 896, reference_patch_cap=512) == pytest.approx((0.8 * 96 / 896,) * 2)
    assert derive_target_spacing(slices, 64, reference_patch_cap=80) == pytest.approx((1.0, 1.0))


def test_training_samples_depend_only_on_seed_epoch_and_index(workspace):
    slices = build_slice_dataset(workspace / "ds", workspace / "cache")
    make = lambda seed: TrainSliceDataset(slices, 8, 64, 1.2, seed=seed, oversample_foreground=0.33)  # noqa: E731
    a, b = make(0), make(0)
    # Out of order and from another instance (as a dataloader worker would): identical samples.
    for index in (11, 3, 8):
        sa, sb = a[index], b[index]
        assert torch.equal(sa["pixel_values"], sb["pixel_values"]) and torch.equal(sa["labels"], sb["labels"])
    assert a[0]["pixel_values"].shape == (1, 64, 64) and a[0]["labels"].dtype == torch.int64
    assert not torch.equal(a[1]["pixel_values"], a[1 + 8]["pixel_values"])  # epoch 1 differs from epoch 0
    assert not torch.equal(a[1]["pixel_values"], make(1)[1]["pixel_values"])  # the seed matters
    sampler = EpochSampler(8)
    sampler.set_epoch(2)
    assert list(sampler) == list(range(16, 24))


def test_foreground_oversampling_centres_patches_on_foreground(workspace):
    slices = build_slice_dataset(workspace / "ds", workspace / "cache")
    always = TrainSliceDataset(slices, 16, 32, 1.2, seed=0, oversample_foreground=1.0, augment=False)
    assert all((always[i]["labels"] > 0).any() for i in range(16))


def test_slice_dice_metric_pools_over_batches():
    metric = SliceDiceMetric({0: "bg", 1: "a", 2: "b", 3: "absent"}, ignore_index=255)
    pred1, gt1 = torch.tensor([[1, 1, 0, 2]]), torch.tensor([[1, 0, 0, 2]])
    pred2, gt2 = torch.tensor([[1, 2, 2, 0]]), torch.tensor([[1, 255, 2, 2]])  # 255 ignored
    assert metric(type("P", (), {"predictions": pred1, "label_ids": gt1})()) is None
    out = metric(type("P", (), {"predictions": pred2, "label_ids": gt2})(), compute_result=True)
    # class a: hits 2, |P| 3, |G| 2 → 0.8; class b: hits 2, |P| 2, |G| 3 → 0.8; absent → 1.
    assert out["dice_a"] == pytest.approx(0.8) and out["dice_b"] == pytest.approx(0.8)
    assert out["dice_absent"] == 1.0 and out["dice"] == pytest.approx((0.8 + 0.8 + 1) / 3)
    assert metric.total.sum() == 0  # reset for the next evaluation


# ---------------------------------------------------------------------------------------------------------
# Training runs
# ---------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trained(workspace) -> tuple[Path, list[FakeHfApi]]:
    out = workspace / "run"
    FakeHfApi.instances.clear()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(hub_module, "HfApi", FakeHfApi)
        mp.setattr(huggingface_hub, "HfApi", FakeHfApi)  # the pre-training push check builds its own
        argv = _argv(
            workspace, out, "--max_steps", "12", "--learning_rate", "3e-3", "--backbone_learning_rate", "3e-4",
            "--disable_augmentation", "--logging_steps", "1", "--eval_strategy", "steps", "--eval_steps", "6",
            "--save_steps", "6", "--load_best_model_at_end", "--push_to_hub", "--hub_model_id", "me/ct-seg",
        )  # fmt: skip
        assert run_finetune(argv) == 0
    return out, list(FakeHfApi.instances)


def test_trainer_loss_goes_down_and_evaluates_volumes(trained):
    out, _ = trained
    state = json.loads((out / "trainer_state.json").read_text())
    losses = [e["loss"] for e in state["log_history"] if "loss" in e]
    assert len(losses) == 12
    assert np.mean(losses[-3:]) < np.mean(losses[:3])
    evals = [e for e in state["log_history"] if "eval_volume_dice" in e]
    assert len(evals) == 2 and {"eval_dice", "eval_dice_liver", "eval_volume_dice_kidney"} <= set(evals[0])
    # Best checkpoint chosen by mean volume Dice and kept.
    best = max(evals, key=lambda e: e["eval_volume_dice"])
    assert state["best_metric"] == pytest.approx(best["eval_volume_dice"])
    assert Path(state["best_model_checkpoint"]).name == f"checkpoint-{best['step']}"
    assert (out / f"checkpoint-{best['step']}").is_dir() and not (out / ".checkpoint-staging").exists()
    metrics = json.loads((out / "validation" / "metrics.json").read_text())
    assert set(metrics["mean"]) == {"liver", "kidney", "spleen", "mean"}
    assert set(metrics["mean"]["mean"]) == {"dice", "hd95", "nsd"}


def test_output_folder_loads_with_auto_classes_and_pipeline(trained, workspace):
    out, _ = trained
    model = AutoModelForSemanticSegmentation.from_pretrained(out).eval()
    processor = AutoImageProcessor.from_pretrained(out)
    assert model.config.id2label == {0: "background", 1: "liver", 2: "kidney", 3: "spleen"}
    assert processor.target_spacing == pytest.approx((1.2, 1.2))  # working spacing saved with the model
    from meddinov3_hf.data.synthetic import make_synthetic_ct

    hu, _ = make_synthetic_ct((1, 96, 96), SPACING, seed=3)
    segments = pipeline("image-segmentation", model=str(out))(hu[0], spacing=SPACING[1:])
    assert segments and all(s["mask"].size == (96, 96) for s in segments)
    assert {s["label"] for s in segments} <= set(model.config.id2label.values())
    card = (out / "README.md").read_text()
    assert "model-index" in card and "not for clinical decisions" in card and "MedDINOv3Synthetic" in card


def test_push_to_hub_uploads_model_processor_and_card(trained):
    out, apis = trained
    (api,) = [a for a in apis if a.repos or a.commits]  # the other one only answered the pre-training check
    assert api.repos == [{"repo_id": "me/ct-seg", "repo_type": "model", "private": None, "exist_ok": True}]
    (commit,) = api.commits
    files = commit["files"]
    assert {"model.safetensors", "config.json", "preprocessor_config.json", "README.md"} <= set(files)
    assert "validation/metrics.json" in files
    assert not any(name.startswith(("checkpoint-", "_")) for name in files)
    assert files["model.safetensors"] == (out / "model.safetensors").read_bytes()
    assert b"me/ct-seg" in files["README.md"]


def test_push_slice_dataset_writes_readable_parquet_shards(workspace, tmp_path):
    slices = build_slice_dataset(workspace / "ds", workspace / "cache")
    api = FakeHfApi()
    push_slice_dataset(slices, "me/ct-slices", rows_per_shard=25, api=api)
    assert api.repos[0]["repo_type"] == "dataset" and api.repos[0]["private"] is True
    files = api.commits[0]["files"]
    shards = sorted(k for k in files if k.startswith("data/"))
    assert len(shards) == 3 and "README.md" in files  # 60 slices in shards of 25
    rows = 0
    for name in shards:
        (tmp_path / "s.parquet").write_bytes(files[name])
        rows += pq.read_table(tmp_path / "s.parquet").num_rows
    assert rows == len(slices)


def test_push_refuses_an_incomplete_folder(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="preprocessor_config.json"):
        push_finetuned_model(tmp_path, "me/x", api=FakeHfApi())


class _StopAt(TrainerCallback):
    """Simulates a kill right after checkpoint `step` was written."""

    def __init__(self, step: int):
        self.step = step

    def on_save(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            control.should_training_stop = True


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(folder / "model.safetensors")


def test_resume_reproduces_the_uninterrupted_run(workspace):
    # Augmentation and drop-path on: data order, sample randomness and the global RNG all have to resume.
    common = ("--max_steps", "6", "--save_steps", "3", "--logging_steps", "1", "--learning_rate", "1e-3",
              "--volume_eval_during_training", "false")  # fmt: skip
    full = workspace / "full"
    assert run_finetune(_argv(workspace, full, *common)) == 0

    part = workspace / "part"
    parser_args = _parse(_argv(workspace, part, *common))
    trainer, _ = build_trainer(*parser_args, callbacks=[_StopAt(3)])
    trainer.train()
    assert get_last_checkpoint(str(part)).endswith("checkpoint-3") and not (part / "checkpoint-6").exists()
    (part / ".checkpoint-staging" / "checkpoint-9").mkdir(parents=True)  # debris of a kill while saving
    assert get_last_checkpoint(str(part)).endswith("checkpoint-3")
    # Resume in a fresh Trainer (as a new process would) and count the steps it really runs.
    resumed, _ = build_trainer(*_parse(_argv(workspace, part, *common)), callbacks=[counter := _CountSteps()])
    resumed.train(resume_from_checkpoint=str(part / "checkpoint-3"))
    assert counter.steps == 3 and resumed.state.global_step == 6

    a, b = _weights(full), resumed.model.state_dict()
    assert a.keys() <= b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-6, rtol=0, msg=key)
    losses = lambda history: [e["loss"] for e in history if "loss" in e]  # noqa: E731
    full_history = json.loads((full / "trainer_state.json").read_text())["log_history"]
    assert len(losses(resumed.state.log_history)) == 6
    assert losses(resumed.state.log_history)[-3:] == pytest.approx(losses(full_history)[-3:], abs=1e-6)


class _CountSteps(TrainerCallback):
    def __init__(self):
        self.steps = 0

    def on_step_end(self, args, state, control, **kwargs):
        self.steps += 1


def _parse(argv: list[str]):
    from transformers import HfArgumentParser

    return HfArgumentParser((FinetuneArguments, FinetuneTrainingArguments)).parse_args_into_dataclasses(
        args=argv
    )


def test_dinov3_checkpoint_folder_is_converted_on_the_fly(workspace, tmp_path):
    from conftest import reference_dinov3

    reference_dinov3(tiny_config()).save_pretrained(tmp_path / "dinov3")
    args, training_args = _parse(
        _argv(workspace, tmp_path / "out", "--max_steps", "1", model=tmp_path / "dinov3")
    )
    trainer, _ = build_trainer(args, training_args)
    assert trainer.backbone_learning_rate == 1e-4  # natural-image weights: higher rate (docs/method.md §4)
    converted = list((tmp_path / "out").glob("_base_model-*"))
    assert len(converted) == 1 and (converted[0] / "config.json").is_file()
    groups = trainer.create_optimizer().param_groups
    assert [g["lr"] for g in groups] == [3e-4, 1e-4] and all(g["weight_decay"] == 0.05 for g in groups)
    assert groups[0]["betas"] == (0.9, 0.98)


def test_two_process_accelerate_launch(workspace, tmp_path):
    out = tmp_path / "ddp"
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               WANDB_DISABLED="true", OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")  # fmt: skip
    accelerate = Path(sys.executable).with_name("accelerate")
    # accelerate 1.15's `--cpu` runs ONE process whatever --num_processes says; the torchrun-based launcher
    # with no visible GPU gives two gloo ranks (run_finetune tells transformers it is on CPU).
    cmd = [str(accelerate), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", str(REPO / "training" / "finetune.py"),
           *_argv(workspace, out, "--max_steps", "2", "--eval_strategy", "steps", "--eval_steps", "2")]  # fmt: skip
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    state = json.loads((out / "trainer_state.json").read_text())
    assert state["global_step"] == 2
    assert "2 process(es), 4 patches" in done.stderr  # really two ranks, each with its own batches
    assert any("eval_volume_dice" in e for e in state["log_history"])
    AutoModelForSemanticSegmentation.from_pretrained(out)
    assert (out / "validation" / "metrics.json").is_file()


def test_training_uses_the_model_processors_intensity_window(workspace, tmp_path):
    """A model whose processor windows HU differently must be trained on that same normalisation."""
    model_dir = tmp_path / "windowed"
    MedDINOv3Model(tiny_config()).save_pretrained(model_dir)
    MedDINOv3ImageProcessor(window="abdomen").save_pretrained(model_dir)
    args = _argv(
        workspace,
        tmp_path / "out",
        "--disable_augmentation",
        "true",
        "--max_steps",
        "1",
        "--volume_eval_during_training",
        "false",
        model=model_dir,
    )
    trainer, data = build_trainer(*_parse(args))
    for dataset in (data.train, data.eval):
        pixels = torch.stack([dataset[i]["pixel_values"] for i in range(4)])
        assert pixels.min() >= -1.0 - 1e-5 and pixels.max() <= 1.0 + 1e-5  # abdomen window → [-1, 1]
        assert pixels.min() < -0.99  # air reaches the window's lower end (reference scaling would give ≈ -6)


def test_target_spacing_flag_is_one_per_axis_tuple_end_to_end(workspace, tmp_path):
    """`--target_spacing` takes one value (both axes, the old usage) or ROW COL; the tuple reaches the saved
    processor and both transforms, which are built from that processor (no normaliser patched in later)."""
    base = _argv(workspace, tmp_path / "o", "--max_steps", "1", "--volume_eval_during_training", "false")
    assert _parse(base + ["--target_spacing", "1.2"])[0].target_spacing == (1.2, 1.2)
    with pytest.raises(ValueError, match="one or two positive mm values"):
        _parse(base + ["--target_spacing", "1", "2", "3"])
    trainer, data = build_trainer(*_parse(base + ["--target_spacing", "1.0", "0.8"]))
    processor = trainer.processing_class
    assert processor.target_spacing == data.target_spacing == (1.0, 0.8)
    transforms = (data.train.foreground_transform, data.train.random_transform, data.eval.transform)
    for transform in transforms:
        assert transform.target_spacing == (1.0, 0.8)
        assert transform.normalize == processor.normalize  # the processor's own method
    assert not hasattr(data.train, "set_normalizer")
    with pytest.raises(ValueError, match="either a processor or a target_spacing"):
        TrainSliceDataset(data.train_slices, 2, 64, 1.0, processor=processor)
