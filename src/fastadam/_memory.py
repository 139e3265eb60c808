"""Allocation of optimizer-owned buffers: zeroed, 64-byte aligned, at chosen page offsets.

Why page offsets: large NumPy (and PyTorch) arrays each get their own mmap, so they all
start at the same offset within a 4 KiB page. In a loop that streams param, grad, m and v,
loads and stores then share their low 12 address bits and the CPU falsely stalls loads
behind unrelated stores ("4K aliasing": docs/guide/performance.md measured 10-20% lost, up to 45% at 2^22
elements). fastadam places each state buffer of its own at a different offset (STATE_PAGE_OFFSETS)
away from where NumPy puts user buffers (offset 16, just past the allocator's header).
"""

from __future__ import annotations

import numpy as np

PAGE = 4096
ALIGNMENT = 64  # a cache line, and the widest vector (AVX-512)
# exp_avg, exp_avg_sq, max_exp_avg_sq: 1 KiB apart from each other and from offset 0-63.
STATE_PAGE_OFFSETS = {"exp_avg": 1024, "exp_avg_sq": 2048, "max_exp_avg_sq": 3072, "master_param": 512}


def zeros_at(size: int, dtype: np.dtype, page_offset: int = 0) -> np.ndarray:
    """A zeroed 1-D array whose data starts ``page_offset`` bytes into a 4 KiB page
    (``page_offset`` a multiple of 64, so the array is also 64-byte aligned)."""
    dtype = np.dtype(dtype)
    if page_offset % ALIGNMENT or not 0 <= page_offset < PAGE:
        raise ValueError(f"page_offset must be a multiple of {ALIGNMENT} in [0, {PAGE}), got {page_offset}")
    nbytes = size * dtype.itemsize
    raw = np.zeros(nbytes + PAGE, np.uint8)  # calloc: untouched pages cost nothing
    start = (page_offset - raw.ctypes.data) % PAGE
    return raw[start:start + nbytes].view(dtype)
