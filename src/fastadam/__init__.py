"""fastadam: the fastest trustworthy Adam optimizer for Python on the CPU.

Cython kernels with OpenMP update float32 and float64 buffers in place; this package
wraps them for NumPy arrays and any object supporting the buffer protocol.
"""

from fastadam import _simd, schedules  # noqa: F401  (_simd selects the SIMD level)
from fastadam._config import show_config
from fastadam._functional import adam_state, adam_step, adam_step_rows
from fastadam._threads import get_num_threads, set_num_threads, threads_per_rank
from fastadam._version import __version__
from fastadam.checkpoint import load, save
from fastadam.flat import FlatParams
from fastadam.optim import Adam, AdamW

__all__ = [
    "Adam",
    "AdamW",
    "FlatParams",
    "adam_state",
    "adam_step",
    "adam_step_rows",
    "get_num_threads",
    "load",
    "save",
    "schedules",
    "set_num_threads",
    "show_config",
    "threads_per_rank",
    "__version__",
]
