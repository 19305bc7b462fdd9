"""`meddinov3 demo`, and the subcommands whose arguments live with their code: build-ct3m, convert-dataset,
finetune and pretrain."""

from __future__ import annotations

__all__ = ["add_delegated", "add_demo"]


def add_demo(sub) -> None:
    p = sub.add_parser("demo", help="offline end-to-end demo on synthetic CT (no downloads)")
    p.add_argument("-o", "--output", default="meddinov3-demo", help="output folder")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=None, help="fine-tuning steps (default: the demo's own)")
    p.add_argument(
        "--threads", type=int, default=None, help="torch threads (default: OMP_NUM_THREADS, else idle cores)"
    )
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=_run_demo)


def _run_demo(args) -> int:
    from ..demo import run_demo

    result = run_demo(args.output, seed=args.seed, steps=args.steps, quiet=args.quiet, threads=args.threads)
    return 0 if result["passed"] else 1


def add_delegated(sub) -> None:
    from ..data import ct3m

    p = sub.add_parser("build-ct3m", help="build a CT-3M-style slice dataset from CT volumes")
    ct3m.add_build_ct3m_arguments(p)
    p.set_defaults(func=ct3m.run_build_ct3m)

    from ..data import conversion

    p = sub.add_parser("convert-dataset", help="MSD or TotalSegmentator layout -> nnU-Net raw dataset")
    conversion.add_convert_dataset_arguments(p)
    p.set_defaults(func=conversion.run_convert_dataset)

    p = sub.add_parser(
        "finetune", help="fine-tune on an nnU-Net-format dataset (Trainer flags apply)", add_help=False
    )
    p.set_defaults(func=None, passthrough="finetune")
    p = sub.add_parser("pretrain", help="domain-adaptive pretraining (see training/configs)", add_help=False)
    p.set_defaults(func=None, passthrough="pretrain")
