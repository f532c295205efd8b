"""The `diffusers-offload` command line."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence


def _demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    return 0 if run_demo(args.out, device=args.device) else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="diffusers-offload", description="Run large diffusion pipelines on small accelerators."
    )
    verbs = parser.add_subparsers(dest="verb", required=True, metavar="VERB")
    demo = verbs.add_parser(
        "demo",
        help="run a tiny pipeline built locally (no download) with each offload strategy",
        description="Builds a tiny random-weight SD3 pipeline, runs it without offload, with model swap and "
        "with layer-wise offload, checks the images are bitwise equal and saves one.",
    )
    demo.add_argument("--out", default="demo.png", help="where to save the image (default: demo.png)")
    demo.add_argument("--device", default=None, help="execution device (default: the accelerator, else cpu)")
    demo.set_defaults(run=_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except (ValueError, RuntimeError, FileNotFoundError) as error:
        print(f"diffusers-offload {args.verb}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
