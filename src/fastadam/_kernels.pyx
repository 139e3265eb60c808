# cython: language_level=3, boundscheck=False, wraparound=False, initializedcheck=False
# cython: cdivision=True, nonecheck=False, embedsignature=True
"""Adam kernels: the bottom layer of fastadam.

Design (see DESIGN.md "Layers"):

* Everything here assumes validated input. fastadam._validation has already checked
  dtypes, element counts, contiguity, alignment, writability, overlap and every
  hyperparameter; nothing in this module raises for bad data, so a rejected call never
  reaches a write.
* One update is described by an ``AdamTensor`` record: raw pointers, a length, a dtype
  flag and the step's ``Coefficients`` (computed once, in double, by
  ``fill_coefficients``). ``run_tensors`` takes a table of them, cuts every tensor into
  fixed-size chunks and lets one OpenMP team work through the chunk table with the GIL
  released. ``adam_step`` is a table of one; the multi-tensor optimizer step reuses
  the same engine.
* Lazy sparse rows (``adam_step_rows``, row-sparse gradients in ``AdamTable``) reuse it
  too: a row of a C-contiguous tensor is a contiguous run of ``row_size`` elements, so a
  ``RowUpdate`` runs each given row through ``run_chunk`` exactly as a dense update of
  that row alone would (``run_rows``: one OpenMP team over the rows).
* The per-element loop is ``_update``. Every option of DESIGN.md (grad_scale/maximize,
  L2 or decoupled decay, the lerp branch, AMSGrad, the eps_root form) is a *compile-time*
  switch: a fused type of two empty tag structs, resolved with ``if Tag is On:`` by
  Cython, so each of the 2 x 32 specializations is straight-line arithmetic that the C
  compiler vectorizes (checked by .github/scripts/check_vectorization.py). The
  ``_by_*`` functions walk the run-time flags down to the right specialization once per
  chunk, never per element.
* Exactness: coefficients are computed in double and cast to the element type once per
  chunk; the loop performs exactly the operations of DESIGN.md in its order. The build
  uses -ffp-contract=off (no silent FMA), so the vector body and the scalar remainder
  round identically and results do not depend on the thread count or chunking.
  Options that are exact identities are folded instead of specialized: maximize is a
  sign on the gradient factor (x * -1 and x / -s are exact negations), "no weight decay"
  is the decoupled form with a factor of exactly 1, and the eps_hat form is the paper
  form with step_coef = -lr*sqrt(bc2)/bc1 and a divisor of exactly 1.
"""

from cpython.pycapsule cimport PyCapsule_GetPointer, PyCapsule_IsValid
from libc.math cimport pow, sqrt
from libc.stdint cimport INT64_MIN, int64_t
from libc.stdlib cimport calloc, free, malloc, qsort
from cython cimport floating
from cython.parallel cimport prange

cimport numpy as cnp
import numpy

from fastadam._adam_types cimport AdamTensor, Coefficients

cnp.import_array()

cdef extern from "_omp_shim.h" nogil:
    int omp_get_max_threads() noexcept
    int fa_team_size(int num_threads) noexcept
    int FA_OPENMP_ENABLED
    int FA_OPENMP_VERSION
    const char* FA_VECTOR_ISA
    const char* FA_COMPILER
    const char* FASTADAM_CFLAGS

# Elements per work unit of the OpenMP chunk table. A multiple of 64 so that every chunk
# starts with the same alignment as its tensor; large enough that the per-chunk cost
# (dispatch + loop prologue, tens of ns) is noise next to the ~3 us a float32 chunk takes,
# small enough that two threads already split an 8192-element tensor (with 16384, two
# threads gained nothing below 2^15 elements: one chunk, one busy thread).
# benchmarks/serial_cutoff.py measures it; the performance issue tunes it further.
cdef enum:
    CHUNK_ELEMENTS = 4096


cdef extern from "_cpu_features.h" nogil:
    int fa_cpu_has_x86_64_v3() noexcept
    int fa_cpu_has_x86_64_v4() noexcept


include "_adam_loops.pxi"


# --- which compiled loops run: the SIMD dispatch table ---------------------------------------
# Each level's loops live in their own extension module (this one: the baseline ISA;
# _kernels_avx2, _kernels_avx512), exported as function pointers. fastadam._simd chooses,
# once at import, one level for small tensors and one for large ones (see set_kernels).

ctypedef void (*RunChunk)(const AdamTensor*, Py_ssize_t, Py_ssize_t) noexcept nogil
ctypedef Py_ssize_t (*CountChunk)(const AdamTensor*, Py_ssize_t, Py_ssize_t) noexcept nogil

cdef RunChunk _run_small = run_chunk
cdef RunChunk _run_large = run_chunk
cdef CountChunk _count_small = count_nonfinite_chunk
cdef CountChunk _count_large = count_nonfinite_chunk
cdef Py_ssize_t _small_limit = 0      # tensors of at most this many elements are "small"


cdef inline RunChunk _runner(const AdamTensor* t) noexcept nogil:
    return _run_small if t.size <= _small_limit else _run_large


cdef inline CountChunk _counter(const AdamTensor* t) noexcept nogil:
    return _count_small if t.size <= _small_limit else _count_large


cdef void* _pointer(object capsule, const char* name) except NULL:
    if not PyCapsule_IsValid(capsule, name):
        raise TypeError(f"expected a {name.decode()} capsule from a fastadam kernel module")
    return PyCapsule_GetPointer(capsule, name)


def set_kernels(small, large, Py_ssize_t small_limit):
    """Route tensors of at most ``small_limit`` elements to the ``small`` loops and the
    others to ``large``; each a pair of capsules (run_chunk_capsule,
    count_nonfinite_capsule) of one kernel module (this one, _kernels_avx2 or
    _kernels_avx512). Not thread-safe: fastadam._simd calls it at import (tests and
    benchmarks between steps)."""
    global _run_small, _run_large, _count_small, _count_large, _small_limit
    cdef RunChunk run_small = <RunChunk>_pointer(small[0], b"fastadam.run_chunk")
    cdef CountChunk count_small = <CountChunk>_pointer(small[1], b"fastadam.count_nonfinite_chunk")
    cdef RunChunk run_large = <RunChunk>_pointer(large[0], b"fastadam.run_chunk")
    cdef CountChunk count_large = <CountChunk>_pointer(large[1], b"fastadam.count_nonfinite_chunk")
    # all four checked: switch together
    _run_small, _count_small = run_small, count_small
    _run_large, _count_large = run_large, count_large
    _small_limit = small_limit


def cpu_levels():
    """The SIMD levels this CPU and OS can run, widest last (cpuid and xgetbv)."""
    levels = ["baseline"]
    if fa_cpu_has_x86_64_v3():
        levels.append("avx2")
        if fa_cpu_has_x86_64_v4():
            levels.append("avx512")
    return levels


# --- coefficients and the chunk engine ------------------------------------------------

cdef void fill_coefficients(Coefficients* c, double step, double lr, double beta1,
                            double beta2, double eps, double weight_decay,
                            bint decoupled_weight_decay, bint amsgrad, bint maximize,
                            bint eps_hat, double eps_root, double grad_scale) noexcept nogil:
    """DESIGN.md's per-step constants, in double precision, outside every loop."""
    cdef double bc1 = 1.0 - pow(beta1, step)
    cdef double bc2 = 1.0 - pow(beta2, step)
    cdef double r2 = sqrt(bc2)
    cdef double sign = -1.0 if maximize else 1.0

    c.grad_scaled = grad_scale != 1.0
    c.grad_factor = sign * grad_scale if c.grad_scaled else sign
    c.l2_decay = weight_decay != 0.0 and not decoupled_weight_decay
    c.l2 = weight_decay if c.l2_decay else 0.0
    c.param_scale = 1.0 - lr * weight_decay if decoupled_weight_decay else 1.0
    c.w = 1.0 - beta1
    c.beta2 = beta2
    c.one_minus_beta2 = 1.0 - beta2
    c.eps = eps
    c.amsgrad = amsgrad
    c.root_form = eps_root > 0.0
    c.bc1 = bc1
    c.bc2 = bc2
    c.eps_root = eps_root
    if c.root_form:
        c.step_coef = lr
        c.denom_div = 1.0
    elif eps_hat:
        c.step_coef = -((lr * r2) / bc1)
        c.denom_div = 1.0
    else:
        c.step_coef = -(lr / bc1)
        c.denom_div = r2


cdef struct Chunk:
    Py_ssize_t tensor
    Py_ssize_t start
    Py_ssize_t stop


cdef Py_ssize_t _count_chunks(const AdamTensor* tensors, Py_ssize_t n_tensors) noexcept nogil:
    cdef Py_ssize_t t, n_chunks = 0
    for t in range(n_tensors):
        n_chunks += (tensors[t].size + CHUNK_ELEMENTS - 1) // CHUNK_ELEMENTS
    return n_chunks


cdef Chunk* _make_chunks(const AdamTensor* tensors, Py_ssize_t n_tensors,
                         Py_ssize_t n_chunks) noexcept nogil:
    """The chunk table (malloc'ed; NULL if out of memory), tensors in order."""
    cdef Chunk* chunks = <Chunk*>malloc(n_chunks * sizeof(Chunk))
    cdef Py_ssize_t t, k = 0, start
    if chunks == NULL:
        return NULL
    for t in range(n_tensors):
        start = 0
        while start < tensors[t].size:
            chunks[k].tensor = t
            chunks[k].start = start
            chunks[k].stop = min(start + CHUNK_ELEMENTS, tensors[t].size)
            start = chunks[k].stop
            k += 1
    return chunks


cdef int run_tensors(const AdamTensor* tensors, Py_ssize_t n_tensors,
                     int num_threads) noexcept nogil:
    """Update every tensor of the table; returns -1 (nothing written) if out of memory."""
    cdef Py_ssize_t n_chunks = _count_chunks(tensors, n_tensors)
    cdef Py_ssize_t t
    cdef Chunk* chunks
    if n_chunks == 0:
        return 0
    num_threads = <int>min(num_threads, n_chunks)  # an idle team member only costs
    if num_threads <= 1:
        # No parallel region at all: a team of one still pays OpenMP's fork/join.
        for t in range(n_tensors):
            _runner(&tensors[t])(&tensors[t], 0, tensors[t].size)
        return 0
    chunks = _make_chunks(tensors, n_tensors, n_chunks)
    if chunks == NULL:
        return -1
    _run_chunks(tensors, chunks, 0, n_chunks, num_threads)
    free(chunks)
    return 0


cdef void _run_chunks(const AdamTensor* tensors, const Chunk* chunks, Py_ssize_t first,
                      Py_ssize_t stop, int num_threads) noexcept nogil:
    """Chunks [first, stop) of the table, on one OpenMP team."""
    cdef Py_ssize_t k
    cdef const AdamTensor* tensor
    # schedule(static): each thread gets one contiguous run of chunks, so a single large
    # tensor is split into num_threads contiguous pieces.
    for k in prange(first, stop, schedule='static', num_threads=num_threads):
        tensor = &tensors[chunks[k].tensor]
        _runner(tensor)(tensor, chunks[k].start, chunks[k].stop)


cdef Py_ssize_t count_nonfinite_grads(const AdamTensor* tensors, Py_ssize_t n_tensors,
                                      int num_threads) noexcept nogil:
    """How many gradient elements of the table are NaN or Inf (-1: out of memory)."""
    cdef Py_ssize_t n_chunks = _count_chunks(tensors, n_tensors)
    cdef Py_ssize_t t, k, bad = 0
    cdef const AdamTensor* tensor
    cdef Chunk* chunks
    num_threads = <int>min(num_threads, n_chunks)
    if num_threads <= 1:
        for t in range(n_tensors):
            bad += _counter(&tensors[t])(&tensors[t], 0, tensors[t].size)
        return bad
    chunks = _make_chunks(tensors, n_tensors, n_chunks)
    if chunks == NULL:
        return -1
    for k in prange(n_chunks, schedule='static', num_threads=num_threads):
        tensor = &tensors[chunks[k].tensor]
        bad += _counter(tensor)(tensor, chunks[k].start, chunks[k].stop)
    free(chunks)
    return bad


# --- lazy sparse rows ------------------------------------------------------------------

cdef struct RowUpdate:
    # One tensor's lazy row update. ``tensor`` has the whole tensor's param and state
    # pointers and the step's coefficients; its grad points at n_rows gradient rows of
    # row_size elements, row i of them for tensor row rows[i] (unique and in range:
    # validated, duplicates already summed).
    AdamTensor tensor
    const int64_t* rows     # IN
    Py_ssize_t n_rows
    Py_ssize_t row_size


cdef extern from *:
    """
    #if defined(__GNUC__) || defined(__clang__)
    #define FA_PREFETCH_FOR_WRITE(p) __builtin_prefetch((p), 1, 3)
    #else
    #define FA_PREFETCH_FOR_WRITE(p) ((void)(p))
    #endif
    """
    void FA_PREFETCH_FOR_WRITE(const void* p) noexcept nogil

# Rows ahead whose param and state lines are prefetched. Rows of a large table are far
# apart, so each one starts with cache misses that the hardware prefetcher cannot foresee;
# asking for a later row's lines while this one is computed overlaps those misses. On a
# 1M x 64 float32 table, 9,000 random rows per call, one thread (CPU time, medians of 3
# runs of 15): 1.70-1.79 ms without, 1.41-1.49 ms 4 rows ahead, 1.44-1.56 ms 8 ahead.
cdef enum:
    PREFETCH_ROWS_AHEAD = 4
    PREFETCH_LINES = 8          # per buffer; a longer row streams, the hardware follows it


cdef inline void _prefetch_row(const RowUpdate* u, Py_ssize_t i) noexcept nogil:
    cdef size_t row_bytes = <size_t>u.row_size * (8 if u.tensor.is_double else 4)
    cdef size_t offset = <size_t>u.rows[i] * row_bytes
    cdef size_t line
    cdef size_t stop = min(row_bytes, <size_t>(PREFETCH_LINES * 64))
    for line in range(0, stop, 64):
        FA_PREFETCH_FOR_WRITE(u.tensor.param + offset + line)
        FA_PREFETCH_FOR_WRITE(u.tensor.exp_avg + offset + line)
        FA_PREFETCH_FOR_WRITE(u.tensor.exp_avg_sq + offset + line)
        if u.tensor.max_exp_avg_sq != NULL:
            FA_PREFETCH_FOR_WRITE(u.tensor.max_exp_avg_sq + offset + line)


cdef inline Py_ssize_t _pieces_per_row(const RowUpdate* u) noexcept nogil:
    """Work units per row: long rows are cut at CHUNK_ELEMENTS like dense tensors."""
    return (u.row_size + CHUNK_ELEMENTS - 1) // CHUNK_ELEMENTS


cdef void _run_row_piece(const RowUpdate* u, Py_ssize_t unit, Py_ssize_t pieces) noexcept nogil:
    """Work unit ``unit``: piece ``unit % pieces`` of gradient row ``unit // pieces``,
    through the loops a dense update of that one row would use (same record, same size,
    so the same SIMD level): bit-identical to adam_step on the row."""
    cdef Py_ssize_t i = unit // pieces
    cdef Py_ssize_t start = (unit % pieces) * CHUNK_ELEMENTS
    cdef size_t row_bytes = <size_t>u.row_size * (8 if u.tensor.is_double else 4)
    cdef size_t offset = <size_t>u.rows[i] * row_bytes
    cdef AdamTensor row = u.tensor
    if start == 0 and i + PREFETCH_ROWS_AHEAD < u.n_rows:
        _prefetch_row(u, i + PREFETCH_ROWS_AHEAD)
    row.size = u.row_size
    row.param = u.tensor.param + offset
    row.grad = u.tensor.grad + <size_t>i * row_bytes
    row.exp_avg = u.tensor.exp_avg + offset
    row.exp_avg_sq = u.tensor.exp_avg_sq + offset
    if u.tensor.max_exp_avg_sq != NULL:
        row.max_exp_avg_sq = u.tensor.max_exp_avg_sq + offset
    _runner(&row)(&row, start, min(start + CHUNK_ELEMENTS, u.row_size))


cdef void run_rows(const RowUpdate* u, int num_threads) noexcept nogil:
    """Update the given rows of one tensor (and only those); one OpenMP team over the
    rows. Rows are distinct, so no two work units touch the same memory."""
    cdef Py_ssize_t pieces = _pieces_per_row(u)
    cdef Py_ssize_t n_units = u.n_rows * pieces
    cdef Py_ssize_t k
    if n_units == 0:
        return
    num_threads = <int>min(num_threads, n_units)
    if num_threads <= 1:
        for k in range(n_units):
            _run_row_piece(u, k, pieces)
        return
    # schedule(static): each thread takes one contiguous run of the (sorted, when they
    # were summed) rows, so the threads' writes stay apart.
    for k in prange(n_units, schedule='static', num_threads=num_threads):
        _run_row_piece(u, k, pieces)


cdef Py_ssize_t count_nonfinite_rows(const RowUpdate* u, int num_threads) noexcept nogil:
    """How many elements of the update's gradient rows are NaN or Inf (-1: out of memory)."""
    cdef AdamTensor values = u.tensor
    values.size = u.n_rows * u.row_size
    return count_nonfinite_grads(&values, 1, num_threads)


def sum_sorted_rows(floating[:, ::1] out, const floating[:, ::1] values,
                    const int64_t[::1] order, const unsigned char[::1] first):
    """Row g of ``out``: the sum of the rows values[order[j]] of group g, added left to
    right in j; a group starts at each j with first[j] (first[0] is set). fastadam._rows
    sums duplicate gradient rows with it, in one pass. Validated shapes and indices."""
    cdef Py_ssize_t j, i, g = -1, n = out.shape[1]
    cdef floating* target = NULL
    cdef const floating* source
    if n == 0:
        return
    with nogil:
        for j in range(order.shape[0]):
            source = &values[order[j], 0]
            if first[j]:
                g += 1
                target = &out[g, 0]
                for i in range(n):
                    target[i] = source[i]
            else:
                for i in range(n):
                    target[i] = target[i] + source[i]


# --- memory ranges ---------------------------------------------------------------------------

cdef struct Interval:
    size_t start
    size_t stop
    Py_ssize_t index


cdef int _by_start(const void* a, const void* b) noexcept nogil:
    cdef size_t x = (<const Interval*>a).start, y = (<const Interval*>b).start
    return -1 if x < y else (1 if x > y else 0)


cdef inline Interval _interval(object array, Py_ssize_t index) except *:
    cdef Interval r
    r.start = <size_t>cnp.PyArray_DATA(<cnp.ndarray?>array)
    r.stop = r.start + <size_t>cnp.PyArray_NBYTES(<cnp.ndarray>array)
    r.index = index
    return r


cdef Interval* _sorted_intervals(list arrays, Py_ssize_t* n_out) except NULL:
    """Address ranges of the non-empty arrays, sorted by start (malloc'ed)."""
    cdef Py_ssize_t n = len(arrays), i, k = 0
    cdef Interval* intervals = <Interval*>malloc(max(n, 1) * sizeof(Interval))
    if intervals == NULL:
        raise MemoryError()
    try:
        for i in range(n):
            intervals[k] = _interval(arrays[i], i)
            if intervals[k].stop > intervals[k].start:
                k += 1
    except BaseException:
        free(intervals)
        raise
    qsort(intervals, k, sizeof(Interval), _by_start)
    n_out[0] = k
    return intervals


def first_overlap(list arrays):
    """(i, j), i < j, of two contiguous ndarrays whose memory overlaps, or None.

    A helper of fastadam._validation (which owns the error message): sorts the address
    ranges, so it is O(n log n) for the thousands of tensors of a model.
    """
    cdef Py_ssize_t n, k, widest = 0
    cdef Interval* intervals = _sorted_intervals(arrays, &n)
    try:
        for k in range(1, n):
            if intervals[k].start < intervals[widest].stop:
                a, b = intervals[widest].index, intervals[k].index
                return (min(a, b), max(a, b))
            if intervals[k].stop > intervals[widest].stop:
                widest = k
        return None
    finally:
        free(intervals)


def max_int64(cnp.ndarray values):
    """The largest element of a 1-D, C-contiguous int64 array (-2**63 if it is empty):
    the per-step check that no step count is about to wrap
    (fastadam._validation.check_steps_advance), 20x cheaper than ndarray.max here."""
    cdef const int64_t* data
    cdef Py_ssize_t i, n
    cdef int64_t largest = INT64_MIN
    if (cnp.PyArray_TYPE(values) != cnp.NPY_INT64 or cnp.PyArray_NDIM(values) != 1
            or not cnp.PyArray_IS_C_CONTIGUOUS(values)):
        raise TypeError("max_int64 takes a 1-D C-contiguous int64 array")
    data = <const int64_t*>cnp.PyArray_DATA(values)
    n = cnp.PyArray_SIZE(values)
    for i in range(n):
        if data[i] > largest:
            largest = data[i]
    return largest


# --- Python entry points (private; callers validate first) --------------------------------

cdef inline char* _data(object array) except? NULL:
    return <char*>cnp.PyArray_DATA(<cnp.ndarray?>array)


cdef int _fill_tensor(AdamTensor* t, object param, object grad, object exp_avg,
                      object exp_avg_sq, object max_exp_avg_sq) except -1:
    """t's buffers: validated, contiguous, aligned, same-dtype 1-D NumPy arrays."""
    t.size = cnp.PyArray_SIZE(<cnp.ndarray?>param)
    t.is_double = cnp.PyArray_TYPE(<cnp.ndarray>param) == cnp.NPY_DOUBLE
    t.param = _data(param)
    t.grad = _data(grad)
    t.exp_avg = _data(exp_avg)
    t.exp_avg_sq = _data(exp_avg_sq)
    t.max_exp_avg_sq = NULL if max_exp_avg_sq is None else _data(max_exp_avg_sq)
    return 0


def adam_step(param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq, double step, double lr,
              double beta1, double beta2, double eps, double weight_decay,
              bint decoupled_weight_decay, bint maximize, bint eps_hat, double eps_root,
              double grad_scale, int num_threads):
    """One Adam step on validated, contiguous, aligned, same-dtype 1-D NumPy arrays.

    ``max_exp_avg_sq`` is None or an array (AMSGrad). Releases the GIL while it runs.
    """
    cdef AdamTensor t
    cdef int status
    _fill_tensor(&t, param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq)
    fill_coefficients(&t.coef, step, lr, beta1, beta2, eps, weight_decay,
                      decoupled_weight_decay, max_exp_avg_sq is not None, maximize,
                      eps_hat, eps_root, grad_scale)
    with nogil:
        status = run_tensors(&t, 1, num_threads)
    if status != 0:
        raise MemoryError("fastadam: could not allocate the chunk table")


def adam_step_rows(param, grad_rows, rows, Py_ssize_t row_size, exp_avg, exp_avg_sq,
                   max_exp_avg_sq, double step, double lr, double beta1, double beta2,
                   double eps, double weight_decay, bint decoupled_weight_decay,
                   bint maximize, bint eps_hat, double eps_root, double grad_scale,
                   int num_threads):
    """One lazy Adam step of the rows ``rows`` of validated, contiguous, aligned,
    same-dtype 1-D NumPy arrays (param and state: the whole tensor, row_size elements
    per row; grad_rows: len(rows) rows). ``rows``: int64, unique, in range."""
    cdef RowUpdate u
    u.tensor.size = cnp.PyArray_SIZE(<cnp.ndarray>param)
    u.tensor.is_double = cnp.PyArray_TYPE(<cnp.ndarray>param) == cnp.NPY_DOUBLE
    u.tensor.param = _data(param)
    u.tensor.grad = _data(grad_rows)
    u.tensor.exp_avg = _data(exp_avg)
    u.tensor.exp_avg_sq = _data(exp_avg_sq)
    u.tensor.max_exp_avg_sq = NULL if max_exp_avg_sq is None else _data(max_exp_avg_sq)
    u.rows = <const int64_t*>_data(rows)
    u.n_rows = cnp.PyArray_SIZE(<cnp.ndarray>rows)
    u.row_size = row_size
    fill_coefficients(&u.tensor.coef, step, lr, beta1, beta2, eps, weight_decay,
                      decoupled_weight_decay, max_exp_avg_sq is not None, maximize,
                      eps_hat, eps_root, grad_scale)
    with nogil:
        run_rows(&u, num_threads)


# --- testing the 64-bit index arithmetic without 8 GiB buffers (tests/test_large_buffers.py) ---

def chunk_table(sizes):
    """The chunk table the engine would build for tensors of these element counts, as
    (tensor, start, stop) rows of an int64 array; no buffer is needed (testing only)."""
    cdef Py_ssize_t n = len(sizes), t
    cdef AdamTensor* tensors = <AdamTensor*>calloc(max(n, 1), sizeof(AdamTensor))
    cdef Chunk* chunks = NULL
    cdef Py_ssize_t n_chunks
    cdef int64_t[:, ::1] rows
    if tensors == NULL:
        raise MemoryError()
    try:
        for t in range(n):
            tensors[t].size = sizes[t]
        n_chunks = _count_chunks(tensors, n)
        table = numpy.empty((n_chunks, 3), numpy.int64)
        rows = table
        chunks = _make_chunks(tensors, n, n_chunks)
        if chunks == NULL and n_chunks > 0:
            raise MemoryError()
        for t in range(n_chunks):
            rows[t, 0], rows[t, 1], rows[t, 2] = chunks[t].tensor, chunks[t].start, chunks[t].stop
        return table
    finally:
        free(tensors)
        free(chunks)


def run_chunks_from(Py_ssize_t first_element, param, grad, exp_avg, exp_avg_sq,
                    max_exp_avg_sq, double step, double lr, double beta1, double beta2,
                    double eps, double weight_decay, bint decoupled_weight_decay,
                    bint maximize, bint eps_hat, double eps_root, double grad_scale,
                    int num_threads):
    """adam_step's chunk engine on one tensor, skipping the chunks that start before
    ``first_element``: elements past 2**31 of a sparse (mostly untouched) memory map are
    updated through the same chunk table, prange loop and kernels as every step.
    Returns (chunks in the table, [(start, stop) of each chunk run]). Testing only."""
    cdef AdamTensor t
    cdef Py_ssize_t n_chunks, first = 0, k
    cdef Chunk* chunks
    _fill_tensor(&t, param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq)
    fill_coefficients(&t.coef, step, lr, beta1, beta2, eps, weight_decay,
                      decoupled_weight_decay, max_exp_avg_sq is not None, maximize,
                      eps_hat, eps_root, grad_scale)
    n_chunks = _count_chunks(&t, 1)
    chunks = _make_chunks(&t, 1, n_chunks)
    if chunks == NULL:
        raise MemoryError()
    try:
        while first < n_chunks and chunks[first].start < first_element:
            first += 1
        with nogil:
            _run_chunks(&t, chunks, first, n_chunks, max(1, min(num_threads, n_chunks - first)))
        return n_chunks, [(chunks[k].start, chunks[k].stop) for k in range(first, n_chunks)]
    finally:
        free(chunks)


cdef struct GroupHyperparameters:
    double lr, beta1, beta2, eps, weight_decay, eps_root
    bint decoupled_weight_decay, amsgrad, maximize, eps_hat


cdef class AdamTable:
    """The optimizer's tensors as one C table, stepped in one pass (fastadam.optim).

    Holds, per tensor, the pointers of param and state, its group and (in the int64
    array ``steps``, shared with the optimizer) its step count. ``step`` fills in the
    gradients and per-tensor coefficients, releases the GIL once and runs every tensor
    of every group through one OpenMP team. Arguments are validated by the caller
    (fastadam._validation); ``first_nonconforming`` is the fast scan that lets it skip
    the per-gradient Python checks when all gradients are plain conforming ndarrays.

    Runs: consecutive tensors of one group and dtype whose params lie back to back in
    memory, and whose states do too (the optimizer allocates each group's state as one
    block), form a run. When a step's gradients for a run also lie back to back (as
    fastadam.FlatParams lays them out) and the run's step counts agree, the run is
    updated as ONE tensor: one long stream instead of many short loops. Only memory
    that belongs to the tensors is touched either way (runs have no gaps).

    Row-sparse gradients: a gradient given as a tuple ``(rows, values)`` (int64 rows,
    unique and in range; values of those rows, contiguous: validated) makes its tensor a
    ``RowUpdate`` of this pass instead of a record: only those rows and their moments
    change, with the tensor's step count and group coefficients. Its step count still
    advances by one (it is the tensor's step, as in TensorFlow's LazyAdam and PyTorch's
    SparseAdam).
    """
    cdef AdamTensor* tensors      # one record per tensor (grad pointers set per step)
    cdef AdamTensor* records      # what a step runs: whole runs, or single tensors
    cdef Py_ssize_t* record_first  # the tensor each record starts with
    cdef Py_ssize_t n_records
    cdef Py_ssize_t n
    cdef Py_ssize_t* run_stop     # at a run's first tensor: one past its last tensor
    cdef Py_ssize_t* group_of
    cdef Py_ssize_t n_groups
    cdef int64_t* steps
    cdef RowUpdate* row_updates   # this pass's row-sparse tensors
    cdef Py_ssize_t* row_update_of  # the tensor of each row update
    cdef Py_ssize_t n_row_updates
    cdef bint* sparse             # per tensor: has a row-sparse gradient in this pass
    cdef Interval* written        # address ranges of every written buffer, sorted
    cdef Py_ssize_t n_written
    cdef list params              # the params as given (N-d), for shape checks
    cdef object keep_alive

    def __cinit__(self, list params, list exp_avgs, list exp_avg_sqs, list max_exp_avg_sqs,
                  cnp.ndarray steps, list group_of):
        cdef Py_ssize_t i, n = len(params)
        self.n = n
        self.tensors = <AdamTensor*>calloc(max(n, 1), sizeof(AdamTensor))
        self.records = <AdamTensor*>calloc(max(n, 1), sizeof(AdamTensor))
        self.record_first = <Py_ssize_t*>malloc(max(n, 1) * sizeof(Py_ssize_t))
        self.run_stop = <Py_ssize_t*>malloc(max(n, 1) * sizeof(Py_ssize_t))
        self.group_of = <Py_ssize_t*>malloc(max(n, 1) * sizeof(Py_ssize_t))
        self.row_updates = <RowUpdate*>calloc(max(n, 1), sizeof(RowUpdate))
        self.row_update_of = <Py_ssize_t*>malloc(max(n, 1) * sizeof(Py_ssize_t))
        self.sparse = <bint*>calloc(max(n, 1), sizeof(bint))
        if (self.tensors == NULL or self.records == NULL or self.record_first == NULL
                or self.run_stop == NULL or self.group_of == NULL or self.row_updates == NULL
                or self.row_update_of == NULL or self.sparse == NULL):
            raise MemoryError()
        self.n_row_updates = 0
        self.n_groups = 0
        for i in range(n):
            t = &self.tensors[i]
            t.size = cnp.PyArray_SIZE(<cnp.ndarray?>params[i])
            t.is_double = cnp.PyArray_TYPE(<cnp.ndarray>params[i]) == cnp.NPY_DOUBLE
            t.param = _data(params[i])
            t.exp_avg = _data(exp_avgs[i])
            t.exp_avg_sq = _data(exp_avg_sqs[i])
            t.max_exp_avg_sq = NULL if max_exp_avg_sqs[i] is None else _data(max_exp_avg_sqs[i])
            self.group_of[i] = group_of[i]
            self.n_groups = max(self.n_groups, self.group_of[i] + 1)
        self._find_runs()
        self.steps = <int64_t*>cnp.PyArray_DATA(steps)
        written = params + exp_avgs + exp_avg_sqs + [a for a in max_exp_avg_sqs if a is not None]
        self.written = _sorted_intervals(written, &self.n_written)
        self.params = params
        self.keep_alive = (written, steps)

    def __dealloc__(self):
        free(self.tensors)
        free(self.records)
        free(self.record_first)
        free(self.run_stop)
        free(self.group_of)
        free(self.row_updates)
        free(self.row_update_of)
        free(self.sparse)
        free(self.written)

    cdef void _find_runs(self):
        cdef Py_ssize_t i = 0, j
        while i < self.n:
            j = i + 1
            while (j < self.n and self.group_of[j] == self.group_of[i]
                   and self.tensors[j].is_double == self.tensors[i].is_double
                   and _follows(&self.tensors[j], &self.tensors[j - 1])):
                j += 1
            self.run_stop[i] = j
            i = j

    def runs(self):
        """[(first, stop), ...]: the runs of tensors (see the class docstring)."""
        result, i = [], 0
        while i < self.n:
            result.append((i, self.run_stop[i]))
            i = self.run_stop[i]
        return result

    @property
    def records_in_last_pass(self):
        """How many records (whole runs or single tensors) the last pass ran."""
        return self.n_records

    cdef int _overlaps_written(self, object array) except -1:
        """Does this array's memory overlap any param or state buffer? (binary search)"""
        cdef Interval r = _interval(array, 0)
        cdef Py_ssize_t lo = 0, hi = self.n_written, mid
        if r.stop == r.start:
            return False
        while lo < hi:  # the first written range starting at or after r.stop
            mid = (lo + hi) // 2
            if self.written[mid].start < r.stop:
                lo = mid + 1
            else:
                hi = mid
        return lo > 0 and self.written[lo - 1].stop > r.start

    def overlaps_written(self, array):
        return self._overlaps_written(array)

    def first_nonconforming(self, list grads):
        """Index of the first gradient that is not a C-contiguous, aligned ndarray of its
        param's dtype and shape and clear of every written buffer; -1 if all are."""
        cdef Py_ssize_t i
        cdef cnp.ndarray g, p
        for i in range(self.n):
            obj = grads[i]
            if type(obj) is not cnp.ndarray:
                return i
            g = <cnp.ndarray>obj
            p = <cnp.ndarray>self.params[i]
            if (cnp.PyArray_TYPE(g) != cnp.PyArray_TYPE(p) or not cnp.PyArray_SAMESHAPE(g, p)
                    or not cnp.PyArray_IS_C_CONTIGUOUS(g) or not cnp.PyArray_ISALIGNED(g)
                    or not cnp.PyArray_ISNOTSWAPPED(g) or self._overlaps_written(g)):
                return i
        return -1

    cdef int _prepare(self, list grads) except -1:
        """Set the gradient pointers, then build this pass's records: each run as one
        record if its gradients lie back to back and its step counts agree, else its
        (dense) tensors one by one; and a row update per row-sparse gradient."""
        cdef Py_ssize_t i, k, stop
        cdef bint merge
        self.n_row_updates = 0
        for i in range(self.n):
            grad = grads[i]
            self.sparse[i] = type(grad) is tuple
            if self.sparse[i]:
                self._add_row_update(i, grad[0], grad[1])
            else:
                self.tensors[i].grad = _data(grad)
        self.n_records = 0
        i = 0
        while i < self.n:
            stop = self.run_stop[i]
            merge = stop - i > 1 and not self.sparse[i]
            k = i + 1
            while merge and k < stop:
                merge = (not self.sparse[k] and self.steps[k] == self.steps[i] and
                         self.tensors[k].grad
                         == self.tensors[k - 1].grad + _nbytes(&self.tensors[k - 1]))
                k += 1
            if merge:
                self.records[self.n_records] = self.tensors[i]
                self.record_first[self.n_records] = i
                for k in range(i + 1, stop):
                    self.records[self.n_records].size += self.tensors[k].size
                self.n_records += 1
            else:
                for k in range(i, stop):
                    if self.sparse[k]:
                        continue
                    self.records[self.n_records] = self.tensors[k]
                    self.record_first[self.n_records] = k
                    self.n_records += 1
            i = stop
        return 0

    cdef int _add_row_update(self, Py_ssize_t i, object rows, object values) except -1:
        cdef RowUpdate* u = &self.row_updates[self.n_row_updates]
        cdef cnp.ndarray param = <cnp.ndarray>self.params[i]
        u.tensor = self.tensors[i]
        u.tensor.grad = _data(values)
        u.rows = <const int64_t*>_data(rows)
        u.n_rows = cnp.PyArray_SIZE(<cnp.ndarray?>rows)
        # (row-sparse gradients are validated to have a param of at least one axis)
        u.row_size = u.tensor.size // param.shape[0] if param.shape[0] else 0
        self.row_update_of[self.n_row_updates] = i
        self.n_row_updates += 1
        return 0

    def count_nonfinite(self, list grads, int num_threads):
        """How many elements of the (validated) gradients are NaN or Inf."""
        cdef Py_ssize_t bad, more, k = 0
        self._prepare(grads)
        with nogil:
            bad = count_nonfinite_grads(self.records, self.n_records, num_threads)
            while bad >= 0 and k < self.n_row_updates:
                more = count_nonfinite_rows(&self.row_updates[k], num_threads)
                bad = -1 if more < 0 else bad + more
                k += 1
        if bad < 0:
            raise MemoryError("fastadam: could not allocate the chunk table")
        return bad

    def step(self, list grads, list groups, double grad_scale, int num_threads):
        """One Adam step of every tensor. ``groups``: one tuple per param group,
        (lr, beta1, beta2, eps, weight_decay, eps_root, decoupled_weight_decay, amsgrad,
        maximize, eps_hat), validated; grads validated and conforming (dense arrays, or
        (rows, values) tuples: see the class docstring)."""
        cdef Py_ssize_t i = 0, k, first
        cdef int status
        cdef GroupHyperparameters* h
        cdef AdamTensor* r
        cdef GroupHyperparameters* hyper = <GroupHyperparameters*>malloc(
            max(len(groups), 1) * sizeof(GroupHyperparameters))
        if hyper == NULL:
            raise MemoryError()
        try:
            if len(groups) != self.n_groups:  # never index past the groups given
                raise ValueError(f"expected hyperparameters for {self.n_groups} groups, "
                                 f"got {len(groups)}")
            for k, values in enumerate(groups):
                (hyper[k].lr, hyper[k].beta1, hyper[k].beta2, hyper[k].eps,
                 hyper[k].weight_decay, hyper[k].eps_root, hyper[k].decoupled_weight_decay,
                 hyper[k].amsgrad, hyper[k].maximize, hyper[k].eps_hat) = values
            self._prepare(grads)
            for k in range(self.n_records):
                r = &self.records[k]
                first = self.record_first[k]  # its group and step count are the record's
                if (k > 0 and self.group_of[first] == self.group_of[i]
                        and self.steps[first] == self.steps[i]):
                    r.coef = self.records[k - 1].coef  # the usual case: once per group
                else:
                    h = &hyper[self.group_of[first]]
                    fill_coefficients(&r.coef, <double>(self.steps[first] + 1), h.lr, h.beta1,
                                      h.beta2, h.eps, h.weight_decay, h.decoupled_weight_decay,
                                      h.amsgrad, h.maximize, h.eps_hat, h.eps_root, grad_scale)
                i = first
            for k in range(self.n_row_updates):
                r = &self.row_updates[k].tensor
                first = self.row_update_of[k]
                h = &hyper[self.group_of[first]]
                fill_coefficients(&r.coef, <double>(self.steps[first] + 1), h.lr, h.beta1,
                                  h.beta2, h.eps, h.weight_decay, h.decoupled_weight_decay,
                                  h.amsgrad, h.maximize, h.eps_hat, h.eps_root, grad_scale)
            with nogil:
                status = run_tensors(self.records, self.n_records, num_threads)
                if status == 0:
                    for k in range(self.n_row_updates):
                        run_rows(&self.row_updates[k], num_threads)
            if status != 0:
                raise MemoryError("fastadam: could not allocate the chunk table")
            for i in range(self.n):
                self.steps[i] += 1
        finally:
            free(hyper)


cdef inline size_t _nbytes(const AdamTensor* t) noexcept nogil:
    return <size_t>t.size * (8 if t.is_double else 4)


cdef inline bint _follows(const AdamTensor* t, const AdamTensor* previous) noexcept nogil:
    """Do t's param and state buffers start exactly where previous's end?"""
    cdef size_t gap = _nbytes(previous)
    if (previous.max_exp_avg_sq == NULL) != (t.max_exp_avg_sq == NULL):
        return False
    return (t.param == previous.param + gap and t.exp_avg == previous.exp_avg + gap
            and t.exp_avg_sq == previous.exp_avg_sq + gap
            and (t.max_exp_avg_sq == NULL or t.max_exp_avg_sq == previous.max_exp_avg_sq + gap))


def openmp_enabled():
    """True when this extension was compiled with OpenMP."""
    return bool(FA_OPENMP_ENABLED)


def openmp_version():
    """The _OPENMP date macro of the build (e.g. 201511 for OpenMP 4.5), 0 without OpenMP."""
    return FA_OPENMP_VERSION


def max_threads():
    """omp_get_max_threads() in the calling thread, read now (1 without OpenMP)."""
    return omp_get_max_threads()


def team_size(int num_threads):
    """How many threads a parallel region asked for ``num_threads`` really gets."""
    return fa_team_size(num_threads)


def build_info():
    """Facts fixed at compile time: compiler, flags, vector ISA, OpenMP."""
    return {
        "compiler": FA_COMPILER.decode("utf-8", "replace"),
        "cflags": FASTADAM_CFLAGS.decode("utf-8", "replace"),
        "vector_isa": FA_VECTOR_ISA.decode("ascii"),
        "openmp": bool(FA_OPENMP_ENABLED),
        "openmp_version": FA_OPENMP_VERSION,
        "chunk_elements": CHUNK_ELEMENTS,
    }
