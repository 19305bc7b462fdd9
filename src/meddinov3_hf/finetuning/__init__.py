"""Fine-tuning MedDINOv3 for CT segmentation on nnU-Net raw datasets with `transformers.Trainer`.

Entry point: `run_finetune(argv)` (used by `training/finetune.py` and the `meddinov3 finetune` command).
"""

from __future__ import annotations

__all__ = ["run_finetune"]


def run_finetune(argv: list[str] | None = None) -> int:
    """Parse `argv` (default `sys.argv[1:]`) and fine-tune; returns the exit status."""
    # Imported lazily: the trainer stack (datasets, accelerate) is heavy for `import meddinov3_hf.finetuning`.
    from .trainer import run_finetune as _run

    return _run(argv)
