"""Index arithmetic is 64-bit: tensors of more than 2**31 (and 2**32) elements.

Without 16 GiB of RAM per buffer: the chunk table is built from sizes alone, and the
kernels run the last chunks of a 2**32 + 8192-element tensor that lives in a sparse
anonymous memory map (only the pages a test touches are ever allocated). The offsets are
chosen so that an index truncated to 32 bits lands *inside* the mapping, near its start:
the test then fails on a value check instead of crashing (a crash would fail it too).
"""

import mmap
import sys

import numpy as np
import pytest

from fastadam import _kernels
from fastadam._validation import check_hyperparameters

from reference import adam_reference

CHUNK = _kernels.build_info()["chunk_elements"]
HUGE = 2**32 + 2 * CHUNK  # float32: 16 GiB + 32 KiB of address space per buffer
# Linux: do not reserve swap for the mapping (Python < 3.12 lacks the constant).
NORESERVE = getattr(mmap, "MAP_NORESERVE", 0x4000) if sys.platform.startswith("linux") else 0


def expected_rows(sizes):
    rows = []
    for tensor, size in enumerate(sizes):
        for start in range(0, size, CHUNK):
            rows.append((tensor, start, min(start + CHUNK, size)))
    return rows


def test_chunk_table_of_small_tensors_matches_the_definition():
    sizes = [0, 1, CHUNK - 1, CHUNK, CHUNK + 1, 3 * CHUNK + 17, 0]
    assert _kernels.chunk_table(sizes).tolist() == [list(r) for r in expected_rows(sizes)]


def test_chunk_table_beyond_2_to_the_31_and_32_elements():
    sizes = [2**31 + 5, 7, 2**32 + CHUNK + 3]
    table = _kernels.chunk_table(sizes)
    counts = [-(-size // CHUNK) for size in sizes]
    assert table.shape == (sum(counts), 3)
    bounds = np.cumsum([0] + counts)
    for tensor, size in enumerate(sizes):
        rows = table[bounds[tensor]:bounds[tensor + 1]]
        assert (rows[:, 0] == tensor).all()
        # every chunk starts where the previous one stopped: the tensor is covered once
        np.testing.assert_array_equal(rows[:, 1], np.arange(0, size, CHUNK, dtype=np.int64))
        np.testing.assert_array_equal(rows[:-1, 2], rows[1:, 1])
        assert rows[-1, 2] == size and (rows[:, 2] - rows[:, 1] <= CHUNK).all()


@pytest.fixture(scope="module")
def sparse_buffers():
    """param, grad, exp_avg, exp_avg_sq: float32 arrays of HUGE elements, each in its own
    anonymous mapping whose untouched pages cost no memory."""
    if sys.platform == "win32":
        pytest.skip("Windows commits anonymous mappings up front")
    try:
        maps = [mmap.mmap(-1, HUGE * 4, flags=mmap.MAP_PRIVATE | NORESERVE) for _ in range(4)]
    except (OSError, OverflowError, ValueError) as exc:  # 32-bit, strict overcommit, limits
        pytest.skip(f"no 16 GiB sparse mapping here: {exc}")
    # No explicit close: the arrays keep their mappings alive, and unmap them when freed.
    return [np.frombuffer(m, np.float32) for m in maps]


def test_chunks_past_2_to_the_32_elements_are_updated_in_place(sparse_buffers):
    param, grad, exp_avg, exp_avg_sq = sparse_buffers
    assert param.size == HUGE
    first = 2**32 - CHUNK  # one chunk below 2**32, two above
    rng = np.random.default_rng(3)
    values = {}
    for name, array in zip(("param", "grad", "exp_avg", "exp_avg_sq"), sparse_buffers):
        tail = rng.random(HUGE - first, dtype=np.float32)
        array[first:] = tail
        values[name] = tail
        array[:4 * CHUNK] = -7.0  # where a 32-bit index would land (2**32 -> 0)
    hp = check_hyperparameters(lr=0.01, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0,
                               decoupled_weight_decay=False, amsgrad=False, maximize=False,
                               eps_hat=False, eps_root=0.0)

    n_chunks, ran = _kernels.run_chunks_from(first, param, grad, exp_avg, exp_avg_sq, None,
                                             hp, 4.0, 1.0, 2)

    assert n_chunks == -(-HUGE // CHUNK)
    assert ran == [(first, 2**32), (2**32, 2**32 + CHUNK), (2**32 + CHUNK, HUGE)]
    expected = adam_reference(values["param"], values["grad"], values["exp_avg"],
                              values["exp_avg_sq"], step=4, lr=0.01, dtype=np.float32)
    for array, want in zip((param, exp_avg, exp_avg_sq), expected):
        np.testing.assert_array_equal(array[first:], want)
    np.testing.assert_array_equal(grad[first:], values["grad"])
    for array in sparse_buffers:
        assert (array[:4 * CHUNK] == -7.0).all(), "an index wrapped around 2**32"
        assert (array[first - CHUNK:first] == 0.0).all(), "a chunk before `first` was run"
