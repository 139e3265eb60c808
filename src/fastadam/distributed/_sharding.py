"""How :mod:`fastadam.distributed` cuts a flat block into one shard per rank (no MPI here)."""

from __future__ import annotations

from typing import List, Tuple

import numpy as np

__all__ = ["Bounds", "shard_bounds"]

Bounds = List[Tuple[int, int]]


def shard_bounds(total: int, world_size: int, align: int = 1) -> Bounds:
    """The ``(start, stop)`` of each rank's shard of ``total`` elements (see
    :mod:`fastadam.distributed`): contiguous, in rank order, covering ``[0, total)``; the
    starts are multiples of ``align``; shard sizes differ by at most ``align`` elements,
    except that the last non-empty shard may be shorter and trailing shards may be empty."""
    for value, name, low in ((total, "total", 0), (world_size, "world_size", 1), (align, "align", 1)):
        if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
            raise TypeError(f"{name} must be an integer, got {type(value).__name__}")
        if value < low:
            raise ValueError(f"{name} must be >= {low}, got {value}")
    total, world_size, align = int(total), int(world_size), int(align)
    blocks = -(-total // align)
    base, extra = divmod(blocks, world_size)
    bounds = []
    for rank in range(world_size):
        start = align * (rank * base + min(rank, extra))
        stop = start + align * (base + (rank < extra))
        bounds.append((min(start, total), min(stop, total)))
    return bounds
