"""Duplicate row indices of a row-sparse gradient, summed before the update.

A lazy Adam update is not linear in the gradient, so a row given twice must be updated
once with the sum of its gradient rows (as TensorFlow's LazyAdam and PyTorch's SparseAdam
do: coalesce first). Already-unique rows, sorted or not, are passed through untouched:
each row's update is independent of the others, so their order does not matter.
"""

from __future__ import annotations

from typing import Sequence, Tuple

import numpy as np


def sum_duplicate_rows(rows: np.ndarray, values: np.ndarray, row_size: int) -> Tuple[np.ndarray, np.ndarray]:
    """(unique rows, their gradient rows) for validated int64 ``rows`` and the 1-D
    ``values`` of len(rows) rows of ``row_size`` elements.

    With duplicates, the rows come back sorted, and each one's gradient is the sum of
    its gradient rows in the element dtype, added strictly left to right in the order
    they appear in ``rows``: deterministic, independent of the thread count. (Not
    np.add.reduceat: it does not add a segment left to right.)
    """
    if rows.size < 2 or bool(np.all(rows[1:] > rows[:-1])):  # strictly increasing: unique
        return rows, values
    order = np.argsort(rows, kind="stable")
    ordered = rows[order]
    first = np.concatenate(([True], ordered[1:] != ordered[:-1]))
    if first.all():  # unique, merely unsorted
        return rows, values
    grads = values.reshape(rows.size, row_size)[order]
    summed = grads[first]  # each row's first gradient row (a copy), then the others added to it
    group = np.cumsum(first) - 1
    # np.add.at is unbuffered and applies the additions in index order
    np.add.at(summed, group[~first], grads[~first])
    return ordered[first], summed.reshape(-1)


def updated_elements(grads: Sequence, params: Sequence[np.ndarray], total: int) -> int:
    """How many elements an optimizer step with these checked gradients updates (of
    ``total`` in its params): a row-sparse gradient counts only its rows. Decides the
    step's team size (fastadam._threads.threads_for)."""
    return total - sum(params[i].size - grad[1].size
                       for i, grad in enumerate(grads) if type(grad) is tuple)
