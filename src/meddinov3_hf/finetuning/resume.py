"""`--resume_from_checkpoint true`: continue from the latest `checkpoint-N` of `--output_dir`.

`TrainingArguments.resume_from_checkpoint` is a string, so `true` would otherwise be taken for a folder named
"true". As `Trainer.train(resume_from_checkpoint=True)` does, the latest checkpoint is found with transformers'
`get_last_checkpoint`.
"""

from __future__ import annotations

import os

TRUE_WORDS = {"true", "yes", "1", "last", "latest"}
FALSE_WORDS = {"false", "no", "0", "none", ""}


def resolve_resume_checkpoint(value: str | bool | None, output_dir: str | os.PathLike[str]) -> str | None:
    """`true`/`latest` → the latest checkpoint folder in `output_dir`; `false` → None; a path stays a path.

    Raises:
        FileNotFoundError: `true` with no `checkpoint-N` folder in `output_dir`, or a path that does not exist.
    """
    from transformers.trainer_utils import get_last_checkpoint

    if value is None or value is False:
        return None
    text = "true" if value is True else str(value).strip()
    if text.lower() in FALSE_WORDS:
        return None
    if text.lower() in TRUE_WORDS and not os.path.isdir(text):
        last = get_last_checkpoint(str(output_dir)) if os.path.isdir(output_dir) else None
        if last is None:
            raise FileNotFoundError(
                f"--resume_from_checkpoint {text}: no checkpoint-N folder in --output_dir {output_dir} to resume from"
            )
        return last
    if not os.path.isdir(text):
        raise FileNotFoundError(f"--resume_from_checkpoint {text}: no such checkpoint folder")
    return text
