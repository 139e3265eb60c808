"""The ``fastadam`` command (also ``python -m fastadam``): the entry point of the app.

    fastadam demo      train a NumPy-only MLP on Fashion-MNIST with fastadam.Adam
    fastadam bench     a quick speed table on this machine (under a minute)
    fastadam config    print what this installation was built with (show_config)
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import List, Optional

import fastadam

EPILOG = """\
commands:
  demo     train a NumPy-only MLP on Fashion-MNIST (or a synthetic task without the data)
           with fastadam.Adam, with progress per epoch; about 5-10 s on 2 cores
  bench    a quick speed table: fastadam against NumPy (and torch, if installed) per
           tensor size and thread count, under a minute
  config   print the build (compiler, flags, OpenMP, SIMD levels) and the threads in use

examples:
  fastadam demo                       Fashion-MNIST if installed, else a synthetic task
  fastadam demo --download --epochs 1 fetch Fashion-MNIST first (needs the network)
  fastadam bench --sizes 16 20        two sizes only
  fastadam config

Each command has its own options: fastadam demo --help, fastadam bench --help.
The documentation (docs/ in the source tree) covers the Python API."""


def positive_int(text: str) -> int:
    """An argparse type the subcommands share: an integer of at least 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    from fastadam.app import bench, demo

    parser = argparse.ArgumentParser(
        prog="fastadam", description="fastadam: the fast, exact Adam optimizer for the CPU.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"fastadam {fastadam.__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    demo_parser = commands.add_parser(
        "demo", help="train a NumPy-only MLP on Fashion-MNIST with fastadam.Adam",
        description=demo.DESCRIPTION)
    demo.add_arguments(demo_parser)
    bench_parser = commands.add_parser(
        "bench", help="a quick speed table: fastadam vs NumPy (and torch) per size and threads",
        description=bench.__doc__.splitlines()[0].replace("``", ""))
    bench.add_arguments(bench_parser)
    commands.add_parser("config", help="print the build and runtime configuration",
                        description="Print what this installation was built with and will use "
                                    "(fastadam.show_config()).")
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "demo":
            from fastadam.app import demo

            demo.run(args)
        elif args.command == "bench":
            from fastadam.app import bench

            bench.run(args)
        elif args.command == "config":
            fastadam.show_config()
        sys.stdout.flush()
    except BrokenPipeError:
        # The reader went away (`fastadam config | head`): stop quietly, as Unix tools do.
        # Python would otherwise report the error again when it flushes stdout at exit.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 141  # 128 + SIGPIPE, what a shell reports for a tool killed by it
    return 0
