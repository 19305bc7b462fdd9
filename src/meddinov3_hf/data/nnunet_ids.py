"""nnU-Net dataset names and IDs: `--dataset 1`, `--dataset Dataset001_AMOS` or a folder, resolved as nnU-Net does.

nnU-Net v2 (`nnunetv2/utilities/dataset_name_id_conversion.py`) names datasets `DatasetXXX_Name` and looks them up
in the folder named by the `nnUNet_raw` environment variable; an integer ID matches the one folder starting with
`Dataset{ID:03d}_`.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

_NAME = re.compile(r"^Dataset(\d{3})_.+")


def resolve_nnunet_dataset(text: str | os.PathLike[str]) -> Path:
    """An existing folder as given; otherwise a dataset ID (`1`, `001`) or name (`Dataset001_AMOS`) in
    `$nnUNet_raw`. Raises `FileNotFoundError` naming what was looked for and where."""
    path = Path(text)
    if path.is_dir():
        return path
    value = str(text).strip()
    if not (value.isdigit() or _NAME.match(value)):
        raise FileNotFoundError(
            f"--dataset {value}: no such folder, and not an nnU-Net dataset ID (e.g. 1) or name (Dataset001_X)"
        )
    raw = os.environ.get("nnUNet_raw")
    if not raw:
        raise FileNotFoundError(
            f"--dataset {value}: an nnU-Net dataset ID or name needs the nnUNet_raw environment variable "
            "(the folder holding DatasetXXX_Name folders), or pass the dataset folder itself"
        )
    root = Path(raw)
    if not root.is_dir():
        raise FileNotFoundError(f"--dataset {value}: nnUNet_raw={raw} is not a folder")
    if value.isdigit():
        prefix = f"Dataset{int(value):03d}_"
        matches = sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith(prefix))
        if len(matches) > 1:
            names = ", ".join(p.name for p in matches)
            raise FileNotFoundError(
                f"--dataset {value}: several datasets with ID {int(value):03d} in {raw}: {names}"
            )
        if not matches:
            raise FileNotFoundError(f"--dataset {value}: no {prefix}* folder in nnUNet_raw={raw}")
        return matches[0]
    candidate = root / value
    if not candidate.is_dir():
        raise FileNotFoundError(f"--dataset {value}: no such dataset in nnUNet_raw={raw}")
    return candidate
