"""Command line of ``meddinov3 build-ct3m`` and ``training/build_ct3m.py``."""

from __future__ import annotations

import argparse
import logging
import sys

from ...files import check_output_path
from .build import build_ct3m
from .discovery import parse_source
from .manifest import push_to_hub
from .schema import (
    DEFAULT_AIR_THRESHOLD,
    DEFAULT_MAX_ROWS_PER_SHARD,
    DEFAULT_MAX_SHARD_BYTES,
    DEFAULT_MIN_BODY_FRACTION,
    DEFAULT_VOLUMES_PER_TASK,
)


def add_build_ct3m_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``build-ct3m`` options to ``parser``."""
    parser.add_argument(
        "sources",
        nargs="+",
        metavar="NAME=FOLDER",
        help="input dataset: NIfTI files (recursive) and/or DICOM series folders; repeat for each source",
    )
    parser.add_argument("-o", "--output", required=True, help="output folder (re-run to resume)")
    parser.add_argument("--num-workers", type=int, default=1, help="worker processes (default 1)")
    parser.add_argument("--max-rows-per-shard", type=int, default=DEFAULT_MAX_ROWS_PER_SHARD)
    parser.add_argument(
        "--max-shard-bytes", type=int, default=DEFAULT_MAX_SHARD_BYTES, help="raw image bytes per shard"
    )
    parser.add_argument(
        "--volumes-per-task",
        type=int,
        default=DEFAULT_VOLUMES_PER_TASK,
        help="volumes published/ledgered together (work lost per worker on interruption)",
    )
    parser.add_argument(
        "--air-threshold",
        type=float,
        default=DEFAULT_AIR_THRESHOLD,
        help="HU above which a pixel counts as body (default -500)",
    )
    parser.add_argument(
        "--min-body-fraction",
        type=float,
        default=DEFAULT_MIN_BODY_FRACTION,
        help="keep a slice if this fraction of pixels is body (default 0.05)",
    )
    parser.add_argument("--push-to-hub", metavar="REPO_ID", help="upload the finished build (HF_TOKEN)")
    parser.add_argument("--public", action="store_true", help="create the Hub repo public (default private)")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bar")


def run_build_ct3m(args: argparse.Namespace) -> int:
    """Run a build from parsed arguments; 0 on success (bad volumes are reported, not fatal), 2 on bad
    arguments."""
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, format="%(message)s")
    try:
        sources = [parse_source(s) for s in args.sources]
        # The build scans its sources recursively: an output inside one would be read back as input.
        check_output_path(args.output, [s.folder for s in sources], kind="into", option="-o")
        # Each of these flags sets the build_ct3m parameter of the same name.
        names = ("num_workers", "max_rows_per_shard", "max_shard_bytes", "volumes_per_task", "air_threshold")
        settings = {name: getattr(args, name) for name in (*names, "min_body_fraction", "quiet")}
        manifest = build_ct3m(sources, args.output, **settings)
    except ValueError as exc:
        print(f"build-ct3m: error: {exc}", file=sys.stderr)
        return 2
    t = manifest["totals"]
    print(
        f"CT-3M: {t['rows']} slices in {t['shards']} shards from {t['volumes_used']} volumes "
        f"({t['volumes_duplicate']} duplicates, {t['volumes_failed']} failed, "
        f"{t['slices_skipped_air']} air slices skipped) -> {args.output}"
    )
    if args.push_to_hub:
        push_to_hub(args.output, args.push_to_hub, private=not args.public)
        print(f"uploaded to https://huggingface.co/datasets/{args.push_to_hub}")
    return 0
