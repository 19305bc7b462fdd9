"""Regenerate docs/app.png: `meddinov3 app` on the demo's model and held-out volume, in headless chromium.

meddinov3 demo -o meddinov3-demo && python docs/app_screenshot.py --demo meddinov3-demo
"""

from __future__ import annotations

import argparse
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--demo", default="meddinov3-demo")
    parser.add_argument("-o", "--output", default=str(Path(__file__).with_name("app.png")))
    args = parser.parse_args()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    demo = Path(args.demo).resolve()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    command = [
        sys.executable,
        "-m",
        "meddinov3_hf.cli",
        "app",
        "--model",
        str(demo / "model"),
        "--port",
        str(port),
    ]
    app = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium")
    for arg in ["--headless=new", "--no-sandbox", "--disable-gpu", "--window-size=1400,1080"]:
        options.add_argument(arg)
    driver = None
    try:
        for _ in range(240):
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=2)
                break
            except OSError:
                time.sleep(0.5)
        driver = webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=options)
        driver.get(f"http://127.0.0.1:{port}/")
        wait = WebDriverWait(driver, 120)
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#upload input[type=file]"))
        upload = driver.find_element(By.CSS_SELECTOR, "#upload input[type=file]")
        upload.send_keys(str(demo / "heldout" / "heldout_0000.nii.gz"))
        wait.until(lambda d: any((i.get_attribute("src") or "").endswith(".png")
                                 for i in d.find_elements(By.CSS_SELECTOR, "#overlay img")))  # fmt: skip
        time.sleep(2)  # let the table and downloads render
        driver.save_screenshot(args.output)
        print(f"wrote {args.output}")
    finally:
        if driver is not None:
            driver.quit()
        app.terminate()
        app.wait(timeout=30)


if __name__ == "__main__":
    main()
