#!/usr/bin/env python3
"""Quick speed table: fastadam.adam_step vs an in-place NumPy Adam (and torch, if installed).

The same table as ``fastadam bench`` (fastadam.app.bench), with sizes up to 2^24 and
longer samples by default. The timing helpers of every script here are
fastadam.app.timing's, the ones ``fastadam bench`` uses.

    python benchmarks/quick.py                      # float32, 2^10..2^24, 1 and 2 threads
    python benchmarks/quick.py --dtype float64 --sizes 16 20 --repeats 11
"""

import argparse

from fastadam.app.bench import add_arguments, run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(parser)
    parser.set_defaults(sizes=[10, 12, 14, 16, 18, 20, 22, 24], threads=[1, 2], repeats=7, target_ms=20.0)
    run(parser.parse_args())


if __name__ == "__main__":
    main()
