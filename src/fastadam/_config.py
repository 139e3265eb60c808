"""``show_config()``: what this installation of fastadam was built with and will use."""

from __future__ import annotations

import os
import platform
import sys
from typing import Any, Dict, List

import numpy as np

from fastadam import _kernels, _simd, _threads
from fastadam._version import __version__


def _openmp_libraries() -> List[str]:
    """Paths of the OpenMP runtimes loaded in this process, as threadpoolctl sees them."""
    try:
        from threadpoolctl import threadpool_info
    except ImportError:
        return ["(install threadpoolctl to list the loaded OpenMP runtimes)"]
    return [info["filepath"] for info in threadpool_info() if info.get("user_api") == "openmp"]


def config() -> Dict[str, Any]:
    build = _kernels.build_info()
    return {
        "fastadam": __version__,
        "python": sys.version.split()[0],
        "numpy": np.__version__,
        "platform": platform.platform(),
        "compiler": build["compiler"],
        "compiler_flags": build["cflags"],
        # The SIMD levels in use come first; the baseline module's instruction set (what
        # the plain build targets, used only on CPUs without AVX2 or under
        # FASTADAM_SIMD=baseline) is labelled as such, so the two never read as a conflict.
        "simd": _simd.chosen(),
        "baseline_isa": f"{build['vector_isa']} (the baseline module: CPUs without AVX2)",
        "openmp": build["openmp"],
        "openmp_version": build["openmp_version"],
        "openmp_runtimes": _openmp_libraries() if build["openmp"] else [],
        "num_threads": _threads.get_num_threads(),
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
        "cpu_count": os.cpu_count(),
        "serial_cutoff_elements": _threads.SERIAL_CUTOFF,
        "chunk_elements": build["chunk_elements"],
    }


def show_config(mode: str = "stdout") -> Any:
    """Print (``mode="stdout"``) or return (``mode="dicts"``) the build and runtime facts:
    version, compiler and flags, vector width, OpenMP on/off and runtime, threads."""
    if mode not in ("stdout", "dicts"):
        raise ValueError(f"mode must be 'stdout' or 'dicts', got {mode!r}")
    info = config()
    if mode == "dicts":
        return info
    width = max(len(key) for key in info)
    for key, value in info.items():
        if isinstance(value, list):
            value = ", ".join(value) or "-"
        elif isinstance(value, dict):
            value = ", ".join(f"{k}={v}" for k, v in value.items())
        print(f"{key:<{width}}  {value}")
    return None
