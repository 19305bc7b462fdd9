"""Checkpoints of a pretraining run: writing them, and loading what a run starts from without ever unpickling
code.

- `save_checkpoint`: `accelerator.save_state` of the student, the optimiser and the registered objects
  (`TrainState`, the teachers; with FSDP2 as `FullStateDict` views, so the files are those of DDP) into a
  temporary folder, renamed to `checkpoints/step_N` when complete, with `pretrain_state.json` beside them.
- `load_init`: backbone config, backbone weights and DINO/iBOT head weights from any `--init` (or
  `gram.checkpoint`): a converted MedDINOv3 folder (`model.safetensors` + `pretraining_heads.safetensors`, as
  `meddinov3 convert` writes it), an export of a run (same files), a transformers DINOv3 folder, a training
  checkpoint or run folder, or the MedDINOv3 release `.pth` itself (`teacher`: `backbone.*`, `dino_head.*`,
  `ibot_head.*`) or Meta's plain DINOv3 `.pth`.
- `load_resume_state`: the files `accelerator.save_state` wrote, read back with safetensors or
  `torch.load(weights_only=True)` (accelerate's own `load_state` unpickles `custom_checkpoint_*.pkl` and the RNG
  files with `weights_only=False`). The RNG files are not read at all: every random draw of a step is seeded from
  (seed, step, rank), see stream.py and loop.py.

Every torch file is read with `weights_only=True` explicitly, which `TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1` cannot
override; a file that needs more (a pickled payload) is refused with its name.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import shutil
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from meddinov3_hf.configuration_meddinov3 import MedDINOv3Config

from .config import PretrainConfig, config_to_dict

__all__ = [
    "HEADS_FILE",
    "STATE_FILE",
    "CheckpointLoadError",
    "FullStateDict",
    "TrainState",
    "head_sizes",
    "latest_checkpoint",
    "load_init",
    "load_resume_state",
    "resume_folder",
    "safe_torch_load",
    "save_checkpoint",
]

STATE_FILE = "pretrain_state.json"
# The head weights beside model.safetensors, in a converted release folder and in a run's export.
HEADS_FILE = "pretraining_heads.safetensors"
_LEGACY_HEADS_FILES = ("heads.safetensors",)  # exports written before the heads took DINOv3's form
HEAD_NAMES = ("dino_head", "ibot_head")


class CheckpointLoadError(ValueError):
    """A file that cannot be loaded safely or faithfully (the message names it)."""


def safe_torch_load(path: str | Path | io.BytesIO, what: str | None = None) -> Any:
    """`torch.load(..., weights_only=True)` on CPU; any failure (a pickled payload, truncation) becomes a
    one-line `CheckpointLoadError` naming the file."""
    name = what or str(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # UnpicklingError for payloads, RuntimeError for truncated zips, ...
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointLoadError(
            f"{name}: refused, cannot be loaded with weights_only=True ({first[:200]})"
        ) from err


def _safe_tensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path))
    except Exception as err:
        raise CheckpointLoadError(f"{path}: not a readable safetensors file ({err})") from err


def latest_checkpoint(root: Path) -> Path | None:
    found = sorted(p for p in Path(root).glob("step_*") if (p / STATE_FILE).is_file())
    return found[-1] if found else None


def checkpoint_dir(path: Path) -> Path | None:
    """A training checkpoint folder for `path` (a checkpoint itself, or a run folder → its latest)."""
    if (path / STATE_FILE).is_file():
        return path
    if (path / "checkpoints").is_dir():
        return latest_checkpoint(path / "checkpoints")
    return None


def head_sizes(heads: Mapping[str, torch.Tensor], name: str) -> dict[str, int]:
    """DINOHead kwargs (out_dim, hidden_dim, bottleneck_dim, nlayers) read off the `name.*` weights."""
    w = {k[len(name) + 1 :]: v for k, v in heads.items() if k.startswith(name + ".")}
    if "last_layer.weight" not in w:
        raise CheckpointLoadError(f"{name}.last_layer.weight missing among the head weights {sorted(w)[:8]}")
    if "mlp.weight" in w:  # one-layer MLP
        return dict(
            out_dim=w["last_layer.weight"].shape[0],
            hidden_dim=w["mlp.weight"].shape[0],
            bottleneck_dim=w["mlp.weight"].shape[0],
            nlayers=1,
        )
    linear = sorted(int(k.split(".")[1]) for k in w if k.startswith("mlp.") and k.endswith(".weight"))
    if not linear:
        raise CheckpointLoadError(f"{name}.mlp.* missing among the head weights {sorted(w)[:8]}")
    return dict(
        out_dim=w["last_layer.weight"].shape[0],
        hidden_dim=w[f"mlp.{linear[0]}.weight"].shape[0],
        bottleneck_dim=w[f"mlp.{linear[-1]}.weight"].shape[0],
        nlayers=len(linear),
    )


def _heads_beside(folder: Path) -> dict[str, torch.Tensor]:
    for name in (HEADS_FILE, *_LEGACY_HEADS_FILES):
        if (folder / name).is_file():
            return _safe_tensors(folder / name)
    return {}


def _split_teacher(teacher: Mapping[str, torch.Tensor]) -> tuple[dict, dict]:
    backbone = {k[len("backbone.") :]: v for k, v in teacher.items() if k.startswith("backbone.")}
    heads = {k: v for k, v in teacher.items() if k.startswith(tuple(h + "." for h in HEAD_NAMES))}
    return backbone, heads


def load_init(path: str | Path) -> tuple[MedDINOv3Config, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(backbone config, MedDINOv3Model state dict, head state dict with `dino_head.*`/`ibot_head.*` keys, maybe
    empty) for an `--init` path (see the module docstring)."""
    from meddinov3_hf.modeling_meddinov3 import MedDINOv3Model

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"--init {path}: no such file or folder")
    if path.is_file():  # the MedDINOv3 release .pth (teacher with heads) or Meta's DINOv3 .pth
        from meddinov3_hf.convert import convert_checkpoint

        heads: dict[str, torch.Tensor] = {}
        checkpoint = safe_torch_load(path)
        if isinstance(checkpoint, Mapping) and isinstance(checkpoint.get("teacher"), Mapping):
            _, heads = _split_teacher(checkpoint["teacher"])
        del checkpoint
        with tempfile.TemporaryDirectory() as tmp:
            convert_checkpoint(path, Path(tmp) / "converted")
            model = MedDINOv3Model.from_pretrained(Path(tmp) / "converted")
        return model.config, model.state_dict(), dict(heads)
    ckpt = checkpoint_dir(path)
    if ckpt is not None:
        meta = json.loads((ckpt / STATE_FILE).read_text())
        teacher = safe_torch_load(ckpt / f"custom_checkpoint_{meta['teacher_index']}.pkl")
        backbone, heads = _split_teacher(teacher)
        return MedDINOv3Config.from_dict(meta["backbone_config"]), backbone, heads
    config_file = path / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(
            f"--init {path}: neither a model folder (config.json) nor a training checkpoint"
        )
    model_type = json.loads(config_file.read_text()).get("model_type")
    with tempfile.TemporaryDirectory() as tmp:
        folder = path
        if model_type == "dinov3_vit":  # natural-image DINOv3 in transformers layout: convert explicitly
            from meddinov3_hf.convert import convert_checkpoint

            convert_checkpoint(path, Path(tmp) / "converted")
            folder = Path(tmp) / "converted"
        model = MedDINOv3Model.from_pretrained(folder)
    return model.config, model.state_dict(), _heads_beside(path)


# ---------------------------------------------------------------------------------------------------------
# Saving
# ---------------------------------------------------------------------------------------------------------


@dataclass
class TrainState:
    """Step counter and per-process data positions; registered with accelerate for save/load_state."""

    step: int = 0
    positions: list[list[int]] | None = None  # per process: [epoch, offset], as of the last checkpoint
    current_position: tuple[int, int] = (0, 0)  # this process's live position (not saved directly)

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step, "positions": self.positions}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step, self.positions = int(state["step"]), state["positions"]


def save_checkpoint(accelerator: Any, state: TrainState, cfg: PretrainConfig, meta: Any, root: Path) -> Path:
    """accelerator.save_state into a temporary folder, then rename to checkpoints/step_N (all processes
    call this; the folder is complete, or absent, at every instant). Needs a filesystem shared by all nodes."""
    from accelerate.utils import gather_object

    state.positions = gather_object([list(state.current_position)])
    final = root / f"step_{state.step:08d}"
    tmp = root / f".tmp_step_{state.step:08d}"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        root.mkdir(parents=True, exist_ok=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        info = {
            "step": state.step,
            "positions": state.positions,
            "world_size": accelerator.num_processes,
            "teacher_index": 1,  # order of register_for_checkpointing in train()
            "backbone_config": meta.teacher.backbone.config.to_dict(),
            "config": config_to_dict(cfg),
        }
        with open(tmp / STATE_FILE, "w") as f:
            json.dump(info, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        kept = sorted(p for p in root.glob("step_*") if (p / STATE_FILE).is_file())
        for old in kept[: max(len(kept) - max(cfg.train.keep_checkpoints, 1), 0)]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


class FullStateDict:
    """Checkpointing view of an FSDP2-sharded module for `register_for_checkpointing`: every process takes part
    in gathering the full state dict (the main process writes it, as with DDP); loading scatters it back."""

    def __init__(self, module: torch.nn.Module):
        self.module = module

    def state_dict(self) -> dict[str, torch.Tensor]:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        return get_model_state_dict(self.module, options=options)

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        set_model_state_dict(self.module, state, options=StateDictOptions(full_state_dict=True))


def resume_folder(resume: str | None, root: Path) -> Path | None:
    """The checkpoint a run continues from (`resume`: "latest" or a folder), or None for a fresh run; a fresh
    run into a folder that already holds checkpoints is refused."""
    if resume:
        folder = latest_checkpoint(root) if resume == "latest" else Path(resume)
        if folder is None:
            raise FileNotFoundError(f"--resume: no checkpoint under {root}")
        return folder
    if latest_checkpoint(root) is not None:
        raise FileExistsError(f"{root} has checkpoints: pass --resume to continue, or another --output_dir")
    return None


# ---------------------------------------------------------------------------------------------------------
# Resume
# ---------------------------------------------------------------------------------------------------------


def load_resume_state(
    accelerator: Any,
    folder: Path,
    student: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    custom_objects: list[Any],
) -> None:
    """Restore what `accelerator.save_state(folder)` wrote for (student, optimizer, registered objects), reading
    every file with safetensors or `torch.load(weights_only=True)`. The RNG files are deliberately not read."""
    from accelerate.utils import DistributedType

    folder = Path(folder)
    if accelerator.distributed_type == DistributedType.FSDP:
        _load_fsdp_student_and_optimizer(accelerator, folder, student, optimizer)
    else:
        model_file = folder / "model.safetensors"
        if not model_file.is_file():
            raise CheckpointLoadError(f"{folder}: no model.safetensors (not a checkpoint of this trainer)")
        state = _safe_tensors(model_file)
        target = accelerator.unwrap_model(student)
        missing, unexpected = target.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise CheckpointLoadError(
                f"{model_file}: missing {missing[:5]}, unexpected {unexpected[:5]} keys"
            )
        optim_state = safe_torch_load(folder / "optimizer.bin")
        optimizer.load_state_dict(optim_state)
    scaler = getattr(accelerator, "scaler", None)
    if scaler is not None and (folder / "scaler.pt").is_file():
        scaler.load_state_dict(safe_torch_load(folder / "scaler.pt"))
    for index, obj in enumerate(custom_objects):
        obj.load_state_dict(safe_torch_load(folder / f"custom_checkpoint_{index}.pkl"))
    accelerator.wait_for_everyone()


class _SafeMetadataUnpickler(pickle.Unpickler):
    """DCP's `.metadata` file is a plain pickle (torch's FileSystemReader reads it with `pickle.load`). Read it with
    an unpickler that resolves only DCP's own metadata classes and torch's dtype/size/layout objects; any other
    global (a function a payload would call) is refused before anything runs. (torch's weights-only unpickler
    cannot be used: it does not read the protocol-4 opcodes DCP writes.)"""

    _MODULES = ("torch.distributed.checkpoint.metadata", "torch.distributed.checkpoint.filesystem")

    def find_class(self, module: str, name: str) -> Any:
        if module in self._MODULES:
            import importlib

            obj = getattr(importlib.import_module(module), name, None)
            if isinstance(obj, type):
                return obj
        if module == "torch" and name in ("Size",):
            return torch.Size
        if module == "torch.serialization" and name == "_get_layout":  # layout name → torch.layout, a lookup
            return torch.serialization._get_layout
        if module == "torch" and isinstance(
            getattr(torch, name, None), (torch.dtype, torch.layout, torch.memory_format)
        ):
            return getattr(torch, name)
        if module == "pathlib" and name in (
            "PosixPath",
            "WindowsPath",
            "PurePosixPath",
            "PureWindowsPath",
            "Path",
        ):
            import pathlib

            return getattr(pathlib, name)  # storage file names; constructing a path runs nothing
        if module == "collections" and name == "OrderedDict":
            from collections import OrderedDict

            return OrderedDict
        raise pickle.UnpicklingError(f"global {module}.{name} is not allowed in DCP metadata")

    @classmethod
    def load_file(cls, stream: Any, name: str) -> Any:
        try:
            return cls(stream).load()
        except (pickle.UnpicklingError, AttributeError, EOFError, TypeError, ValueError) as err:
            raise CheckpointLoadError(f"{name}: refused, not plain DCP metadata ({err})") from err


def _safe_dcp_reader_and_planner(ckpt_dir: Path) -> tuple[Any, Any]:
    import torch.distributed.checkpoint as dist_cp
    from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner

    class SafeReader(dist_cp.FileSystemReader):
        def read_metadata(self, *args: Any, **kwargs: Any) -> Any:
            from torch.distributed.checkpoint.metadata import StorageMeta

            path = self._get_metadata_path(kwargs.get("rank"))
            with self.fs.create_stream(path, "rb") as stream:
                metadata = _SafeMetadataUnpickler.load_file(io.BytesIO(stream.read()), str(path))
            if getattr(metadata, "storage_meta", None) is None:
                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            return metadata

    class SafePlanner(DefaultLoadPlanner):
        def load_bytes(
            self, read_item: Any, value: io.BytesIO
        ) -> None:  # the default uses weights_only=False
            from torch.distributed.checkpoint._traverse import set_element

            obj = safe_torch_load(value, what=f"{ckpt_dir} ({read_item.dest_index.fqn})")
            if self.flatten_state_dict:
                set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], obj)
            else:
                self.state_dict[read_item.dest_index.fqn] = obj

    return SafeReader(ckpt_dir), SafePlanner()


def _load_fsdp_student_and_optimizer(
    accelerator: Any, folder: Path, student: torch.nn.Module, optimizer: torch.optim.Optimizer
) -> None:
    """FSDP2 + SHARDED_STATE_DICT (what accelerate's save_state writes with DCP): the same reads as accelerate's
    load_fsdp_model / load_fsdp_optimizer, through a reader and planner that never unpickle code."""
    import torch.distributed.checkpoint as dist_cp
    from accelerate.utils.fsdp_utils import _prepare_sd_options, load_fsdp_model, load_fsdp_optimizer
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        get_optimizer_state_dict,
        set_model_state_dict,
        set_optimizer_state_dict,
    )
    from torch.distributed.fsdp.fully_sharded_data_parallel import StateDictType

    plugin = accelerator.state.fsdp_plugin
    if (
        plugin.state_dict_type == StateDictType.FULL_STATE_DICT
    ):  # accelerate reads these with weights_only=True
        load_fsdp_model(plugin, accelerator, student, str(folder))
        load_fsdp_optimizer(plugin, accelerator, optimizer, student, str(folder))
        return
    options = _prepare_sd_options(plugin)
    model_dir, optim_dir = folder / "pytorch_model_fsdp_0", folder / "optimizer_0"
    for d in (model_dir, optim_dir):
        if not (d / ".metadata").is_file():
            raise CheckpointLoadError(f"{d}: missing DCP .metadata (not an FSDP checkpoint of this trainer)")
    accelerator.wait_for_everyone()
    state = {"model": get_model_state_dict(student, options=options)}
    reader, planner = _safe_dcp_reader_and_planner(model_dir)
    dist_cp.load(state_dict=state, storage_reader=reader, planner=planner)
    set_model_state_dict(student, state["model"], options=options)
    optim = {"optimizer": get_optimizer_state_dict(student, optimizer, options=options)}
    reader, planner = _safe_dcp_reader_and_planner(optim_dir)
    dist_cp.load(state_dict=optim, storage_reader=reader, planner=planner)
    set_optimizer_state_dict(student, optimizer, optim["optimizer"], options=options)
