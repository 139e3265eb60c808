"""The ``fastadam`` command (also ``python -m fastadam``).

    fastadam demo      train a NumPy-only MLP on Fashion-MNIST with fastadam.Adam
    fastadam bench     a quick speed table on this machine (under a minute)
    fastadam config    print what this installation was built with (show_config)
"""

from __future__ import annotations

import argparse
from typing import List, Optional

import fastadam


def build_parser() -> argparse.ArgumentParser:
    from fastadam import bench, demo

    parser = argparse.ArgumentParser(prog="fastadam", description="fastadam: the fast Adam for the CPU")
    parser.add_argument("--version", action="version", version=f"fastadam {fastadam.__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    demo_parser = commands.add_parser(
        "demo", help="train a NumPy-only MLP on Fashion-MNIST with fastadam.Adam",
        description=demo.__doc__.splitlines()[0])
    demo.add_arguments(demo_parser)
    bench_parser = commands.add_parser(
        "bench", help="a quick speed table: fastadam vs NumPy (and torch) per size and threads",
        description=bench.__doc__.splitlines()[0])
    bench.add_arguments(bench_parser)
    commands.add_parser("config", help="print the build and runtime configuration")
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "demo":
        from fastadam import demo

        demo.run(args)
    elif args.command == "bench":
        from fastadam import bench

        bench.run(args)
    elif args.command == "config":
        fastadam.show_config()
    return 0
