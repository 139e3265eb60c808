# cython: language_level=3, boundscheck=False, wraparound=False, initializedcheck=False
# cython: cdivision=True, nonecheck=False, embedsignature=True
"""fastadam.torch's per-step work over its parameters, in one compiled loop.

A step of ``fastadam.torch.Adam`` must find every parameter's gradient, check it (a
dense CPU tensor of the parameter's dtype, shape and strides), check that the parameter
still lives where the engine holds it and that ``opt.state`` still holds the tensors
fastadam put there, and take the gradient's address. In Python that is several
microseconds per tensor; here it is a handful of attribute calls on each tensor, with
the comparisons in C. Built without torch: tensors are reached through their Python
methods, so any torch version works.

Anything this loop does not recognise (a sparse or foreign gradient, a parameter whose
storage moved, state replaced by the user) stops it; ``fastadam.torch`` then takes its
general path for that step, which handles or refuses every case with a clear error.
"""

from cpython.dict cimport PyDict_GetItem
from cpython.object cimport PyObject
from libc.stdint cimport int64_t

cimport numpy as cnp

cnp.import_array()

# The address handed over for a gradient without elements: its data_ptr() is 0, which
# the engine reads as "no gradient", yet its step counts (as torch's does; FSDP2 gives
# the ranks past a small parameter's last row empty shards). Nothing is read from it.
cdef double _empty_grad[8]


cdef class Gather:
    """The cached facts of the engine's tensors, in engine order: each parameter, its
    address, dtype, shape and strides, its element count, and the ``opt.state`` entry
    fastadam published for it (or None before its first step)."""
    cdef list params
    cdef list dtypes
    cdef list shapes
    cdef list strides
    cdef list published
    cdef int64_t[::1] addresses
    cdef int64_t[::1] sizes
    cdef object tensor_type
    cdef tuple own_keys

    def __init__(self, list params, list dtypes, list shapes, list strides, addresses, sizes,
                 tensor_type, tuple own_keys=()):
        # own_keys: every key fastadam may publish in an entry; an entry may hold other
        # keys besides (other code's: timm's Lookahead keeps its slow weights there), but
        # none of these that was not published.
        self.own_keys = own_keys
        self.params = params
        self.dtypes = dtypes
        self.shapes = shapes
        self.strides = strides
        self.addresses = addresses
        self.sizes = sizes
        self.tensor_type = tensor_type
        self.published = [None] * len(params)

    def publish(self, Py_ssize_t i, tuple entry):
        """Remember the state fastadam put into ``opt.state`` for tensor ``i``: (the
        dict, then the tensors it holds, in the order the dict's keys were given)."""
        self.published[i] = entry

    def run(self, int64_t[::1] out, list grads=None):
        """Fill ``out[i]`` with tensor i's gradient address (0 without a gradient): its
        ``.grad``, or ``grads[i]`` when a list is given (Keras hands gradients over).

        Returns (index of the first tensor this loop cannot take, or -1; the elements
        of the tensors with a gradient). ``opt.state`` itself is watched by the caller
        (its entries are never added, removed or replaced unseen); here each published
        per-parameter dict is checked to still hold fastadam's tensors."""
        cdef Py_ssize_t i, n = len(self.params)
        cdef Py_ssize_t active = 0
        if grads is not None and len(grads) != n:
            return 0, 0
        for i in range(n):
            p = self.params[i]
            g = p.grad if grads is None else grads[i]
            if g is None:
                out[i] = 0
                continue
            if type(g) is not self.tensor_type:
                return i, active
            try:
                if (<int64_t>p.data_ptr() != self.addresses[i] or g.dtype is not self.dtypes[i]
                        or not g.is_cpu or g.shape != self.shapes[i]
                        or g.stride() != self.strides[i]):
                    return i, active
                out[i] = g.data_ptr()
                if out[i] == 0:
                    out[i] = <int64_t><size_t>&_empty_grad[0]
            except Exception:  # a sparse gradient has no strides: the general path
                return i, active
            entry = self.published[i]
            if entry is not None and not _holds(entry, self.own_keys):
                return i, active
            active += self.sizes[i]
        return -1, active


cdef bint _holds(tuple entry, tuple own_keys) except -1:
    """Does the dict entry[0] still hold the tensors entry[2:] under the keys entry[1],
    and no key of own_keys besides them?"""
    cdef dict state = entry[0]
    cdef tuple keys = entry[1]
    cdef Py_ssize_t k
    cdef PyObject* value
    if len(state) != len(keys):
        if len(state) < len(keys):
            return False
        for key in own_keys:  # other code's keys are allowed; an own one not published is not
            if key not in keys and key in state:
                return False
    for k in range(len(keys)):
        value = PyDict_GetItem(state, keys[k])
        if value == NULL or <object>value is not entry[k + 2]:
            return False
    return True
