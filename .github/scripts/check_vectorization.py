#!/usr/bin/env python3
"""Fail unless GCC vectorizes every Adam kernel loop, at every SIMD level fastadam builds.

Kernel loops are the lines of src/fastadam/_adam_loops.pxi marked ``# vectorized: kernel
loop``. For each kernel module (_kernels: baseline; _kernels_avx2: -march=x86-64-v3;
_kernels_avx512: -march=x86-64-v4) the script cythonizes it, compiles the C with the
release flags of setup.py plus ``-fopt-info-vec-all``, maps every C ``for`` statement
Cython emitted for a marked line (through the ``/* ".../_adam_loops.pxi":N`` comments
it writes before each statement) and requires a "loop vectorized" report for
each: one per fused specialization (dtype x options). It prints the vector widths.

The specializations of the torch numerics profile (FormTag TorchForm/TorchTailForm) call
fma/fmaf. Where the ISA has an FMA instruction (the avx2/avx512 levels) they must
vectorize like the others; at the baseline (x86-64 has no FMA before x86-64-v3) each fma
is a correctly rounded libm call, GCC cannot vectorize the loop, and the script only
reports them (same bits, slower: that level runs on CPUs where torch itself has no FMA
kernel).

Usage: python .github/scripts/check_vectorization.py [--cflags "-mno-fma"]
"""

from __future__ import annotations

import argparse
import collections
import platform
import re
import runpy
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SOURCE_DIR = ROOT / "src" / "fastadam"
LOOPS = SOURCE_DIR / "_adam_loops.pxi"
# module -> the flags setup.py adds for its SIMD level: the table they both read
LEVELS = runpy.run_path(str(SOURCE_DIR / "_simd_levels.py"))["LEVELS"]
MODULES = {level.module.split(".")[-1]: list(level.unix_flags) for level in LEVELS}
X86_64_ONLY = {level.module.split(".")[-1] for level in LEVELS if level.x86_64_only}
MARKER = "# vectorized: kernel loop"
FMA_MODULES = {"_kernels_avx2", "_kernels_avx512"}  # levels whose ISA has FMA
FMA_TAGS = re.compile(r"_(TorchForm|TorchTailForm) \*")  # a specialization calling fma
RELEASE_FLAGS = ["-O3", "-fno-math-errno", "-ffp-contract=off", "-fopenmp"]
WIDTH_NAMES = {8: "64-bit", 16: "128-bit xmm", 32: "256-bit ymm", 64: "512-bit zmm"}


def is_gcc() -> bool:
    """Whether `gcc` is GCC (on macOS it is Apple clang, which has no -fopt-info)."""
    if shutil.which("gcc") is None:
        return False
    version = subprocess.run(["gcc", "--version"], capture_output=True, text=True).stdout
    return "Free Software Foundation" in version


def default_modules() -> list[str]:
    """The modules setup.py builds here: the SIMD twins exist on x86-64 only."""
    x86_64 = platform.machine().lower() in ("x86_64", "amd64")
    return [m for m in MODULES if x86_64 or m not in X86_64_ONLY]


def kernel_loop_lines() -> set[int]:
    lines = {n for n, text in enumerate(LOOPS.read_text().splitlines(), 1) if MARKER in text}
    if not lines:
        sys.exit(f"no line of {LOOPS} is marked {MARKER!r}")
    return lines


def loops_in_c(c_source: Path, pyx_lines: set[int]) -> list[tuple[int, bool]]:
    """(C line number, calls fma) of the for statements generated for the marked .pyx
    lines; "calls fma": the loop is in a specialization of the torch numerics profile."""
    position = re.compile(r'/\* "[^"]*_adam_loops\.pxi":(\d+)')  # path as Cython saw it
    current, loops, in_fma_function = None, [], False
    for number, text in enumerate(c_source.read_text().splitlines(), 1):
        if text.startswith("static ") and "(" in text and not text.rstrip().endswith("/*proto*/"):
            in_fma_function = bool(FMA_TAGS.search(text))  # a function definition
        match = position.search(text)
        if match:
            current = int(match.group(1))
        elif current in pyx_lines and text.lstrip().startswith("for ("):
            loops.append((number, in_fma_function))
            current = None  # one loop per marked statement
    return loops


def compile_with_report(c_source: Path, extra_flags: list[str]) -> str:
    import numpy

    includes = [f"-I{sysconfig.get_paths()['include']}", f"-I{numpy.get_include()}",
                f"-I{SOURCE_DIR}"]
    command = ["gcc", "-c", "-fPIC", *RELEASE_FLAGS, *extra_flags, "-fopt-info-vec-all",
               "-DNPY_NO_DEPRECATED_API=NPY_1_7_API_VERSION", *includes, str(c_source),
               "-o", str(c_source.with_suffix(".o"))]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        sys.exit(f"compilation failed:\n{result.stderr[-4000:]}")
    return result.stderr


def check_module(module: str, flags: list[str], pyx_lines: set[int]) -> bool:
    with tempfile.TemporaryDirectory() as tmp:
        c_source = Path(tmp) / f"{module}.c"
        subprocess.run([sys.executable, "-m", "cython", "-3", "-I", str(ROOT / "src"),
                        str(SOURCE_DIR / f"{module}.pyx"), "-o", str(c_source)], check=True)
        loops = loops_in_c(c_source, pyx_lines)
        report = compile_with_report(c_source, flags)

    vectorized = collections.defaultdict(set)
    pattern = re.compile(rf"{module}\.c:(\d+):\d+: optimized: loop vectorized using (\d+) byte vectors")
    for match in pattern.finditer(report):
        vectorized[int(match.group(1))].add(int(match.group(2)))
    # A specialization nothing calls (Cython emits every combination of the fused types,
    # float64 math with bfloat16 storage included) is removed by GCC before its loops are
    # analyzed: no report of any kind names its lines. Only the loops GCC compiled count.
    analyzed = {int(n) for n in re.findall(rf"{module}\.c:(\d+):\d+: ", report)}
    dead = [line for line, _ in loops if line not in analyzed]
    loops = [(line, fma) for line, fma in loops if line in analyzed]
    has_fma = module in FMA_MODULES or "-mfma" in flags
    required = [line for line, fma in loops if has_fma or not fma]
    libm_fma = [line for line, fma in loops if fma and not has_fma]
    missing = [line for line in required if line not in vectorized]
    widths = sorted({w for line, _ in loops for w in vectorized.get(line, ())})
    print(f"{module} ({' '.join(flags) or 'baseline'}): {len(loops)} kernel loops, "
          f"{len(required) - len(missing)} of the {len(required)} required vectorized; widths: "
          + ", ".join(f"{w} bytes ({WIDTH_NAMES.get(w, '?')})" for w in widths))
    if dead:
        print(f"  {len(dead)} loops in specializations nothing calls (removed by GCC, not checked)")
    if libm_fma:
        print(f"  {len(libm_fma)} torch-profile loops call libm fma (no FMA instruction at "
              f"this level), {sum(line in vectorized for line in libm_fma)} vectorized anyway")
    if not loops:
        print("  FAIL: found no generated C loop for the marked lines")
    elif not any(fma for _, fma in loops):
        print("  FAIL: found no loop of the torch numerics profile (TorchForm/TorchTailForm)")
        return False
    elif missing:
        print(f"  FAIL: not vectorized: generated C lines {missing}")
    return bool(loops) and not missing


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cflags", default="", help="extra compiler flags for every module")
    parser.add_argument("--modules", nargs="+", default=default_modules(), choices=list(MODULES))
    args = parser.parse_args()
    if not is_gcc():
        sys.exit("GCC not found (gcc is missing or is another compiler): this check reads "
                 "GCC's -fopt-info-vec report")
    pyx_lines = kernel_loop_lines()
    ok = [check_module(m, MODULES[m] + args.cflags.split(), pyx_lines) for m in args.modules]
    if not all(ok):
        return 1
    print("OK: every kernel loop is vectorized")
    return 0


if __name__ == "__main__":
    sys.exit(main())
