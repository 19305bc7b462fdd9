"""Checks made before fine-tuning starts, so that a run does not fail after hours of training.

- `--bf16` on a machine that cannot train in bfloat16: transformers raises from `TrainingArguments`; the message
  is turned into one line saying what to do.
- `--push_to_hub`: the Hub must be reachable and the repository writable with the token *before* training
  (the push happens at the end); `meddinov3 push DIR REPO` retries a push that failed afterwards.
- `--output_dir` may not be, or lie inside, the dataset or the starting model folder (`save_model` would write
  `model.safetensors` over the starting weights).
"""

from __future__ import annotations

import os
from typing import Any

from ..files import check_output_path

__all__ = ["check_hub_push", "check_output_dir", "explain_arguments_error", "hub_offline"]


def explain_arguments_error(err: Exception) -> str:
    """One actionable line for a `TrainingArguments` validation error."""
    text = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    if "bf16" in text.lower():
        import torch

        where = (
            f"GPU {torch.cuda.get_device_name(0)} has no bfloat16 support"
            if torch.cuda.is_available()
            else "this machine has no CUDA GPU (bfloat16 training needs one, or --use_cpu)"
        )
        return f"--bf16: {where}; drop --bf16 (or use --fp16 on a GPU without bf16) [{text}]"
    return f"invalid fine-tuning arguments: {text}"


def hub_offline() -> bool:
    """`HF_HUB_OFFLINE` as huggingface_hub reads it (checked at call time, not at import)."""
    from huggingface_hub import constants

    value = os.environ.get("HF_HUB_OFFLINE")
    return (
        bool(constants.HF_HUB_OFFLINE)
        if value is None
        else value.strip().upper() in constants.ENV_VARS_TRUE_VALUES
    )


def check_hub_push(
    repo_id: str, token: str | None = None, api: Any = None, option: str = "--push_to_hub"
) -> None:
    """Refuse (ValueError, one line) unless `repo_id` can be created or written with `token` now.

    Checks, without writing anything: the repo id's form, `HF_HUB_OFFLINE`, that the Hub answers `whoami`
    for the token, that the token may write, and that the namespace is the user's or one of their orgs."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError as err:
        raise ValueError(f"{option} {repo_id}: not a Hub repo id ({err})") from err
    retry = f"train without {option} and push later with `meddinov3 push OUTPUT_DIR {repo_id}`"
    if hub_offline():
        raise ValueError(f"{option} {repo_id}: the Hub is offline here (HF_HUB_OFFLINE=1); {retry}")
    if api is None:
        from huggingface_hub import HfApi

        api = HfApi(token=token)
    try:
        who = api.whoami()
    except Exception as err:  # no network, no token, invalid token: all mean the push would fail later
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(
            f"{option} {repo_id}: cannot reach the Hub or the token is not valid ({first}); log in with "
            f"`hf auth login` or pass --hub_token, or {retry}"
        ) from err
    role = ((who.get("auth") or {}).get("accessToken") or {}).get("role")
    if role == "read":
        raise ValueError(f"{option} {repo_id}: the token is read-only; use a token with write access")
    namespace = repo_id.split("/")[0] if "/" in repo_id else who.get("name")
    allowed = {who.get("name")} | {org.get("name") for org in who.get("orgs") or []}
    if namespace not in allowed:
        raise ValueError(
            f"{option} {repo_id}: the token (user {who.get('name')}) cannot write to namespace {namespace!r}; "
            f"it can write to {sorted(n for n in allowed if n)}"
        )


def check_output_dir(output_dir: str, dataset: str | None, model: str | None) -> None:
    """`--output_dir` may hold earlier runs (resume) but never be or lie inside the dataset or the starting
    model folder (or be the starting checkpoint file)."""
    check_output_path(output_dir, [dataset, model], kind="into", option="--output_dir")
