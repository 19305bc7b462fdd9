"""Hugging Face Spaces entry point: the `meddinov3 app` interface as a Gradio Space.

A Space runs `python app.py`. Put a fine-tuned segmentation folder beside this file as `model/` (or set
`MEDDINOV3_MODEL` to a folder or Hub repo id) and list `meddinov3-hf[app]` in the Space's requirements.txt.
Locally, `meddinov3 app --model DIR` starts the same app.
"""

import os

from meddinov3_hf.app import build_app

demo = build_app(os.environ.get("MEDDINOV3_MODEL", "model"), device=os.environ.get("MEDDINOV3_DEVICE", "cpu"))

if __name__ == "__main__":
    demo.launch(allowed_paths=[str(demo.meddinov3_workdir)])
