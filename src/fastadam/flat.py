"""FlatParams: many parameters in one contiguous block, updated as one stream.

A model's parameters allocated one by one are many short, scattered buffers: the
optimizer runs one short loop per tensor. FlatParams allocates them back to back in ONE
64-byte-aligned block (and their gradients in a second block with the same layout) and
hands out shaped views. fastadam.Adam allocates each group's state the same way, and when
a group's params and a step's grads lie back to back it updates them as one tensor.
"""

from __future__ import annotations

import numbers
from typing import Any, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np

from fastadam._memory import zeros_at
from fastadam._validation import check_element_dtype, check_sequence

Shape = Union[int, Sequence[int]]
# Params at the start of a page, grads 512 bytes in: apart from each other and from the
# optimizer's state offsets (fastadam._memory.STATE_PAGE_OFFSETS), against 4K aliasing.
PARAM_PAGE_OFFSET = 0
GRAD_PAGE_OFFSET = 512


def _check_shape(shape: Shape, name: str) -> Tuple[int, ...]:
    dims: Any = (shape,) if isinstance(shape, numbers.Integral) else shape
    try:
        dims = tuple(dims)
    except TypeError:
        raise TypeError(f"{name} must be an int or a sequence of ints, got {type(shape).__name__}") from None
    for d in dims:
        if isinstance(d, (bool, np.bool_)) or not isinstance(d, numbers.Integral):
            raise TypeError(f"{name} must be an int or a sequence of ints, got {shape!r}")
        if d < 0:
            raise ValueError(f"{name} must have non-negative dimensions, got {shape!r}")
    return tuple(int(d) for d in dims)


class FlatParams:
    """Parameters (``params``) and gradients (``grads``) as views of two flat blocks.

    Parameters
    ----------
    shapes : sequence of int or tuple
        One shape per parameter, in order.
    dtype : float32, float64, bfloat16 or float16
        The element type of every parameter ("bfloat16": ml_dtypes' bfloat16 when it is
        installed; 16-bit params are for master weights: ``Adam(master_weights=True)``,
        ``fastadam.distributed.ShardedAdam``).

    Attributes
    ----------
    params, grads : list of numpy.ndarray
        Zero-initialised views, shaped as requested; write into them in place (``w[...] =
        ...``, ``np.matmul(..., out=g)``): rebinding a name does not change the block.
    data, grad_data : numpy.ndarray
        The two 1-D blocks (64-byte aligned).

    Examples
    --------
    >>> flat = FlatParams([(784, 128), 128, (128, 10), 10])
    >>> opt = fastadam.Adam(flat.params)              # doctest: +SKIP
    >>> ... fill flat.grads ...; opt.step(flat.grads) # one stream for the whole model
    """

    def __init__(self, shapes: Sequence[Shape], dtype: Union[str, np.dtype, type] = np.float32):
        shapes = check_sequence(shapes, "shapes", "shapes")
        self.shapes: List[Tuple[int, ...]] = [_check_shape(s, f"shapes[{i}]") for i, s in enumerate(shapes)]
        self.dtype = check_element_dtype(dtype)
        sizes = [int(np.prod(s, dtype=np.int64)) for s in self.shapes]
        total = sum(sizes)
        self.data = zeros_at(total, self.dtype, PARAM_PAGE_OFFSET)
        self.grad_data = zeros_at(total, self.dtype, GRAD_PAGE_OFFSET)
        offsets = np.concatenate([[0], np.cumsum(sizes, dtype=np.int64)]).tolist()
        self.params = [self.data[a:b].reshape(s) for a, b, s in zip(offsets, offsets[1:], self.shapes)]
        self.grads = [self.grad_data[a:b].reshape(s) for a, b, s in zip(offsets, offsets[1:], self.shapes)]

    @classmethod
    def from_arrays(cls, arrays: Sequence[np.ndarray], dtype: Optional[Union[str, np.dtype, type]] = None) -> "FlatParams":
        """A FlatParams holding copies of ``arrays`` (dtype: theirs, or the one given)."""
        arrays = [np.asarray(a) for a in check_sequence(arrays, "arrays", "arrays")]
        if dtype is None:
            dtype = arrays[0].dtype if arrays else np.float32
        flat = cls([a.shape for a in arrays], dtype)
        for view, array in zip(flat.params, arrays):
            view[...] = array
        return flat

    def zero_grad(self) -> None:
        """Set every gradient to zero (one memset of the gradient block)."""
        self.grad_data.fill(0)

    def __len__(self) -> int:
        return len(self.params)

    def __iter__(self) -> Iterator[np.ndarray]:
        return iter(self.params)

    def __repr__(self) -> str:
        return f"FlatParams({len(self.shapes)} tensors, {self.data.size} elements, {self.dtype.name})"
