"""The notebook-facing API: canonical volume results, the overlay helper, channels-first probabilities, PIL
input to the slice pipeline, and quiet model loading."""

from __future__ import annotations

import sys
import types

import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import tiny_config
from PIL import Image
from transformers import pipeline
from transformers.utils import logging as hf_logging

import meddinov3_hf
from meddinov3_hf import MedDINOv3ForSemanticSegmentation, MedDINOv3ImageProcessor
from meddinov3_hf.cli import main as cli_main
from meddinov3_hf.data.synthetic import make_synthetic_ct, write_nnunet_dataset
from meddinov3_hf.progress import progress_bar
from meddinov3_hf.visualize import axial_caption, overlay_image, overlay_slice
from meddinov3_hf.volumes.io import load_volume

SHAPE, SPACING = (6, 40, 48), (3.0, 1.5, 1.2)  # (Z, Y, X), anisotropic in-plane so stretching shows


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-seg")
    torch.manual_seed(0)  # random weights: labels vary over the image, which is what orientation tests need
    MedDINOv3ForSemanticSegmentation(tiny_config(image_size=64)).save_pretrained(folder)
    MedDINOv3ImageProcessor().save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def scan(tmp_path_factory):
    """A synthetic CT stored with permuted and flipped voxel axes ("PRS"), so stored ≠ canonical order."""
    root = write_nnunet_dataset(
        tmp_path_factory.mktemp("data") / "ds", n_cases=1, shape=SHAPE, spacing=SPACING, affine_kind="PRS"
    )
    return root / "imagesTr" / "case_000_0000.nii.gz"


@pytest.fixture(scope="module")
def volume_pipe(model_dir):
    return pipeline("ct-segmentation", model=str(model_dir))


def test_canonical_result_is_the_generators_axial_order(volume_pipe, scan):
    hu, _ = make_synthetic_ct(SHAPE, SPACING, seed=0)
    assert nib.load(scan).shape != SHAPE[::-1]  # the file's own order really differs from canonical
    out = volume_pipe(str(scan), return_canonical=True, return_probabilities=True)
    np.testing.assert_array_equal(out["hu"], hu.astype(np.float32))
    assert out["labels"].shape == SHAPE and out["labels"].dtype == np.uint8
    assert len(np.unique(out["labels"])) > 1  # non-trivial labels, so an orientation error would show
    assert out["spacing"] == pytest.approx(SPACING)
    assert out["probabilities"].shape == (*SHAPE, 3)
    chosen = np.take_along_axis(out["probabilities"], out["labels"][..., None].astype(np.int64), -1)[..., 0]
    assert (chosen >= out["probabilities"].max(-1) - 1e-3).all()  # the label is the most probable (float16)
    # The canonical affine maps canonical index (x, y, z) = hu[z, y, x] to the same world point as the file.
    stored = volume_pipe(str(scan))
    volume = load_volume(scan)
    np.testing.assert_array_equal(volume.to_canonical(stored["labels"]), out["labels"])
    np.testing.assert_allclose(out["affine"], volume.canonical_affine)


def test_probabilities_axis_order_and_channels_first(volume_pipe, scan):
    stored_shape = nib.load(scan).shape
    last = volume_pipe(str(scan), return_probabilities=True)["probabilities"]
    first = volume_pipe(str(scan), return_probabilities=True, channels_first=True)["probabilities"]
    assert last.shape == (*stored_shape, 3) and first.shape == (3, *stored_shape)
    np.testing.assert_array_equal(np.moveaxis(first, 0, -1), last)
    canonical = volume_pipe(str(scan), return_probabilities=True, return_canonical=True, channels_first=True)
    assert canonical["probabilities"].shape == (3, *SHAPE)
    np.testing.assert_array_equal(
        np.moveaxis(canonical["probabilities"], 0, -1), load_volume(scan).to_canonical(last)
    )
    with pytest.raises(TypeError, match="channel_first"):
        volume_pipe(str(scan), channel_first=True)


@pytest.mark.parametrize("slice_arg", [None, 2])
def test_overlay_slice_equals_the_cli_overlay(volume_pipe, scan, model_dir, tmp_path, slice_arg):
    out = volume_pipe(str(scan), return_canonical=True)
    stored = volume_pipe(str(scan))
    labels_path = tmp_path / "labels.nii.gz"
    nib.save(nib.Nifti1Image(stored["labels"], stored["affine"]), labels_path)
    png = tmp_path / "overlay.png"
    argv = [
        "overlay",
        "-i",
        str(scan),
        "--labels",
        str(labels_path),
        "-o",
        str(png),
        "--names",
        str(model_dir),
    ]
    assert cli_main(argv + (["--slice", str(slice_arg)] if slice_arg is not None else [])) == 0
    picture = overlay_slice(out, slice_arg)
    np.testing.assert_array_equal(np.asarray(picture), np.asarray(Image.open(png).convert("RGB")))
    # ... and it is the canonical slice z drawn as is (radiological: no flip or transpose on the way).
    z = slice_arg if slice_arg is not None else int(np.argmax((out["labels"] > 0).sum(axis=(1, 2))))
    caption = axial_caption(out["affine"], SHAPE, z, "abdomen")
    direct = overlay_image(
        out["hu"][z],
        out["labels"][z],
        out["label_names"],
        spacing_yx=SPACING[1:],
        orientation=("A", "P", "R", "L"),
        caption=caption,
    )
    np.testing.assert_array_equal(np.asarray(picture), np.asarray(direct))


def test_overlay_slice_needs_a_canonical_result(volume_pipe, scan):
    with pytest.raises(ValueError, match="return_canonical=True"):
        overlay_slice(volume_pipe(str(scan)), 0)
    with pytest.raises(ValueError, match="outside"):
        overlay_slice(volume_pipe(str(scan), return_canonical=True), SHAPE[0])


def test_sixteen_bit_pil_images_are_stored_values_with_a_warning(model_dir):
    pipe = pipeline("image-segmentation", model=str(model_dir))
    rng = np.random.default_rng(0)
    stored = rng.integers(0, 2000, size=(48, 64)).astype(np.uint16)  # e.g. HU + 1024 as a 16-bit PNG keeps it
    expected = pipe(stored.astype(np.float32))
    for image in (Image.fromarray(stored), Image.fromarray(stored.astype(np.int32))):
        assert image.mode in ("I;16", "I")
        with pytest.warns(UserWarning, match="stored values.*RescaleIntercept"):
            masks = pipe(image)
        assert [m["label"] for m in masks] == [m["label"] for m in expected]
        for got, want in zip(masks, expected):
            np.testing.assert_array_equal(np.asarray(got["mask"]), np.asarray(want["mask"]))


@pytest.mark.parametrize("mode", ["L", "RGB", "RGBA", "P"])
def test_eight_bit_or_colour_pil_images_are_refused_with_how_to_pass_hu(model_dir, mode):
    pipe = pipeline("image-segmentation", model=str(model_dir))
    with pytest.raises(ValueError, match="cannot hold Hounsfield units.*pixel_array") as err:
        pipe(Image.new(mode, (32, 32)))
    assert "\n" not in str(err.value)


def test_model_loading_is_quiet_unless_asked(model_dir, capsys):
    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.enable_progress_bar()
    try:
        pipeline("ct-segmentation", model=str(model_dir)).model.save_pretrained(model_dir.parent / "copy")
        quiet = capsys.readouterr()
        meddinov3_hf.set_loading_progress(True)
        MedDINOv3ForSemanticSegmentation.from_pretrained(model_dir)
        loud = capsys.readouterr()
    finally:
        meddinov3_hf.set_loading_progress(False)
        if not was_enabled:
            hf_logging.disable_progress_bar()
    assert "Loading weights" not in quiet.err and "Writing model shards" not in quiet.err
    assert "Loading weights" in loud.err


def test_progress_bar_is_a_widget_or_nothing_in_jupyter(monkeypatch):
    assert list(progress_bar(range(3), enabled=False)) == [0, 1, 2]
    monkeypatch.setitem(sys.modules, "ipykernel.zmqshell", types.ModuleType("ipykernel.zmqshell"))
    monkeypatch.setitem(sys.modules, "ipywidgets", None)  # not installed: `import ipywidgets` fails
    bar = progress_bar(range(3), desc="x")
    assert type(bar).__module__ == "meddinov3_hf.progress" and list(bar) == [0, 1, 2]
    bar.update(1)  # tqdm's methods are accepted and do nothing
    bar.close()
