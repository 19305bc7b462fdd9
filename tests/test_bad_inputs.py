"""Bad and unusual inputs, one row each: the command must refuse cleanly and leave the user's files alone.

Row format (append a `Case(...)` to `CASES`; the next defect of this kind is one row):

    Case(
        id="short-kebab-name",            # test id
        build=fn,                         # fn(tmp: Path, ctx: Context) -> list[str]: makes the inputs under
                                          #   `tmp` and returns the argv after `meddinov3` (str paths or
                                          #   paths relative to `tmp`; the command runs with cwd = `tmp`)
        code=2,                           # expected exit code (argparse usage errors also exit 2)
        message="fragment",               # must appear in stderr (case-insensitive)
        absent=("out",),                  # paths under `tmp` that must not exist afterwards
        unchanged=("gt", "ckpt.pth"),     # paths under `tmp` (files or whole folders) whose bytes, names and
                                          #   modes must be exactly as before the command ran
        env={"HF_HUB_OFFLINE": "1"},      # optional environment for the run
    )

`ctx` (a :class:`Context`) gives shared, lazily built material: `ctx.seg_model` (a tiny segmentation model
folder), `ctx.checkpoint(path)` (a tiny MedDINOv3 release checkpoint), `ctx.scan(path)` (a small CT NIfTI),
`ctx.labels(path)` (a label NIfTI on the same grid), `ctx.dicom_series(folder, ...)` (a CT DICOM series).
After every row the harness also checks that no temporary of the package's own pattern
(`.{name}.{12 hex}.tmp...`) is left anywhere under `tmp`.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import reference_dinov3, tiny_config, to_reference_names

from meddinov3_hf import MedDINOv3ForSemanticSegmentation, MedDINOv3ImageProcessor
from meddinov3_hf.cli import main as cli_main

LPS = np.diag([-0.8, -0.9, 2.5, 1.0])
# The package's temporary names (`meddinov3_hf.files.temporary_name`), spelled out independently here.
TEMPORARY = re.compile(r"^\..+\.[0-9a-f]{12}\.tmp(\.[^.]+)*$")


def scan_data(shape=(24, 20, 5), seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    data = (rng.normal(0, 50, shape) - 200).astype(np.int16)
    data[:2] = -1000
    data[5:12, 3:9, 1:4] = 800
    return data


class Context:
    """Material shared by the rows, built on first use (one tiny model per test session)."""

    def __init__(self, root: Path):
        self.root = root
        self._seg_model: Path | None = None

    @property
    def seg_model(self) -> Path:
        if self._seg_model is None:
            folder = self.root / "seg-model"
            torch.manual_seed(0)
            MedDINOv3ForSemanticSegmentation(tiny_config(image_size=32)).save_pretrained(folder)
            MedDINOv3ImageProcessor(target_spacing=[1.0, 1.0]).save_pretrained(folder)
            self._seg_model = folder
        return self._seg_model

    @staticmethod
    def checkpoint(path: Path) -> Path:
        """A tiny MedDINOv3 release checkpoint (`teacher` with `backbone.*` keys)."""
        config = tiny_config()
        sd = to_reference_names(
            reference_dinov3(config).state_dict(),
            config.num_hidden_layers,
            num_heads=config.num_attention_heads,
        )
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"teacher": {f"backbone.{k}": v for k, v in sd.items()}}, path)
        return path

    @staticmethod
    def scan(path: Path, affine=LPS, shape=(24, 20, 5), seed=0) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        nib.save(nib.Nifti1Image(scan_data(shape, seed), affine), path)
        return path

    @staticmethod
    def nnunet_checkpoint(path: Path, plans: dict | None) -> Path:
        """A tiny nnU-Net fine-tune checkpoint (`network_weights`, `init_args` with or without plans)."""
        config = tiny_config()
        sd = to_reference_names(
            reference_dinov3(config).state_dict(),
            config.num_hidden_layers,
            num_heads=config.num_attention_heads,
        )
        seg = MedDINOv3ForSemanticSegmentation(config)
        weights = {f"dino_encoder.{k}": v for k, v in sd.items()}
        for s, stage in enumerate(seg.decoder.stages):
            for sub, module in (("0", stage.upsample), ("1", stage.norm)):
                weights[f"up_projection.decode.{s}.{sub}.weight"] = module.weight.detach().clone()
                weights[f"up_projection.decode.{s}.{sub}.bias"] = module.bias.detach().clone()
        weights["up_projection.decode.4.weight"] = seg.decoder.classifier.weight.detach().clone()
        weights["up_projection.decode.4.bias"] = seg.decoder.classifier.bias.detach().clone()
        init_args = {"dataset_json": {"labels": {"background": 0, "liver": 1, "kidney": 2}}}
        if plans is not None:
            init_args |= {"plans": plans, "configuration": "2d"}
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"network_weights": weights, "init_args": init_args}, path)
        return path

    @staticmethod
    def dicom_series(
        folder: Path, uid: str = "1.2.3.4", prefix: str = "s", n: int = 5, rgb: bool = False
    ) -> Path:
        """A small axial CT series (or, with `rgb`, an 8-bit RGB secondary capture) of `n` 6x7 slices."""
        from pydicom.uid import SecondaryCaptureImageStorage
        from test_volume_io import _dicom_slice

        folder.mkdir(parents=True, exist_ok=True)
        rng = np.random.default_rng(0)
        for k in range(n):
            raw = rng.integers(0, 2000, size=(6, 7)).astype(np.int16)
            path = folder / f"{prefix}{k:03d}.dcm"
            _dicom_slice(path, raw, [0.0, 0.0, 2.5 * k], [1, 0, 0, 0, 1, 0], [0.7, 0.9], 1.0, -1024.0, uid)
            if rgb:  # rewrite as what a screenshot / dose report looks like
                import pydicom

                ds = pydicom.dcmread(path)
                ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
                ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PlanarConfiguration = 3, "RGB", 0
                ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
                ds.PixelData = rng.integers(0, 255, size=(6, 7, 3)).astype(np.uint8).tobytes()
                ds.save_as(path)
        return folder

    @staticmethod
    def lying_nifti(path: Path, shape: tuple[int, int, int]) -> Path:
        """A ~100-byte .nii.gz whose header declares `shape` int16 voxels."""
        import gzip

        header = nib.Nifti1Header()
        header.set_data_dtype(np.int16)
        header.set_data_shape(shape)
        header.set_qform(LPS, code=1)
        header.set_sform(LPS, code=1)
        header["vox_offset"] = 352
        raw = header.binaryblock + b"\0" * 4 + b"\0" * 64
        path.write_bytes(gzip.compress(raw))
        return path

    @staticmethod
    def labels(path: Path, data: np.ndarray | None = None, affine=LPS, shape=(24, 20, 5)) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        if data is None:
            data = np.zeros(shape, np.uint8)
            data[5:12, 3:9, 1:4] = 1
            data[14:18, 10:15, 2:4] = 2
        nib.save(nib.Nifti1Image(np.asarray(data), affine), path)
        return path


@dataclass
class Case:
    id: str
    build: Callable[[Path, Context], list[str]]
    code: int
    message: str
    absent: tuple[str, ...] = ()
    unchanged: tuple[str, ...] = ()
    env: dict[str, str] = field(default_factory=dict)


def _snapshot(path: Path) -> dict[str, tuple[str, int]]:
    """{relative name: (sha256 or '<dir>', mode)} for a file or a whole folder."""
    if not path.exists():
        return {}
    items = [path] + (sorted(path.rglob("*")) if path.is_dir() else [])
    out = {}
    for p in items:
        name = str(p.relative_to(path.parent))
        digest = "<dir>" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
        out[name] = (digest, p.stat().st_mode)
    return out


# ------------------------------------------------------------------------------------------------------------
# Rows
# ------------------------------------------------------------------------------------------------------------
CASES: list[Case] = []


def case(id: str, code: int, message: str, absent=(), unchanged=(), env=None):
    """Decorator form of a row: the decorated function is the row's `build`."""

    def register(build):
        CASES.append(Case(id, build, code, message, tuple(absent), tuple(unchanged), dict(env or {})))
        return build

    return register


# -- issue 8 item 1: convert never deletes an existing folder ------------------------------------------------
@case("convert-into-non-empty-folder", 2, "--overwrite", unchanged=["out"])
def _(tmp, ctx):
    ctx.checkpoint(tmp / "ckpt.pth")
    (tmp / "out").mkdir()
    (tmp / "out" / "notes.txt").write_text("my notes")
    return ["convert", "ckpt.pth", "out", "--blocks", "0,1,2,3"]


@case("convert-into-its-own-folder", 2, "contains the input", unchanged=["dir"])
def _(tmp, ctx):
    ctx.checkpoint(tmp / "dir" / "ckpt.pth")
    return ["convert", "dir/ckpt.pth", "dir", "--blocks", "0,1,2,3"]


@case("convert-into-its-own-folder-even-with-overwrite", 2, "contains the input", unchanged=["dir"])
def _(tmp, ctx):
    ctx.checkpoint(tmp / "dir" / "ckpt.pth")
    return ["convert", "dir/ckpt.pth", "dir", "--overwrite", "--blocks", "0,1,2,3"]


@case("convert-into-cwd", 2, "current directory", unchanged=["ckpt.pth", "keep.txt"])
def _(tmp, ctx):
    ctx.checkpoint(tmp / "ckpt.pth")
    (tmp / "keep.txt").write_text("keep")
    return ["convert", str(tmp / "ckpt.pth"), ".", "--blocks", "0,1,2,3"]


@case("convert-overwrite-replaces-only-its-files", 0, "", unchanged=["out/notes.txt", "ckpt.pth"])
def _(tmp, ctx):
    ctx.checkpoint(tmp / "ckpt.pth")
    (tmp / "out").mkdir()
    (tmp / "out" / "notes.txt").write_text("my notes")
    (tmp / "out" / "config.json").write_text("{}")  # an earlier conversion's file: replaced
    return ["convert", "ckpt.pth", "out", "--overwrite", "--blocks", "0,1,2,3"]


@case("convert-wrong-tensor-shapes", 2, "wrong shape", absent=["out"], unchanged=["bad.pth"])
def _(tmp, ctx):
    ctx.checkpoint(tmp / "ckpt.pth")
    checkpoint = torch.load(tmp / "ckpt.pth", weights_only=True)
    teacher = checkpoint["teacher"]
    teacher["backbone.blocks.1.mlp.fc1.weight"] = torch.zeros(48, 32)  # block 0 says 64 hidden units
    torch.save(checkpoint, tmp / "bad.pth")
    return ["convert", "bad.pth", "out", "--blocks", "0,1,2,3"]


# -- issue 8 item 3: a converted nnU-Net fine-tune keeps its working spacing --------------------------------
@case("convert-nnunet-without-spacing", 2, "--native-resolution", absent=["out"], unchanged=["fold_0"])
def _(tmp, ctx):
    ctx.nnunet_checkpoint(tmp / "fold_0" / "checkpoint_final.pth", plans=None)
    return ["convert", "fold_0/checkpoint_final.pth", "out", "--blocks", "0,1,2,3"]


# -- issue 8 item 2: evaluate never writes over its inputs ---------------------------------------------------
@case("evaluate-output-is-the-reference", 2, "input", unchanged=["gt", "pred"], absent=["gt/case1.nii.csv"])
def _(tmp, ctx):
    ctx.labels(tmp / "gt" / "case1.nii.gz")
    ctx.labels(tmp / "pred" / "case1.nii.gz")
    return ["evaluate", "--pred", "pred", "--gt", "gt", "-o", "gt/case1.nii.gz"]


@case("evaluate-output-not-json", 2, ".json", unchanged=["gt", "pred"], absent=["metrics.txt", "metrics.csv"])
def _(tmp, ctx):
    ctx.labels(tmp / "gt" / "case1.nii.gz")
    ctx.labels(tmp / "pred" / "case1.nii.gz")
    return ["evaluate", "--pred", "pred", "--gt", "gt", "-o", "metrics.txt"]


@case("evaluate-output-inside-a-prediction-folder", 2, "inside the input folder", unchanged=["pred", "gt"])
def _(tmp, ctx):
    ctx.labels(tmp / "gt" / "case1.nii.gz")
    ctx.labels(tmp / "pred" / "case1.nii.gz")
    return ["evaluate", "--pred", "pred", "--gt", "gt", "-o", "pred/metrics.json"]


# -- issue 8 item 5: a prediction on another grid is resampled exactly or refused ---------------------------
@case("evaluate-shifted-prediction", 2, "--allow-grid-mismatch", absent=["m.json", "m.csv"])
def _(tmp, ctx):
    ctx.labels(tmp / "gt.nii.gz")
    shifted = LPS.copy()
    shifted[0, 3] += 50.0  # 50 mm off: not the same place, whatever the voxels say
    ctx.labels(tmp / "pred.nii.gz", affine=shifted)
    return ["evaluate", "--pred", "pred.nii.gz", "--gt", "gt.nii.gz", "-o", "m.json"]


# -- issue 8 item 9: labels outside --labels are reported, negative labels refused --------------------------
@case("evaluate-negative-label-values", 2, "negative label values", absent=["m.json"])
def _(tmp, ctx):
    ctx.labels(tmp / "gt.nii.gz")
    data = np.zeros((24, 20, 5), np.int16)
    data[5:12, 3:9, 1:4] = -1
    ctx.labels(tmp / "pred.nii.gz", data=data)
    return ["evaluate", "--pred", "pred.nii.gz", "--gt", "gt.nii.gz", "-o", "m.json"]


@case("evaluate-negative-label-id", 2, "must be >= 0")
def _(tmp, ctx):
    ctx.labels(tmp / "gt.nii.gz")
    ctx.labels(tmp / "pred.nii.gz")
    return ["evaluate", "--pred", "pred.nii.gz", "--gt", "gt.nii.gz", "--labels", "1=liver,-2=x"]


@case("evaluate-labels-absent-from-list", 0, "not in --labels")
def _(tmp, ctx):
    ctx.labels(tmp / "gt.nii.gz")  # holds labels 1 and 2
    ctx.labels(tmp / "pred.nii.gz")
    return ["evaluate", "--pred", "pred.nii.gz", "--gt", "gt.nii.gz", "--labels", "1=liver"]


@case("evaluate-labels-from-a-model-config", 0, "")
def _(tmp, ctx):
    ctx.labels(tmp / "gt.nii.gz")
    ctx.labels(tmp / "pred.nii.gz")
    return [
        "evaluate",
        "--pred",
        "pred.nii.gz",
        "--gt",
        "gt.nii.gz",
        "--labels",
        ctx.seg_model / "config.json",
    ]


# -- issue 8 items 6, 7, 8: folders that would be misread or written into ------------------------------------
@case("segment-folder-name-collision", 2, "a.nii.gz and a_0000.nii.gz", absent=["pred"], unchanged=["in"])
def _(tmp, ctx):
    ctx.scan(tmp / "in" / "a_0000.nii.gz")
    ctx.scan(tmp / "in" / "a.nii.gz", seed=1)
    return ["segment", "-i", "in", "-o", "pred", "--model", ctx.seg_model, "--quiet"]


@case("segment-output-folder-inside-input-folder", 2, "inside the input folder", absent=["in/pred"])
def _(tmp, ctx):
    ctx.scan(tmp / "in" / "a_0000.nii.gz")
    return ["segment", "-i", "in", "-o", "in/pred", "--model", ctx.seg_model, "--quiet"]


@case("segment-output-inside-dicom-folder", 2, "inside the input folder", unchanged=["dicom"])
def _(tmp, ctx):
    ctx.dicom_series(tmp / "dicom")
    return ["segment", "-i", "dicom", "-o", "dicom/seg.nii.gz", "--model", ctx.seg_model, "--quiet"]


@case("segment-mixed-dicom-and-nifti-folder", 2, "both DICOM", absent=["seg.nii.gz"], unchanged=["dicom"])
def _(tmp, ctx):
    ctx.dicom_series(tmp / "dicom")
    ctx.labels(tmp / "dicom" / "labels.nii.gz")
    return ["segment", "-i", "dicom", "-o", "seg.nii.gz", "--model", ctx.seg_model, "--quiet"]


@case("segment-two-dicom-series", 2, "--series", absent=["seg.nii.gz"], unchanged=["dicom"])
def _(tmp, ctx):
    ctx.dicom_series(tmp / "dicom", uid="1.2.3.4", prefix="a")
    ctx.dicom_series(tmp / "dicom", uid="5.6.7.8", prefix="b")
    return ["segment", "-i", "dicom", "-o", "seg.nii.gz", "--model", ctx.seg_model, "--quiet"]


@case("segment-secondary-capture", 1, "not CT: secondary capture", absent=["seg.nii.gz"])
def _(tmp, ctx):
    ctx.dicom_series(tmp / "sc", rgb=True)
    return ["segment", "-i", "sc", "-o", "seg.nii.gz", "--model", ctx.seg_model, "--quiet"]


# -- issue 8 item 10: a lying header is refused before allocating -------------------------------------------
@case("segment-header-declares-huge-volume", 1, "declares shape (10000, 10000, 10000)", absent=["seg.nii.gz"])
def _(tmp, ctx):
    ctx.lying_nifti(tmp / "liar.nii.gz", (10000, 10000, 10000))
    return ["segment", "-i", "liar.nii.gz", "-o", "seg.nii.gz", "--model", ctx.seg_model, "--quiet"]


@case("segment-header-declares-more-than-the-file-holds", 1, "declares shape (400, 400, 400)")
def _(tmp, ctx):
    ctx.lying_nifti(tmp / "liar.nii.gz", (400, 400, 400))
    return ["segment", "-i", "liar.nii.gz", "-o", "seg.nii.gz", "--model", ctx.seg_model, "--quiet"]


# -- issue 8 item 13: stale temporaries cleaned, labels never without their probabilities ------------------
@case("segment-removes-its-stale-temporaries", 0, "", unchanged=["pred/.notes.txt", "in"])
def _(tmp, ctx):
    ctx.scan(tmp / "in" / "a_0000.nii.gz")
    (tmp / "pred").mkdir()
    (tmp / "pred" / ".a.nii.gz.0123456789ab.tmp.nii.gz").write_bytes(b"half-written by a killed run")
    (tmp / "pred" / ".notes.txt").write_text("not ours: kept")
    return ["segment", "-i", "in", "-o", "pred", "--model", ctx.seg_model, "--quiet"]


@case("segment-probabilities-unwritable-no-labels", 2, "existing folder", absent=["seg.nii.gz"])
def _(tmp, ctx):
    ctx.scan(tmp / "ct.nii.gz")
    (tmp / "seg_probabilities.nii.gz").mkdir()  # the probabilities cannot be written there
    return ["segment", "-i", "ct.nii.gz", "-o", "seg.nii.gz", "--model", ctx.seg_model, "--quiet",
            "--save-probabilities"]  # fmt: skip


# -- issue 8: messages instead of tracebacks -----------------------------------------------------------------
@case("segment-cuda-device-on-cpu-torch", 2, "--device cuda", absent=["seg.nii.gz"])
def _(tmp, ctx):
    if torch.cuda.is_available():
        pytest.skip("this torch has CUDA")
    ctx.scan(tmp / "ct.nii.gz")
    return ["segment", "-i", "ct.nii.gz", "-o", "seg.nii.gz", "--model", ctx.seg_model, "--device", "cuda"]


@case("segment-device-list-on-cpu-torch", 2, "--device cuda:0", absent=["seg.nii.gz"])
def _(tmp, ctx):
    if torch.cuda.is_available():
        pytest.skip("this torch has CUDA")
    ctx.scan(tmp / "ct.nii.gz")
    return ["segment", "-i", "ct.nii.gz", "-o", "seg.nii.gz", "--model", ctx.seg_model, "--device",
            "cuda:0,cuda:1"]  # fmt: skip


@case("segment-bad-device-string", 2, "not a torch device", absent=["seg.nii.gz"])
def _(tmp, ctx):
    ctx.scan(tmp / "ct.nii.gz")
    return ["segment", "-i", "ct.nii.gz", "-o", "seg.nii.gz", "--model", ctx.seg_model, "--device", "gpu0"]


@case("features-bad-device-string", 2, "not a torch device", absent=["f.png"])
def _(tmp, ctx):
    ctx.scan(tmp / "ct.nii.gz")
    return ["features", "-i", "ct.nii.gz", "-o", "f.png", "--model", ctx.seg_model, "--device", "gpu0"]


@case("segment-missing-model-folder", 2, "no such model folder", absent=["seg.nii.gz"])
def _(tmp, ctx):
    ctx.scan(tmp / "ct.nii.gz")
    return ["segment", "-i", "ct.nii.gz", "-o", "seg.nii.gz", "--model", "./no-such-model"]


@case("segment-garbage-safetensors", 2, "model.safetensors", absent=["seg.nii.gz"], unchanged=["model"])
def _(tmp, ctx):
    ctx.scan(tmp / "ct.nii.gz")
    shutil.copytree(ctx.seg_model, tmp / "model")
    (tmp / "model" / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{garbage")
    return ["segment", "-i", "ct.nii.gz", "-o", "seg.nii.gz", "--model", "model", "--quiet"]


@case("features-truncated-safetensors", 2, "model.safetensors", absent=["f.png"], unchanged=["model"])
def _(tmp, ctx):
    ctx.scan(tmp / "ct.nii.gz")
    shutil.copytree(ctx.seg_model, tmp / "model")
    data = (tmp / "model" / "model.safetensors").read_bytes()
    (tmp / "model" / "model.safetensors").write_bytes(data[: len(data) // 2])
    return ["features", "-i", "ct.nii.gz", "-o", "f.png", "--model", "model"]


@case("overlay-output-inside-dicom-folder", 2, "inside the input folder", unchanged=["dicom"])
def _(tmp, ctx):
    ctx.dicom_series(tmp / "dicom")
    ctx.labels(tmp / "labels.nii.gz", data=np.zeros((7, 6, 5), np.uint8), affine=np.eye(4))
    return ["overlay", "-i", "dicom", "--labels", "labels.nii.gz", "-o", "dicom/overlay.png"]


@case("overlay-names-from-a-model-folder", 0, "", unchanged=["ct.nii.gz", "labels.nii.gz"])
def _(tmp, ctx):
    ctx.scan(tmp / "ct.nii.gz")
    ctx.labels(tmp / "labels.nii.gz")
    return [
        "overlay",
        "-i",
        "ct.nii.gz",
        "--labels",
        "labels.nii.gz",
        "-o",
        "o.png",
        "--names",
        ctx.seg_model,
    ]


# -- issue 11: overlay reads labels with the one label reader, which checks the grid (shape AND affine) -----
@case("overlay-labels-on-another-grid", 2, "affine differs from ct.nii.gz", absent=["o.png"],
      unchanged=["ct.nii.gz", "labels.nii.gz"])  # fmt: skip
def _(tmp, ctx):
    ctx.scan(tmp / "ct.nii.gz")
    shifted = LPS.copy()
    shifted[:3, 3] += 40.0  # same shape, 40 mm away: drawn on the scan it would be silently wrong
    ctx.labels(tmp / "labels.nii.gz", affine=shifted)
    return ["overlay", "-i", "ct.nii.gz", "--labels", "labels.nii.gz", "-o", "o.png"]


@case("finetune-bf16-without-support", 2, "--bf16", absent=["run"])
def _(tmp, ctx):
    if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        pytest.skip("this machine trains in bf16")
    return ["finetune", "--bf16", "--dataset", "data", "--model", ctx.seg_model, "--output_dir", "run"]


@case("finetune-push-to-hub-offline", 2, "offline", absent=["run"], env={"HF_HUB_OFFLINE": "1"})
def _(tmp, ctx):
    (tmp / "data").mkdir()
    return ["finetune", "--dataset", "data", "--model", ctx.seg_model, "--output_dir", "run", "--push_to_hub",
            "--hub_model_id", "someone/model"]  # fmt: skip


@case("finetune-output-inside-the-dataset", 2, "inside the input folder", unchanged=["data"])
def _(tmp, ctx):
    (tmp / "data").mkdir()
    (tmp / "data" / "dataset.json").write_text("{}")
    return ["finetune", "--dataset", "data", "--model", ctx.seg_model, "--output_dir", "data/run"]


@case("push-offline", 2, "offline", env={"HF_HUB_OFFLINE": "1"}, unchanged=["model"])
def _(tmp, ctx):
    shutil.copytree(ctx.seg_model, tmp / "model")
    (tmp / "model" / "README.md").write_text("# model")
    return ["push", "model", "someone/model"]


@case("build-ct3m-output-inside-a-source", 2, "inside the input folder", absent=["scans/ct3m"])
def _(tmp, ctx):
    ctx.scan(tmp / "scans" / "a.nii.gz")
    return ["build-ct3m", "scans_a=scans", "-o", "scans/ct3m"]


@case("pretrain-output-inside-the-dataset", 2, "inside the input folder", unchanged=["ct3m"])
def _(tmp, ctx):
    (tmp / "ct3m").mkdir()
    (tmp / "ct3m" / "manifest.json").write_text("{}")
    config = Path(__file__).resolve().parents[1] / "training" / "configs" / "stage1.yaml"
    return ["pretrain", "--config", config, "--dataset", "ct3m", "--output_dir", "ct3m/run"]


# -- rows added for other issues go below this line (keep one row per defect) --------------------------------


# -- issue 12: DICOM outputs, label sets, clean-up flags, DICOM inputs ---------------------------------------
@case("segment-dicom-seg-from-nifti", 2, "no source series", absent=["out"], unchanged=["ct.nii.gz"])
def _(tmp, ctx):
    ctx.scan(tmp / "ct.nii.gz")
    return ["segment", "-i", "ct.nii.gz", "-o", "out", "--model", ctx.seg_model, "--output-type", "dicom-seg"]


@case("segment-rtstruct-for-a-series-off-its-grid", 1, "off the series' regular grid", absent=["out"],
      unchanged=["ct"])  # fmt: skip
def _(tmp, ctx):
    from dicom_series import write_series

    positions = [np.array([-10.0, -12.0, 30.0 + 2.5 * k]) for k in range(6)]
    positions[2] = positions[2] + np.array([0.0, 2.0, 0.0])  # shifted in-plane: spacing along z still uniform
    write_series(tmp / "ct", positions=positions)
    return ["segment", "-i", "ct", "-o", "out", "--model", ctx.seg_model, "--output-type", "rtstruct", "nifti",
            "--quiet"]  # fmt: skip


@case("postprocess-labels-outside-the-model-set", 2, "label value(s) 7 are not in the label set",
      absent=["clean.nii.gz", "clean.labels.json"], unchanged=["seg.nii.gz"])  # fmt: skip
def _(tmp, ctx):
    data = np.zeros((24, 20, 5), np.uint8)
    data[3:6, 3:6, 1:3] = 7
    ctx.labels(tmp / "seg.nii.gz", data=data)
    return [
        "postprocess",
        "-i",
        "seg.nii.gz",
        "-o",
        "clean.nii.gz",
        "--names",
        ctx.seg_model,
        "--keep-largest",
    ]


@case("segment-keep-largest-unknown-class", 2, "unknown class 'pancreas'", absent=["out"], unchanged=["ct"])
def _(tmp, ctx):
    ctx.dicom_series(tmp / "ct")
    return ["segment", "-i", "ct", "-o", "out", "--model", ctx.seg_model, "--keep-largest", "liver+pancreas"]


@case("segment-several-series-into-one-file", 2, "-o must be a folder", absent=["seg.nii.gz"],
      unchanged=["study"])  # fmt: skip
def _(tmp, ctx):
    ctx.dicom_series(tmp / "study" / "a", uid="1.2.3.4")
    ctx.dicom_series(tmp / "study" / "b", uid="1.2.3.5")
    return ["segment", "-i", "study", "-o", "seg.nii.gz", "--model", ctx.seg_model]


@case("segment-zip-member-outside-the-archive", 2, "outside the archive folder", unchanged=["study.zip"])
def _(tmp, ctx):
    import zipfile

    ctx.dicom_series(tmp / "s")
    with zipfile.ZipFile(tmp / "study.zip", "w") as archive:
        for path in sorted((tmp / "s").iterdir()):
            archive.write(path, f"../{path.name}")
    return ["segment", "-i", "study.zip", "-o", "out", "--model", ctx.seg_model]


# -- issue 13: ensembles, subset and fast modes, export ------------------------------------------------------
def _other_fold(folder: Path, **overrides) -> Path:
    torch.manual_seed(1)
    config = tiny_config(image_size=32, **overrides)
    MedDINOv3ForSemanticSegmentation(config).save_pretrained(folder)
    MedDINOv3ImageProcessor(target_spacing=[1.0, 1.0]).save_pretrained(folder)
    return folder


@case("segment-ensemble-label-maps-differ", 2, "label maps differ", absent=["out.nii.gz"], unchanged=["scan.nii.gz"])  # fmt: skip
def _(tmp, ctx):
    ctx.scan(tmp / "scan.nii.gz")
    _other_fold(tmp / "fold1", id2label={0: "background", 1: "liver", 2: "spleen"})
    return ["segment", "-i", "scan.nii.gz", "-o", "out.nii.gz", "--model", str(ctx.seg_model), "fold1"]


@case("segment-ensemble-patch-sizes-differ", 2, "patch sizes differ", absent=["out.nii.gz"])
def _(tmp, ctx):
    ctx.scan(tmp / "scan.nii.gz")
    _other_fold(tmp / "fold1", patch_size=8, decoder_hidden_sizes=[32, 16, 8])
    return ["segment", "-i", "scan.nii.gz", "-o", "out.nii.gz", "--model", str(ctx.seg_model), "fold1"]


@case("segment-roi-subset-unknown-name", 2, "unknown structure(s) lungs", absent=["out.nii.gz"])
def _(tmp, ctx):
    ctx.scan(tmp / "scan.nii.gz")
    return ["segment", "-i", "scan.nii.gz", "-o", "out.nii.gz", "--model", str(ctx.seg_model), "--roi-subset",
            "liver,lungs"]  # fmt: skip


@case("segment-step-size-zero", 2, "--step-size must be in (0, 1]", absent=["out.nii.gz"])
def _(tmp, ctx):
    ctx.scan(tmp / "scan.nii.gz")
    return ["segment", "-i", "scan.nii.gz", "-o", "out.nii.gz", "--model", str(ctx.seg_model), "--step-size",
            "0"]  # fmt: skip


@case("export-not-onnx", 2, "must end with .onnx", absent=["model.pt"])
def _(tmp, ctx):
    return ["export", "--format", "onnx", str(ctx.seg_model), "model.pt"]


# -- issue 8 items 4 and 12 (pretraining): --max_steps sanity; no pickle ever runs on --init or --resume --------
_PRETRAIN_CONFIG = str(Path(__file__).resolve().parents[1] / "training" / "configs" / "stage1.yaml")
_PRETRAIN_TINY = [
    "crops.global_size=32", "crops.local_size=16", "crops.n_local=2", "train.batch_size=4",
    "train.mixed_precision=no", "train.num_workers=0", "train.log_with=none", "train.shuffle_buffer_size=8",
    "health.every=0", "heads.out_dim=16", "heads.hidden_dim=16", "heads.bottleneck_dim=8",
]  # fmt: skip
_FORCE_UNSAFE = {"TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD": "1"}  # must not matter: loads pass weights_only=True


class _PicklePayload:
    """Unpickled with weights_only=False, this creates the file `marker` (the row asserts it never exists)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return exec, (f"open({str(self.marker)!r}, 'w').close()",)


def _reset_accelerate() -> None:
    """Each `pretrain` command creates an Accelerator; in one test process its global state must be reset."""
    from accelerate.state import AcceleratorState, GradientState, PartialState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    PartialState._reset_state()


def _pretrain_run(ctx: Context) -> Path:
    """A finished 1-step tiny pretraining run (CT-3M from synthetic volumes), built once per session."""
    _reset_accelerate()
    run = ctx.root / "pretrain-run"
    if (run / "checkpoints").is_dir():
        return run
    from meddinov3_hf.data.ct3m import build_ct3m
    from meddinov3_hf.data.synthetic import make_synthetic_ct
    from meddinov3_hf.pretraining.config import load_config
    from meddinov3_hf.pretraining.loop import train

    for i in range(2):
        hu, _ = make_synthetic_ct(shape=(6, 48, 48), seed=i)
        path = ctx.root / "pretrain-src" / f"case{i}.nii.gz"
        path.parent.mkdir(parents=True, exist_ok=True)
        nib.save(nib.Nifti1Image(np.transpose(hu, (2, 1, 0)), np.diag([0.8, 0.8, 2.5, 1.0])), path)
    build_ct3m([f"synth={ctx.root / 'pretrain-src'}"], ctx.root / "pretrain-ct3m", quiet=True)
    torch.manual_seed(0)
    from meddinov3_hf import MedDINOv3Config, MedDINOv3Model

    MedDINOv3Model(MedDINOv3Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                   intermediate_size=64)).save_pretrained(ctx.root / "pretrain-init")  # fmt: skip
    cfg = load_config(_PRETRAIN_CONFIG, [*_PRETRAIN_TINY, "train.max_steps=1", "train.checkpoint_every=1"])
    cfg.dataset, cfg.output_dir, cfg.init = (
        str(ctx.root / "pretrain-ct3m"),
        str(run),
        str(ctx.root / "pretrain-init"),
    )
    try:
        train(cfg)
    finally:
        _reset_accelerate()
    return run


@case("pretrain-max-steps-zero", 2, "train.max_steps must be a positive integer", absent=["out"])
def _(tmp, ctx):
    _reset_accelerate()
    return ["pretrain", "--config", _PRETRAIN_CONFIG, "--max_steps", "0", "--output_dir", "out"]


@case("pretrain-init-pickled-release-pth", 2, "weights_only=True", absent=["out", "ran"], unchanged=["release.pth"],
      env=_FORCE_UNSAFE)  # fmt: skip
def _(tmp, ctx):
    _reset_accelerate()
    torch.save({"teacher": _PicklePayload(tmp / "ran")}, tmp / "release.pth")
    return ["pretrain", "--config", _PRETRAIN_CONFIG, "--init", "release.pth", "--output_dir", "out"]


@case("pretrain-init-pickled-checkpoint", 2, "custom_checkpoint_1.pkl", absent=["out", "ran"], unchanged=["ckpt"],
      env=_FORCE_UNSAFE)  # fmt: skip
def _(tmp, ctx):
    shutil.copytree(_pretrain_run(ctx) / "checkpoints" / "step_00000001", tmp / "ckpt")
    torch.save({"backbone.x": _PicklePayload(tmp / "ran")}, tmp / "ckpt" / "custom_checkpoint_1.pkl")
    return ["pretrain", "--config", _PRETRAIN_CONFIG, "--init", "ckpt", "--output_dir", "out"]


def _resume_row(file_name: str):
    def build(tmp, ctx):
        run = _pretrain_run(ctx)
        shutil.copytree(run, tmp / "run")
        torch.save(
            {"state": _PicklePayload(tmp / "ran")}, tmp / "run" / "checkpoints" / "step_00000001" / file_name
        )
        return ["pretrain", "--config", _PRETRAIN_CONFIG, "--init", ctx.root / "pretrain-init", "--output_dir",
                "run", "--dataset", ctx.root / "pretrain-ct3m", "--max_steps", "2", "--resume",
                *_PRETRAIN_TINY]  # fmt: skip

    return build


for _name in ("optimizer.bin", "custom_checkpoint_0.pkl", "custom_checkpoint_1.pkl"):
    case(f"pretrain-resume-pickled-{_name}", 2, _name, absent=["ran"], unchanged=["run"], env=_FORCE_UNSAFE)(
        _resume_row(_name)
    )


# ------------------------------------------------------------------------------------------------------------
# Harness
# ------------------------------------------------------------------------------------------------------------
def _reset_accelerate() -> None:
    """Forget accelerate's process-wide state, as a fresh `meddinov3` process would start without it."""
    import sys

    if "accelerate.state" in sys.modules:
        sys.modules["accelerate.state"].AcceleratorState._reset_state(reset_partial_state=True)


@pytest.fixture(scope="module")
def ctx(tmp_path_factory) -> Context:
    return Context(tmp_path_factory.mktemp("bad-inputs-shared"))


@pytest.mark.parametrize("row", CASES, ids=[c.id for c in CASES])
def test_bad_input(row: Case, ctx: Context, tmp_path: Path, monkeypatch, capsys) -> None:
    work = tmp_path / "work"
    work.mkdir()
    argv = [str(a) for a in row.build(work, ctx)]
    before = {name: _snapshot(work / name) for name in row.unchanged}
    for name, value in row.env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.chdir(work)
    _reset_accelerate()  # a build or an earlier row may have run accelerate in this process
    try:
        code = cli_main(argv)
    except SystemExit as stop:  # argparse errors
        code = stop.code
    finally:
        _reset_accelerate()
    captured = capsys.readouterr()
    assert code == row.code, f"exit {code}, expected {row.code}; stderr:\n{captured.err}"
    assert row.message.lower() in captured.err.lower(), captured.err
    assert "Traceback" not in captured.err, captured.err
    for name in row.absent:
        assert not (work / name).exists(), f"{name} was written"
    for name in row.unchanged:
        assert _snapshot(work / name) == before[name], f"{name} changed"
    leftovers = [str(p) for p in work.rglob("*") if TEMPORARY.match(p.name)]
    assert not leftovers, leftovers
    os.chdir(tmp_path)
