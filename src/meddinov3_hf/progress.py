"""Quiet by default in notebooks.

- transformers draws a per-tensor bar ("Loading weights", "Writing model shards") whenever a model is loaded
  or saved; for MedDINOv3 models those bars are hidden unless asked for with `set_loading_progress(True)`
  (or the environment variable `MEDDINOV3_LOADING_PROGRESS=1`). Download bars of the Hub are not affected.
- The package's own long loops draw their bars with `progress_bar`: `tqdm.auto`, i.e. a widget in Jupyter
  when ipywidgets is installed, nothing in Jupyter without it (instead of a text bar and tqdm's
  "IProgress not found" warning), a text bar in a terminal.
"""

from __future__ import annotations

import contextlib
import contextvars
import os
import sys
import warnings
from collections.abc import Iterable, Iterator
from typing import Any

# tqdm.auto warns once per kernel when ipywidgets is missing, as soon as anything imports it (transformers does
# at import time). The bars still work as text, so the warning is only noise in a notebook.
warnings.filterwarnings("ignore", message="IProgress not found", module="tqdm")

__all__ = ["progress_bar", "quiet_weight_bars", "set_loading_progress"]

_WEIGHT_BARS = ("Loading weights", "Writing model shards")
_show_loading = os.environ.get("MEDDINOV3_LOADING_PROGRESS", "").strip().lower() in ("1", "true", "yes")
_quiet = contextvars.ContextVar("meddinov3_quiet_weight_bars", default=False)
_installed = False


def set_loading_progress(enabled: bool) -> None:
    """Show (True) or hide (False, the default) transformers' bars while MedDINOv3 weights load or save."""
    global _show_loading
    _show_loading = bool(enabled)


class _NoBar:
    """Stands in for a tqdm bar: iterates and ignores every call."""

    def __init__(self, iterable: Iterable | None = None, *args: Any, **kwargs: Any):
        self._iterable = iterable

    def __iter__(self) -> Iterator:
        return iter(self._iterable if self._iterable is not None else ())

    def __enter__(self) -> _NoBar:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def __getattr__(self, _name: str) -> Any:
        return lambda *args, **kwargs: None


def _install_hook() -> None:
    """Chain a filter in front of transformers' tqdm factory (once); it only acts inside `quiet_weight_bars`."""
    global _installed
    if _installed:
        return
    from transformers.utils import logging as hf_logging

    if not hasattr(hf_logging, "set_tqdm_hook"):  # older transformers: nothing to hook into
        _installed = True
        return
    previous = getattr(hf_logging, "_tqdm_hook", None)

    def hook(factory, args, kwargs):
        if _quiet.get() and not _show_loading and kwargs.get("desc") in _WEIGHT_BARS:
            return _NoBar(args[0] if args else kwargs.get("iterable"))
        if previous is not None:
            return previous(factory, args, kwargs)
        return factory(*args, **kwargs)

    hf_logging.set_tqdm_hook(hook)
    _installed = True


@contextlib.contextmanager
def quiet_weight_bars() -> Iterator[None]:
    """Within the block, transformers' weight loading/saving bars are hidden (unless `set_loading_progress`)."""
    _install_hook()
    token = _quiet.set(True)
    try:
        yield
    finally:
        _quiet.reset(token)


def _in_notebook_without_widgets() -> bool:
    if "ipykernel.zmqshell" not in sys.modules:  # the test tqdm.autonotebook makes
        return False
    try:
        import ipywidgets  # noqa: F401
    except ImportError:
        return True
    return False


def progress_bar(iterable: Iterable | None = None, enabled: bool = True, **kwargs: Any) -> Any:
    """A `tqdm.auto` bar over `iterable` (kwargs as tqdm's), or a silent stand-in when disabled or in a
    Jupyter kernel without ipywidgets."""
    if not enabled or _in_notebook_without_widgets():
        return _NoBar(iterable)
    from tqdm.auto import tqdm

    return tqdm(iterable, **kwargs)
