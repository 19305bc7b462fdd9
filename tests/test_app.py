"""`meddinov3 app`: the Gradio app end to end in a real headless browser (Debian chromium + Selenium).

The app is started as the user starts it (`meddinov3 app --model DIR`) on 127.0.0.1; the browser uploads a
scan, waits for the overlay, reads the statistics table, switches the window, downloads the label NIfTI and
compares it with `meddinov3 segment`'s output; an unreadable upload must give a clear message."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import tiny_config

from meddinov3_hf import MedDINOv3ForSemanticSegmentation, MedDINOv3ImageProcessor
from meddinov3_hf.cli import main
from meddinov3_hf.data.synthetic import make_synthetic_ct
from meddinov3_hf.volumes.io import load_volume, save_volume

NAMES = {0: "background", 1: "liver", 2: "kidney", 3: "spleen"}


def _model_and_scan(root: Path) -> tuple[Path, Path]:
    torch.manual_seed(0)
    model = MedDINOv3ForSemanticSegmentation(tiny_config(image_size=64, id2label=NAMES)).eval()
    model.save_pretrained(root / "seg")
    MedDINOv3ImageProcessor(size={"height": 64, "width": 64}).save_pretrained(root / "seg")
    hu, _ = make_synthetic_ct((6, 48, 40), (3.0, 1.5, 1.5), seed=1)
    volume = load_volume(hu.astype(np.float32), spacing=(3.0, 1.5, 1.5))
    save_volume(volume.hu, volume, root / "demo_0000.nii.gz")
    return root / "seg", root / "demo_0000.nii.gz"


def test_read_upload_refuses_unreadable_files_with_the_file_name(tmp_path):
    from meddinov3_hf.app import UploadError, read_upload

    (tmp_path / "garbage.nii.gz").write_bytes(b"not a nifti")
    (tmp_path / "notes.txt").write_text("hello")
    (tmp_path / "broken.zip").write_bytes(b"PK\x03\x04 truncated")
    for name in ["garbage.nii.gz", "notes.txt", "broken.zip"]:
        with pytest.raises(UploadError, match=f"{name}: .*Upload a NIfTI file"):
            read_upload(tmp_path / name, tmp_path / "work")
    import zipfile

    with zipfile.ZipFile(tmp_path / "evil.zip", "w") as handle:
        handle.writestr("../../escaped.dcm", b"x")
    with pytest.raises(UploadError, match="outside the archive"):
        read_upload(tmp_path / "evil.zip", tmp_path / "work")
    assert not (tmp_path.parent / "escaped.dcm").exists()


def test_app_reads_a_dicom_zip_and_a_single_dicom_file(tmp_path):
    import zipfile

    from pydicom.data import get_testdata_file

    from meddinov3_hf.app import read_upload

    ct = Path(get_testdata_file("CT_small.dcm"))
    expected = load_volume(ct).hu
    with zipfile.ZipFile(tmp_path / "series.zip", "w") as handle:
        handle.write(ct, "patient/series/CT_small.dcm")
    assert np.array_equal(read_upload(tmp_path / "series.zip", tmp_path / "w1").hu, expected)
    assert np.array_equal(read_upload(ct, tmp_path / "w2").hu, expected)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait_for_server(url: str, process: subprocess.Popen, log: Path, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"the app exited with {process.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise AssertionError(f"the app did not answer on {url} within {timeout} s:\n{log.read_text()[-3000:]}")


def _browser(download_dir: Path):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium")
    for arg in ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"]:
        options.add_argument(arg)
    options.add_argument("--window-size=1400,1100")
    options.add_experimental_option(
        "prefs", {"download.default_directory": str(download_dir), "download.prompt_for_download": False}
    )
    return webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=options)


@pytest.mark.slow
def test_app_in_a_real_browser_matches_the_cli(tmp_path):
    pytest.importorskip("gradio")
    pytest.importorskip("selenium")
    if not (shutil.which("chromium") and shutil.which("chromedriver")):
        pytest.skip("Debian's chromium and chromium-driver are not installed (.ci/run installs them)")
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as EC
    from selenium.webdriver.support.ui import WebDriverWait

    model_dir, scan = _model_and_scan(tmp_path)
    cli_labels = tmp_path / "cli_labels.nii.gz"
    assert (
        main(["segment", "-i", str(scan), "-o", str(cli_labels), "--model", str(model_dir), "--quiet"]) == 0
    )
    reference = nib.load(cli_labels)
    expected = np.asarray(reference.dataobj)

    port = _free_port()
    url = f"http://127.0.0.1:{port}/"
    env = dict(os.environ, GRADIO_ANALYTICS_ENABLED="False", HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    log = tmp_path / "app.log"
    command = [
        sys.executable,
        "-m",
        "meddinov3_hf.cli",
        "app",
        "--model",
        str(model_dir),
        "--port",
        str(port),
    ]
    with open(log, "w") as log_handle:
        process = subprocess.Popen(command, stdout=log_handle, stderr=subprocess.STDOUT, env=env)
    driver = None
    try:
        _wait_for_server(url, process, log)
        downloads = tmp_path / "downloads"
        downloads.mkdir()
        driver = _browser(downloads)
        wait = WebDriverWait(driver, 120)
        driver.get(url)
        upload = wait.until(EC.presence_of_element_located((By.CSS_SELECTOR, "#upload input[type=file]")))
        upload.send_keys(str(scan))

        def overlay_src(d):
            images = d.find_elements(By.CSS_SELECTOR, "#overlay img")
            src = images[0].get_attribute("src") if images else ""
            return src if src and "/file=/" not in src[-8:] and src.endswith(".png") else False

        first_src = wait.until(overlay_src)
        status = driver.find_element(By.ID, "status").text
        assert "demo_0000.nii.gz" in status and "6 axial slices" in status, status

        def table_rows(d):  # Gradio's dataframe renders its cells as grid cells with data-row/data-col
            cells = d.find_elements(By.CSS_SELECTOR, "#statistics [role=gridcell][data-row][data-col]")
            rows: dict[int, dict[int, str]] = {}
            for cell in cells:
                rows.setdefault(int(cell.get_attribute("data-row")), {})[
                    int(cell.get_attribute("data-col"))
                ] = cell.text.strip()
            table = [[row[c] for c in sorted(row)] for _, row in sorted(rows.items())]
            return table if len(table) == 3 and all(len(r) >= 3 and r[2] for r in table) else False

        rows = wait.until(table_rows)
        # The statistics shown equal an independent count on the CLI's label map.
        for row in rows:
            label = int(row[0])
            assert row[1] == NAMES[label]
            assert int(row[2]) == int((expected == label).sum()), row

        driver.find_element(By.CSS_SELECTOR, "#window input[value='lung']").click()
        wait.until(lambda d: overlay_src(d) not in (False, first_src))

        link = wait.until(
            lambda d: next(
                (
                    a
                    for a in d.find_elements(By.CSS_SELECTOR, "#downloads a")
                    if "labels.nii.gz" in (a.get_attribute("href") or "")
                ),
                False,
            )
        )
        link.click()
        target = downloads / "demo_0000_labels.nii.gz"
        wait.until(lambda d: target.is_file() and not list(downloads.glob("*.crdownload")))
        downloaded = nib.load(target)
        assert np.array_equal(np.asarray(downloaded.dataobj), expected)
        assert np.array_equal(downloaded.affine, reference.affine)
        assert downloaded.get_data_dtype() == reference.get_data_dtype()

        bad = tmp_path / "broken.nii.gz"
        bad.write_bytes(b"this is not a NIfTI file")
        driver.get(url)
        upload = wait.until(EC.presence_of_element_located((By.CSS_SELECTOR, "#upload input[type=file]")))
        upload.send_keys(str(bad))
        wait.until(lambda d: "Could not read" in d.find_element(By.ID, "status").text)
        message = driver.find_element(By.ID, "status").text
        assert "broken.nii.gz" in message and "not a readable NIfTI" in message, message
    finally:
        if driver is not None:
            driver.quit()
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    assert bad.read_bytes() == b"this is not a NIfTI file"  # inputs untouched


def test_space_entry_point_builds_the_app_from_the_environment(tmp_path, monkeypatch):
    # The repository's app.py is what a Hugging Face Space runs: it must build the app without launching it.
    import runpy

    pytest.importorskip("gradio")
    import gradio as gr

    model_dir, _ = _model_and_scan(tmp_path)
    monkeypatch.setenv("MEDDINOV3_MODEL", str(model_dir))
    namespace = runpy.run_path(str(Path(__file__).parents[1] / "app.py"), run_name="space")
    assert isinstance(namespace["demo"], gr.Blocks)
    assert "liver, kidney, spleen" in namespace["demo"].config["components"][0]["props"]["value"]


def test_app_offers_a_dicom_seg_for_dicom_uploads_and_none_for_nifti(tmp_path):
    import zipfile

    import pydicom
    from pydicom.data import get_testdata_file

    from meddinov3_hf.app import SegmentationApp

    model_dir, scan = _model_and_scan(tmp_path)
    ct = Path(get_testdata_file("CT_small.dcm"))
    with zipfile.ZipFile(tmp_path / "series.zip", "w") as handle:
        handle.write(ct, "series/CT_small.dcm")
    app = SegmentationApp(model_dir, workdir=tmp_path / "work")
    for upload in [tmp_path / "series.zip", ct]:
        result = app.segment(upload)
        seg = [f for f in result.files if f.endswith("_seg.dcm")]
        assert len(seg) == 1 and not result.notes
        dataset = pydicom.dcmread(seg[0])
        assert dataset.Modality == "SEG"
        assert dataset.ReferencedSeriesSequence[0].SeriesInstanceUID == pydicom.dcmread(ct).SeriesInstanceUID
    nifti = app.segment(scan)
    assert not any(f.endswith(".dcm") for f in nifti.files)
    assert [Path(f).name for f in nifti.files] == [
        "demo_0000_labels.nii.gz", "demo_0000_statistics.csv", "demo_0000_statistics.json"
    ]  # fmt: skip
