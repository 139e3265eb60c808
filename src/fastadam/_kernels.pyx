# cython: language_level=3, boundscheck=False, wraparound=False, initializedcheck=False
# cython: cdivision=True, nonecheck=False, embedsignature=True
"""Adam kernels: the bottom layer of fastadam.

Design (see docs/design.md "Layers"):

* Everything here assumes validated input. fastadam._validation has already checked
  dtypes, element counts, contiguity, alignment, writability, overlap and every
  hyperparameter; nothing in this module raises for bad data, so a rejected call never
  reaches a write. Hyperparameters arrive as one record (``Hyper``, read from the
  validated ``Hyperparameters`` by ``hyper_from_record``), never as positional lists.
* One update is described by an ``AdamTensor`` record: raw pointers, a length, each
  buffer's element type and the step's ``Coefficients`` (computed once, in double, by
  ``fill_coefficients``). ``run_tensors`` takes a table of them, cuts every tensor into
  fixed-size chunks and lets one OpenMP team work through the chunk table with the GIL
  released. ``adam_step`` is a table of one; the multi-tensor optimizer step reuses
  the same engine.
* The engine's compiled core (fastadam._table) cimports ``run_tensors``, ``run_rows``
  and their non-finite scans through _kernels.pxd.
* Lazy sparse rows (``adam_step_rows``, row-sparse gradients of an optimizer step) reuse it
  too: a row of a C-contiguous tensor is a contiguous run of ``row_size`` elements, so a
  ``RowUpdate`` runs each given row through ``run_chunk`` exactly as a dense update of
  that row alone would (``run_rows``: one OpenMP team over the rows).
* The per-element loop is ``_update``. Every option of docs/design.md (grad_scale/maximize,
  L2 or decoupled decay, the lerp branch, AMSGrad, the form: paper, eps_root or the two
  of the torch numerics profile) is a *compile-time* switch: a fused type of empty tag
  structs, resolved with ``if Tag is On:`` by Cython, and so is the storage of the
  buffers (the math type itself, or bfloat16 converted in registers), so each of the
  3 x 80 specializations that run (float64, float32, float32 math over bfloat16) is
  straight-line arithmetic that the C compiler vectorizes (checked by
  .github/scripts/check_vectorization.py). Tensors with float16 grads (and bfloat16
  ones where the CPU has AVX-512 BF16) run a loop written with intrinsics at the avx2
  and avx512 levels (_vectors16.h): pure 16-bit, bfloat16 rounded stochastically, or
  float32 masters with a 16-bit model copy; what it leaves, and other 16-bit
  combinations, run the float32 specializations block by block (``_run_staged`` in
  _adam_loops.pxi). The
  ``_by_*`` functions walk the run-time flags down to the right specialization once per
  chunk, never per element.
* Exactness: coefficients are computed in double and cast to the element type once per
  chunk; the loop performs exactly the operations of docs/design.md in its order. The build
  uses -ffp-contract=off (no silent FMA), so the vector body and the scalar remainder
  round identically and results do not depend on the thread count or chunking.
  Options that are exact identities are folded instead of specialized: maximize is a
  sign on the gradient factor (x * -1 and x / -s are exact negations), "no weight decay"
  is the decoupled form with a factor of exactly 1, and the eps_hat form is the paper
  form with step_coef = -lr*sqrt(bc2)/bc1 and a divisor of exactly 1.
"""

from cpython.pycapsule cimport PyCapsule_GetPointer, PyCapsule_IsValid
from libc.math cimport pow, sqrt
from libc.stdint cimport int64_t, uint64_t
from libc.stdlib cimport calloc, free, malloc
from cython cimport floating
from cython.parallel cimport prange

cimport numpy as cnp
import numpy

from fastadam._adam_types cimport (
    ELEM_BF16,
    ELEM_F16,
    ELEM_F32,
    ELEM_F64,
    NUMERICS_EXACT,
    NUMERICS_FAST,
    NUMERICS_TORCH,
)


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


cdef inline bint _takes_small_loops(const AdamTensor* t) noexcept nogil:
    """Small tensors, and tensors with any 16-bit buffer (or a master copy), run the
    "small" level's loops (the widest). Widening and rounding 16-bit elements is compute,
    not traffic, and 512-bit code does it in half the instructions: pure bfloat16 at 2^24
    elements, one thread, took 17.7 ms at avx512 against 26.9 ms at avx2 (an Intel Xeon;
    FASTADAM_SIMD=avx512|avx2 python benchmarks/low_precision.py --threads 1), where
    float32 streams as fast at either width."""
    return t.size <= _small_limit or t.model_param != NULL or not (
        t.grad_type == t.param_type and t.state_type == t.param_type
        and (t.param_type == ELEM_F32 or t.param_type == ELEM_F64))


cdef inline RunChunk _runner(const AdamTensor* t) noexcept nogil:
    return _run_small if _takes_small_loops(t) else _run_large


cdef inline CountChunk _counter(const AdamTensor* t) noexcept nogil:
    return _count_small if _takes_small_loops(t) else _count_large


cdef void* _pointer(object capsule, const char* name) except NULL:
    if not PyCapsule_IsValid(capsule, name):
        raise TypeError(f"expected a {name.decode()} capsule from a fastadam kernel module")
    return PyCapsule_GetPointer(capsule, name)


def set_kernels(small, large, Py_ssize_t small_limit):
    """Route tensors of at most ``small_limit`` elements (and tensors with 16-bit
    buffers: _takes_small_loops) to the ``small`` loops and the others to ``large``;
    each a pair of capsules (run_chunk_capsule, count_nonfinite_capsule) of one kernel
    module (this one, _kernels_avx2 or _kernels_avx512). Not thread-safe: fastadam._simd
    calls it at import (tests and benchmarks between steps)."""
    global _run_small, _run_large, _count_small, _count_large, _small_limit
    cdef RunChunk run_small = <RunChunk>_pointer(small[0], b"fastadam.run_chunk")
    cdef CountChunk count_small = <CountChunk>_pointer(small[1], b"fastadam.count_nonfinite_chunk")
    cdef RunChunk run_large = <RunChunk>_pointer(large[0], b"fastadam.run_chunk")
    cdef CountChunk count_large = <CountChunk>_pointer(large[1], b"fastadam.count_nonfinite_chunk")
    # all four checked: switch together
    _run_small, _count_small = run_small, count_small
    _run_large, _count_large = run_large, count_large
    _small_limit = small_limit


def cpu_supports(str feature):
    """Can this CPU and OS run code built for ``feature`` ("x86-64-v3" or "x86-64-v4",
    the ``cpu`` of fastadam._simd_levels)? Asked with cpuid and xgetbv."""
    if feature == "x86-64-v3":
        return bool(fa_cpu_has_x86_64_v3())
    if feature == "x86-64-v4":
        return bool(fa_cpu_has_x86_64_v3() and fa_cpu_has_x86_64_v4())
    raise ValueError(f"unknown CPU feature set {feature!r}")


# --- coefficients and the chunk engine ------------------------------------------------

cdef int hyper_from_record(Hyper* h, object record) except -1:
    """Fill ``h`` from a validated Hyperparameters record, by field name."""
    h.lr = record.lr
    h.beta1 = record.beta1
    h.beta2 = record.beta2
    h.eps = record.eps
    h.weight_decay = record.weight_decay
    h.eps_root = record.eps_root
    h.decoupled_weight_decay = record.decoupled_weight_decay
    h.amsgrad = record.amsgrad
    h.maximize = record.maximize
    h.eps_hat = record.eps_hat
    h.numerics = _numerics_code(record.numerics)
    return 0


cdef int _numerics_code(str name) except -1:
    """The C code of a numerics profile (fastadam._validation.NUMERICS)."""
    if name == "exact":
        return NUMERICS_EXACT
    if name == "torch":
        return NUMERICS_TORCH
    if name == "fast":
        return NUMERICS_FAST
    raise ValueError(f"no kernels for numerics={name!r}")


cdef void fill_coefficients(Coefficients* c, const Hyper* h, double step,
                            double grad_scale) noexcept nogil:
    """docs/design.md's per-step constants, in double precision, outside every loop."""
    cdef double bc1 = 1.0 - pow(h.beta1, step)
    cdef double bc2 = 1.0 - pow(h.beta2, step)
    cdef double r2 = sqrt(bc2)
    cdef double sign = -1.0 if h.maximize else 1.0

    c.grad_scaled = grad_scale != 1.0
    c.grad_factor = sign * grad_scale if c.grad_scaled else sign
    c.l2_decay = h.weight_decay != 0.0 and not h.decoupled_weight_decay
    c.l2 = h.weight_decay if c.l2_decay else 0.0
    c.param_scale = 1.0 - h.lr * h.weight_decay if h.decoupled_weight_decay else 1.0
    c.w = 1.0 - h.beta1
    c.beta2 = h.beta2
    c.one_minus_beta2 = 1.0 - h.beta2
    c.eps = h.eps
    c.amsgrad = h.amsgrad
    c.root_form = h.eps_root > 0.0
    c.numerics = NUMERICS_EXACT if c.root_form else h.numerics  # eps_root has one order
    c.bc1 = bc1
    c.bc2 = bc2
    c.eps_root = h.eps_root
    if c.root_form:
        c.step_coef = h.lr
        c.denom_div = 1.0
    elif h.eps_hat:
        c.step_coef = -((h.lr * r2) / bc1)
        c.denom_div = 1.0
    else:
        c.step_coef = -(h.lr / bc1)
        c.denom_div = r2
    c.inv_denom_div = 1.0 / c.denom_div


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
    cdef size_t param_offset = <size_t>u.rows[i] * u.row_size * element_size(u.tensor.param_type)
    cdef size_t state_offset = <size_t>u.rows[i] * u.row_size * element_size(u.tensor.state_type)
    cdef size_t line
    cdef size_t stop = min(<size_t>u.row_size * element_size(u.tensor.state_type),
                           <size_t>(PREFETCH_LINES * 64))
    for line in range(0, stop, 64):
        FA_PREFETCH_FOR_WRITE(u.tensor.param + param_offset + line)
        FA_PREFETCH_FOR_WRITE(u.tensor.exp_avg + state_offset + line)
        FA_PREFETCH_FOR_WRITE(u.tensor.exp_avg_sq + state_offset + line)
        if u.tensor.max_exp_avg_sq != NULL:
            FA_PREFETCH_FOR_WRITE(u.tensor.max_exp_avg_sq + state_offset + line)


cdef inline Py_ssize_t _pieces_per_row(const RowUpdate* u) noexcept nogil:
    """Work units per row: long rows are cut at CHUNK_ELEMENTS like dense tensors."""
    return (u.row_size + CHUNK_ELEMENTS - 1) // CHUNK_ELEMENTS


cdef void _run_row_piece(const RowUpdate* u, Py_ssize_t unit, Py_ssize_t pieces) noexcept nogil:
    """Work unit ``unit``: piece ``unit % pieces`` of gradient row ``unit // pieces``,
    through the loops a dense update of that one row would use (same record, same size,
    so the same SIMD level): bit-identical to adam_step on the row."""
    cdef Py_ssize_t i = unit // pieces
    cdef Py_ssize_t start = (unit % pieces) * CHUNK_ELEMENTS
    cdef size_t row = <size_t>u.rows[i] * u.row_size  # the row's first element
    cdef size_t state_offset = row * element_size(u.tensor.state_type)
    cdef AdamTensor record = u.tensor
    if start == 0 and i + PREFETCH_ROWS_AHEAD < u.n_rows:
        _prefetch_row(u, i + PREFETCH_ROWS_AHEAD)
    record.size = u.row_size
    record.param = u.tensor.param + row * element_size(u.tensor.param_type)
    record.grad = u.tensor.grad + <size_t>i * u.row_size * element_size(u.tensor.grad_type)
    record.exp_avg = u.tensor.exp_avg + state_offset
    record.exp_avg_sq = u.tensor.exp_avg_sq + state_offset
    if u.tensor.max_exp_avg_sq != NULL:
        record.max_exp_avg_sq = u.tensor.max_exp_avg_sq + state_offset
    if u.tensor.model_param != NULL:
        record.model_param = u.tensor.model_param + row * element_size(u.tensor.model_type)
    _runner(&record)(&record, start, min(start + CHUNK_ELEMENTS, u.row_size))


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


# --- Python entry points (private; callers validate first) --------------------------------

cdef inline char* _data(object array) except? NULL:
    return <char*>cnp.PyArray_DATA(<cnp.ndarray?>array)


cdef int element_type(object array) except -1:
    """The ELEM_* code of a validated array's dtype (float32, float64, float16, or a
    2-byte bfloat16 type: ml_dtypes' or fastadam._dtypes' stand-in)."""
    cdef int code = cnp.PyArray_TYPE(<cnp.ndarray?>array)
    if code == cnp.NPY_FLOAT:
        return ELEM_F32
    if code == cnp.NPY_DOUBLE:
        return ELEM_F64
    if code == cnp.NPY_FLOAT16:
        return ELEM_F16
    return ELEM_BF16


cdef int fill_buffers(AdamTensor* t, object param, object grad, object exp_avg,
                      object exp_avg_sq, object max_exp_avg_sq, object model_param) except -1:
    """t's buffers and their element types: validated, contiguous, aligned 1-D NumPy
    arrays of one element count (exp_avg_sq and max_exp_avg_sq of exp_avg's type).
    ``model_param`` None, or the 16-bit model copy of a float32 master ``param``."""
    t.size = cnp.PyArray_SIZE(<cnp.ndarray?>param)
    t.param = _data(param)
    t.grad = _data(grad)
    t.exp_avg = _data(exp_avg)
    t.exp_avg_sq = _data(exp_avg_sq)
    t.max_exp_avg_sq = NULL if max_exp_avg_sq is None else _data(max_exp_avg_sq)
    t.model_param = NULL if model_param is None else _data(model_param)
    t.param_type = element_type(param)
    t.grad_type = element_type(grad)
    t.state_type = element_type(exp_avg)
    t.model_type = ELEM_F32 if model_param is None else element_type(model_param)
    t.stochastic = False
    t.rounding_key = 0
    return 0


cdef uint64_t rounding_key(int64_t seed, int64_t step, Py_ssize_t tensor) noexcept nogil:
    """The random stream of one tensor's stochastic rounding at one step (splitmix64 of
    seed, step and the tensor's position): the same bits on every run with that seed."""
    cdef uint64_t x = _splitmix64(<uint64_t>seed)
    x = _splitmix64(x ^ <uint64_t>step)
    return _splitmix64(x ^ <uint64_t>tensor)


cdef inline uint64_t _splitmix64(uint64_t x) noexcept nogil:
    x += 0x9E3779B97F4A7C15ULL
    x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ULL
    x = (x ^ (x >> 27)) * 0x94D049BB133111EBULL
    return x ^ (x >> 31)


cdef int _coefficients(Coefficients* c, object hyper, double step, double grad_scale,
                       object max_exp_avg_sq) except -1:
    """The coefficients of one update from a validated Hyperparameters record; AMSGrad
    follows the presence of its buffer (never a NULL pointer behind amsgrad=True)."""
    cdef Hyper h
    hyper_from_record(&h, hyper)
    h.amsgrad = max_exp_avg_sq is not None
    fill_coefficients(c, &h, step, grad_scale)
    return 0


def adam_step(param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq, hyper, double step,
              double grad_scale, int num_threads, model_param=None, rounding_seed=None):
    """One Adam step on validated, contiguous, aligned 1-D NumPy arrays of one element
    count and a validated combination of element types.

    ``max_exp_avg_sq`` is None or an array (AMSGrad); ``hyper`` a validated
    Hyperparameters record; ``model_param`` None or the 16-bit copy of a float32 master
    ``param``; ``rounding_seed`` None (round to nearest even) or the int64 seed of a
    bfloat16 param's stochastic rounding. Releases the GIL while it runs.
    """
    cdef AdamTensor t
    cdef int status
    fill_buffers(&t, param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq, model_param)
    _coefficients(&t.coef, hyper, step, grad_scale, max_exp_avg_sq)
    if rounding_seed is not None:
        t.stochastic = True
        t.rounding_key = rounding_key(rounding_seed, <int64_t>step, 0)
    with nogil:
        status = run_tensors(&t, 1, num_threads)
    if status != 0:
        raise MemoryError("fastadam: could not allocate the chunk table")


def adam_step_rows(param, grad_rows, rows, Py_ssize_t row_size, exp_avg, exp_avg_sq,
                   max_exp_avg_sq, hyper, double step, double grad_scale, int num_threads):
    """One lazy Adam step of the rows ``rows`` of validated, contiguous, aligned,
    same-dtype 1-D NumPy arrays (param and state: the whole tensor, row_size elements
    per row; grad_rows: len(rows) rows). ``rows``: int64, unique, in range, owned by
    fastadam (checked after copying: nobody else writes them)."""
    cdef RowUpdate u
    fill_buffers(&u.tensor, param, grad_rows, exp_avg, exp_avg_sq, max_exp_avg_sq, None)
    u.rows = <const int64_t*>_data(rows)
    u.n_rows = cnp.PyArray_SIZE(<cnp.ndarray>rows)
    u.row_size = row_size
    _coefficients(&u.tensor.coef, hyper, step, grad_scale, max_exp_avg_sq)
    with nogil:
        run_rows(&u, num_threads)


# --- testing the routing to a SIMD level (tests/test_simd.py) ---------------------------------

def takes_small_loops(param, grad, exp_avg, model_param=None):
    """Would a tensor of these NumPy arrays (exp_avg standing for every moment) run the
    "small" level's loops? (_takes_small_loops; testing only.)"""
    cdef AdamTensor t
    fill_buffers(&t, param, grad, exp_avg, exp_avg, None, model_param)
    return bool(_takes_small_loops(&t))


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
                    max_exp_avg_sq, hyper, double step, double grad_scale, int num_threads):
    """adam_step's chunk engine on one tensor, skipping the chunks that start before
    ``first_element``: elements past 2**31 of a sparse (mostly untouched) memory map are
    updated through the same chunk table, prange loop and kernels as every step.
    Returns (chunks in the table, [(start, stop) of each chunk run]). Testing only."""
    cdef AdamTensor t
    cdef Py_ssize_t n_chunks, first = 0, k
    cdef Chunk* chunks
    fill_buffers(&t, param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq, None)
    _coefficients(&t.coef, hyper, step, grad_scale, max_exp_avg_sq)
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
