"""The `meddinov3` command: convert, segment, evaluate, features, overlay, demo, build-ct3m, finetune, pretrain.

One module per group of subcommands (`convert`, `segment`, `evaluate`, `pictures`, `deploy`, `training`),
each with its `add_*(subparsers)`; `common` holds the shared argument types.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from collections.abc import Sequence

from .common import LabelMap
from .convert import add_convert
from .deploy import add_export_and_app, add_push
from .evaluate import add_evaluate
from .pictures import add_pictures
from .segment import add_postprocess, add_segment
from .training import add_delegated, add_demo

__all__ = ["LabelMap", "build_parser", "main"]

DESCRIPTION = __doc__.split("\n\n")[0]  # the first paragraph: what `meddinov3 --help` has always shown


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="meddinov3", description=DESCRIPTION)
    sub = parser.add_subparsers(dest="command", required=True)
    add_convert(sub)
    add_segment(sub)
    add_postprocess(sub)
    add_evaluate(sub)
    add_pictures(sub)
    add_demo(sub)
    add_push(sub)
    add_export_and_app(sub)
    add_delegated(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "finetune":
        from ..finetuning import run_finetune

        return run_finetune(argv[1:])
    if argv and argv[0] == "pretrain":
        from ..pretraining.loop import add_pretrain_arguments, run_pretrain

        parser = argparse.ArgumentParser(prog="meddinov3 pretrain", description="domain-adaptive pretraining")
        add_pretrain_arguments(parser)
        # Intermixed: dotted `section.key=value` overrides may come before or after options.
        return run_pretrain(parser.parse_intermixed_args(argv[1:]))
    args = build_parser().parse_args(argv)
    warnings.simplefilter("default")
    try:
        return int(args.func(args) or 0)
    except (ValueError, OSError, KeyError) as err:
        message = err.args[0] if isinstance(err, KeyError) and err.args else err
        print(f"error: {message}", file=sys.stderr)
        return 2
    except MemoryError:
        print(f"error: {args.command}: out of memory", file=sys.stderr)
        return 2
