#!/usr/bin/env python3
"""The in-cache compute ceiling of Adam for three operation orders (see in_cache_bound.c).

Explains why DeepSpeed's loop is faster than fastadam's on cache-resident tensors: the
torch-exact order fastadam keeps costs two divisions per element. Needs a C compiler.

    python benchmarks/in_cache_bound.py
"""

import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

SOURCE = Path(__file__).with_name("in_cache_bound.c")
FLAGS = ["-O3", "-fno-math-errno", "-ffp-contract=off"]


def main():
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        sys.exit("no C compiler found")
    with tempfile.TemporaryDirectory() as tmp:
        for arch in ("x86-64-v3", "x86-64-v4"):
            exe = Path(tmp) / arch
            subprocess.run([cc, *FLAGS, f"-march={arch}", "-mprefer-vector-width=512", str(SOURCE),
                            "-o", str(exe), "-lm"], check=True)
            for n, reps in ((16384, 2000), (262144, 200)):
                print(arch, subprocess.run([str(exe), str(n), str(reps)], capture_output=True,
                                           text=True, check=True).stdout.strip())


if __name__ == "__main__":
    main()
