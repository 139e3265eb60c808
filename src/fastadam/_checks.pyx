# cython: language_level=3, boundscheck=False, wraparound=False, initializedcheck=False
# cython: cdivision=True, nonecheck=False, embedsignature=True
"""The compiled part of fastadam._validation: checks over many buffers at once.

Address arithmetic on NumPy arrays, in C because a model has thousands of tensors and
these run on every step: the memory ranges of a set of arrays (sorted, for overlap tests
in O(log n)), the first pair that overlaps, and the one-pass scan that tells whether a
step's gradients are all plain conforming arrays. Nothing here writes to a buffer or
calls into the kernels: like fastadam._validation, this is a leaf.
"""

from libc.stdint cimport int64_t, uint64_t
from libc.stdlib cimport free, malloc, qsort

cimport numpy as cnp
import numpy

cnp.import_array()

cdef extern from "numpy/arrayobject.h":
    enum: NPY_USERDEF   # the first type number NumPy gives a user-defined dtype


cdef struct Range:
    uint64_t start
    uint64_t stop
    uint64_t index


cdef int _by_start(const void* a, const void* b) noexcept nogil:
    cdef uint64_t x = (<const Range*>a).start, y = (<const Range*>b).start
    return -1 if x < y else (1 if x > y else 0)


cdef inline Range _range(object array, Py_ssize_t index) except *:
    cdef Range r
    r.start = <uint64_t><size_t>cnp.PyArray_DATA(<cnp.ndarray?>array)
    r.stop = r.start + <uint64_t>cnp.PyArray_NBYTES(<cnp.ndarray>array)
    r.index = <uint64_t>index
    return r


def sorted_ranges(list arrays):
    """The memory ranges of the non-empty contiguous ndarrays ``arrays``, sorted by
    start: an (n, 3) uint64 array of rows (start, stop, index into ``arrays``)."""
    cdef Py_ssize_t n = len(arrays), i, k = 0
    cdef Range* ranges = <Range*>malloc(max(n, 1) * sizeof(Range))
    cdef cnp.ndarray result
    if ranges == NULL:
        raise MemoryError()
    try:
        for i in range(n):
            ranges[k] = _range(arrays[i], i)
            if ranges[k].stop > ranges[k].start:
                k += 1
        qsort(ranges, k, sizeof(Range), _by_start)
        result = numpy.empty((k, 3), numpy.uint64)
        for i in range(k):
            (<uint64_t*>cnp.PyArray_GETPTR2(result, i, 0))[0] = ranges[i].start
            (<uint64_t*>cnp.PyArray_GETPTR2(result, i, 1))[0] = ranges[i].stop
            (<uint64_t*>cnp.PyArray_GETPTR2(result, i, 2))[0] = ranges[i].index
        return result
    finally:
        free(ranges)


def first_overlap(list arrays):
    """(i, j), i < j, of two contiguous ndarrays whose memory overlaps, or None.
    O(n log n): the ranges are sorted once."""
    cdef const uint64_t[:, ::1] r = sorted_ranges(arrays)
    cdef Py_ssize_t k, widest = 0
    for k in range(1, r.shape[0]):
        if r[k, 0] < r[widest, 1]:
            a, b = r[widest, 2], r[k, 2]
            return (int(min(a, b)), int(max(a, b)))
        if r[k, 1] > r[widest, 1]:
            widest = k
    return None


cdef bint _overlaps(const uint64_t[:, ::1] ranges, uint64_t start, uint64_t stop) noexcept:
    """Does [start, stop) overlap one of the sorted, disjoint ranges? (binary search)"""
    cdef Py_ssize_t lo = 0, hi = ranges.shape[0], mid
    if stop == start:
        return False
    while lo < hi:  # the first range starting at or after stop
        mid = (lo + hi) // 2
        if ranges[mid, 0] < stop:
            lo = mid + 1
        else:
            hi = mid
    return lo > 0 and ranges[lo - 1, 1] > start


def overlaps(const uint64_t[:, ::1] ranges, array):
    """Does the contiguous ndarray ``array`` overlap any of ``ranges`` (sorted_ranges of
    arrays that do not overlap each other)?"""
    cdef Range r = _range(array, 0)
    return _overlaps(ranges, r.start, r.stop)


def first_nonconforming(list grads, list params, const uint64_t[:, ::1] written,
                        bint allow_none=False):
    """Index of the first gradient that is not a C-contiguous, aligned, native-order
    ndarray of its param's dtype and shape clear of every ``written`` range (nor None,
    with ``allow_none``); -1 if there is none. The common case of a step, decided in one
    C loop."""
    cdef Py_ssize_t i, n = len(params)
    cdef cnp.ndarray g, p
    cdef Range r
    if len(grads) != n:
        return 0
    for i in range(n):
        obj = grads[i]
        if obj is None and allow_none:
            continue
        if type(obj) is not cnp.ndarray:
            return i
        g = <cnp.ndarray>obj
        p = <cnp.ndarray?>params[i]
        if (cnp.PyArray_TYPE(g) != cnp.PyArray_TYPE(p)
                # bfloat16 is a user-defined (ml_dtypes) or a structured type: those type
                # numbers are shared, so compare the types themselves
                or (cnp.PyArray_TYPE(p) >= cnp.NPY_VOID
                    and g.dtype != p.dtype)
                or not cnp.PyArray_SAMESHAPE(g, p)
                or not cnp.PyArray_IS_C_CONTIGUOUS(g) or not cnp.PyArray_ISALIGNED(g)
                or not cnp.PyArray_ISNOTSWAPPED(g)):
            return i
        r = _range(g, i)
        if _overlaps(written, r.start, r.stop):
            return i
    return -1


cdef bint _plain(object obj, int dtype, Py_ssize_t size, bint writable) noexcept:
    """Is ``obj`` an exact ndarray of this dtype and size, native, C-contiguous, aligned,
    and writable if asked? (What as_array would return unchanged.)"""
    cdef cnp.ndarray a
    if type(obj) is not cnp.ndarray:
        return False
    a = <cnp.ndarray>obj
    return (cnp.PyArray_TYPE(a) == dtype and cnp.PyArray_SIZE(a) == size
            and cnp.PyArray_IS_C_CONTIGUOUS(a) and cnp.PyArray_ISALIGNED(a)
            and cnp.PyArray_ISNOTSWAPPED(a) and (not writable or cnp.PyArray_ISWRITEABLE(a)))


cdef int _bfloat16_type = -1   # ml_dtypes' bfloat16 type number, once an array of it is seen


cdef bint _stored_type(cnp.ndarray a, int dtype) except -1:
    """Is ``dtype``, ``a``'s type number, one the kernels store? float32, float64,
    float16, or ml_dtypes' bfloat16: a user-defined type, whose number NumPy assigns when
    ml_dtypes registers it (recognized as fastadam._validation.is_bfloat16 does, once)."""
    global _bfloat16_type
    if dtype == cnp.NPY_FLOAT or dtype == cnp.NPY_DOUBLE or dtype == cnp.NPY_FLOAT16:
        return True
    if dtype == _bfloat16_type:
        return True
    if dtype >= NPY_USERDEF:
        descr = a.dtype
        if descr.kind == "V" and descr.itemsize == 2 and descr.name == "bfloat16":
            _bfloat16_type = dtype
            return True
    return False


def plain_buffers(param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq):
    """True when adam_step's buffers need no coercion and pass every check: exact 1-D
    or N-d ndarrays of one native dtype the kernels store (float32, float64, float16,
    ml_dtypes' bfloat16) and one size, C-contiguous, aligned, writable (grad excepted),
    no two overlapping. False sends the call through the general checks of
    fastadam._validation, which own the messages. The common case of a call, decided
    in C."""
    cdef cnp.ndarray p
    cdef int dtype
    cdef Py_ssize_t size, i, j, n = 4 if max_exp_avg_sq is None else 5
    cdef Range r[5]
    if type(param) is not cnp.ndarray:
        return False
    p = <cnp.ndarray>param
    dtype = cnp.PyArray_TYPE(p)
    if not _stored_type(p, dtype):
        return False
    size = cnp.PyArray_SIZE(p)
    if not (_plain(param, dtype, size, True) and _plain(grad, dtype, size, False)
            and _plain(exp_avg, dtype, size, True) and _plain(exp_avg_sq, dtype, size, True)
            and (max_exp_avg_sq is None or _plain(max_exp_avg_sq, dtype, size, True))):
        return False
    r[0], r[1] = _range(param, 0), _range(grad, 1)
    r[2], r[3] = _range(exp_avg, 2), _range(exp_avg_sq, 3)
    if n == 5:
        r[4] = _range(max_exp_avg_sq, 4)
    for i in range(n):
        for j in range(i + 1, n):
            if r[i].start < r[j].stop and r[j].start < r[i].stop and size > 0:
                return False
    return True


def edited_counts(const float[::1] shown, const int64_t[::1] counts):
    """The indices where ``shown`` (float32 copies of step counts, which a front end lets
    users edit in place: torch's ``state["step"]``) differs from ``counts`` converted to
    float32 as NumPy converts (NaN differs from everything). One C pass: it runs on every
    step, and edits are rare."""
    cdef Py_ssize_t i, n = counts.shape[0]
    if shown.shape[0] != n:
        raise ValueError(f"shown has {shown.shape[0]} counts, counts has {n}")
    edited = []
    for i in range(n):
        if shown[i] != <float>counts[i]:
            edited.append(i)
    return edited


# The values of a param group that make its hyperparameter record, as remembered_group
# reads them (betas' two items are compared too: a list's can change in place).
_GROUP_KEYS = ("lr", "betas", "eps", "weight_decay", "decoupled_weight_decay", "amsgrad",
               "maximize", "eps_hat", "eps_root", "numerics")


cdef inline bint _immutable_scalar(object value) noexcept:
    return (type(value) is float or type(value) is bool or type(value) is int
            or type(value) is str)


cdef class GroupMemo:
    """One param group's record, kept with the very objects its values were when it was
    checked. While the group (a dict) holds those same objects, each an immutable
    float, int, bool or str (betas a pair of them), the record stands: a training loop's
    groups hold the same objects step after step, and comparing them is one C pass
    instead of reading and checking every value again. Holding the objects keeps them
    alive, so an identity never matches a new object at a freed one's address."""
    # (the values, betas' items appended and _MISSING for an absent key; the element
    # types; the record), kept and replaced as one; None (as Cython starts it): nothing
    cdef tuple kept

    def lookup(self, group, dtypes):
        """The record kept for ``group`` and ``dtypes`` if it holds the same objects, else None."""
        cdef Py_ssize_t k
        cdef tuple kept = self.kept
        if kept is None or dtypes is not kept[1] or type(group) is not dict:
            return None
        cdef list seen = kept[0]
        for k in range(len(_GROUP_KEYS)):
            if (<dict>group).get(_GROUP_KEYS[k], _MISSING) is not seen[k]:
                return None
        betas = seen[1]
        if type(betas) is list and (len(betas) != 2 or betas[0] is not seen[len(_GROUP_KEYS)]
                                    or betas[1] is not seen[len(_GROUP_KEYS) + 1]):
            return None
        return kept[2]

    def keep(self, group, dtypes, record):
        """Keep ``record``, checked for ``group``'s values now, for the next lookups (when
        those values are plain immutable objects; otherwise forget any record)."""
        self.kept = None
        if type(group) is not dict:
            return
        seen = [(<dict>group).get(key, _MISSING) for key in _GROUP_KEYS]
        betas = seen[1]
        if type(betas) is not tuple and type(betas) is not list or len(betas) != 2:
            return
        seen += [betas[0], betas[1]]
        for k, value in enumerate(seen):
            if k != 1 and value is not _MISSING and not _immutable_scalar(value):
                return
        self.kept = (seen, dtypes, record)


_MISSING = object()
