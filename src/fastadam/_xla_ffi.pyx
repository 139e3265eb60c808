# cython: language_level=3, boundscheck=False, wraparound=False, initializedcheck=False
# cython: cdivision=True, nonecheck=False, embedsignature=True
"""fastadam's XLA FFI handler: one Adam step of a whole pytree as one XLA custom call.

``fastadam.jax`` lowers a step to ``jax.ffi.ffi_call("fastadam_adam", ...)``, whose
handler is the C function ``_adam`` below. XLA calls it with the buffers of every leaf;
params, moments and the step count are outputs aliased to their inputs
(``input_output_aliases``), so the kernels write into the buffers XLA donated and no copy
is made. The handler builds one ``AdamTensor`` record per leaf and runs them all through
``run_tensors`` on one OpenMP team: the engine, threads and SIMD dispatch of every other
front end.

Built without JAX: _xla_ffi_api.h declares the part of XLA's versioned FFI C ABI used
here. XLA asks a handler for the API version it was written against when it is
registered (the metadata call below), and refuses versions it does not support.

Operands (n leaves; ``lr`` only with the attribute ``traced_lr``, the last block only
with ``amsgrad``):
  args  [count, (lr), params[n], grads[n], mu[n], nu[n], (nu_max[n])]
  rets  [count, params[n], mu[n], nu[n], (nu_max[n])]   (each aliased to its argument)
``count``: an int32 or int64 scalar, the number of steps already taken (optax's
``count``); this step is number count + 1, and with the attribute ``increment_count``
count + 1 is written back. A step of many leaves is several calls chained through the
count (each takes the previous one's count result, and only the last increments it): the
count is then written in place, after every call has read it, with no copy. ``lr``: a
float32 or float64 scalar computed in the step (a schedule's value), which replaces the
``lr`` attribute; being traced, it is checked here, when the step runs. Leaf i of each
list has the element count of params[i] and its dtype (float32, float64, bfloat16 or
float16: one dtype per leaf; 16-bit leaves are computed in float32 and rounded to
nearest even, as ``fastadam.adam_step`` does). The
hyperparameters are scalar attributes named after the fields of ``Hyper`` (see
``hyper_attributes``), plus ``num_threads``, ``traced_lr``, ``increment_count`` and
``decayed_leaves``: weight decay applies to the first ``decayed_leaves`` leaves only
(optax's ``mask``).
"""

from cpython.pycapsule cimport PyCapsule_New
from libc.float cimport FLT_MAX
from libc.math cimport fabs, isfinite
from libc.stdint cimport INT32_MAX, INT64_MAX, int32_t, int64_t
from libc.stdio cimport snprintf
from libc.stdlib cimport malloc, free
from libc.string cimport memcmp, strlen

import numpy as np

from fastadam._adam_types cimport (
    ELEM_BF16,
    ELEM_F16,
    ELEM_F32,
    ELEM_F64,
    AdamTensor,
    Coefficients,
)
from fastadam._kernels cimport Hyper, fill_coefficients, hyper_from_record, run_tensors


cdef extern from "_xla_ffi_api.h" nogil:
    int FA_XLA_FFI_API_MAJOR
    int FA_XLA_FFI_API_MINOR
    size_t FA_CALL_FRAME_SIZE
    size_t FA_BUFFER_SIZE
    size_t FA_API_SIZE
    size_t FA_API_VERSION_SIZE
    size_t FA_METADATA_SIZE
    size_t FA_METADATA_EXTENSION_SIZE
    size_t FA_ERROR_CREATE_ARGS_SIZE

    ctypedef enum XLA_FFI_Extension_Type:
        XLA_FFI_Extension_Metadata
    ctypedef struct XLA_FFI_Extension_Base:
        size_t struct_size
        XLA_FFI_Extension_Type type
    ctypedef struct XLA_FFI_Api_Version:
        size_t struct_size
        XLA_FFI_Extension_Base* extension_start
        int major_version
        int minor_version
    ctypedef struct XLA_FFI_Error
    ctypedef enum XLA_FFI_Error_Code:
        XLA_FFI_Error_Code_INVALID_ARGUMENT
        XLA_FFI_Error_Code_RESOURCE_EXHAUSTED
        XLA_FFI_Error_Code_FAILED_PRECONDITION
    ctypedef struct XLA_FFI_Error_Create_Args:
        size_t struct_size
        XLA_FFI_Extension_Base* extension_start
        const char* message
        XLA_FFI_Error_Code errc
    ctypedef XLA_FFI_Error* (*XLA_FFI_Error_Create)(XLA_FFI_Error_Create_Args* args)
    ctypedef enum XLA_FFI_DataType:
        XLA_FFI_DataType_PRED
        XLA_FFI_DataType_S32
        XLA_FFI_DataType_S64
        XLA_FFI_DataType_F16
        XLA_FFI_DataType_F32
        XLA_FFI_DataType_F64
        XLA_FFI_DataType_BF16
    ctypedef struct XLA_FFI_Buffer:
        size_t struct_size
        XLA_FFI_DataType dtype
        void* data
        int64_t rank
        int64_t* dims
    ctypedef enum XLA_FFI_ArgType:
        XLA_FFI_ArgType_BUFFER
    ctypedef enum XLA_FFI_RetType:
        XLA_FFI_RetType_BUFFER
    ctypedef enum XLA_FFI_AttrType:
        XLA_FFI_AttrType_SCALAR
    ctypedef struct XLA_FFI_ByteSpan:
        const char* ptr
        size_t len
    ctypedef struct XLA_FFI_Scalar:
        XLA_FFI_DataType dtype
        void* value
    ctypedef enum XLA_FFI_ExecutionStage:
        XLA_FFI_ExecutionStage_EXECUTE
    ctypedef struct XLA_FFI_Args:
        int64_t size
        XLA_FFI_ArgType* types
        void** args
    ctypedef struct XLA_FFI_Rets:
        int64_t size
        XLA_FFI_RetType* types
        void** rets
    ctypedef struct XLA_FFI_Attrs:
        int64_t size
        XLA_FFI_AttrType* types
        XLA_FFI_ByteSpan** names
        void** attrs
    ctypedef struct XLA_FFI_Api:
        size_t struct_size
        XLA_FFI_Api_Version api_version
        XLA_FFI_Error_Create XLA_FFI_Error_Create
    ctypedef struct XLA_FFI_CallFrame:
        size_t struct_size
        XLA_FFI_Extension_Base* extension_start
        const XLA_FFI_Api* api
        XLA_FFI_ExecutionStage stage
        XLA_FFI_Args args
        XLA_FFI_Rets rets
        XLA_FFI_Attrs attrs
    ctypedef struct XLA_FFI_Metadata:
        size_t struct_size
        XLA_FFI_Api_Version api_version
        unsigned int traits
    ctypedef struct XLA_FFI_Metadata_Extension:
        XLA_FFI_Extension_Base extension_base
        XLA_FFI_Metadata* metadata


# The name fastadam.jax registers the handler under, and the attributes it reads: the
# fields of Hyper (fastadam._kernels.pxd) that a Hyperparameters record fills, and the
# call's own (see the module docstring). Every attribute must be present, of its type,
# exactly once.
TARGET_NAME = "fastadam_adam"
cdef enum:
    N_ATTRIBUTES = 15
    MESSAGE_SIZE = 256


cdef struct CallAttributes:
    # The attributes that belong to the call rather than to Hyper.
    int num_threads
    bint traced_lr
    bint increment_count
    int64_t decayed_leaves


cdef XLA_FFI_Error* _error(const XLA_FFI_CallFrame* frame, XLA_FFI_Error_Code code,
                           const char* message) noexcept nogil:
    cdef XLA_FFI_Error_Create_Args args
    args.struct_size = FA_ERROR_CREATE_ARGS_SIZE
    args.extension_start = NULL
    args.message = message
    args.errc = code
    return frame.api.XLA_FFI_Error_Create(&args)


cdef XLA_FFI_Error* _metadata(XLA_FFI_CallFrame* frame) noexcept nogil:
    """Answer XLA's registration-time question: the FFI API version this handler was
    written against (XLA refuses the registration if it does not support it). The call
    frame of this question carries no API table, so a malformed request can only be left
    unanswered: XLA then sees version 0.0 and refuses."""
    cdef XLA_FFI_Metadata_Extension* ext = <XLA_FFI_Metadata_Extension*>frame.extension_start
    if (ext.extension_base.struct_size < FA_METADATA_EXTENSION_SIZE or ext.metadata == NULL
            or ext.metadata.struct_size < FA_METADATA_SIZE):
        return NULL
    ext.metadata.api_version.struct_size = FA_API_VERSION_SIZE
    ext.metadata.api_version.extension_start = NULL
    ext.metadata.api_version.major_version = FA_XLA_FFI_API_MAJOR
    ext.metadata.api_version.minor_version = FA_XLA_FFI_API_MINOR
    ext.metadata.traits = 0
    return NULL


cdef bint _named(const XLA_FFI_ByteSpan* name, const char* expected) noexcept nogil:
    cdef size_t n = strlen(expected)
    return name.len == n and memcmp(name.ptr, expected, n) == 0


cdef int _read_attributes(const XLA_FFI_Attrs* attrs, Hyper* h, CallAttributes* call,
                          char* message) noexcept nogil:
    """Fill ``h`` and ``call`` from the call's attributes; -1 (with ``message`` set) if
    one is missing, repeated, unknown or of another type."""
    cdef int64_t i
    cdef int k, seen = 0
    cdef const XLA_FFI_Scalar* s
    cdef const XLA_FFI_ByteSpan* name
    cdef double* doubles[6]
    cdef bint* flags[4]
    cdef const char* double_names[6]
    cdef const char* flag_names[4]
    doubles[:] = [&h.lr, &h.beta1, &h.beta2, &h.eps, &h.weight_decay, &h.eps_root]
    double_names[:] = [b"lr", b"beta1", b"beta2", b"eps", b"weight_decay", b"eps_root"]
    flags[:] = [&h.decoupled_weight_decay, &h.amsgrad, &h.maximize, &h.eps_hat]
    flag_names[:] = [b"decoupled_weight_decay", b"amsgrad", b"maximize", b"eps_hat"]
    for i in range(attrs.size):
        name = attrs.names[i]
        s = <const XLA_FFI_Scalar*>attrs.attrs[i]
        if attrs.types[i] != XLA_FFI_AttrType_SCALAR:
            snprintf(message, MESSAGE_SIZE, "fastadam_adam: attribute %.*s is not a scalar",
                     <int>name.len, name.ptr)
            return -1
        k = _attribute_index(name, double_names, flag_names)
        if k < 0 or seen & (1 << k) or s.dtype != (
                XLA_FFI_DataType_F64 if k < 6 else XLA_FFI_DataType_PRED if k < 10 or k >= 12
                and k != 13 else XLA_FFI_DataType_S64 if k == 13 else XLA_FFI_DataType_S32):
            snprintf(message, MESSAGE_SIZE,
                     "fastadam_adam: unknown, repeated or mistyped attribute %.*s",
                     <int>name.len, name.ptr)
            return -1
        seen |= 1 << k
        if k < 6:
            doubles[k][0] = (<const double*>s.value)[0]
        elif k < 10:
            flags[k - 6][0] = (<const unsigned char*>s.value)[0] != 0
        elif k == 10:
            h.numerics = (<const int32_t*>s.value)[0]
        elif k == 11:
            call.num_threads = (<const int32_t*>s.value)[0]
        elif k == 12:
            call.traced_lr = (<const unsigned char*>s.value)[0] != 0
        elif k == 13:
            call.decayed_leaves = (<const int64_t*>s.value)[0]
        else:
            call.increment_count = (<const unsigned char*>s.value)[0] != 0
    if seen != (1 << N_ATTRIBUTES) - 1:
        snprintf(message, MESSAGE_SIZE, "fastadam_adam: expected %d attributes",
                 <int>N_ATTRIBUTES)
        return -1
    return 0


cdef int _attribute_index(const XLA_FFI_ByteSpan* name, const char** double_names,
                          const char** flag_names) noexcept nogil:
    """0-5: a double of Hyper, 6-9: a flag of Hyper, 10: numerics, 11: num_threads,
    12: traced_lr, 13: decayed_leaves, 14: increment_count."""
    cdef int k
    for k in range(6):
        if _named(name, double_names[k]):
            return k
    for k in range(4):
        if _named(name, flag_names[k]):
            return 6 + k
    if _named(name, b"numerics"):
        return 10
    if _named(name, b"num_threads"):
        return 11
    if _named(name, b"traced_lr"):
        return 12
    if _named(name, b"decayed_leaves"):
        return 13
    if _named(name, b"increment_count"):
        return 14
    return -1


cdef int64_t _elements(const XLA_FFI_Buffer* b) noexcept nogil:
    cdef int64_t i, n = 1
    for i in range(b.rank):
        n *= b.dims[i]
    return n


cdef int _element_type(XLA_FFI_DataType dtype) noexcept nogil:
    """The kernels' ELEM_* of an XLA element type, or -1 for one they do not store."""
    if dtype == XLA_FFI_DataType_F32:
        return ELEM_F32
    if dtype == XLA_FFI_DataType_F64:
        return ELEM_F64
    if dtype == XLA_FFI_DataType_BF16:
        return ELEM_BF16
    if dtype == XLA_FFI_DataType_F16:
        return ELEM_F16
    return -1


cdef int _record(AdamTensor* t, const XLA_FFI_Buffer* param, const XLA_FFI_Buffer* grad,
                 const XLA_FFI_Buffer* exp_avg, const XLA_FFI_Buffer* exp_avg_sq,
                 const XLA_FFI_Buffer* max_exp_avg_sq) noexcept nogil:
    """One leaf's record: XLA's dense row-major buffers of one float dtype (float32,
    float64, bfloat16 or float16: pure 16-bit, no master copy) and one
    element count (fastadam.jax checks this when it traces; here it is checked again
    because a mismatch would be an out-of-bounds write). 0, or -1 if they do not match.
    The one place that knows AdamTensor's fields."""
    cdef int64_t size = _elements(param)
    cdef const XLA_FFI_Buffer* state[3]
    cdef int k, element_type = _element_type(param.dtype)
    state[:] = [exp_avg, exp_avg_sq, max_exp_avg_sq]
    if element_type < 0:
        return -1
    if grad.dtype != param.dtype or _elements(grad) != size:
        return -1
    for k in range(3):
        if state[k] != NULL and (state[k].dtype != param.dtype or _elements(state[k]) != size):
            return -1
    t.param = <char*>param.data
    t.grad = <const char*>grad.data
    t.exp_avg = <char*>exp_avg.data
    t.exp_avg_sq = <char*>exp_avg_sq.data
    t.max_exp_avg_sq = NULL if max_exp_avg_sq == NULL else <char*>max_exp_avg_sq.data
    t.model_param = NULL  # no master weights
    t.size = <Py_ssize_t>size
    t.param_type = element_type
    t.grad_type = t.state_type = t.model_type = t.param_type
    t.stochastic = False
    t.rounding_key = 0
    return 0


cdef int _read_count(const XLA_FFI_Buffer* count, const XLA_FFI_Buffer* out,
                     int64_t* value) noexcept nogil:
    """The step count: an int32 or int64 scalar, >= 0 and below its type's maximum (so
    that count + 1 is written back exactly), aliased to its result."""
    if count.rank != 0 or out.data != count.data or out.dtype != count.dtype:
        return -1
    if count.dtype == XLA_FFI_DataType_S32:
        value[0] = (<const int32_t*>count.data)[0]
        return 0 if 0 <= value[0] < INT32_MAX else -1
    if count.dtype == XLA_FFI_DataType_S64:
        value[0] = (<const int64_t*>count.data)[0]
        return 0 if 0 <= value[0] < INT64_MAX else -1
    return -1


cdef int _read_lr(const XLA_FFI_Buffer* lr, Hyper* h) noexcept nogil:
    """The traced learning rate: a float32 or float64 scalar, finite and >= 0."""
    if lr.rank != 0:
        return -1
    if lr.dtype == XLA_FFI_DataType_F32:
        h.lr = (<const float*>lr.data)[0]
    elif lr.dtype == XLA_FFI_DataType_F64:
        h.lr = (<const double*>lr.data)[0]
    else:
        return -1
    return 0 if isfinite(h.lr) and h.lr >= 0.0 else -1


cdef bint _fits_float32(const Coefficients* c) noexcept nogil:
    """Are the coefficients a traced learning rate gives finite in float32? (The
    validation layer's check_element_type_range, for a value known only now.)"""
    return fabs(c.step_coef) <= FLT_MAX and fabs(c.param_scale) <= FLT_MAX


cdef XLA_FFI_Error* _adam(XLA_FFI_CallFrame* frame) noexcept nogil:
    """The handler: see the module docstring for its operands."""
    cdef char message[MESSAGE_SIZE]
    cdef Hyper h
    cdef CallAttributes call
    cdef int64_t i, n, k, first, count = 0
    cdef int64_t blocks
    cdef Coefficients coef[2]  # with weight decay, and without (leaves past decayed_leaves)
    cdef AdamTensor* tensors
    cdef const XLA_FFI_Buffer** args
    cdef const XLA_FFI_Buffer** rets
    cdef int status
    cdef bint float32 = False
    call.num_threads, call.traced_lr, call.decayed_leaves = 1, False, 0  # all set, or refused
    call.increment_count = False
    if frame.extension_start != NULL and frame.extension_start.type == XLA_FFI_Extension_Metadata:
        return _metadata(frame)
    # (XLA checked the major version when it registered the handler: the API table's
    # head, which reports errors, has the same layout in every 0.x version.)
    if frame.struct_size < FA_CALL_FRAME_SIZE or frame.api.struct_size < FA_API_SIZE:
        return _error(frame, XLA_FFI_Error_Code_FAILED_PRECONDITION,
                      b"fastadam_adam: XLA's FFI call frame is smaller than API 0.1's")
    if frame.stage != XLA_FFI_ExecutionStage_EXECUTE:
        return _error(frame, XLA_FFI_Error_Code_FAILED_PRECONDITION,
                      b"fastadam_adam: registered for the execute stage only")
    if _read_attributes(&frame.attrs, &h, &call, message) != 0:
        return _error(frame, XLA_FFI_Error_Code_INVALID_ARGUMENT, message)
    blocks = 5 if h.amsgrad else 4  # params, grads, mu, nu (, nu_max)
    first = 2 if call.traced_lr else 1  # the first param's operand
    n = (frame.args.size - first) // blocks
    if (frame.args.size != first + blocks * n or frame.rets.size != 1 + (blocks - 1) * n
            or call.num_threads < 1 or not 0 <= call.decayed_leaves <= n):
        return _error(frame, XLA_FFI_Error_Code_INVALID_ARGUMENT,
                      b"fastadam_adam: wrong number of operands or results")
    args = <const XLA_FFI_Buffer**>frame.args.args
    rets = <const XLA_FFI_Buffer**>frame.rets.rets
    for i in range(frame.args.size):
        if frame.args.types[i] != XLA_FFI_ArgType_BUFFER or args[i].struct_size < FA_BUFFER_SIZE:
            return _error(frame, XLA_FFI_Error_Code_INVALID_ARGUMENT,
                          b"fastadam_adam: every operand must be a buffer")
    for i in range(frame.rets.size):
        if frame.rets.types[i] != XLA_FFI_RetType_BUFFER or rets[i].struct_size < FA_BUFFER_SIZE:
            return _error(frame, XLA_FFI_Error_Code_INVALID_ARGUMENT,
                          b"fastadam_adam: every result must be a buffer")
    if _read_count(args[0], rets[0], &count) != 0:
        return _error(frame, XLA_FFI_Error_Code_INVALID_ARGUMENT,
                      b"fastadam_adam: the step count must be an int32 or int64 scalar, "
                      b">= 0 and below its type's maximum, aliased to its result")
    if call.traced_lr and _read_lr(args[1], &h) != 0:
        return _error(frame, XLA_FFI_Error_Code_INVALID_ARGUMENT,
                      b"fastadam_adam: the learning rate must be a float32 or float64 scalar, "
                      b"finite and >= 0")
    # Every result is written in place: it must be its argument's buffer (the aliases
    # fastadam.jax declares). Anything else would leave a result unwritten.
    for k in range(blocks - 1):
        for i in range(n):
            if rets[1 + k * n + i].data != args[first + (k if k == 0 else k + 1) * n + i].data:
                return _error(frame, XLA_FFI_Error_Code_INVALID_ARGUMENT,
                              b"fastadam_adam: a result is not aliased to its operand")
    tensors = <AdamTensor*>malloc(max(n, 1) * sizeof(AdamTensor))
    if tensors == NULL:
        return _error(frame, XLA_FFI_Error_Code_RESOURCE_EXHAUSTED,
                      b"fastadam_adam: out of memory")
    fill_coefficients(&coef[0], &h, <double>(count + 1), 1.0)
    h.weight_decay = 0.0
    fill_coefficients(&coef[1], &h, <double>(count + 1), 1.0)
    for i in range(n):
        if _record(&tensors[i], args[first + i], args[first + n + i], args[first + 2 * n + i],
                   args[first + 3 * n + i], args[first + 4 * n + i] if h.amsgrad else NULL) != 0:
            free(tensors)
            snprintf(message, MESSAGE_SIZE, "fastadam_adam: leaf %lld: param, grad and state "
                     "must have one dtype (float32, float64, bfloat16 or float16) and one "
                     "element count",
                     <long long>i)
            return _error(frame, XLA_FFI_Error_Code_INVALID_ARGUMENT, message)
        tensors[i].coef = coef[0 if i < call.decayed_leaves else 1]
        # (16-bit leaves compute in float32 too)
        float32 = float32 or args[first + i].dtype != XLA_FFI_DataType_F64
    if call.traced_lr and float32 and not (_fits_float32(&coef[0]) and _fits_float32(&coef[1])):
        free(tensors)
        snprintf(message, MESSAGE_SIZE, "fastadam_adam: the learning rate %.9g makes the step "
                 "coefficient or the decay factor overflow float32, the params' math type",
                 h.lr)
        return _error(frame, XLA_FFI_Error_Code_INVALID_ARGUMENT, message)
    status = run_tensors(tensors, n, call.num_threads)
    free(tensors)
    if status != 0:
        return _error(frame, XLA_FFI_Error_Code_RESOURCE_EXHAUSTED,
                      b"fastadam_adam: could not allocate the chunk table")
    if call.increment_count:
        _write_count(rets[0], count + 1)
    return NULL


cdef void _write_count(const XLA_FFI_Buffer* out, int64_t value) noexcept nogil:
    if out.dtype == XLA_FFI_DataType_S32:
        (<int32_t*>out.data)[0] = <int32_t>value
    else:
        (<int64_t*>out.data)[0] = value


def handler():
    """The handler as a PyCapsule, for ``jax.ffi.register_ffi_target``."""
    return PyCapsule_New(<void*>_adam, NULL, NULL)


def api_version():
    """(major, minor): the XLA FFI API version the handler declares."""
    return FA_XLA_FFI_API_MAJOR, FA_XLA_FFI_API_MINOR


def hyper_attributes(record, int num_threads, bint traced_lr, int64_t decayed_leaves,
                     bint increment_count):
    """The call's attributes for a validated Hyperparameters record: read into C by
    fastadam._kernels.hyper_from_record (the one reader of the record), then named after
    Hyper's fields, as NumPy scalars of the types the handler reads; and the call's own
    (see the module docstring)."""
    cdef Hyper h
    hyper_from_record(&h, record)
    return {
        "lr": np.float64(h.lr), "beta1": np.float64(h.beta1), "beta2": np.float64(h.beta2),
        "eps": np.float64(h.eps), "weight_decay": np.float64(h.weight_decay),
        "eps_root": np.float64(h.eps_root),
        "decoupled_weight_decay": np.bool_(h.decoupled_weight_decay),
        "amsgrad": np.bool_(h.amsgrad), "maximize": np.bool_(h.maximize),
        "eps_hat": np.bool_(h.eps_hat), "numerics": np.int32(h.numerics),
        "num_threads": np.int32(num_threads), "traced_lr": np.bool_(traced_lr),
        "decayed_leaves": np.int64(decayed_leaves), "increment_count": np.bool_(increment_count),
    }
