"""`pipeline("image-segmentation")` on CT slices and `pipeline("ct-segmentation")` on volumes."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import tiny_config
from PIL import Image
from pydicom.data import get_testdata_file
from transformers import pipeline

from meddinov3_hf import MedDINOv3ForSemanticSegmentation, MedDINOv3ImageProcessor
from meddinov3_hf.pipelines import CTImageSegmentationPipeline, CTVolumeSegmentationPipeline


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-seg")
    torch.manual_seed(0)
    model = MedDINOv3ForSemanticSegmentation(tiny_config(image_size=64))
    with torch.no_grad():  # make "liver" win wherever the input is bright, so the masks are predictable
        model.decoder.classifier.bias.copy_(torch.tensor([0.0, -50.0, -50.0]))
    model.save_pretrained(folder)
    MedDINOv3ImageProcessor().save_pretrained(folder)
    return folder


def test_plain_pipeline_call_takes_hu_arrays(model_dir):
    pipe = pipeline("image-segmentation", model=str(model_dir))
    assert isinstance(pipe, CTImageSegmentationPipeline)
    hu = np.full((70, 90), -1000, dtype=np.int16)
    masks = pipe(hu)
    assert [m["label"] for m in masks] == ["background"]
    assert masks[0]["mask"].size == (90, 70) and masks[0]["mask"].mode == "L"
    assert np.asarray(masks[0]["mask"]).min() == 255


def test_pipeline_keeps_hu_precision(model_dir, monkeypatch):
    pipe = pipeline("image-segmentation", model=str(model_dir))
    seen = {}
    forward = pipe.model.forward

    def spy(pixel_values, **kwargs):
        seen["x"] = pixel_values.clone()
        return forward(pixel_values, **kwargs)

    monkeypatch.setattr(pipe.model, "forward", spy)
    hu = np.linspace(-1000, 1000, 64 * 64, dtype=np.float32).reshape(64, 64)
    pipe(hu)
    assert seen["x"].shape == (1, 1, 64, 64)
    assert len(torch.unique(seen["x"])) == 64 * 64  # no 8-bit RGB conversion on the way


def test_pipeline_on_dicom_file_and_batches(model_dir):
    pipe = pipeline("image-segmentation", model=str(model_dir))
    masks = pipe(get_testdata_file("CT_small.dcm"))
    assert all(m["mask"].size == (128, 128) for m in masks)
    batch = pipe(np.full((2, 32, 48), -1000, dtype=np.int16))
    assert len(batch) == 2 and batch[1][0]["mask"].size == (48, 32)


def test_stock_behaviour_kept_for_other_models(model_dir, tmp_path):
    # A non-MedDINOv3 processor takes the stock path: PIL images in, masks out.
    pipe = pipeline("image-segmentation", model=str(model_dir))
    pipe.image_processor = type("Other", (), {})()  # not a MedDINOv3ImageProcessor
    with pytest.raises(Exception):  # noqa: B017 - the stock path cannot call a dummy processor
        pipe(Image.new("RGB", (32, 32)))


def test_volume_pipeline_returns_labels_on_the_input_grid(model_dir, tmp_path):
    data = np.full((40, 36, 5), -1000, dtype=np.int16)  # stored (X, Y, Z), RAS affine
    affine = np.diag([0.9, 0.8, 2.5, 1.0])
    nib.save(nib.Nifti1Image(data, affine), tmp_path / "scan.nii.gz")
    pipe = pipeline("ct-segmentation", model=str(model_dir))
    assert isinstance(pipe, CTVolumeSegmentationPipeline)
    out = pipe(str(tmp_path / "scan.nii.gz"), return_probabilities=True)
    assert out["labels"].shape == (40, 36, 5) and out["labels"].dtype == np.uint8
    np.testing.assert_allclose(out["affine"], affine)
    assert out["probabilities"].shape == (40, 36, 5, 3)
    np.testing.assert_allclose(out["probabilities"].astype(np.float32).sum(-1), 1.0, atol=2e-3)
    assert out["label_names"][1] == "liver"
