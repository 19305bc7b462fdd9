"""nnU-Net-style inference options of `meddinov3 segment`: fold ensembles, --step-size, --spacing, --body-crop,
--roi-subset, --continue, --save-probabilities npz."""

from __future__ import annotations

import gzip

import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import tiny_config

from meddinov3_hf import MedDINOv3ForSemanticSegmentation, MedDINOv3ImageProcessor
from meddinov3_hf.cli import main
from meddinov3_hf.volumes.inference import VolumeSegmenter, load_segmentation_model
from meddinov3_hf.volumes.io import load_volume
from meddinov3_hf.volumes.predictor import EnsemblePredictor, PredictOptions, body_box

NAMES = {0: "background", 1: "liver", 2: "kidney"}


def _fold(path, seed, processor=None, **overrides):
    torch.manual_seed(seed)
    config = tiny_config(image_size=32, id2label=overrides.pop("id2label", NAMES), **overrides)
    model = MedDINOv3ForSemanticSegmentation(config).eval()
    with torch.no_grad():  # decisive, seed-dependent logits so that the folds disagree
        model.decoder.classifier.bias.normal_(0, 1)
    model.save_pretrained(path)
    (processor or MedDINOv3ImageProcessor(size={"height": 32, "width": 32})).save_pretrained(path)
    return path


def _scan(path, shape_xyz=(40, 36, 5), seed=0, affine=None):
    rng = np.random.default_rng(seed)
    hu = rng.normal(-900, 30, shape_xyz).astype(np.float32)
    hu[8:32, 6:30] = rng.normal(50, 40, (24, 24, shape_xyz[2]))  # a "body" in the middle, air around it
    affine = np.diag([-0.9, 0.8, 2.5, 1.0]) if affine is None else affine  # stored flipped in x
    nib.save(nib.Nifti1Image(hu, affine), path)
    return path


def _members(*dirs):
    return [(str(d), *load_segmentation_model(d)) for d in dirs]


def test_two_fold_ensemble_equals_the_mean_of_their_probabilities(tmp_path):
    a, b = _fold(tmp_path / "fold0", 0), _fold(tmp_path / "fold1", 1)
    volume = load_volume(_scan(tmp_path / "case_0000.nii.gz"))
    hu = torch.from_numpy(volume.hu)
    singles = [VolumeSegmenter(m, p) for _, m, p in _members(a, b)]
    with torch.inference_mode():
        probabilities = [s.predict_slices(hu, volume.spacing[1:]).softmax(1) for s in singles]
    mean = (probabilities[0] + probabilities[1]) / 2
    assert (probabilities[0].argmax(1) != probabilities[1].argmax(1)).any()  # the folds really disagree
    result = EnsemblePredictor(_members(a, b)).segment(volume, return_probabilities=True)
    assert np.array_equal(result.labels, mean.argmax(1).numpy())
    np.testing.assert_allclose(
        result.probabilities.astype(np.float32), mean.transpose(0, 1).numpy(), atol=1e-3
    )

    # The same through the CLI, with nnU-Net's .npz probabilities (K, z, y, x of the stored voxel order).
    out = tmp_path / "ens.nii.gz"
    assert main(["segment", "-i", str(volume.source), "-o", str(out), "--model", str(a), str(b),
                 "--save-probabilities", "npz", "--quiet"]) == 0  # fmt: skip
    stored = nib.load(out)
    assert np.array_equal(np.asarray(stored.dataobj), volume.to_original(result.labels))
    npz = np.load(tmp_path / "ens.npz")["probabilities"]
    expected = np.transpose(volume.to_original(mean.transpose(0, 1).numpy(), channel_axis=0), (3, 2, 1, 0))
    assert npz.dtype == np.float32 and npz.shape == expected.shape == (3, 5, 36, 40)
    np.testing.assert_allclose(npz, expected, atol=1e-3)
    # nnU-Net's layout: the argmax over K, read as (z, y, x), is the stored label volume (x, y, z) transposed.
    assert np.array_equal(npz.argmax(0), np.asarray(stored.dataobj).transpose(2, 1, 0))


@pytest.mark.parametrize(
    "change, fragment",
    [
        (dict(id2label={0: "background", 1: "liver", 2: "spleen"}), "label maps differ"),
        (dict(patch_size=8, decoder_hidden_sizes=[32, 16, 8]), "patch sizes differ"),
        (dict(processor=MedDINOv3ImageProcessor(size={"height": 32, "width": 32}, target_spacing=(1.0, 1.0))),
         "processors differ (target_spacing"),
    ],
)  # fmt: skip
def test_ensemble_of_incompatible_models_is_refused_with_what_differs(tmp_path, capsys, change, fragment):
    a = _fold(tmp_path / "fold0", 0)
    b = _fold(tmp_path / "fold1", 1, **change)
    scan = _scan(tmp_path / "case_0000.nii.gz")
    out = tmp_path / "out.nii.gz"
    assert main(["segment", "-i", str(scan), "-o", str(out), "--model", str(a), "--model", str(b)]) != 0
    message = capsys.readouterr().err
    assert fragment in message and "fold1" in message and "fold0" in message, message
    assert not out.exists()


def test_roi_subset_keeps_only_the_named_structures_and_refuses_unknown_names(tmp_path, capsys):
    model = _fold(tmp_path / "fold0", 0)
    scan = _scan(tmp_path / "case_0000.nii.gz")
    full, subset = tmp_path / "full.nii.gz", tmp_path / "subset.nii.gz"
    assert main(["segment", "-i", str(scan), "-o", str(full), "--model", str(model), "--quiet"]) == 0
    assert main(["segment", "-i", str(scan), "-o", str(subset), "--model", str(model), "--roi-subset", "kidney",
                 "--quiet"]) == 0  # fmt: skip
    full_labels, subset_labels = np.asarray(nib.load(full).dataobj), np.asarray(nib.load(subset).dataobj)
    assert {1, 2} <= set(np.unique(full_labels))
    assert np.array_equal(subset_labels, np.where(full_labels == 2, 2, 0))
    capsys.readouterr()
    bad = tmp_path / "bad.nii.gz"
    assert (
        main(
            ["segment", "-i", str(scan), "-o", str(bad), "--model", str(model), "--roi-subset", "liver,lungs"]
        )
        != 0
    )
    message = capsys.readouterr().err
    assert "--roi-subset" in message and "lungs" in message and "liver, kidney" in message, message
    assert not bad.exists()


def test_continue_skips_finished_cases_and_redoes_a_truncated_one(tmp_path, capsys):
    model = _fold(tmp_path / "fold0", 0)
    inputs = tmp_path / "imagesTs"
    inputs.mkdir()
    for i in range(2):
        _scan(inputs / f"case{i}_0000.nii.gz", seed=i)
    out = tmp_path / "pred"
    assert main(["segment", "-i", str(inputs), "-o", str(out), "--model", str(model), "--quiet"]) == 0
    good, cut = out / "case0.nii.gz", out / "case1.nii.gz"
    reference = cut.read_bytes()
    (tmp_path / "reference.nii.gz").write_bytes(reference)
    cut.write_bytes(reference[: len(reference) // 2])  # a run killed mid-write of an older version
    with pytest.raises((EOFError, OSError, gzip.BadGzipFile)):
        np.asarray(nib.load(cut).dataobj)
    good_mtime = good.stat().st_mtime_ns
    assert main(["segment", "-i", str(inputs), "-o", str(out), "--model", str(model), "--continue"]) == 0
    assert "1 case(s) already segmented, 1 to do" in capsys.readouterr().out
    assert good.stat().st_mtime_ns == good_mtime  # skipped, not rewritten
    redone = np.asarray(nib.load(cut).dataobj)  # complete again, and what the first run wrote
    assert np.array_equal(redone, np.asarray(nib.load(tmp_path / "reference.nii.gz").dataobj))


def test_step_size_and_spacing_change_the_tiling(tmp_path, capsys):
    model = _fold(tmp_path / "fold0", 0)
    volume = load_volume(_scan(tmp_path / "case_0000.nii.gz"))
    members = _members(model)
    dense = EnsemblePredictor(members, PredictOptions(step=0.25))
    assert (
        len(dense._tiles(96, 96)) == 9 * 9 and len(VolumeSegmenter(*members[0][1:])._tiles(96, 96)) == 5 * 5
    )
    coarse = EnsemblePredictor(members, PredictOptions(spacing_mm=3.2))
    labels = coarse.segment(volume).labels
    assert labels.shape == volume.hu.shape
    # 36 × 40 voxels of 0.8 × 0.9 mm at 3.2 mm → 9 × 11 px: the tile shrinks from 32 × 32 to 16 × 16 (the
    # smallest multiple of the patch covering the slice) instead of padding air around the slice.
    assert coarse.working_shape((36, 40), volume.spacing[1:]) == (9, 11)
    assert coarse.tile == (16, 16)
    assert main(["segment", "-i", str(volume.source), "-o", str(tmp_path / "x.nii.gz"), "--model", str(model),
                 "--step-size", "0"]) != 0  # fmt: skip
    assert "--step-size must be in (0, 1]" in capsys.readouterr().err


def test_body_crop_segments_only_the_body_box(tmp_path):
    model = _fold(tmp_path / "fold0", 0)
    path = _scan(tmp_path / "case_0000.nii.gz")
    volume = load_volume(path)
    hu = volume.hu.copy()
    hu[:, -3:, :] = 200  # a "table" below the body, not connected to it in the axial projection
    box = body_box(hu, volume.spacing, margin_mm=0)
    body_rows = np.nonzero((volume.hu > -500).any(axis=(0, 2)))[0]
    assert box[0].start <= body_rows.min() and box[0].stop >= body_rows.max() + 1
    assert box[0].stop < hu.shape[1] - 3  # the table is left out
    volume = load_volume(_scan(tmp_path / "wide_0000.nii.gz", shape_xyz=(80, 72, 3)))  # a wide field of view
    result = EnsemblePredictor(_members(model), PredictOptions(body_crop=True)).segment(volume)
    box = body_box(volume.hu, volume.spacing)
    outside = np.ones(volume.hu.shape[1:], bool)
    outside[box] = False
    assert outside.any() and not result.labels[:, outside].any()
    assert result.labels[:, box[0], box[1]].any()
