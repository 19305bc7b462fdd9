"""Checkpoints from the Hugging Face Hub in one command, and converted folders back to it.

`meddinov3 convert REPO_ID OUT` downloads through `huggingface_hub` into its normal cache (so `HF_HUB_CACHE`,
`HF_HUB_OFFLINE`, `HF_ENDPOINT` and `HF_TOKEN` work as everywhere else), then converts the local copy:

- the MedDINOv3 release (`ricklisz123/MedDINOv3-ViTB-16-CT-3M`, file `model.pth`, a training checkpoint whose
  `teacher` holds the EMA teacher): one file;
- Meta's DINOv3 in transformers layout (`facebook/dinov3-*`): `config.json` plus the safetensors weights
  (one file or the shards of `model.safetensors.index.json`).

Which one a repo is follows from its files: a repo with `config.json` is a transformers folder, otherwise the
release file (`--filename`, default `model.pth`) is fetched.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from huggingface_hub import CommitOperationAdd, HfApi, hf_hub_download
from huggingface_hub.errors import (
    EntryNotFoundError,
    GatedRepoError,
    HfHubHTTPError,
    LocalEntryNotFoundError,
    OfflineModeIsEnabled,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)

__all__ = [
    "RELEASE_FILENAME",
    "HubSource",
    "HubSourceError",
    "download_checkpoint",
    "is_hub_repo_id",
    "push_converted_folder",
    "push_files",
]

RELEASE_FILENAME = "model.pth"
_REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9_.-]+$")


class HubSourceError(ValueError):
    """A Hub repo that cannot be fetched (offline and not cached, not found, gated, no checkpoint file)."""


@dataclass
class HubSource:
    """A downloaded checkpoint: `path` is the file (release) or the snapshot folder (transformers layout)."""

    repo_id: str
    revision: str
    commit: str
    path: Path
    filenames: list[str] = field(default_factory=list)

    def describe(self) -> str:
        """One sentence for the model card: where the weights come from, exactly."""
        files = ", ".join(f"`{name}`" for name in self.filenames)
        return (
            f"Converted from the Hugging Face Hub repo [`{self.repo_id}`](https://huggingface.co/{self.repo_id}) "
            f"(revision `{self.revision}`, commit `{self.commit}`; {files}) with `meddinov3 convert`."
        )


_CHECKPOINT_SUFFIXES = (".pth", ".pt", ".ckpt", ".bin", ".safetensors", ".json")


def is_hub_repo_id(source: str | os.PathLike) -> bool:
    """True for `owner/name` that is not an existing local path (a local file or folder always wins) and does
    not end like a checkpoint file (`dir/ckpt.pth` that does not exist is a missing file, not a repo)."""
    text = os.fspath(source)
    if os.path.exists(text) or text.lower().endswith(_CHECKPOINT_SUFFIXES):
        return False
    return bool(_REPO_ID.match(text))


def _commit_of(path: Path) -> str:
    # huggingface_hub's cache layout: .../models--owner--name/snapshots/<commit>/<file>
    for parent in path.parents:
        if parent.parent.name == "snapshots":
            return parent.name
    return "unknown"


def _fetch(repo_id: str, filename: str, revision: str | None) -> Path:
    """`hf_hub_download` with its failures turned into one line that says what to do."""
    try:
        return Path(hf_hub_download(repo_id, filename, revision=revision))
    except GatedRepoError as err:
        raise HubSourceError(
            f"{repo_id}: access is gated; accept its licence on https://huggingface.co/{repo_id} and log in "
            "(`hf auth login` or HF_TOKEN)"
        ) from err
    except RepositoryNotFoundError as err:
        raise HubSourceError(
            f"{repo_id}: no such repo on the Hub (or it is private: log in with `hf auth login` or HF_TOKEN)"
        ) from err
    except RevisionNotFoundError as err:
        raise HubSourceError(f"{repo_id}: no revision {revision!r}") from err
    # LocalEntryNotFoundError is also an EntryNotFoundError: test it first.
    except (LocalEntryNotFoundError, OfflineModeIsEnabled) as err:
        raise _NotCached(repo_id, filename, revision) from err
    except EntryNotFoundError as err:  # the repo exists but lacks the file; the caller decides
        raise _Missing(f"{repo_id}: no file {filename!r}") from err
    except HfHubHTTPError as err:
        raise HubSourceError(f"{repo_id}: download of {filename} failed ({err})") from err


class _Missing(HubSourceError):
    pass


class _NotCached(HubSourceError):
    def __init__(self, repo_id: str, filename: str, revision: str | None):
        rev = f" --revision {revision}" if revision else ""
        super().__init__(
            f"{repo_id}: {filename} is not in the Hugging Face cache and the Hub cannot be reached "
            f"(offline, HF_HUB_OFFLINE=1); download it first where there is network: "
            f"`hf download {repo_id} {filename}{rev}`"
        )
        self.filename = filename


def download_checkpoint(repo_id: str, revision: str | None = None, filename: str | None = None) -> HubSource:
    """Fetch what `convert_checkpoint` needs from `repo_id` into the Hugging Face cache (or find it there).

    With `filename`, that one file. Otherwise a transformers folder (`config.json` + safetensors weights) when
    the repo has `config.json`, else the release file `model.pth`. Raises `HubSourceError` with one line."""
    if not _REPO_ID.match(repo_id):
        raise HubSourceError(f"{repo_id}: not a Hub repo id (expected OWNER/NAME) and no such local path")
    if filename is not None:
        try:
            path = _fetch(repo_id, filename, revision)
        except _Missing as err:
            raise HubSourceError(f"{repo_id}: the repo has no file {filename!r}") from err
        return HubSource(repo_id, revision or "main", _commit_of(path), path, [filename])
    not_cached: _NotCached | None = None
    try:
        config = _fetch(repo_id, "config.json", revision)
    except _Missing:
        config = None
    except _NotCached as err:  # offline: maybe only the release file is cached
        config, not_cached = None, err
    if config is not None:
        return _download_transformers_folder(repo_id, revision, config)
    try:
        path = _fetch(repo_id, RELEASE_FILENAME, revision)
    except _Missing as err:
        raise HubSourceError(
            f"{repo_id}: neither config.json (transformers layout) nor {RELEASE_FILENAME} (MedDINOv3 release); "
            "name the checkpoint file with --filename"
        ) from err
    except _NotCached as err:
        if not_cached is not None:
            raise HubSourceError(
                f"{repo_id}: not in the Hugging Face cache and the Hub cannot be reached (offline, "
                f"HF_HUB_OFFLINE=1); download it first where there is network: `hf download {repo_id}` "
                f"(or only the checkpoint file: `hf download {repo_id} {RELEASE_FILENAME}`)"
            ) from err
        raise
    return HubSource(repo_id, revision or "main", _commit_of(path), path, [RELEASE_FILENAME])


def _download_transformers_folder(repo_id: str, revision: str | None, config: Path) -> HubSource:
    files = ["config.json"]
    try:
        _fetch(repo_id, "model.safetensors", revision)
        files.append("model.safetensors")
    except _Missing:
        try:
            index = _fetch(repo_id, "model.safetensors.index.json", revision)
        except _Missing as err:
            raise HubSourceError(
                f"{repo_id}: config.json but no model.safetensors or model.safetensors.index.json"
            ) from err
        files.append("model.safetensors.index.json")
        shards = sorted(set(json.loads(index.read_text()).get("weight_map", {}).values()))
        for shard in shards:
            try:
                _fetch(repo_id, shard, revision)
            except _Missing as err:
                raise HubSourceError(f"{repo_id}: the index names {shard}, which the repo lacks") from err
            files.append(shard)
    return HubSource(repo_id, revision or "main", _commit_of(config), config.parent, files)


def push_files(
    folder: str | os.PathLike,
    repo_id: str,
    files: list[Path],
    commit_message: str,
    repo_type: str = "model",
    token: str | None = None,
    private: bool | None = None,
    api: Any = None,
) -> Any:
    """The package's one Hub upload: create `repo_id` if needed and commit `files` (inside `folder`, uploaded
    at their paths relative to it) in one commit. Converted folders, fine-tuned models and slice datasets all
    go through it.

    `api`: an `HfApi`-like object (`create_repo`, `create_commit`); default a real `HfApi` (HF_ENDPOINT/HF_TOKEN)."""
    folder = Path(folder)
    api = api if api is not None else HfApi(token=token)
    operations = [
        CommitOperationAdd(path_in_repo=Path(p).relative_to(folder).as_posix(), path_or_fileobj=str(p))
        for p in files
    ]
    api.create_repo(repo_id=repo_id, repo_type=repo_type, private=private, exist_ok=True)
    return api.create_commit(
        repo_id=repo_id, repo_type=repo_type, operations=operations, commit_message=commit_message
    )


def push_converted_folder(
    folder: str | os.PathLike,
    repo_id: str,
    source: HubSource | None = None,
    token: str | None = None,
    private: bool | None = None,
    api: Any = None,
) -> Any:
    """Publish a folder written by `meddinov3 convert` (every file in it: weights, config, processor config, model
    card, the model code for `trust_remote_code`, pretraining heads) as one commit to `repo_id`.

    `api`: an `HfApi`-like object (`create_repo`, `create_commit`); default a real `HfApi` (HF_ENDPOINT/HF_TOKEN)."""
    folder = Path(folder)
    files = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))
    required = ("config.json", "README.md")
    missing = [n for n in required if not (folder / n).is_file()]
    if not any(p.suffix == ".safetensors" for p in files):
        missing.append("model.safetensors")
    if missing:
        raise HubSourceError(f"{folder}: cannot push, missing {missing}")
    message = "Upload MedDINOv3 folder converted with meddinov3 convert"
    if source is not None:
        message += f" from {source.repo_id}@{source.commit}"
    try:
        return push_files(folder, repo_id, files, message, token=token, private=private, api=api)
    except HfHubHTTPError as err:
        raise HubSourceError(
            f"{repo_id}: push failed ({err}); the converted folder {folder} is kept"
        ) from err
