"""Runtime SIMD dispatch: which compiled Adam loops the kernels run.

The loops exist at up to three levels, each in its own extension module: baseline
(fastadam._kernels, what every CPU of the platform runs), avx2 (_kernels_avx2, built with
-march=x86-64-v3) and avx512 (_kernels_avx512, -march=x86-64-v4). At import, fastadam
asks the CPU and OS (cpuid + xgetbv, in fastadam._kernels) which levels they support and
routes small tensors and large tensors to the best level for each:

* small tensors (up to SMALL_TENSOR_ELEMENTS): the widest level. 512-bit code handles a
  short loop in fewer iterations with masked remainders;
* large tensors: avx2 where available. On this Zen 4 machine 256-bit code was as fast or
  faster than 512-bit once a tensor streams from L2/L3 or memory (docs/guide/performance.md; the table in
  benchmarks/simd_levels.py);
* tensors with a bfloat16 or float16 buffer (or a master copy), whatever their size: the
  widest level, like small tensors. Their conversions are compute that 512-bit code does
  in half the instructions (fastadam._kernels._takes_small_loops).

``FASTADAM_SIMD=baseline|avx2|avx512`` forces one level for all tensors (testing,
benchmarking); a forced level the CPU cannot run is an error at import. Every level
gives bit-identical numbers: the build forbids FMA contraction (-ffp-contract=off) and
sqrt/division are correctly rounded at every vector width. NaNs are at the same positions
at every level, but a NaN's sign bit and payload may differ: where two NaNs meet in one
operation, x86 returns one of them, and the vector code may order the operands of a
commutative operation differently from the scalar code (tests/test_simd.py).
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import os
from typing import Dict, List, Optional

from fastadam import _kernels
from fastadam._simd_levels import LEVELS as _LEVELS

LEVELS = tuple(level.name for level in _LEVELS)
MODULES = {level.name: level.module for level in _LEVELS}
SMALL_TENSOR_ELEMENTS = 4096

_chosen: Dict[str, str] = {}


@functools.cache
def _built(level: str) -> bool:
    return importlib.util.find_spec(MODULES[level]) is not None


def cpu_levels() -> List[str]:
    """The levels this CPU and OS can run, widest last (whether built or not)."""
    return [level.name for level in _LEVELS
            if level.cpu is None or (_is_x86_64() or not level.x86_64_only)
            and _kernels.cpu_supports(level.cpu)]


@functools.cache
def _is_x86_64() -> bool:
    import platform

    return platform.machine().lower() in ("x86_64", "amd64", "x64")


def available_levels() -> List[str]:
    """Levels that are both built into this installation and runnable on this CPU/OS."""
    return [level for level in cpu_levels() if _built(level)]


def _capsules(level: str) -> tuple:
    module = importlib.import_module(MODULES[level])
    return (module.run_chunk_capsule, module.count_nonfinite_capsule)


def use(small: str, large: Optional[str] = None) -> None:
    """Route small tensors to level ``small`` and large ones to ``large`` (default: the
    same). Raises ValueError for a level that is unknown or not available here."""
    large = small if large is None else large
    available = available_levels()
    for level in (small, large):
        if level not in LEVELS:
            raise ValueError(f"SIMD level must be one of {', '.join(LEVELS)}, got {level!r}")
        if level not in available:
            raise ValueError(f"SIMD level {level!r} is not available on this machine "
                             f"(available: {', '.join(available)})")
    _kernels.set_kernels(_capsules(small), _capsules(large), SMALL_TENSOR_ELEMENTS)
    _chosen.update(small=small, large=large)


def default_levels() -> tuple:
    """(small, large) levels chosen when FASTADAM_SIMD is not set."""
    available = available_levels()
    widest = available[-1]
    return widest, ("avx2" if "avx2" in available else widest)


def select_from_environment() -> None:
    forced = os.environ.get("FASTADAM_SIMD", "").strip().lower()
    if forced:
        try:
            use(forced)
        except ValueError as exc:
            raise ImportError(f"fastadam: FASTADAM_SIMD={forced}: {exc}") from None
    else:
        use(*default_levels())


def chosen() -> Dict[str, object]:
    """What show_config reports."""
    return {"small_tensors": _chosen.get("small"), "large_tensors": _chosen.get("large"),
            "sixteen_bit_tensors": _chosen.get("small"),  # at every size: _takes_small_loops
            "small_tensor_elements": SMALL_TENSOR_ELEMENTS, "available": available_levels(),
            "FASTADAM_SIMD": os.environ.get("FASTADAM_SIMD")}


select_from_environment()
