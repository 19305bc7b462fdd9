#!/usr/bin/env python
"""MedDINOv3 domain-adaptive pretraining, one stage per run (same as ``meddinov3 pretrain``).

Examples::

    accelerate launch training/pretrain.py --config training/configs/stage1.yaml \
        --dataset /data/ct3m --init /models/dinov3-vitb16 --output_dir runs/stage1
    accelerate launch training/pretrain.py --config training/configs/stage2.yaml \
        --dataset /data/ct3m --init runs/stage1/export/final --output_dir runs/stage2 gram.refresh_every=10000
    accelerate launch training/pretrain.py --config training/configs/stage1.yaml ... --resume

Any config value can be overridden with ``section.key=value`` (see src/meddinov3_hf/pretraining/config.py).
``--max_steps N`` makes every schedule span N steps (as finetune.py's Trainer); ``--stop_at_step N`` stops early
with the full schedules. ``--init`` also takes the MedDINOv3 release ``.pth`` or a folder converted from it: the
run then continues from its backbone and DINO/iBOT heads.
"""

from __future__ import annotations

import argparse
import sys

from meddinov3_hf.pretraining.loop import add_pretrain_arguments, run_pretrain


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_pretrain_arguments(parser)
    # Intermixed: dotted overrides may come before or after options such as --max_steps.
    return run_pretrain(parser.parse_intermixed_args(argv))


if __name__ == "__main__":  # guard required: DataLoader workers may re-import this file
    sys.exit(main())
