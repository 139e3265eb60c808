#!/usr/bin/env python3
"""Fail unless GCC vectorizes every Adam kernel loop of src/fastadam/_kernels.pyx.

Kernel loops are the lines of _kernels.pyx marked ``# vectorized: kernel loop``. The
script cythonizes the module, compiles the C with the release flags of setup.py plus
``-fopt-info-vec-all``, maps every C ``for`` statement that Cython emitted for a marked
line (through the ``/* "fastadam/_kernels.pyx":N`` comments it writes before each
statement) and requires a "loop vectorized" report for each one: one per fused
specialization (dtype x options). It prints the vector width the build uses.

Usage: python .github/scripts/check_vectorization.py [--cflags "-march=x86-64-v3"]
"""

from __future__ import annotations

import argparse
import collections
import re
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PYX = ROOT / "src" / "fastadam" / "_kernels.pyx"
MARKER = "# vectorized: kernel loop"
RELEASE_FLAGS = ["-O3", "-fno-math-errno", "-ffp-contract=off", "-fopenmp"]
WIDTH_NAMES = {8: "64-bit", 16: "128-bit xmm", 32: "256-bit ymm", 64: "512-bit zmm"}


def kernel_loop_lines() -> set[int]:
    lines = {n for n, text in enumerate(PYX.read_text().splitlines(), 1) if MARKER in text}
    if not lines:
        sys.exit(f"no line of {PYX} is marked {MARKER!r}")
    return lines


def loops_in_c(c_source: Path, pyx_lines: set[int]) -> list[int]:
    """C line numbers of the for statements generated for the marked .pyx lines."""
    position = re.compile(r'/\* "fastadam/_kernels\.pyx":(\d+)')
    current, loops = None, []
    for number, text in enumerate(c_source.read_text().splitlines(), 1):
        match = position.search(text)
        if match:
            current = int(match.group(1))
        elif current in pyx_lines and text.lstrip().startswith("for ("):
            loops.append(number)
            current = None  # one loop per marked statement
    return loops


def compile_with_report(c_source: Path, extra_flags: list[str]) -> str:
    import numpy

    includes = [f"-I{sysconfig.get_paths()['include']}", f"-I{numpy.get_include()}",
                f"-I{PYX.parent}"]
    command = ["gcc", "-c", "-fPIC", *RELEASE_FLAGS, *extra_flags, "-fopt-info-vec-all",
               "-DNPY_NO_DEPRECATED_API=NPY_1_7_API_VERSION", *includes, str(c_source),
               "-o", str(c_source.with_suffix(".o"))]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        sys.exit(f"compilation failed:\n{result.stderr[-4000:]}")
    return result.stderr


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cflags", default="", help="extra compiler flags, e.g. -mavx2")
    args = parser.parse_args()
    if shutil.which("gcc") is None:
        sys.exit("gcc not found: this check reads GCC's -fopt-info-vec report")

    pyx_lines = kernel_loop_lines()
    with tempfile.TemporaryDirectory() as tmp:
        c_source = Path(tmp) / "_kernels.c"
        subprocess.run([sys.executable, "-m", "cython", "-3", "-I", str(PYX.parent),
                        str(PYX), "-o", str(c_source)], check=True)
        loops = loops_in_c(c_source, pyx_lines)
        report = compile_with_report(c_source, args.cflags.split())

    vectorized = collections.defaultdict(set)
    pattern = re.compile(r"_kernels\.c:(\d+):\d+: optimized: loop vectorized using (\d+) byte vectors")
    for match in pattern.finditer(report):
        vectorized[int(match.group(1))].add(int(match.group(2)))

    missing = [line for line in loops if line not in vectorized]
    widths = sorted({w for line in loops for w in vectorized.get(line, ())})
    print(f"kernel loops (fused specializations): {len(loops)}, vectorized: "
          f"{len(loops) - len(missing)}; vector widths: "
          + ", ".join(f"{w} bytes ({WIDTH_NAMES.get(w, '?')})" for w in widths))
    if not loops:
        print("FAIL: found no generated C loop for the marked lines")
        return 1
    if missing:
        print(f"FAIL: not vectorized: generated C lines {missing}")
        return 1
    print("OK: every kernel loop is vectorized")
    return 0


if __name__ == "__main__":
    sys.exit(main())
