"""Pushing fine-tuning outputs to the Hugging Face Hub with `huggingface_hub`.

Both functions choose what to upload and hand it to `meddinov3_hf.hub.push_files`, the package's one Hub
upload. Both take an optional `api` (an `HfApi`-like object with `create_repo` and `create_commit`), so tests
and air-gapped users can substitute a local stand-in; by default a real `HfApi` is used.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

from huggingface_hub import HfApi

from ..hub import push_files

__all__ = ["MODEL_FILES", "model_files_to_push", "push_finetuned_model", "push_slice_dataset"]

# What a fine-tuned folder needs on the Hub: weights, config, processor, card, metrics. Checkpoints,
# converted base models (`_*`), logs and the trainer's own state stay local.
MODEL_FILES: tuple[str, ...] = (
    "config.json",
    "model.safetensors",
    "model.safetensors.index.json",
    "preprocessor_config.json",
    "README.md",
    "validation/metrics.json",
    "validation/metrics.csv",
)


def model_files_to_push(folder: str | os.PathLike) -> list[Path]:
    """The files of `folder` that `push_finetuned_model` uploads (weight shards included)."""
    folder = Path(folder)
    files = [folder / name for name in MODEL_FILES if (folder / name).is_file()]
    files += sorted(folder.glob("model-*-of-*.safetensors"))
    # The model code `save_pretrained` copies beside the weights, for trust_remote_code=True.
    files += sorted(folder.glob("*.py"))
    required = ("config.json", "preprocessor_config.json", "README.md")
    missing = [n for n in required if not (folder / n).is_file()]
    if not any(p.name.endswith(".safetensors") for p in files):
        missing.append("model.safetensors")
    if missing:
        raise FileNotFoundError(f"{folder}: cannot push, missing {missing}")
    return files


def push_finetuned_model(
    folder: str | os.PathLike,
    repo_id: str,
    token: str | None = None,
    private: bool | None = None,
    commit_message: str = "Upload fine-tuned MedDINOv3 segmentation model",
    api: Any = None,
) -> Any:
    """Create `repo_id` if needed and upload model, processor, card and validation metrics in one commit."""
    api = api if api is not None else HfApi(token=token)
    files = model_files_to_push(folder)
    return push_files(folder, repo_id, files, commit_message, private=private, api=api)


_DATASET_CARD = """---
license: other
task_categories:
- image-segmentation
tags:
- medical-imaging
- computed-tomography
- meddinov3
---

# {name}

Axial CT slices built by `meddinov3_hf.data.slices.build_slice_dataset` from an nnU-Net raw dataset:
{rows} slices of {cases} cases. `image` holds little-endian int16 Hounsfield units and `label` the class
ids (`label_dtype`), both (height, width) C-order bytes; decode with `meddinov3_hf.data.slices.decode_slice`.

CT scans are patient data: check that the source licence and ethics approval allow sharing before making
this repository public.
"""


def push_slice_dataset(
    dataset: Any,
    repo_id: str,
    token: str | None = None,
    private: bool = True,
    rows_per_shard: int = 2048,
    split: str = "train",
    api: Any = None,
) -> Any:
    """Upload a slice `datasets.Dataset` as parquet shards (`data/{split}-0000i-of-0000n.parquet`) plus a
    dataset card. Shards are written one at a time to a temporary folder, so memory stays bounded.
    Private by default: CT scans are patient data."""
    api = api if api is not None else HfApi(token=token)
    n_shards = max(1, -(-len(dataset) // rows_per_shard))
    with tempfile.TemporaryDirectory(prefix="meddinov3-push-") as tmp:
        files = []
        (Path(tmp) / "data").mkdir()
        for index in range(n_shards):
            shard = dataset.select(
                range(index * rows_per_shard, min(len(dataset), (index + 1) * rows_per_shard))
            )
            path = Path(tmp) / "data" / f"{split}-{index:05d}-of-{n_shards:05d}.parquet"
            shard.to_parquet(str(path))
            files.append(path)
        card = Path(tmp) / "README.md"
        cases = len(set(dataset["case_id"])) if len(dataset) else 0
        card.write_text(_DATASET_CARD.format(name=repo_id, rows=len(dataset), cases=cases), encoding="utf-8")
        files.append(card)
        message = "Upload CT slice dataset"
        return push_files(tmp, repo_id, files, message, repo_type="dataset", private=private, api=api)
