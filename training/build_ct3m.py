#!/usr/bin/env python
"""Build the CT-3M slice dataset (same as ``meddinov3 build-ct3m``).

Example::

    python training/build_ct3m.py TotalSegmentator=/data/ts LIDC=/data/lidc -o /data/ct3m --num-workers 16

Re-running the same command resumes an interrupted build.
"""

from __future__ import annotations

import argparse
import sys

from meddinov3_hf.data.ct3m import add_build_ct3m_arguments, run_build_ct3m


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_build_ct3m_arguments(parser)
    return run_build_ct3m(parser.parse_args(argv))


if __name__ == "__main__":  # guard required: worker processes are spawned and re-import this file
    sys.exit(main())
