"""Output-path guards and atomic writes shared by every command that writes files.

This is the package's lowest layer: it imports nothing from `meddinov3_hf`, so any module may use it.

Two failure classes are guarded against, in one place:

1. **Destroying inputs.** An output equal to an input, or inside an input folder (the metrics JSON written over
   the ground truth, a label map written into the DICOM series it came from), and, for a folder that is
   filled or replaced, a folder that holds an input or the current directory (`convert ckpt.pth .`).
2. **Destroying what the package did not write.** A folder output that already holds other files is refused
   unless the user passes `--overwrite`, and even then only the files the command writes are replaced; a file
   output must carry the command's suffix, so it can only ever replace a file of the kind the command writes.

Writes are atomic: a file is written under a hidden temporary name in the same folder (the package's own
pattern, `.{name}.{12 hex}.tmp{suffix}`) and renamed into place. A run killed with `kill -9` can leave such a
temporary behind; :func:`remove_stale_temporaries` deletes only names of that pattern (never anything else).

Typical use in a command::

    out = check_output_path(args.output, [args.input], kind="file", suffixes=(".json",), option="-o")
    with atomic_path(out) as tmp:
        tmp.write_text(text)

    folder = check_output_path(args.output, [args.source], kind="folder", overwrite=args.overwrite)
    with atomic_dir(folder) as tmp:   # fill tmp; on success its files replace those of `folder`
        model.save_pretrained(tmp)
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import uuid
from collections.abc import Iterable, Iterator
from pathlib import Path

__all__ = [
    "FOLDER_MODE",
    "OutputPathError",
    "atomic_dir",
    "atomic_path",
    "check_output_path",
    "is_temporary",
    "remove_stale_temporaries",
    "temporary_name",
]

# Compound suffixes kept whole on temporary names, so writers that dispatch on the extension (nibabel gzips
# `.gz`, numpy appends `.npy`) behave as for the real name.
_COMPOUND_SUFFIXES = (".nii.gz", ".tar.gz")
_TEMP_RE = re.compile(r"^\.(?P<final>.+)\.(?P<token>[0-9a-f]{12})\.tmp(?P<suffix>(\.[^.]+)*)$")
# Mode of the folders this package creates: what `save_pretrained`'s `os.makedirs` gives under the usual umask.
FOLDER_MODE = 0o755


class OutputPathError(ValueError):
    """An output path that would destroy an input or files the package did not write; names the path."""


def _resolved(path: str | os.PathLike[str]) -> Path:
    return Path(os.path.abspath(os.path.realpath(os.fspath(path))))


def _inside(child: Path, parent: Path) -> bool:
    """`child` equals `parent` or lies below it (both resolved)."""
    return child == parent or parent in child.parents


def _suffix(name: str) -> str:
    lower = name.lower()
    for compound in _COMPOUND_SUFFIXES:
        if lower.endswith(compound):
            return name[-len(compound) :]
    return Path(name).suffix


def check_output_path(
    output: str | os.PathLike[str],
    inputs: Iterable[str | os.PathLike[str] | None] = (),
    *,
    overwrite: bool = False,
    kind: str = "file",
    suffixes: tuple[str, ...] | None = None,
    option: str = "output",
) -> Path:
    """Refuse an output that would destroy an input or unrelated files; returns `output` as a `Path`.

    Args:
        output: the path the command will write.
        inputs: files or folders the command reads (`None` entries and non-paths such as Hub repo ids that do
            not exist on disk are ignored).
        overwrite: for `kind="folder"`, allow an existing non-empty folder (its files of the same names as the
            command's outputs are replaced; nothing else is touched). For `kind="file"`, allow replacing an
            existing file (of the required suffix); when False an existing file is refused.
        kind: `"file"` (one file written atomically), `"folder"` (a folder the command fills or replaces as a
            whole: model folders), or `"into"` (a folder that receives named files next to whatever it holds:
            `segment`'s folder mode, a training output folder).
        suffixes: for files, the accepted endings (case-insensitive), e.g. `(".json",)`.
        option: how the user spelled the option, used in messages (`-o`, `--output_dir`, `OUT`).

    Raises:
        OutputPathError: with one line naming the path and the problem.
    """
    if kind not in ("file", "folder", "into"):
        raise ValueError(f"check_output_path: unknown kind {kind!r}")
    out = Path(output)
    if str(output) == "":
        raise OutputPathError(f"{option}: an empty output path")
    target = _resolved(out)
    if kind == "folder" and _inside(_resolved(Path.cwd()), target):
        raise OutputPathError(
            f"{out}: {option} is (or contains) the current directory; choose a new folder for the output"
        )
    for item in inputs:
        if item is None or not os.path.exists(item):
            continue
        source = _resolved(item)
        if target == source:
            raise OutputPathError(f"{out}: {option} is the input {item}; refusing to overwrite an input")
        if Path(item).is_dir() and _inside(target, source):
            raise OutputPathError(
                f"{out}: {option} lies inside the input folder {item}; write outputs outside the inputs"
            )
        if kind == "folder" and _inside(source, target):
            raise OutputPathError(
                f"{out}: {option} contains the input {item}; choose an output folder that holds no input"
            )
    if kind == "file":
        if suffixes and not out.name.lower().endswith(tuple(s.lower() for s in suffixes)):
            raise OutputPathError(f"{out}: {option} must end with {' or '.join(suffixes)}")
        if out.is_dir():
            raise OutputPathError(f"{out}: {option} is an existing folder; give a file name")
        if out.exists() and not overwrite:
            raise OutputPathError(f"{out}: {option} exists; pass --overwrite to replace it")
        return out
    if out.exists() and not out.is_dir():
        raise OutputPathError(f"{out}: {option} exists and is not a folder")
    if kind == "folder" and out.is_dir() and not overwrite:
        entries = [p.name for p in out.iterdir() if not is_temporary(p)]
        if entries:
            shown = ", ".join(sorted(entries)[:5]) + (", ..." if len(entries) > 5 else "")
            raise OutputPathError(
                f"{out}: {option} is a folder that is not empty ({shown}); pass --overwrite to replace the "
                "files this command writes (nothing else is touched), or choose a new folder"
            )
    return out


def temporary_name(final: str | os.PathLike[str]) -> Path:
    """A hidden, unique temporary path next to `final` in the package's pattern (keeps the final suffix)."""
    final = Path(final)
    return final.parent / f".{final.name}.{uuid.uuid4().hex[:12]}.tmp{_suffix(final.name)}"


def is_temporary(path: str | os.PathLike[str], final_name: str | None = None) -> bool:
    """Whether `path` is a temporary of the package's own pattern (for `final_name`, when given)."""
    match = _TEMP_RE.match(Path(path).name)
    return bool(match) and (final_name is None or match.group("final") == final_name)


def remove_stale_temporaries(
    folder: str | os.PathLike[str], final_names: Iterable[str] | None = None
) -> list[Path]:
    """Delete temporaries of the package's pattern left in `folder` by an interrupted run (`kill -9`).

    Only names of the pattern `.{final}.{12 hex}.tmp{suffix}` are touched, and with `final_names` only those
    belonging to these outputs (the ones this run is about to write, so no concurrent run can own them).
    Returns what was removed."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    wanted = None if final_names is None else set(final_names)
    removed = []
    for path in folder.iterdir():
        match = _TEMP_RE.match(path.name)
        if not match or (wanted is not None and match.group("final") not in wanted):
            continue
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
        removed.append(path)
    return removed


@contextlib.contextmanager
def atomic_path(final_path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path next to `final_path`; move it into place only if the block succeeds.

    `os.replace` within one folder is atomic, so readers never see a half-written file. On error the
    temporary is removed and the exception propagates. The parent folder is created if needed."""
    final = Path(final_path)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_name(final)
    try:
        yield tmp
        if not tmp.exists():
            raise OSError(f"{final}: nothing was written to the temporary file {tmp.name}")
        os.replace(tmp, final)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_dir(final_dir: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a fresh temporary folder next to `final_dir`; on success it becomes `final_dir`.

    When `final_dir` does not exist the temporary folder is renamed to it (one atomic step). When it exists
    (the caller checked `--overwrite` with :func:`check_output_path`), each top-level file of the temporary
    folder replaces the file of the same name, one atomic rename each, and nothing else in `final_dir` is
    touched. The folder gets mode 0755 (less the umask), as `save_pretrained` gives, not `mkdtemp`'s 0700.
    On error the temporary folder (which this function created) is removed."""
    final = Path(final_dir)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_name(final)
    tmp.mkdir()
    try:
        yield tmp
        os.chmod(tmp, FOLDER_MODE & ~_umask())
        if not final.exists():
            os.replace(tmp, final)
            return
        _merge_tree(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _merge_tree(source: Path, destination: Path) -> None:
    """Move every file of `source` into `destination`, replacing files of the same name; sub-folders are merged
    file by file the same way, never deleted wholesale."""
    for entry in sorted(source.iterdir()):
        target = destination / entry.name
        if entry.is_dir() and target.is_dir():
            _merge_tree(entry, target)
        else:
            os.replace(entry, target)
