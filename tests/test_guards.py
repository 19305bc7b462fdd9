"""The shared output guard and atomic writers (`meddinov3_hf.files`), and the positive side of issue 8's fixes:
what is refused in `test_bad_inputs.py` works when the input is right."""

from __future__ import annotations

import json
import stat
import tracemalloc

import nibabel as nib
import numpy as np
import pytest
import torch
from test_bad_inputs import LPS, Context

from meddinov3_hf.cli import main as cli_main
from meddinov3_hf.files import (
    OutputPathError,
    atomic_dir,
    check_output_path,
    is_temporary,
    remove_stale_temporaries,
    temporary_name,
)
from meddinov3_hf.finetuning.preflight import check_hub_push
from meddinov3_hf.volumes.evaluation import evaluate_folders
from meddinov3_hf.volumes.io import load_volume, save_volume


# -- files.py -------------------------------------------------------------------------------------------------
def test_check_output_path_refusals(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "ct.nii.gz").write_bytes(b"x")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "a.txt").write_text("a")
    with pytest.raises(OutputPathError, match="is the input"):
        check_output_path("in/ct.nii.gz", ["in/ct.nii.gz"], overwrite=True)
    with pytest.raises(OutputPathError, match="inside the input folder"):
        check_output_path("in/x.json", ["in"], overwrite=True)
    with pytest.raises(OutputPathError, match="contains the input"):
        check_output_path("in", ["in/ct.nii.gz"], kind="folder", overwrite=True)
    with pytest.raises(OutputPathError, match="current directory"):
        check_output_path("..", [], kind="folder", overwrite=True)
    with pytest.raises(OutputPathError, match="not empty"):
        check_output_path("full", [], kind="folder")
    with pytest.raises(OutputPathError, match=r"must end with \.json"):
        check_output_path("m.txt", [], suffixes=(".json",))
    with pytest.raises(OutputPathError, match="--overwrite"):
        check_output_path("full/a.txt", [])
    # allowed: a new file, a non-empty folder with overwrite, a file beside (not inside) an input file
    assert check_output_path("full", [], kind="folder", overwrite=True).name == "full"
    assert check_output_path("in/seg.nii.gz", ["in/ct.nii.gz"]).name == "seg.nii.gz"
    assert check_output_path("pred", ["in"], kind="into").name == "pred"
    # a Hub repo id (not a path on disk) is no input to protect
    assert check_output_path("out", ["org/model"], kind="folder").name == "out"


def test_atomic_dir_replaces_only_its_files_with_normal_permissions(tmp_path):
    final = tmp_path / "model"
    with atomic_dir(final) as tmp:
        (tmp / "config.json").write_text("new")
    assert stat.S_IMODE(final.stat().st_mode) == 0o755 & ~_umask()
    (final / "notes.txt").write_text("mine")
    with atomic_dir(final) as tmp:
        (tmp / "config.json").write_text("newer")
    assert (final / "config.json").read_text() == "newer" and (final / "notes.txt").read_text() == "mine"
    with pytest.raises(RuntimeError), atomic_dir(final) as tmp:
        (tmp / "config.json").write_text("half")
        raise RuntimeError("killed")
    assert (final / "config.json").read_text() == "newer"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def _umask() -> int:
    import os

    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_stale_temporaries_only_of_our_pattern(tmp_path):
    ours = temporary_name(tmp_path / "a.nii.gz")
    other_target = temporary_name(tmp_path / "b.nii.gz")
    for path in (ours, other_target):
        path.write_bytes(b"partial")
    (tmp_path / ".a.nii.gz.tmp").write_text("someone else's")
    (tmp_path / "a.nii.gz").write_text("result")
    assert is_temporary(ours, "a.nii.gz") and not is_temporary(tmp_path / ".a.nii.gz.tmp")
    assert remove_stale_temporaries(tmp_path, ["a.nii.gz"]) == [ours]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [other_target.name, ".a.nii.gz.tmp", "a.nii.gz"]
    )


# -- convert: the nnU-Net working spacing, folder permissions --------------------------------------------------
PLANS = {"configurations": {"2d": {"spacing": [0.7, 0.8], "patch_size": [64, 48]}}}


@pytest.mark.parametrize("where", ["in-checkpoint", "beside-dataset-json", "--plans", "--target-spacing"])
def test_convert_nnunet_working_spacing(tmp_path, where):
    results = tmp_path / "nnUNet_results" / "Dataset001" / "nnUNetTrainer__nnUNetPlans__2d"
    ckpt = Context.nnunet_checkpoint(
        results / "fold_0" / "checkpoint_final.pth", PLANS if where == "in-checkpoint" else None
    )
    (results / "dataset.json").write_text(json.dumps({"labels": {"background": 0, "liver": 1, "kidney": 2}}))
    argv = ["convert", str(ckpt), str(tmp_path / "out"), "--blocks", "0,1,2,3"]
    if where == "beside-dataset-json":
        (results / "plans.json").write_text(json.dumps(PLANS))
        argv += ["--labels", str(results / "dataset.json")]
    elif where == "--plans":
        (tmp_path / "my_plans.json").write_text(json.dumps(PLANS))
        argv += ["--plans", str(tmp_path / "my_plans.json")]
    elif where == "--target-spacing":
        argv += ["--target-spacing", "0.7,0.8"]
    assert cli_main(argv) == 0
    processor = json.loads((tmp_path / "out" / "preprocessor_config.json").read_text())
    assert processor["target_spacing"] == [0.7, 0.8]
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    if where != "--target-spacing":
        assert config["image_size"] == [64, 48]
    assert stat.S_IMODE((tmp_path / "out").stat().st_mode) == 0o755 & ~_umask()


def test_convert_nnunet_native_resolution_is_explicit(tmp_path):
    ckpt = Context.nnunet_checkpoint(tmp_path / "checkpoint_final.pth", None)
    argv = ["convert", str(ckpt), str(tmp_path / "out"), "--blocks", "0,1,2,3", "--native-resolution"]
    assert cli_main(argv) == 0
    assert (
        json.loads((tmp_path / "out" / "preprocessor_config.json").read_text()).get("target_spacing") is None
    )


# -- evaluate: grids ------------------------------------------------------------------------------------------
def test_evaluate_flipped_and_permuted_prediction_is_scored_exactly(tmp_path):
    data = np.zeros((24, 20, 5), np.uint8)
    data[5:12, 3:9, 1:4] = 1
    Context.labels(tmp_path / "gt.nii.gz", data=data)
    # the same labels stored with axes permuted and flipped: the same voxels in world space
    flip = np.diag([-1.0, 1.0, 1.0, 1.0])
    flip[0, 3] = 23
    stored = np.transpose(data[::-1], (2, 0, 1))
    affine = LPS @ flip @ np.array([[0, 1, 0, 0], [0, 0, 1, 0], [1, 0, 0, 0], [0, 0, 0, 1.0]])
    nib.save(nib.Nifti1Image(np.ascontiguousarray(stored), affine), tmp_path / "pred.nii.gz")
    result = evaluate_folders(tmp_path / "pred.nii.gz", tmp_path / "gt.nii.gz")
    case = result["cases"]["gt"]
    assert case["metrics"]["1"]["dice"] == 1.0 and case["grid"].startswith("reoriented")
    shifted = LPS.copy()
    shifted[1, 3] += 50
    Context.labels(tmp_path / "far.nii.gz", data=data, affine=shifted)
    with pytest.warns(UserWarning, match="voxel by voxel"):
        result = evaluate_folders(tmp_path / "far.nii.gz", tmp_path / "gt.nii.gz", allow_grid_mismatch=True)
    assert result["cases"]["gt"]["grid"].startswith("mismatch")


def test_evaluate_reports_labels_outside_the_list_in_the_json(tmp_path, capsys):
    Context.labels(tmp_path / "gt.nii.gz")
    Context.labels(tmp_path / "pred.nii.gz")
    argv = ["evaluate", "--pred", str(tmp_path / "pred.nii.gz"), "--gt", str(tmp_path / "gt.nii.gz")]
    with pytest.warns(UserWarning):
        assert cli_main([*argv, "--labels", "1=liver", "-o", str(tmp_path / "m.json")]) == 0
    warnings = json.loads((tmp_path / "m.json").read_text())["warnings"]
    assert len(warnings) == 2 and all("[2]" in w for w in warnings)


# -- probabilities are written slice by slice ---------------------------------------------------------------------
def test_save_volume_streams_probabilities(tmp_path):
    permuted = np.array([[0, 0, 2.5, 0], [0.8, 0, 0, 0], [0, -0.9, 0, 0], [0, 0, 0, 1.0]])
    Context.scan(tmp_path / "ct.nii.gz", affine=permuted, shape=(40, 48, 64))
    volume = load_volume(tmp_path / "ct.nii.gz")
    probabilities = np.random.default_rng(0).random((8, *volume.hu.shape)).astype(np.float16)
    tracemalloc.start()
    save_volume(probabilities, volume, tmp_path / "p.nii.gz", channel_axis=0)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    full_float32 = probabilities.size * 4
    # HEAD made a float16 copy and a float32 copy of the whole array (peak ≈ 1.5 × full_float32).
    assert peak < 0.25 * full_float32, (peak, full_float32)
    saved = np.asanyarray(nib.load(tmp_path / "p.nii.gz").dataobj)
    assert saved.dtype == np.float32
    assert np.array_equal(saved, volume.to_original(probabilities, channel_axis=0).astype(np.float32))


def test_labels_are_not_written_when_the_probabilities_fail(tmp_path, monkeypatch):
    from meddinov3_hf.volumes import io

    Context.scan(tmp_path / "ct.nii.gz")
    model = Context(tmp_path).seg_model

    def failing(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(io, "save_volume", failing)
    argv = [
        "segment",
        "-i",
        str(tmp_path / "ct.nii.gz"),
        "-o",
        str(tmp_path / "seg.nii.gz"),
        "--model",
        str(model),
    ]
    assert cli_main([*argv, "--quiet", "--save-probabilities"]) == 1
    assert not (tmp_path / "seg.nii.gz").exists()


# -- the Hub preflight ------------------------------------------------------------------------------------------
class StandInApi:
    """An `HfApi`-like stand-in answering `whoami` as the Hub does for a token."""

    def __init__(self, role="write", orgs=()):
        self.answer = {
            "name": "alice",
            "orgs": [{"name": o} for o in orgs],
            "auth": {"accessToken": {"role": role}},
        }

    def whoami(self):
        return self.answer


def test_hub_push_preflight(monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    check_hub_push("alice/model", api=StandInApi())
    check_hub_push("lab/model", api=StandInApi(orgs=["lab"]))
    with pytest.raises(ValueError, match="read-only"):
        check_hub_push("alice/model", api=StandInApi(role="read"))
    with pytest.raises(ValueError, match="namespace 'bob'"):
        check_hub_push("bob/model", api=StandInApi())
    with pytest.raises(ValueError, match="not a Hub repo id"):
        check_hub_push("a/b/c", api=StandInApi())
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ValueError, match="meddinov3 push OUTPUT_DIR alice/model"):
        check_hub_push("alice/model", api=StandInApi())


def test_cuda_device_is_checked_before_work(tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("this torch has CUDA")
    Context.scan(tmp_path / "ct.nii.gz")
    argv = ["features", "-i", str(tmp_path / "ct.nii.gz"), "-o", str(tmp_path / "f.png")]
    assert cli_main([*argv, "--model", str(tmp_path / "model"), "--device", "cuda:1"]) == 2
    assert "--device cuda:1" in capsys.readouterr().err
