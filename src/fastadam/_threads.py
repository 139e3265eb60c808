"""How many OpenMP threads an update uses.

``num_threads=None`` means the process default set with :func:`set_num_threads`, else
OpenMP's own default, read at call time with ``omp_get_max_threads()`` so that
``OMP_NUM_THREADS`` and ``threadpoolctl.threadpool_limits(user_api="openmp")`` take
effect. The default is stored here in Python rather than with ``omp_set_num_threads``,
whose setting belongs to the calling thread only.

In a child process made by ``fork()`` every update runs on one thread: GNU libgomp
keeps the parent's thread pool in its bookkeeping, and the child's first parallel region
waits forever for pool threads that fork did not copy (a two-thread update in a child
forked after a two-thread update hung here; tests/test_threads.py checks the remedy).
Workers that want threads should be started with the "spawn" or "forkserver" method.

:func:`threads_per_rank` is for the other kind of worker: ranks of a distributed job that
share a host. Launchers set ``OMP_NUM_THREADS=1`` (torchrun does) so that ranks do not
oversubscribe it, which leaves a CPU optimizer on one thread; the function gives a rank
its share of the CPUs instead.
"""

from __future__ import annotations

import os
import threading
from typing import Mapping, Optional, Set

from fastadam import _kernels
from fastadam._validation import check_num_threads

# Below this many elements an update runs on one thread. Alone in a process, two threads
# already paid from 2^13 float32 elements (benchmarks/serial_cutoff.py: 2^13 8.4 us on one
# thread vs 5.0 us on two, 2^14 13.8 vs 8.3 us). But fastadam usually shares the process
# with other thread pools (torch's, numba's, XLA's) whose idle threads spin on the same two
# cores: in benchmarks/peers.py's process a 2^14 update took 16 us on one thread and 40 us
# on two, while from 2^16 on two threads won everywhere. The cutoff takes the robust side.
SERIAL_CUTOFF = 1 << 16

# A team never has more threads than CHUNK_ELEMENTS-element pieces of work (a thread
# without a chunk's worth of elements only adds fork/join cost), nor more than this:
# asking libgomp for tens of thousands of threads (num_threads=100_000 over 100k small
# tensors would) ends the process with "Thread creation failed" once the system's thread
# limit is hit. Results are identical for every team size, so the cap changes only speed.
MAX_TEAM_SIZE = 1024
_CHUNK_ELEMENTS = _kernels.build_info()["chunk_elements"]

_lock = threading.Lock()
_process_default: Optional[int] = None
_in_forked_child = False


def _after_fork_in_child() -> None:
    global _in_forked_child
    _in_forked_child = True


if hasattr(os, "register_at_fork"):  # POSIX; Windows has no fork
    os.register_at_fork(after_in_child=_after_fork_in_child)


def set_num_threads(num_threads: Optional[int]) -> Optional[int]:
    """Set the process-wide default thread count of fastadam's updates.

    ``None`` restores OpenMP's default (``OMP_NUM_THREADS``, else all cores). Returns
    the previous setting. An explicit ``num_threads=`` argument of a call still wins.
    """
    global _process_default
    value = check_num_threads(num_threads)
    with _lock:
        previous, _process_default = _process_default, value
    return previous


def get_num_threads() -> int:
    """The number of threads an update of a large buffer would use now (1 in a child
    process made by fork: see the module docstring)."""
    if not _kernels.openmp_enabled() or _in_forked_child:
        return 1
    default = _process_default
    return default if default is not None else _kernels.max_threads()


def threads_for(num_threads: Optional[int], n_elements: int) -> int:
    """The team size for one update of ``n_elements`` (``num_threads`` already checked)."""
    if n_elements < SERIAL_CUTOFF or not _kernels.openmp_enabled() or _in_forked_child:
        return 1
    requested = num_threads if num_threads is not None else get_num_threads()
    return min(requested, -(-n_elements // _CHUNK_ELEMENTS), MAX_TEAM_SIZE)


# Where launchers put the number of ranks on this host, in the order they are read:
# torchrun, DeepSpeed's launcher, Open MPI's mpirun, MPICH's (and Intel MPI's) mpiexec.
LOCAL_WORLD_SIZE_VARIABLES = ("LOCAL_WORLD_SIZE", "LOCAL_SIZE", "OMPI_COMM_WORLD_LOCAL_SIZE",
                              "MPI_LOCALNRANKS")


def _local_world_size(environ: Mapping[str, str]) -> int:
    """The ranks on this host as the launcher's environment says (1 without a launcher)."""
    for variable in LOCAL_WORLD_SIZE_VARIABLES:
        value = environ.get(variable)
        if value is not None:
            try:
                count = int(value)
            except ValueError:
                count = 0
            if count < 1:
                raise ValueError(f"the environment variable {variable} must be a positive "
                                 f"integer (the number of ranks on this host), got {value!r}")
            return count
    return 1


def _affinity(pid: int) -> Set[int]:
    """The CPUs process ``pid`` may run on (0: this one); all of them where the platform
    cannot say (macOS, Windows)."""
    if hasattr(os, "sched_getaffinity"):
        return set(os.sched_getaffinity(pid))
    return set(range(os.cpu_count() or 1))


def threads_per_rank(local_world_size: Optional[int] = None) -> int:
    """The threads one rank of a distributed job should give its optimizer step, so that
    the ranks on this host together use its CPUs once: pass it as ``num_threads=``.

    ``local_world_size`` is the number of ranks on this host; None reads it from the
    launcher's environment (``LOCAL_WORLD_SIZE`` of torchrun, ``LOCAL_SIZE`` of
    DeepSpeed's launcher, ``OMPI_COMM_WORLD_LOCAL_SIZE`` of Open MPI, ``MPI_LOCALNRANKS``
    of MPICH), else 1. The host's CPUs are those the launcher may run on (the parent
    process's CPU affinity, with this rank's own), shared evenly among the local ranks;
    a rank pinned to fewer CPUs than its share (``--bind-to core``, NUMA binding) gets
    its own CPUs. So the result is ``min(len(own), len(host) // local_world_size)``, at
    least 1. ``OMP_NUM_THREADS`` is not read: it is what this replaces.
    """
    ranks = check_num_threads(local_world_size, "local_world_size")  # None or a positive int
    if ranks is None:
        ranks = _local_world_size(os.environ)
    own = _affinity(0)
    try:
        # The launcher (torchrun's agent, mpiexec's proxy, a shell) is this rank's parent.
        host = own | _affinity(os.getppid())
    except OSError:  # the parent is gone or not ours to read: this rank's CPUs are all it knows
        host = own
    return max(1, min(len(own), len(host) // ranks))


class NumThreadsAttribute:
    """A ``num_threads`` attribute checked on every assignment (None or a positive int),
    for the optimizer classes: ``num_threads = NumThreadsAttribute()``."""

    def __set_name__(self, owner: type, name: str) -> None:
        self.private = f"_{name}"

    def __get__(self, obj: object, objtype: Optional[type] = None) -> Optional[int]:
        return self if obj is None else getattr(obj, self.private)  # type: ignore[return-value]

    def __set__(self, obj: object, value: Optional[int]) -> None:
        setattr(obj, self.private, check_num_threads(value))
