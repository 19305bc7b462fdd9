"""`meddinov3 app --model DIR`: whole-volume CT segmentation in the browser, the Hugging Face Spaces way (Gradio).

Upload a NIfTI file, a zip of one DICOM series or a single DICOM file; the volume is segmented with the same
code path as `meddinov3 segment` (so the label NIfTI is the CLI's, voxel for voxel); scroll the axial slices with
window presets and see the labels with their legend; download the label NIfTI (with the label names in its
header), the per-structure statistics (CSV and JSON) and, for DICOM input, a DICOM-SEG referencing the series.
An upload that cannot be read gives one line naming the file and the reason. `gradio` comes with the `[app]`
extra; the repository's top-level `app.py` runs the same app as a Space.
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
import threading
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

WINDOWS = ["abdomen", "liver", "mediastinum", "lung", "bone", "brain"]
STATISTICS_HEADERS = [
    "id",
    "structure",
    "voxels",
    "volume (ml)",
    "mean HU",
    "std HU",
    "min HU",
    "max HU",
    "truncated",
]
ACCEPTED = "a NIfTI file (.nii / .nii.gz), a zip of one DICOM series, or a single DICOM file"
# Refuse zips that would unpack to more than this (a zip bomb, or not one CT series).
MAX_UNZIPPED_BYTES = 8 * 1024**3


class UploadError(ValueError):
    """An upload the app cannot read; the message names the file and the reason."""


@dataclass
class Segmentation:
    """One segmented upload: canonical HU and labels for display, and the files offered for download."""

    name: str
    hu: np.ndarray
    labels: np.ndarray
    spacing: tuple[float, float, float]
    names: dict[int, str]
    files: list[str] = field(default_factory=list)
    statistics: list[list[Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def _upload_name(path: Path) -> str:
    name = path.name
    for suffix in (".nii.gz", ".nii", ".zip", ".dcm"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)] or "scan"
    return name or "scan"


def _unzip_series(archive: Path, destination: Path) -> Path:
    """Unpack a zip of one DICOM series safely (no paths outside `destination`, bounded size) and return the
    one folder that holds its files."""
    try:
        with zipfile.ZipFile(archive) as handle:
            members = [m for m in handle.infolist() if not m.is_dir()]
            members = [m for m in members if not m.filename.startswith("__MACOSX/")]
            members = [m for m in members if not Path(m.filename).name.startswith(".")]
            if not members:
                raise UploadError("the zip holds no files")
            total = sum(m.file_size for m in members)
            if total > MAX_UNZIPPED_BYTES:
                raise UploadError(f"the zip unpacks to {total / 1e9:.1f} GB, more than one CT series")
            root = destination.resolve()
            for member in members:
                target = (destination / member.filename).resolve()
                if not target.is_relative_to(root):
                    raise UploadError(f"zip entry {member.filename!r} points outside the archive")
                target.parent.mkdir(parents=True, exist_ok=True)
                with handle.open(member) as src, open(target, "wb") as dst:
                    shutil.copyfileobj(src, dst)
    except zipfile.BadZipFile as err:
        raise UploadError(f"not a readable zip file ({err})") from err
    folders = sorted({(destination / m.filename).resolve().parent for m in members})
    if len(folders) != 1:
        shown = ", ".join(str(f.relative_to(destination.resolve())) for f in folders[:4])
        raise UploadError(f"the zip has files in {len(folders)} folders ({shown}), not one DICOM series")
    return folders[0]


def read_upload(path: str | os.PathLike, workdir: str | os.PathLike):
    """Load an uploaded NIfTI file, zip of one DICOM series or single DICOM file as a `CTVolume`.

    Raises:
        UploadError: with one line naming the file, the reason and what the app accepts.
    """
    import warnings

    from .volumes.io import load_volume

    path, workdir = Path(path), Path(workdir)
    if not path.is_file():
        raise UploadError(f"{path.name}: no file was uploaded")
    source = path
    try:
        if zipfile.is_zipfile(path) or path.suffix.lower() == ".zip":
            source = _unzip_series(path, workdir / "dicom")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return load_volume(source)
    except (ValueError, OSError, ImportError, KeyError, AttributeError, TypeError) as err:
        reason = str(err)
        if reason.startswith(f"{source}: "):
            reason = reason[len(f"{source}: ") :]
        reason = reason.replace(str(source), path.name) or type(err).__name__
        raise UploadError(f"Could not read {path.name}: {reason}. Upload {ACCEPTED}.") from err


def statistics_rows(statistics: dict[str, dict[str, Any]]) -> list[list[Any]]:
    """The app's table rows from `volumes.statistics.compute_statistics` output."""

    def rounded(value, digits=1):
        return None if value is None else round(float(value), digits)

    return [
        [
            s["id"],
            s["name"],
            s["voxels"],
            rounded(s["volume_ml"], 3),
            rounded(s["hu_mean"]),
            rounded(s["hu_std"]),
            rounded(s["hu_min"]),
            rounded(s["hu_max"]),
            "yes" if s["truncated"] else "no",
        ]
        for s in statistics.values()
    ]


class SegmentationApp:
    """The app's work without the user interface: load the model once, segment uploads, draw slices.

    Args:
        model_dir: a segmentation model folder.
        device: torch device for inference.
        batch_size: tiles per forward pass (the CLI's default, so results equal `meddinov3 segment`'s).
        workdir: where per-upload outputs go (default: a fresh temporary folder, removed at exit).
    """

    def __init__(
        self,
        model_dir: str | os.PathLike,
        device: str = "cpu",
        batch_size: int = 8,
        workdir: str | os.PathLike | None = None,
    ):
        from .volumes.inference import VolumeSegmenter, load_segmentation_model

        self.model_dir = Path(model_dir)
        model, processor = load_segmentation_model(self.model_dir, device)
        self.segmenter = VolumeSegmenter(model, processor, batch_size=batch_size, device=device)
        self.names = {int(k): str(v) for k, v in model.config.id2label.items()}
        if workdir is None:
            workdir = tempfile.mkdtemp(prefix="meddinov3-app-")
            atexit.register(shutil.rmtree, workdir, True)  # only the folder this app created
        self.workdir = Path(workdir)
        self._lock = threading.Lock()  # one segmentation at a time: the model is shared
        self._count = 0

    def segment(self, upload: str | os.PathLike) -> Segmentation:
        """Segment one upload and write its downloads; raises `UploadError` for unreadable uploads."""
        from .volumes.io import save_labels
        from .volumes.statistics import compute_statistics, write_statistics

        upload = Path(upload)
        with self._lock:
            self._count += 1
            folder = self.workdir / f"{self._count:04d}"
        folder.mkdir(parents=True)
        volume = read_upload(upload, folder)
        with self._lock:
            result = self.segmenter.segment(volume)
        name = _upload_name(upload)
        out = folder / "out"
        labels_path = save_labels(
            result.labels, volume, out / f"{name}_labels.nii.gz", label_names=self.names
        )
        statistics = compute_statistics(result.labels, volume, self.names)
        json_path, csv_path = write_statistics(statistics, out / f"{name}_statistics.json")
        files = [str(labels_path), str(csv_path), str(json_path)]
        notes = []
        if not str(volume.source).lower().endswith((".nii", ".nii.gz")):
            try:
                from .volumes.dicom_out import write_dicom_seg

                seg = write_dicom_seg(
                    result.labels, volume, out / f"{name}_seg.dcm", self.names, model_name=self.model_dir.name
                )
                files.append(str(seg))
            except (ImportError, ValueError, OSError) as err:
                notes.append(f"DICOM-SEG not written: {err}")
        return Segmentation(
            name=upload.name,
            hu=volume.hu,
            labels=result.labels,
            spacing=tuple(float(s) for s in volume.spacing),
            names=self.names,
            files=files,
            statistics=statistics_rows(statistics),
            notes=notes,
        )

    @staticmethod
    def busiest_slice(labels: np.ndarray) -> int:
        """The axial slice with the most labelled voxels (the one `meddinov3 overlay` shows)."""
        return int(np.argmax((labels > 0).reshape(labels.shape[0], -1).sum(1)))

    @staticmethod
    def render(segmentation: Segmentation, index: int, window: str = "abdomen"):
        """Slice `index` with its labels blended on top and the legend, as `meddinov3 overlay` draws it."""
        from .visualize import overlay_image

        index = int(np.clip(index, 0, segmentation.hu.shape[0] - 1))
        return overlay_image(
            segmentation.hu[index],
            segmentation.labels[index],
            segmentation.names,
            window=window,
            spacing_yx=segmentation.spacing[1:],
        )


def build_app(model_dir: str | os.PathLike, device: str = "cpu", workdir: str | os.PathLike | None = None):
    """The Gradio `Blocks` app for a segmentation model folder."""
    try:
        import gradio as gr
    except ImportError as err:
        raise ImportError("the app needs the [app] extra: pip install 'meddinov3-hf[app]'") from err

    app = SegmentationApp(model_dir, device=device, workdir=workdir)
    labels = ", ".join(name for key, name in sorted(app.names.items()) if key != 0)

    def on_upload(upload):
        empty = (None, gr.Slider(minimum=0, maximum=1, value=0), None, [], None)
        if upload is None:
            return ("Upload a scan to start.", *empty)
        path = upload if isinstance(upload, str) else getattr(upload, "name", str(upload))
        try:
            result = app.segment(path)
        except UploadError as err:
            return (f"**Error:** {err}", *empty)
        index = app.busiest_slice(result.labels)
        depth = result.hu.shape[0]
        status = (
            f"Segmented **{result.name}**: {depth} axial slices of {result.hu.shape[1]}×{result.hu.shape[2]}."
        )
        status += "".join(f" {note}" for note in result.notes)
        slider = gr.Slider(minimum=0, maximum=max(depth - 1, 1), value=index, step=1, interactive=depth > 1)
        return status, result, slider, app.render(result, index), result.statistics, result.files

    def on_view(result, index, window):
        return None if result is None else app.render(result, index, window)

    with gr.Blocks(title="MedDINOv3 CT segmentation") as blocks:
        gr.Markdown(
            f"# MedDINOv3 CT segmentation\nModel `{app.model_dir.name}` ({labels}). Upload {ACCEPTED}; "
            "the scan is segmented slice by slice exactly as `meddinov3 segment` does."
        )
        state = gr.State(None)
        with gr.Row():
            with gr.Column(scale=1):
                upload = gr.File(label="CT scan", type="filepath", elem_id="upload")
                status = gr.Markdown("Upload a scan to start.", elem_id="status")
                window = gr.Radio(WINDOWS, value="abdomen", label="Window", elem_id="window")
                index = gr.Slider(0, 1, value=0, step=1, label="Axial slice", elem_id="slice")
                downloads = gr.File(
                    label="Downloads", file_count="multiple", interactive=False, elem_id="downloads"
                )
            with gr.Column(scale=2):
                overlay = gr.Image(
                    label="Overlay", type="pil", format="png", interactive=False, elem_id="overlay"
                )
        table = gr.Dataframe(
            headers=STATISTICS_HEADERS, label="Statistics", interactive=False, elem_id="statistics", wrap=True
        )
        upload.upload(
            on_upload,
            inputs=upload,
            outputs=[status, state, index, overlay, table, downloads],
            concurrency_limit=1,
        )
        index.change(on_view, inputs=[state, index, window], outputs=overlay)
        window.change(on_view, inputs=[state, index, window], outputs=overlay)
    blocks.meddinov3_workdir = app.workdir
    return blocks


def launch_app(
    model_dir: str | os.PathLike,
    host: str = "127.0.0.1",
    port: int = 7860,
    device: str = "cpu",
    share: bool = False,
) -> None:
    """Build the app and serve it (blocking) on `host:port`."""
    blocks = build_app(model_dir, device=device)
    print(f"MedDINOv3 app for {model_dir} on http://{host}:{port}", flush=True)
    blocks.launch(
        server_name=host,
        server_port=port,
        share=share,
        allowed_paths=[str(blocks.meddinov3_workdir)],
        footer_links=[],
    )
