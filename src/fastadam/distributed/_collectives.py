"""The MPI side of sharded Adam: the ranks' agreement before anything can block, and the
reduce-scatter and all-gather of a flat block cut into shards.

This is the one module of :mod:`fastadam.distributed` that imports mpi4py (the others
take ``MPI`` from here), so a missing mpi4py is reported once, saying what to install.

Agreement. A collective that one rank skips (because its arguments failed a check) leaves
the others waiting in it for ever. So every rank checks its own arguments first, then
:func:`agree_on` (before a step or the constructor) or :func:`agree` (after each part of a
checkpoint) tells every rank whether all passed, and every rank raises if one failed.

Exchange. :class:`ShardExchange` runs a step's two collectives on one flat block:
fastadam's reduce-scatter (rank-order sums, bit-identical to one process) and ring
all-gather, or MPI's ``Reduce_scatter`` and ``Allgatherv`` (see :mod:`fastadam.distributed`
for when each pays). A 16-bit block (bfloat16 or float16) travels as 16-bit words and is
summed in float32: fastadam's reduce-scatter receives the 16-bit slices and adds them,
widened, in rank order; MPI's, having no bfloat16 sum, gets the gradient widened to a
float32 copy first.
"""

from __future__ import annotations

import hashlib
from typing import Any, Dict, List, Optional, Tuple

import numpy as np

try:
    from mpi4py import MPI
except ImportError as exc:  # pragma: no cover - exercised in a subprocess without mpi4py
    raise ImportError(
        "fastadam.distributed needs mpi4py and an MPI library: pip install mpi4py mpich (or "
        f"mpi4py built against your system's MPI); importing mpi4py.MPI failed: {exc}"
    ) from exc

from fastadam._memory import zeros_at
from fastadam._validation import BFLOAT16_BITS, FLOAT_DTYPES, math_type
from fastadam.flat import GRAD_PAGE_OFFSET

__all__ = ["COLLECTIVES", "MPI", "ShardExchange", "agree", "agree_on", "any_rank"]

COLLECTIVES = ("fastadam", "mpi")
_MPI_TYPES = {np.dtype(np.float32): MPI.FLOAT, np.dtype(np.float64): MPI.DOUBLE}
FLOAT32 = FLOAT_DTYPES[0]
# fastadam's reduce-scatter receives the slices of its shard in rounds through a scratch buffer
# of about this many bytes (kept between steps): bounded memory whatever the model size,
# and messages of 16 MiB / ranks per peer and round (256 KiB at 64 ranks), far above the
# sizes where latency dominates.
ORDERED_SCRATCH_BYTES = 1 << 24

Bounds = List[Tuple[int, int]]



def _fingerprint(settings: Dict[str, Any]) -> int:
    """A 62-bit hash of the settings' exact values (repr of a float is exact)."""
    digest = hashlib.blake2b(repr(sorted(settings.items())).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 2


def agree_on(comm: Any, error: Optional[BaseException], settings: Optional[Dict[str, Any]],
             action: str) -> None:
    """Collective, before any collective that can block: every rank learns whether every
    rank's checks passed (``error`` is None) and whether all ranks have the same
    ``settings``. If so, it returns; otherwise it raises on EVERY rank, so that no rank
    waits alone in a collective: the failing rank its own exception, the others one of the
    same kind (TypeError, else ValueError) naming the failing rank(s) and their error, or
    a ValueError naming the settings that differ and each rank's values.

    The common case costs one Allreduce of three int64 (a status and a fingerprint of
    the settings, as its maximum and its negated minimum); the details are gathered only
    when something is wrong (then every rank knows it, so every rank takes part)."""
    if comm.Get_size() == 1:
        if error is not None:
            raise error
        return
    fingerprint = 0 if settings is None else _fingerprint(settings)
    status = np.array([int(error is not None), fingerprint, -fingerprint], np.int64)
    comm.Allreduce(MPI.IN_PLACE, [status, MPI.INT64_T], op=MPI.MAX)
    if status[0] == 0 and status[1] == -status[2]:
        return
    mine = None if error is None else (type(error).__name__, str(error))
    reports = comm.allgather((mine, settings))
    if error is not None:
        raise error
    failed = [(rank, report) for rank, (report, _) in enumerate(reports) if report is not None]
    if failed:
        kind = TypeError if failed[0][1][0] == "TypeError" else ValueError
        described = "; ".join(f"rank {rank}: {name}: {message}" for rank, (name, message) in failed)
        ranks = ", ".join(str(rank) for rank, _ in failed)
        raise kind(f"{action} failed on rank {ranks} (every rank raises): {described}")
    everyone = [s for _, s in reports]
    differing = [key for key in everyone[0]  # (repr: -0.0 and 0.0 differ as they hash)
                 if any(repr(s.get(key)) != repr(everyone[0][key]) for s in everyone)]
    described = "; ".join(f"rank {rank}: " + ", ".join(f"{key}={s.get(key)!r}" for key in differing)
                          for rank, s in enumerate(everyone))
    raise ValueError(f"{action}: every rank must have the same {', '.join(differing)}, got {described}")


def agree(comm: Any, error: Optional[BaseException], action: str, kind: type = ValueError) -> None:
    """Collective, after each rank tried ``action``: raise on every rank if it failed on
    any (the failing rank re-raises its own exception, the others a ``kind`` naming it),
    so that no rank goes on alone."""
    failures = comm.allgather(None if error is None else f"{type(error).__name__}: {error}")
    if error is not None:
        raise error
    for rank, failure in enumerate(failures):
        if failure is not None:
            raise kind(f"rank {rank} could not {action}: {failure}")


def any_rank(comm: Any, flag: bool) -> bool:
    """Collective: whether ``flag`` is true on any rank of ``comm``."""
    return bool(comm.allreduce(int(flag), op=MPI.MAX))


# --- the reduce-scatter and the all-gather of a step -------------------------------------------


def _words(block: np.ndarray) -> np.ndarray:
    """What goes on the wire: a float32/float64 block itself, a 16-bit one as its words
    (MPI has no bfloat16 type; these are only moved, never summed)."""
    return block.view(np.uint16) if block.itemsize == 2 else block


def _widened(block: np.ndarray) -> np.ndarray:
    """A bfloat16/float16 block's values in float32 (exact)."""
    if block.dtype == BFLOAT16_BITS:  # the bits of bfloat16 are float32's high half
        return (block.view(np.uint16).astype(np.uint32) << 16).view(np.float32)
    return block.astype(FLOAT32)


class ShardExchange:
    """A step's collectives over a flat block of ``dtype`` cut into ``bounds`` (one shard
    per rank of ``comm``, in rank order). It keeps the buffers they need between steps:
    this rank's summed gradient shard (float32 for a 16-bit block) and, for fastadam's
    reduce-scatter, the bounded receive buffer (MPI's, for a 16-bit block: the float32
    copy of the whole gradient)."""

    def __init__(self, comm: Any, bounds: Bounds, dtype: np.dtype, collectives: str) -> None:
        self.comm, self.bounds, self.collectives = comm, bounds, collectives
        self.rank, self.world_size = comm.Get_rank(), comm.Get_size()
        self.shard = bounds[self.rank]
        start, stop = self.shard
        self._counts = [b - a for a, b in bounds]
        self._displs = [a for a, _ in bounds]
        self._half = np.dtype(dtype).itemsize == 2
        self._type = MPI.UINT16_T if self._half else _MPI_TYPES[np.dtype(dtype)]
        # The summed gradient of this rank's shard, in the math type (one rank: the
        # gradient itself, no copy).
        self._sum_type = math_type(np.dtype(dtype))
        self._reduced = zeros_at(stop - start if self.world_size > 1 else 0, self._sum_type,
                                 GRAD_PAGE_OFFSET)
        self._scratch: Optional[np.ndarray] = None  # of the reduce-scatter

    @property
    def nbytes(self) -> int:
        """Bytes of the buffers kept between steps."""
        return self._reduced.nbytes + (0 if self._scratch is None else self._scratch.nbytes)

    def broadcast(self, block: np.ndarray) -> None:
        """Rank 0's ``block`` to every rank, in place."""
        if self.world_size > 1:
            self.comm.Bcast([_words(block), self._type], root=0)

    def reduce(self, grad: np.ndarray) -> np.ndarray:
        """This rank's shard of the sum of every rank's ``grad`` (in float32 for a 16-bit
        gradient)."""
        start, stop = self.shard
        if self.world_size == 1:
            return grad[start:stop]
        if self.collectives == "mpi":
            if self._half:  # MPI cannot sum 16-bit floats: widen the whole gradient first
                if self._scratch is None or self._scratch.size != grad.size:
                    self._scratch = np.empty(grad.size, FLOAT32)
                self._scratch[...] = _widened(grad)
                grad = self._scratch
            self.comm.Reduce_scatter([grad, _MPI_TYPES[self._sum_type]],
                                     [self._reduced, _MPI_TYPES[self._sum_type]],
                                     self._counts, MPI.SUM)
        else:
            self._reduce_in_rank_order(grad)
        return self._reduced

    def _reduce_in_rank_order(self, grad: np.ndarray) -> None:
        """Receive every rank's slice of this shard (Alltoallv, in rounds through bounded
        scratch memory) and add them in rank order: ((g_0 + g_1) + g_2) + ...

        (Measured here against MPICH's Reduce_scatter, 2 and 3 ranks on one machine, 2^20
        to 2^24 float32: 0.5-1.15x its time, 0.7-0.93x from 2^22 on.)"""
        p, me = self.world_size, self.rank
        starts = np.array(self._displs, np.int64)
        lengths = np.array(self._counts, np.int64)
        longest = int(lengths.max())
        # elements per peer and round: the scratch budget's share, no more than a shard
        block = max(1, min(longest, max(1024, ORDERED_SCRATCH_BYTES // (p * grad.itemsize))))
        if self._scratch is None or self._scratch.size != p * block:
            self._scratch = np.empty(p * block, grad.dtype)
        scratch = self._scratch
        my_start = self.shard[0]
        for offset in range(0, longest, block):
            take = np.clip(lengths - offset, 0, block)
            n = int(take[me])
            send_counts, recv_counts = take.copy(), np.full(p, n, np.int64)
            send_counts[me] = recv_counts[me] = 0  # this rank's own slice is read in place
            send_displs = np.minimum(starts + offset, grad.size)
            recv_displs = np.arange(p, dtype=np.int64) * n
            self.comm.Alltoallv(
                [_words(grad), (send_counts.tolist(), send_displs.tolist()), self._type],
                [_words(scratch), (recv_counts.tolist(), recv_displs.tolist()), self._type])
            rows = [grad[my_start + offset:my_start + offset + n] if q == me
                    else scratch[q * n:(q + 1) * n] for q in range(p)]
            if self._half:  # summed in float32: ((g_0 + g_1) + g_2) + ..., each widened exactly
                rows = [_widened(row) for row in rows]
            out = self._reduced[offset:offset + n]
            np.add(rows[0], rows[1], out=out)
            for row in rows[2:]:
                np.add(out, row, out=out)

    def gather(self, block: np.ndarray) -> None:
        """Every rank's shard of ``block`` to every rank, in place."""
        p, me = self.world_size, self.rank
        if p == 1:
            return
        block = _words(block)
        if self.collectives == "mpi":
            self.comm.Allgatherv(MPI.IN_PLACE, [block, (self._counts, self._displs), self._type])
            return
        # A ring: in step k each rank passes on the shard it got in step k - 1 (its own first).
        right, left = (me + 1) % p, (me - 1) % p
        for k in range(p - 1):
            send_start, send_stop = self.bounds[(me - k) % p]
            recv_start, recv_stop = self.bounds[(me - k - 1) % p]
            self.comm.Sendrecv([block[send_start:send_stop], self._type], dest=right,
                               recvbuf=[block[recv_start:recv_stop], self._type], source=left)
