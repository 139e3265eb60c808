"""The SIMD levels fastadam's kernel loops are compiled for: the one table that the build
(setup.py), the run-time dispatch (fastadam._simd) and the vectorization check
(.github/scripts/check_vectorization.py) all read.

Plain data with no imports of fastadam, so that setup.py can read it before anything is
built (``runpy.run_path``). Each level is one extension module with the same loops
(_adam_loops.pxi) compiled with the level's flags; ``cpu`` names the CPU feature set the
level needs (fastadam._kernels.cpu_supports answers it with cpuid and xgetbv), None for
the baseline that every CPU of the platform runs. Levels are ordered, widest last.
"""

from typing import NamedTuple, Optional, Tuple


class Level(NamedTuple):
    name: str
    module: str                  # the extension module holding its loops
    unix_flags: Tuple[str, ...]  # GCC and Clang
    msvc_flags: Tuple[str, ...]
    cpu: Optional[str]           # the feature set it needs; None: every CPU
    x86_64_only: bool


LEVELS = (
    Level("baseline", "fastadam._kernels", (), (), None, False),
    Level("avx2", "fastadam._kernels_avx2", ("-march=x86-64-v3",), ("/arch:AVX2",),
          "x86-64-v3", True),
    # x86-64-v4 alone makes GCC prefer 512-bit vectors; the explicit preference keeps that
    # true for every compiler version.
    Level("avx512", "fastadam._kernels_avx512", ("-march=x86-64-v4", "-mprefer-vector-width=512"),
          ("/arch:AVX512",), "x86-64-v4", True),
)
