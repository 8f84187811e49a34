"""The ``fastunet`` command: ``fastunet train``, ``fastunet check DIR``, ``fastunet bench``.

Each subcommand lives in its own module with an ``add_arguments(parser)`` and a ``run(args) -> int``;
this file only dispatches. ``fastunet <subcommand> --help`` explains every option.
"""

from __future__ import annotations

import argparse
import sys

from . import bench, check, train

SUBCOMMANDS = {"train": train, "check": check, "bench": bench}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fastunet", description="fastunet's command line: train a small DDPM UNet, "
                                     "check a diffusers-format checkpoint, or benchmark the kernels and UNets.")
    sub = parser.add_subparsers(dest="command", metavar="{train,check,bench}", required=True)
    for name, module in SUBCOMMANDS.items():
        doc = module.__doc__.strip()
        p = sub.add_parser(name, help=doc.splitlines()[0], description=doc,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        module.add_arguments(p)
        p.set_defaults(run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Parse ``argv`` (default: ``sys.argv[1:]``), run the subcommand and return its exit status."""
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
