"""Argument types and options shared by several subcommands: label maps, block lists, devices, --series."""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["LabelMap", "add_series", "check_devices", "int_list", "labels_arg", "options"]


def options(args: argparse.Namespace, names: Sequence[str]) -> dict[str, Any]:
    """The parsed values of `names` as keyword arguments, for flags named like the parameters they set."""
    return {name: getattr(args, name) for name in names}


def int_list(text: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from err


class LabelMap(dict):
    """id → name, remembering the JSON file it was read from (`path`; None for `ID=NAME,...` text)."""

    path: Path | None = None


def labels_arg(text: str) -> LabelMap:
    """`0=background,1=liver`, a model folder or its config.json (`id2label`), or a dataset.json / JSON file
    with {"labels": {name: id}} or {id: name}. Label IDs must be non-negative integers."""
    path = Path(text)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise argparse.ArgumentTypeError(f"{text}: a folder without config.json (not a model folder)")
        path = path / "config.json"
    if path.is_file():
        try:
            data = json.loads(path.read_text())
            if isinstance(data, dict) and "id2label" in data:
                data = data["id2label"]
            elif isinstance(data, dict):
                data = data.get("labels", data)
            if not isinstance(data, dict) or not data:
                raise ValueError("no 'id2label' or 'labels' mapping")
            if all(isinstance(v, int) for v in data.values()):
                labels = LabelMap({int(v): str(k) for k, v in data.items()})
            else:
                labels = LabelMap({int(k): str(v) for k, v in data.items()})
        except (OSError, ValueError, TypeError) as err:
            raise argparse.ArgumentTypeError(f"{path}: not a label map ({err})") from err
        labels.path = path
    elif text.endswith(".json") or "/" in text:
        raise argparse.ArgumentTypeError(f"{text}: no such file or folder")
    else:
        try:
            labels = LabelMap({int(k): v for k, v in (item.split("=", 1) for item in text.split(","))})
        except ValueError as err:
            raise argparse.ArgumentTypeError(
                f"labels must be 'ID=NAME,...', a model folder or a JSON file, got {text!r}"
            ) from err
    negative = sorted(k for k in labels if k < 0)
    if negative:
        raise argparse.ArgumentTypeError(f"{text}: label IDs must be >= 0, got {negative}")
    return labels


def check_devices(text: str | None) -> list[str]:
    """`--device` → checked torch device names (one line naming the option instead of torch's traceback)."""
    import torch

    names = [d.strip() for d in (text or ("cuda" if torch.cuda.is_available() else "cpu")).split(",")]
    for name in names:
        try:
            device = torch.device(name)
        except (RuntimeError, ValueError) as err:
            raise ValueError(
                f"--device {name!r}: not a torch device ({err}); use cpu, cuda, cuda:N or mps"
            ) from err
        if device.type == "cuda" and not torch.cuda.is_available():
            why = "this torch is built without CUDA" if torch.version.cuda is None else "no CUDA GPU visible"
            raise ValueError(f"--device {name}: {why}; use --device cpu")
        if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
            raise ValueError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) are visible")
        if device.type == "mps" and not torch.backends.mps.is_available():
            raise ValueError(f"--device {name}: MPS is not available here; use --device cpu")
        if device.type not in ("cpu", "cuda", "mps"):
            raise ValueError(f"--device {name}: unsupported device type {device.type!r}; use cpu/cuda/mps")
    return names


def add_series(p) -> None:
    p.add_argument(
        "--series",
        default=None,
        metavar="UID",
        help="guard: a DICOM folder holding several series is refused (listing their SeriesInstanceUIDs and "
        "descriptions) unless one is chosen with --series UID",
    )
